"""Turn a PgBouncer configuration (pgbouncer.ini) into the equivalent pgmp.toml.

``parse_ini`` reads the ini as PgBouncer's loader does into an ``Ini``;
``convert`` maps it onto pgmp's settings and returns the TOML text and a list
of ``Note``. Neither touches the file system: included files and the hba file
come through a ``read_text`` callable, listen_addr host names through
``resolve``. ``import_ini`` wires them to the system and checks the result as
``pgmp config check`` does; ``write_output`` writes it. ``pgmp config import``
is these four calls.

How PgBouncer reads the file, and so how this module reads it:

- Lines whose first non-blank character is ``;`` or ``#`` are comments; the
  characters mean nothing later in a line (``pool_mode = session ; x`` is the
  value ``session ; x``, which PgBouncer refuses).
- ``[name]`` starts a section: pgbouncer, databases, users or peers, nothing
  else. Each ``[pgbouncer]`` header sets every [pgbouncer] setting back to its
  default, also the ones an earlier [pgbouncer] section (or included file) set.
- ``key = value``: the key is letters, digits and ``_.-*``, or anything between
  single quotes; the value is the rest of the line without the blanks around
  it. Values are not unquoted: ``auth_file = "x"`` names a file with quotes in
  its name. Numbers are C's strtol: ``0777`` is octal, ``0x10`` hex; durations
  are seconds, fractions allowed; booleans are integers (0 is false).
- ``%include FILE`` reads FILE in place, in the current section. A relative
  FILE is taken from PgBouncer's working directory (``/`` under systemd), not
  from the including file's directory: relative paths here are resolved against
  ``relative_to`` (default: the ini's directory), and a note says so. Includes
  nest at most 10 deep; a file that includes itself is refused.
- [databases] and [users] values, and [peers], are ``key=value`` lists separated
  by spaces (not tabs). A value in single quotes may hold spaces, ``''`` is a
  quote; a backslash is an ordinary character. PgBouncer drops the character
  right after a closing quote, whatever it is. Empty values are refused. Their
  numbers are C's atoi: ``pool_size=12x`` is 12.
- ``*`` in [databases] is the fallback for any database name; a database
  without ``host`` is reached over the unix socket in [pgbouncer]'s
  unix_socket_dir.

Exit statuses of ``pgmp config import``: 0 everything was carried over (the
output passes ``pgmp config check``); 1 something could not be carried over
safely (the output starts with ``unresolved_import_notes = N``, which pgmp
refuses, so it cannot be used by accident before each line marked NOT CARRIED
OVER is resolved); 2 nothing was written (unreadable or invalid input, or the
output exists and --force was not given).

Decision table. *same*: a pgmp setting of the same meaning, values converted
(0/1 to booleans, strtol numbers to integers, relative paths to absolute ones).
*note*: no pgmp equivalent and none needed; written as a ``# pgbouncer: ...``
comment where it stood, exit 0. *UNSAFE*: pgmp cannot do what the setting asks,
and running without it would change who gets in, what is encrypted, where
connections go, what a session sees, or a limit the operator set; written as a
``# NOT CARRIED OVER`` comment, exit 1. Settings not in the file get
PgBouncer's default where pgmp's differs (marked below with "unset").

[pgbouncer]
  listen_addr          same; host names resolved now (PgBouncer resolves them at start);
                       unset -> "" (PgBouncer: unix socket only; pgmp's default is 127.0.0.1)
  listen_port, pool_mode, default_pool_size, max_db_connections, max_user_connections,
  auth_user, auth_dbname, server_reset_query, server_reset_query_always, server_check_delay,
  server_idle_timeout, server_connect_timeout, server_login_retry, client_login_timeout,
  query_timeout, query_wait_timeout, cancel_wait_timeout, client_idle_timeout,
  idle_transaction_timeout, max_prepared_statements, application_name_add_host,
  track_extra_parameters, tcp_keepalive, log_connections, log_disconnections,
  logfile, pidfile, auth_file, client_tls_{cert,key,ca}_file, server_tls_{ca,cert,key}_file
                       same
  max_client_conn      same; unset -> 100 (pgmp's default is 1000)
  unix_socket_dir      same; "@name" (abstract namespace) UNSAFE
  unix_socket_mode     same, as an octal string; above 0777 UNSAFE
  auth_type            trust, md5, scram-sha-256 same; plain -> password; hba -> hba_file
                       (auth_type then only says an auth_file is needed); unset -> md5;
                       cert, any, ldap, pam UNSAFE
  auth_file            same; unset -> /dev/null (PgBouncer without an auth_file lets no
                       user in, also with trust; pgmp's trust without one lets every name in)
  auth_hba_file        hba_file when auth_type = hba, after reading it with pgmp's parser:
                       a file pgmp cannot read (peer, @file, ...) or a rule with map= UNSAFE;
                       note (ignored, as PgBouncer ignores it) with another auth_type;
                       auth_type = hba without it UNSAFE
  auth_ident_file      note; UNSAFE when an hba rule uses map=
  auth_query           same (pgmp's default is PgBouncer's, every name schema-qualified)
  min_pool_size        same, capped at the pool size as PgBouncer caps it
  reserve_pool_size    same; 0 when reserve_pool_timeout = 0 (which disables the reserve
                       in PgBouncer, where pgmp would use it at once)
  reserve_pool_timeout same
  server_lifetime      same; 0 (PgBouncer: use a server once) -> 0.001
  server_check_query   same; "<empty>" (an empty query) -> ";"
  max_packet_size      max_message_size; above 1 GB note (pgmp's and PostgreSQL's limit);
                       below 1 kB UNSAFE
  verbose              log_level = "debug" when above 0
  client_tls_sslmode   client_tls_mode
  client_tls_protocols client_tls_min_version; TLS 1.0/1.1 note (pgmp refuses them:
                       stricter); a list pgmp's minimum cannot express UNSAFE
  client_tls_ciphers   same; PgBouncer's keywords (default, secure, fast, normal) -> ""
  server_tls_sslmode   server_tls_mode; allow -> prefer; unset -> prefer (PgBouncer 1.20's
                       default; pgmp's is disable)
  server_tls_protocols note when it allows TLS 1.2 (pgmp's minimum for servers); else UNSAFE
  server_tls_ciphers   note for the keywords; a cipher list UNSAFE (pgmp has no such setting)
  client_tls13_ciphers, server_tls13_ciphers    UNSAFE when set
  admin_users, stats_users   same when pgmp's schema has them; else note (they take effect
                       once pgmp has its admin console)
  disable_pqexec       UNSAFE when 1 (pgmp cannot refuse the simple query protocol)
  transaction_timeout, max_db_client_connections, max_user_client_connections
                       UNSAFE when not 0
  unix_socket_group, user, resolv_conf   UNSAFE when set
  auth_ldap_options, autodb_idle_timeout, client_tls_dheparams, client_tls_ecdhcurve,
  conffile, dns_max_ttl, dns_nxdomain_ttl, dns_zone_check_period,
  ignore_startup_parameters, job_name, service_name, listen_backlog, log_pooler_errors,
  log_stats, login_notify_message, peer_id, pkt_buf, pool_idle_timeout, query_wait_notify,
  sbuf_loopcnt, scram_iterations, server_fast_close, server_round_robin, so_reuseport,
  stats_period, suspend_timeout, syslog, syslog_facility, syslog_ident, tcp_defer_accept,
  tcp_socket_buffer, tcp_keepcnt, tcp_keepidle, tcp_keepintvl, tcp_user_timeout
                       note
  anything else        UNSAFE (unknown to this importer; PgBouncer refuses unknown keys)
  (unset) workers      1: PgBouncer is one process; pgmp splits every pool size and connection
                       limit across its workers (a note says how many the smallest allows)
[databases]
  dbname, user, password, auth_dbname, pool_size, pool_mode, connect_query,
  application_name     same (connect_query: pgmp counts its failure as a failed login)
  max_db_connections   same; 0 is PgBouncer's "not set" here: nothing
  host                 same; unset -> unix_socket_dir; a host list -> a list, with
                       load_balance_hosts (PgBouncer's default round-robin, or disable);
                       "@name", or no host and no unix_socket_dir, UNSAFE (section left out)
  port                 same
  min_pool_size, reserve_pool / reserve_pool_size    same, as in [pgbouncer]
  auth_user, auth_query    same as [pgbouncer]'s: nothing to write; different UNSAFE
  query_wait_timeout   same as [pgbouncer]'s: nothing; different UNSAFE
  server_lifetime      note (pgmp has one server_lifetime)
  load_balance_hosts   with a host list: same; else a note
  client_encoding, datestyle, timezone, max_db_client_connections (not 0)    UNSAFE
  the name "pgbouncer" UNSAFE (the admin console's name in PgBouncer and pgmp)
[users]
  pool_mode, max_user_connections      same (max_user_connections 0: not set, nothing)
  pool_size, reserve_pool_size, query_timeout, idle_transaction_timeout,
  transaction_timeout, query_wait_timeout, client_idle_timeout
                       same as the instance-wide value: nothing; different UNSAFE (a pool size
                       also when a database sets its own, which the user's wins over in PgBouncer)
  max_user_client_connections          UNSAFE when not 0
[peers]                UNSAFE when it lists peers (pgmp forwards cancels among its own workers,
                       not to other processes or hosts)
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_INCLUDE_DEPTH = 10                 # PgBouncer's include nesting limit
SECTIONS = ("pgbouncer", "databases", "users", "peers")
BLOCKER = "unresolved_import_notes"    # a key pgmp refuses: an unsafe import cannot be used by accident
CHECK = "pgmp config check"            # the subject of what pgmp's own check of the result found
GB, KB = 1024 ** 3, 1024
_SPACE = " \t\n\r\v\f"                 # C's isspace
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-*")
_CIPHER_KEYWORDS = ("default", "secure", "normal", "fast")
_TLS_VERSIONS = ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_POOL_MODES = ("session", "transaction", "statement")
_AUTH_TYPES = ("any", "trust", "plain", "md5", "cert", "hba", "ldap", "pam", "scram-sha-256")


class InvalidIni(Exception):
    """The ini cannot be read, or PgBouncer would refuse it; str() has one problem a line."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Entry:
    """One ``key = value`` line, and where it is ("file:line")."""

    key: str
    value: str
    where: str


@dataclass(frozen=True)
class Note:
    """Something the operator should know about the import; ``unsafe`` ones make it exit 1."""

    where: str
    subject: str
    text: str
    unsafe: bool = False

    def __str__(self) -> str:
        mark = "NOT CARRIED OVER: " if self.unsafe else ""
        return f"{self.where}: {mark}{self.subject}: {self.text}"


@dataclass
class Ini:
    """What PgBouncer would load: the last value of each key per section, in file order."""

    path: str
    base: str                                     # directory relative paths are taken from
    files: list[str] = field(default_factory=list)
    sections: dict[str, dict[str, Entry]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    notes: list[Note] = field(default_factory=list)


# ----------------------------------------------------------------- reading the ini

def resolve_path(base: str, value: str) -> str:
    """A path as PgBouncer opens it, relative ones taken from ``base``."""
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


class _IniReader:
    """PgBouncer's ini loader, over text handed in by ``read_text``."""

    def __init__(self, path: str, base: str, read_text: Callable[[str], str]):
        self.ini = Ini(path=path, base=base)
        self.read_text = read_text
        self.section: str | None = None
        self.saw_main = False

    def read(self) -> Ini:
        self.file(self.ini.path, [], None)
        if not self.saw_main:
            raise InvalidIni([f"{self.ini.path}: no [pgbouncer] section (PgBouncer refuses a file without one)"])
        return self.ini

    def file(self, path: str, stack: list[str], included_at: str | None) -> None:
        real = os.path.normpath(path)
        if real in stack:
            chain = " -> ".join([*stack, real])
            raise InvalidIni([f"{included_at}: %include loop: {chain}"])
        if len(stack) > MAX_INCLUDE_DEPTH:
            raise InvalidIni([f"{included_at}: %include nested more than {MAX_INCLUDE_DEPTH} deep "
                              "(PgBouncer's limit)"])
        try:
            text = self.read_text(path)
        except OSError as exc:
            what = "cannot read the included file" if included_at else "cannot read"
            raise InvalidIni([f"{included_at or path}: {what} {path}: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError as exc:
            line = exc.object[:exc.start].count(b"\n") + 1
            raise InvalidIni([f"{path}:{line}: not UTF-8 (pgmp.toml must be)"]) from None
        if "\0" in text:
            raise InvalidIni([f"{path}:{text[:text.index(chr(0))].count(chr(10)) + 1}: NUL character"])
        self.ini.files.append(path)
        self.lines(text, path, [*stack, real])

    def lines(self, text: str, path: str, stack: list[str]) -> None:
        i, n = 0, len(text)

        def where(pos: int) -> str:
            return f"{path}:{text.count(chr(10), 0, pos) + 1}"

        while True:
            while i < n and text[i] in _SPACE:
                i += 1
            if i >= n:
                return
            eol = text.find("\n", i)
            eol = n if eol < 0 else eol
            if text.startswith("%include", i) and i + 8 < n and text[i + 8] in " \t":
                name = text[i + 8:eol].strip(_SPACE)
                self.include(name, where(i), stack)
                i = eol
            elif text[i] in "#;":
                i = eol
            elif text[i] == "[":
                close = text.find("]", i + 1, eol)
                if close < 0:
                    raise InvalidIni([f"{where(i)}: syntax error: no ] after ["])
                self.start_section(text[i + 1:close], where(i))
                i = close + 1                     # the rest of the line is read on as PgBouncer does
            else:
                i = self.key_value(text, i, eol, where)

    def key_value(self, text: str, i: int, eol: int, where) -> int:
        at = where(i)
        if text[i] == "'":
            close = text.find("'", i + 1)
            if close < 0 or close == i + 1:
                raise InvalidIni([f"{at}: syntax error: a quoted name needs a closing ' and one character"])
            key, j = text[i + 1:close], close + 1
            eol = text.find("\n", j)               # a quoted name may span lines, as in PgBouncer
            eol = len(text) if eol < 0 else eol
        else:
            j = i
            while j < eol and text[j] in _KEY_CHARS:
                j += 1
            key = text[i:j]
        while j < eol and text[j] in " \t":
            j += 1
        if j >= eol or text[j] != "=" or not key:
            shown = text[i:eol].strip()
            raise InvalidIni([f"{at}: syntax error: expected name = value, got {shown!r}"
                              + (" (names with other characters go in single quotes)" if key else "")])
        value = text[j + 1:eol].strip(_SPACE)
        self.set(key, value, at)
        return eol

    def include(self, name: str, at: str, stack: list[str]) -> None:
        if not name:
            raise InvalidIni([f"{at}: no file name after %include"])
        path = resolve_path(self.ini.base, name)
        if not os.path.isabs(name):
            self.ini.notes.append(Note(at, f"%include {name}", f"read {path}: PgBouncer takes a relative "
                                       "file from its working directory; this import takes it from "
                                       f"{self.ini.base} (--relative-to)"))
        self.file(path, stack, at)

    def start_section(self, name: str, at: str) -> None:
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise InvalidIni([f"{at}: invalid section [{name}] (PgBouncer knows [pgbouncer], [databases], "
                              f"[users] and [peers]){hint}"])
        self.section = name
        if name == "pgbouncer":
            self.saw_main = True
            settings = self.ini.sections["pgbouncer"]
            for entry in settings.values():
                self.ini.notes.append(Note(entry.where, entry.key, f"reset to PgBouncer's default by the "
                                           f"[pgbouncer] header at {at} (each such header resets every "
                                           "[pgbouncer] setting); not carried over"))
            settings.clear()

    def set(self, key: str, value: str, at: str) -> None:
        if self.section is None:
            raise InvalidIni([f"{at}: {key} = ... before any [section]"])
        entries = self.ini.sections[self.section]
        old = entries.pop(key, None)
        if old is not None:
            self.ini.notes.append(Note(old.where, key, f"set again at {at}; the later value wins"))
        entries[key] = Entry(key, value, at)


def parse_ini(path: str, read_text: Callable[[str], str], relative_to: str | None = None) -> Ini:
    """Read the ini at ``path`` (and its includes) through ``read_text``; InvalidIni when PgBouncer would refuse it."""
    base = relative_to if relative_to is not None else os.path.dirname(path) or "."
    return _IniReader(path, base, read_text).read()


def parse_connstr(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The key=value pairs of a [databases]/[users]/[peers] value as PgBouncer splits them, and warnings.

    ValueError says what is wrong.
    """
    pairs: list[tuple[str, str]] = []
    warnings: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            return pairs, warnings
        start = i
        while i < n and text[i] not in "= ":
            i += 1
        key = text[start:i]
        while i < n and text[i] == " ":
            i += 1
        if i >= n or text[i] != "=" or not key:
            raise ValueError(f"expected key=value at {text[start:]!r}")
        i += 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "'":
            chars, i = [], i + 1
            while True:
                if i >= n:
                    raise ValueError(f"{key}: no closing quote")
                if text[i] == "'" and text.startswith("''", i):
                    chars.append("'")
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    chars.append(text[i])
                    i += 1
            value = "".join(chars)
            if i < n and text[i] != " ":
                warnings.append(f"{key}: PgBouncer drops the {text[i]!r} right after the closing quote")
        else:
            start = i
            while i < n and text[i] != " ":
                i += 1
            value = text[start:i]
        i += 1                                    # the character after a value is cut off
        if not value:
            raise ValueError(f"{key}: empty value")
        pairs.append((key, value))


# ----------------------------------------------------------------- PgBouncer's values

def _strtol(text: str) -> int:
    """C's strtol(text, &end, 0) over the whole string: sign, 0x hex, 0 octal, decimal."""
    m = re.fullmatch(r"[ \t\n\r\v\f]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        raise ValueError("expected an integer")
    digits = m[2]
    if digits[:2].lower() == "0x":
        n = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        n = int(digits, 8)
    else:
        n = int(digits)
    return -n if m[1] == "-" else n


def _atoi(text: str) -> int:
    """C's atoi: leading blanks, a sign and the digits that follow; 0 when there are none."""
    m = re.match(r"[ \t\n\r\v\f]*([+-]?[0-9]+)", text)
    return int(m[1]) if m else 0


def _seconds(text: str) -> float:
    """A PgBouncer duration: a non-negative number of seconds (C's strtod)."""
    if not re.fullmatch(r"[ \t]*[+]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        raise ValueError("expected a number of seconds")
    return float(text)


def _number(seconds: float) -> int | float:
    return int(seconds) if seconds == int(seconds) else seconds


def _lookup(choices: tuple[str, ...]):
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text.lower()
    return parse


_KINDS: dict[str, Callable[[str], object]] = {
    "int": _strtol, "bool": lambda t: _strtol(t) != 0, "time": _seconds, "str": str, "path": str,
    "list": lambda t: [w.strip(_SPACE) for w in t.split(",") if w.strip(_SPACE)],
    "pool_mode": _lookup(_POOL_MODES), "sslmode": _lookup(_SSLMODES), "auth_type": _lookup(_AUTH_TYPES),
}

# PgBouncer's [pgbouncer] settings: name -> (how PgBouncer parses it, its default).
PGBOUNCER_SETTINGS: dict[str, tuple[str, object]] = {
    "admin_users": ("list", []), "application_name_add_host": ("bool", False), "auth_dbname": ("str", ""),
    "auth_file": ("path", ""), "auth_hba_file": ("path", ""), "auth_ident_file": ("path", ""),
    "auth_ldap_options": ("str", ""), "auth_query": ("str", ""), "auth_type": ("auth_type", "md5"),
    "auth_user": ("str", ""), "autodb_idle_timeout": ("time", 3600.0), "cancel_wait_timeout": ("time", 10.0),
    "client_idle_timeout": ("time", 0.0), "client_login_timeout": ("time", 60.0),
    "client_tls13_ciphers": ("str", ""), "client_tls_ca_file": ("path", ""), "client_tls_cert_file": ("path", ""),
    "client_tls_ciphers": ("str", "default"), "client_tls_dheparams": ("str", "auto"),
    "client_tls_ecdhcurve": ("str", "auto"), "client_tls_key_file": ("path", ""),
    "client_tls_protocols": ("str", "secure"), "client_tls_sslmode": ("sslmode", "disable"),
    "conffile": ("str", ""), "default_pool_size": ("int", 20), "disable_pqexec": ("bool", False),
    "dns_max_ttl": ("time", 15.0), "dns_nxdomain_ttl": ("time", 15.0), "dns_zone_check_period": ("time", 0.0),
    "idle_transaction_timeout": ("time", 0.0), "ignore_startup_parameters": ("list", []),
    "job_name": ("str", ""), "listen_addr": ("str", ""), "listen_backlog": ("int", 128),
    "listen_port": ("int", 6432), "log_connections": ("bool", True), "log_disconnections": ("bool", True),
    "log_pooler_errors": ("bool", True), "log_stats": ("bool", True), "logfile": ("path", ""),
    "login_notify_message": ("str", ""), "max_client_conn": ("int", 100), "max_db_client_connections": ("int", 0),
    "max_db_connections": ("int", 0), "max_packet_size": ("int", 2147483647),
    "max_prepared_statements": ("int", 200), "max_user_client_connections": ("int", 0),
    "max_user_connections": ("int", 0), "min_pool_size": ("int", 0), "peer_id": ("int", 0),
    "pidfile": ("path", ""), "pkt_buf": ("int", 4096), "pool_idle_timeout": ("time", 0.0),
    "pool_mode": ("pool_mode", "session"), "query_timeout": ("time", 0.0), "query_wait_notify": ("int", 5),
    "query_wait_timeout": ("time", 120.0), "reserve_pool_size": ("int", 0), "reserve_pool_timeout": ("time", 5.0),
    "resolv_conf": ("str", ""), "sbuf_loopcnt": ("int", 5), "scram_iterations": ("int", 4096),
    "server_check_delay": ("time", 30.0), "server_check_query": ("str", "<empty>"),
    "server_connect_timeout": ("time", 15.0), "server_fast_close": ("bool", False),
    "server_idle_timeout": ("time", 600.0), "server_lifetime": ("time", 3600.0),
    "server_login_retry": ("time", 15.0), "server_reset_query": ("str", "DISCARD ALL"),
    "server_reset_query_always": ("bool", False), "server_round_robin": ("bool", False),
    "server_tls13_ciphers": ("str", ""), "server_tls_ca_file": ("path", ""), "server_tls_cert_file": ("path", ""),
    "server_tls_ciphers": ("str", "default"), "server_tls_key_file": ("path", ""),
    "server_tls_protocols": ("str", "secure"), "server_tls_sslmode": ("sslmode", "prefer"),
    "service_name": ("str", ""), "so_reuseport": ("bool", False), "stats_period": ("int", 60),
    "stats_users": ("list", []), "suspend_timeout": ("time", 10.0), "syslog": ("bool", False),
    "syslog_facility": ("str", "daemon"), "syslog_ident": ("str", "pgbouncer"), "tcp_defer_accept": ("int", 1),
    "tcp_keepalive": ("bool", True), "tcp_keepcnt": ("int", 0), "tcp_keepidle": ("int", 0),
    "tcp_keepintvl": ("int", 0), "tcp_socket_buffer": ("int", 0), "tcp_user_timeout": ("int", 0),
    "track_extra_parameters": ("list", ["IntervalStyle"]), "transaction_timeout": ("time", 0.0),
    "unix_socket_dir": ("str", "/tmp"), "unix_socket_group": ("str", ""), "unix_socket_mode": ("int", 0o777),
    "user": ("str", ""), "verbose": ("int", 0),
}

# Settings pgmp has under the same name and with the same meaning.
_SAME = frozenset({
    "listen_port", "pool_mode", "max_client_conn", "default_pool_size", "max_db_connections",
    "max_user_connections", "auth_user", "auth_dbname", "auth_query", "server_reset_query",
    "server_reset_query_always", "server_check_delay", "server_idle_timeout", "server_connect_timeout",
    "server_login_retry", "client_login_timeout", "query_timeout", "query_wait_timeout", "cancel_wait_timeout",
    "client_idle_timeout", "idle_transaction_timeout", "max_prepared_statements", "application_name_add_host",
    "track_extra_parameters", "tcp_keepalive", "log_connections", "log_disconnections", "reserve_pool_timeout",
    "logfile", "pidfile", "client_tls_cert_file", "client_tls_key_file", "client_tls_ca_file",
    "server_tls_ca_file", "server_tls_cert_file", "server_tls_key_file",
})

_KERNEL = "pgmp leaves it to the kernel's defaults"
_LOGS = "pgmp logs to stderr (the journal under systemd) or to logfile"
_STATS = "pgmp keeps no periodic statistics in its log; pgmp stats shows them live"
# No pgmp equivalent and none needed: why.
_HARMLESS = {
    "auth_ldap_options": "only auth_type = ldap uses it",
    "autodb_idle_timeout": "pgmp keeps the pools of a \"*\" database like any other's; their idle servers "
                           "close after server_idle_timeout",
    "client_tls_dheparams": "pgmp's TLS uses Python's ssl defaults (ECDHE key exchange)",
    "client_tls_ecdhcurve": "pgmp's TLS uses Python's ssl defaults (ECDHE key exchange)",
    "conffile": "pgmp is told its file with -c",
    "dns_max_ttl": "pgmp has no DNS cache of its own",
    "dns_nxdomain_ttl": "pgmp has no DNS cache of its own",
    "dns_zone_check_period": "pgmp has no DNS cache of its own",
    "ignore_startup_parameters": "pgmp applies every startup parameter a client sends on each server it "
                                 "gets, so there is nothing to ignore",
    "job_name": "a Windows service name",
    "service_name": "a Windows service name",
    "listen_backlog": "pgmp listens with a backlog of 4096 (capped by net.core.somaxconn)",
    "log_pooler_errors": "pgmp logs what it refuses a client at info level (log_level)",
    "log_stats": _STATS,
    "stats_period": _STATS,
    "login_notify_message": "pgmp sends no notice at login",
    "peer_id": "pgmp forwards cancel requests among its own workers",
    "pkt_buf": "pgmp's buffer_size (64 kB) holds each read; larger messages stream through",
    "pool_idle_timeout": "an unused pgmp pool holds no server once server_idle_timeout has passed",
    "query_wait_notify": "pgmp sends no notice while a client waits for a server",
    "sbuf_loopcnt": "pgmp's relay works a transaction at a time",
    "scram_iterations": "pgmp uses the secrets in auth_file or from auth_query as they are",
    "server_fast_close": "pgmp closes servers marked by pgmp reconnect when their client session ends",
    "server_round_robin": "pgmp reuses the most recently used idle server, as PgBouncer's default",
    "so_reuseport": "pgmp always listens with SO_REUSEPORT, one socket per worker",
    "suspend_timeout": "pgmp has no SUSPEND; pgmp restart hands the sockets to a new master instead",
    "syslog": _LOGS, "syslog_facility": _LOGS, "syslog_ident": _LOGS,
    "tcp_defer_accept": _KERNEL, "tcp_socket_buffer": _KERNEL, "tcp_keepcnt": _KERNEL,
    "tcp_keepidle": _KERNEL, "tcp_keepintvl": _KERNEL, "tcp_user_timeout": _KERNEL,
}

# No pgmp equivalent, and unsafe to run without when set: why.
_UNSAFE_WHEN_SET = {
    "client_tls13_ciphers": "pgmp cannot restrict the TLS 1.3 cipher suites it offers clients",
    "server_tls13_ciphers": "pgmp cannot restrict the TLS 1.3 cipher suites it accepts from servers",
    "disable_pqexec": "pgmp cannot refuse the simple query protocol, so clients could send several "
                      "statements in one message again",
    "transaction_timeout": "pgmp has no transaction_timeout: transactions PgBouncer cut off would run on",
    "max_db_client_connections": "pgmp has no per-database limit on client connections (only max_client_conn)",
    "max_user_client_connections": "pgmp has no per-user limit on client connections (only max_client_conn)",
    "unix_socket_group": "pgmp cannot set the unix socket's group; give the same access with "
                         "unix_socket_mode and the directory's permissions",
    "user": "pgmp does not switch users: run it as that user (systemd: User=)",
    "resolv_conf": "pgmp uses the system's resolver, so host names could resolve to other servers",
}


def _admin_setting(name: str) -> bool:
    from pgmp import config
    return any(s.name == name and s.section == "pgmp" for s in config.SCHEMA)


# ----------------------------------------------------------------- TOML output

def toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def _count(n: int) -> str:
    return f"{n} setting" if n == 1 else f"{n} settings"


def _printable(text: str) -> str:
    """A value for a comment: one line, control characters escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _Table:
    """The lines of one TOML table as they are written."""

    def __init__(self, header: str | None, lines: list[str] | None = None):
        self.header = header                     # None: comments only, no table
        self.lines: list[str] = lines if lines is not None else []

    def set(self, key: str, value, comment: str | None = None) -> None:
        line = f"{toml_key(key)} = {toml_value(value)}"
        self.lines.append(f"{line}  # {_printable(comment)}" if comment else line)

    def comment(self, text: str) -> None:
        self.lines.append(f"# {_printable(text)}")

    def render(self) -> str:
        return "\n".join([*([f"[{self.header}]"] if self.header else []), *self.lines]) + "\n"


# ----------------------------------------------------------------- converting

@dataclass
class Converted:
    """The pgmp.toml tables and what the operator should know about them."""

    source: str
    files: list[str]
    tables: list[_Table]
    notes: list[Note]

    @property
    def unsafe(self) -> list[Note]:
        return [n for n in self.notes if n.unsafe]

    def in_file_order(self) -> list[Note]:
        """The notes by file and line (the whole-file ones last), as the operator reads the ini."""
        def key(note: Note):
            path, _, line = note.where.rpartition(":")
            if not line.isdigit():
                return (len(self.files), 0)
            return (self.files.index(path) if path in self.files else len(self.files), int(line))
        return sorted(self.notes, key=key)

    @property
    def toml(self) -> str:
        """The file: a header, then [pgmp] (led by the blocker line when something is unsafe), then the rest."""
        head = [f"# pgmp.toml imported from {_printable(self.source)} by pgmp config import"]
        head += [f"#   included: {_printable(f)}" for f in self.files[1:]]
        unsafe = len(self.unsafe)
        main, *rest = self.tables
        if unsafe:
            head += [f"# {_count(unsafe)} could not be carried over safely. pgmp refuses this file until",
                     f'# you resolve each "NOT CARRIED OVER" line and delete {BLOCKER} below.']
            head += [f"# NOT CARRIED OVER: {n.subject}: {_printable(n.text)}" for n in self.notes
                     if n.subject == CHECK]
            main = _Table(main.header, [f"{BLOCKER} = {unsafe}", *main.lines])
        return "\n".join(head) + "\n\n" + "\n".join(t.render() for t in [main, *rest])


class _Converter:
    """Maps one Ini onto pgmp's tables; see the module docstring's decision table."""

    def __init__(self, ini: Ini, read_text: Callable[[str], str], resolve: Callable[[str], list[str]]):
        self.ini, self.read_text, self.resolve = ini, read_text, resolve
        self.notes: list[Note] = list(ini.notes)
        self.errors: list[str] = []
        self.main = _Table("pgmp")
        self.tables: list[_Table] = []
        self.g = self.pgbouncer_values()
        # (server connection limit, where it is set): pgmp splits each across its workers
        self.limits: list[tuple[int, str]] = [
            (self.g[name], f"[pgbouncer] {name}") for name in
            ("default_pool_size", "max_db_connections", "max_user_connections") if self.g[name] > 0]

    # -- notes
    def note(self, where: str, subject: str, text: str, table: _Table | None = None, unsafe: bool = False):
        self.notes.append(Note(where, subject, text, unsafe))
        if table is not None:
            mark = "NOT CARRIED OVER: " if unsafe else ""
            table.comment(f"{mark}pgbouncer: {subject} — {text}")

    def skip(self, e: Entry, text: str, table: _Table, unsafe: bool = False, shown: str | None = None):
        self.note(e.where, f"{e.key} = {e.value if shown is None else shown}", text, table, unsafe)

    # -- [pgbouncer]
    def pgbouncer_values(self) -> dict:
        """Every [pgbouncer] setting as PgBouncer would hold it: parsed values over its defaults."""
        values = {name: default for name, (_, default) in PGBOUNCER_SETTINGS.items()}
        for e in self.ini.sections["pgbouncer"].values():
            if e.key not in PGBOUNCER_SETTINGS:
                continue
            kind = PGBOUNCER_SETTINGS[e.key][0]
            try:
                values[e.key] = _KINDS[kind](e.value)
            except ValueError as exc:
                self.errors.append(f"{e.where}: invalid value {e.value!r} for {e.key}: {exc}")
        return values

    def path(self, e: Entry, value: str) -> str:
        if not value:
            return ""
        full = resolve_path(self.ini.base, value)
        if not os.path.isabs(value):
            self.note(e.where, f"{e.key} = {value}", f"a relative path, taken as {full} (PgBouncer opens it "
                      f"from its working directory; this import from {self.ini.base}, see --relative-to)")
        if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
            self.note(e.where, f"{e.key} = {value}", "PgBouncer takes the quotes as part of the file name")
        return full

    def convert_main(self) -> None:
        t, g, entries = self.main, self.g, self.ini.sections["pgbouncer"]
        defaults: list[tuple[str, object, str]] = [
            ("workers", 1, "PgBouncer is one process; pgmp splits pool sizes across its workers")]
        if "listen_addr" not in entries:
            defaults.append(("listen_addr", "", "PgBouncer's default: the unix socket only"))
        if "max_client_conn" not in entries:
            defaults.append(("max_client_conn", 100, "PgBouncer's default"))
        if "server_tls_sslmode" not in entries:
            defaults.append(("server_tls_mode", "prefer", "PgBouncer's default since 1.20 (before: disable)"))
        if "auth_type" not in entries:
            defaults.append(("auth_type", self.auth_type(None), "PgBouncer's default"))
        if "auth_file" not in entries and g["auth_type"] not in ("any", "cert", "ldap", "pam"):
            defaults.append(("auth_file", "/dev/null", "PgBouncer had none: no user can log in, as there; "
                                                       "point it at a userlist"))
        if defaults:
            t.comment("As PgBouncer runs, where pgmp's defaults differ:")
            for name, value, why in defaults:
                t.set(name, value, why)
        for e in entries.values():
            self.main_entry(e)

    def main_entry(self, e: Entry) -> None:
        t, g, key = self.main, self.g, e.key
        if key not in PGBOUNCER_SETTINGS:
            close = difflib.get_close_matches(key, PGBOUNCER_SETTINGS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.skip(e, f"unknown to this importer{hint}: PgBouncer refuses unknown settings, or this "
                         "is one newer than the importer, whose absence may matter", t, unsafe=True)
            return
        special = getattr(self, f"main_{key}", None)
        value = g[key]
        if special is not None:
            special(e, value)
        elif key in _SAME:
            t.set(key, self.path(e, value) if PGBOUNCER_SETTINGS[key][0] == "path" else
                  _number(value) if isinstance(value, float) else value)
        elif key in _UNSAFE_WHEN_SET:
            active = bool(value) if not isinstance(value, (int, float)) else value != 0
            self.skip(e, _UNSAFE_WHEN_SET[key] if active else "not set: nothing to carry over", t, unsafe=active)
        else:
            shown = "(not shown)" if key == "auth_ldap_options" else None
            self.skip(e, "no pgmp equivalent: " + _HARMLESS[key], t, shown=shown)

    def main_listen_addr(self, e: Entry, value: str) -> None:
        addrs: list[str] = []
        names = False
        for word in filter(None, (w.strip(_SPACE) for w in value.split(","))):
            try:
                addrs.append(word if word == "*" else str(ipaddress.ip_address(word)))
                continue
            except ValueError:
                names = True
            try:
                found = self.resolve(word)
            except OSError as exc:
                self.skip(e, f"cannot resolve {word!r} here ({exc}); PgBouncer resolves it when it starts: "
                             "write the addresses", self.main, unsafe=True)
                continue
            self.note(e.where, f"listen_addr = {value}", f"{word} resolves to {', '.join(found)} here; "
                      "pgmp listens on these addresses (PgBouncer resolves the name at each start)")
            addrs += found
        addrs = list(dict.fromkeys(addrs))
        self.main.set("listen_addr", addrs[0] if len(addrs) == 1 else addrs if addrs else "",
                      f"pgbouncer: listen_addr = {value}, resolved at import" if names else None)

    def main_unix_socket_dir(self, e: Entry, value: str) -> None:
        if value.startswith("@"):
            self.skip(e, "pgmp has no abstract-namespace unix sockets: give a directory", self.main, unsafe=True)
            return
        self.main.set("unix_socket_dir", self.path(e, value) if value else "")

    def main_unix_socket_mode(self, e: Entry, value: int) -> None:
        if not 0 <= value <= 0o777:
            self.skip(e, f"PgBouncer reads this as {value:#o}; pgmp takes permission bits 0..0777 "
                         "(write the mode with a leading 0, in octal)", self.main, unsafe=True)
            return
        self.main.set("unix_socket_mode", f"0{value:o}" if value else "0")

    def main_auth_type(self, e: Entry, value: str) -> None:
        mapped = self.auth_type(e)
        if mapped is not None:
            comment = "not used while hba_file is set: each rule names its method" if value == "hba" else None
            self.main.set("auth_type", mapped, comment if value != "plain" else "PgBouncer's plain")

    def auth_type(self, e: Entry | None) -> str | None:
        """pgmp's auth_type for PgBouncer's (with a note when there is none)."""
        value = self.g["auth_type"]
        mapping = {"trust": "trust", "plain": "password", "md5": "md5", "scram-sha-256": "scram-sha-256"}
        if value in mapping:
            return mapping[value]
        if value == "hba":
            return "md5"
        why = {
            "cert": "pgmp has no auth_type cert: write an hba_file with hostssl rules of method cert "
                    "(and client_tls_mode = verify-full)",
            "any": "pgmp has no auth_type any (any user name, forced server users): use trust with the "
                   "users in auth_file",
            "ldap": "pgmp does not authenticate with LDAP",
            "pam": "pgmp does not authenticate with PAM",
        }[value]
        self.note(e.where if e else self.ini.path, f"auth_type = {value}", why, self.main if e else None,
                  unsafe=True)
        return None

    def main_auth_file(self, e: Entry, value: str) -> None:
        self.main.set("auth_file", self.path(e, value) if value else "/dev/null",
                      None if value else "PgBouncer had none: no user can log in, as there")

    def main_auth_hba_file(self, e: Entry, value: str) -> None:
        if self.g["auth_type"] != "hba":
            self.skip(e, "not carried over: PgBouncer ignores it unless auth_type = hba", self.main)
            return
        if not value:
            return                                  # main_auth_type's check reports it
        path = self.path(e, value)
        problem = self.hba_problem(path)
        if problem:
            self.skip(e, problem, self.main, unsafe=True)
        self.main.set("hba_file", path)

    def hba_problem(self, path: str) -> str | None:
        from pgmp import hba
        try:
            rules = hba.parse_hba(self.read_text(path), path)
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        except UnicodeDecodeError:
            return f"{path} is not UTF-8"
        except hba.HbaError as exc:
            return f"pgmp cannot use this hba file: {exc}"
        mapped = [str(r.lineno) for r in rules.rules if "map" in r.options]
        if mapped:
            return (f"{path} line {', '.join(mapped)}: map= (auth_ident_file's user name maps) is not "
                    "supported by pgmp: its cert logins would be refused")
        return None

    def main_auth_ident_file(self, e: Entry, value: str) -> None:
        self.skip(e, "no pgmp equivalent: pgmp has no user name maps (an hba rule with map= is reported "
                     "with auth_hba_file)", self.main)

    def main_min_pool_size(self, e: Entry, value: int) -> None:
        if value > self.g["default_pool_size"] >= 0:
            self.note(e.where, f"min_pool_size = {e.value}", "capped at default_pool_size, as PgBouncer caps it")
            value = self.g["default_pool_size"]
        self.main.set("min_pool_size", value)

    def main_reserve_pool_size(self, e: Entry, value: int) -> None:
        if value and self.g["reserve_pool_timeout"] == 0:
            self.note(e.where, f"reserve_pool_size = {e.value}", "reserve_pool_timeout = 0 disables the "
                      "reserve in PgBouncer (pgmp would use it at once): written as 0")
            value = 0
        self.main.set("reserve_pool_size", value)

    def main_server_lifetime(self, e: Entry, value: float) -> None:
        if value == 0:
            self.main.set("server_lifetime", 0.001, "PgBouncer's 0: each server is used once "
                                                    "(pgmp's 0 would keep it forever)")
        else:
            self.main.set("server_lifetime", _number(value))

    def main_server_check_query(self, e: Entry, value: str) -> None:
        if value == "<empty>":
            self.main.set("server_check_query", ";", "PgBouncer's <empty>: an empty query")
        else:
            self.main.set("server_check_query", value)

    def main_max_packet_size(self, e: Entry, value: int) -> None:
        if value > GB:
            self.skip(e, "pgmp's max_message_size is at most 1 GB, PostgreSQL's own limit for a message: "
                         "left at that", self.main)
        elif value < KB:
            self.skip(e, "pgmp's max_message_size is at least 1 kB", self.main, unsafe=True)
        else:
            self.main.set("max_message_size", value, "pgbouncer: max_packet_size")

    def main_verbose(self, e: Entry, value: int) -> None:
        self.main.set("log_level", "debug" if value > 0 else "info", f"pgbouncer: verbose = {e.value}")

    def main_client_tls_sslmode(self, e: Entry, value: str) -> None:
        self.main.set("client_tls_mode", value)

    def main_server_tls_sslmode(self, e: Entry, value: str) -> None:
        if value == "allow":
            self.main.set("server_tls_mode", "prefer", "PgBouncer's allow: pgmp asks for TLS first")
        else:
            self.main.set("server_tls_mode", value)

    def main_client_tls_protocols(self, e: Entry, value: str) -> None:
        versions = self.tls_versions(e, value)
        if versions is None:
            return
        if versions == {"tlsv1.3"}:
            self.main.set("client_tls_min_version", "TLSv1.3")
            return
        if "tlsv1.2" not in versions:
            self.skip(e, "pgmp accepts TLS 1.2 and 1.3 from clients, or 1.3 alone", self.main, unsafe=True)
            return
        if versions & {"tlsv1.0", "tlsv1.1"}:
            self.note(e.where, f"client_tls_protocols = {value}", "pgmp refuses TLS 1.0 and 1.1: clients "
                      "that only speak those fail the handshake")
        if "tlsv1.3" not in versions:
            self.note(e.where, f"client_tls_protocols = {value}", "pgmp also accepts TLS 1.3")
        self.main.set("client_tls_min_version", "TLSv1.2")

    def main_server_tls_protocols(self, e: Entry, value: str) -> None:
        versions = self.tls_versions(e, value)
        if versions is None:
            return
        if "tlsv1.2" in versions:
            self.skip(e, "pgmp speaks TLS 1.2 and 1.3 to servers", self.main)
        else:
            self.skip(e, "pgmp speaks TLS 1.2 and 1.3 to servers and cannot be limited to "
                         + ", ".join(sorted(versions)), self.main, unsafe=True)

    def tls_versions(self, e: Entry, value: str) -> set[str] | None:
        """The versions a PgBouncer *_tls_protocols value allows (None, with a note, when it does not parse)."""
        allowed: set[str] = set()
        for word in re.split("[,:]", value):
            word = word.lstrip(" \t").lower()
            negate = word.startswith("!")
            word = word.removeprefix("!")
            if negate and not allowed:
                allowed = set(_TLS_VERSIONS)
            if word in ("all", "tlsv1"):
                these = set(_TLS_VERSIONS)
            elif word in ("default", "secure"):
                these = {"tlsv1.2", "tlsv1.3"}
            elif word in _TLS_VERSIONS:
                these = {word}
            else:
                self.skip(e, f"{word!r} is not a TLS protocol PgBouncer knows", self.main, unsafe=True)
                return None
            allowed = allowed - these if negate else allowed | these
        return allowed

    def main_client_tls_ciphers(self, e: Entry, value: str) -> None:
        if value.lower() in _CIPHER_KEYWORDS:
            self.main.set("client_tls_ciphers", "", f"pgbouncer: client_tls_ciphers = {value}: the defaults")
        else:
            self.main.set("client_tls_ciphers", value)

    def main_server_tls_ciphers(self, e: Entry, value: str) -> None:
        if value.lower() in _CIPHER_KEYWORDS:
            self.skip(e, "pgmp uses OpenSSL's default ciphers for servers, as this keyword does", self.main)
        else:
            self.skip(e, "pgmp cannot restrict the ciphers it accepts from servers", self.main, unsafe=True)

    def main_admin_users(self, e: Entry, value: list) -> None:
        self.console_users(e, value)

    def main_stats_users(self, e: Entry, value: list) -> None:
        self.console_users(e, value)

    def console_users(self, e: Entry, value: list) -> None:
        if _admin_setting(e.key):
            self.main.set(e.key, value)
        else:
            self.skip(e, "takes effect once pgmp has its admin console (pgmp status and pgmp stats "
                         "meanwhile)", self.main)

    def check_main(self) -> None:
        """Rules that span several [pgbouncer] settings."""
        g = self.g
        if g["auth_type"] == "hba" and not g["auth_hba_file"]:
            self.note(self.ini.path, "auth_type = hba", "without auth_hba_file PgBouncer lets no one in; "
                      "write an hba_file", self.main, unsafe=True)

    # -- [databases]
    def convert_databases(self) -> None:
        for name, e in self.ini.sections["databases"].items():
            try:
                pairs, warnings = parse_connstr(e.value)
            except ValueError as exc:
                self.errors.append(f"{e.where}: [databases] {name}: syntax error in the connection string: {exc}")
                continue
            for warning in warnings:
                self.note(e.where, f"[databases] {name}", warning)
            self.database(name, e, pairs)

    def database(self, name: str, e: Entry, pairs: list[tuple[str, str]]) -> None:
        t = _Table(f"databases.{toml_key(name)}")
        opts = dict(pairs)
        label = f"[databases] {name}"
        left_out = _Table(None)                      # a section pgmp cannot serve: only its comment
        if name == "pgbouncer":
            self.note(e.where, label, "the name of the admin console in PgBouncer and in pgmp: section "
                      "left out", left_out, unsafe=True)
            self.tables.append(left_out)
            return
        host = self.database_host(e, label, opts, left_out)
        if host is None:
            self.tables.append(left_out)
            return
        t.set("host", host[0], host[1])
        if isinstance(host[0], list):
            # PgBouncer spreads new connections over a host list round-robin unless told otherwise
            lb = opts.get("load_balance_hosts", "round-robin").lower()
            if lb in ("round-robin", "disable"):
                t.set("load_balance_hosts", lb, None if lb == "disable" else "PgBouncer's default")
            else:
                self.errors.append(f"{e.where}: {label}: load_balance_hosts={lb}: expected round-robin or disable")
        for key, value in opts.items():
            if key == "host":
                continue
            try:
                self.database_option(t, e, label, key, value, opts)
            except ValueError as exc:
                self.errors.append(f"{e.where}: {label}: {key}={value}: {exc}")
        self.tables.append(t)

    def database_host(self, e: Entry, label: str, opts: dict, left_out: _Table) \
            -> tuple[str | list[str], str | None] | None:
        """(host, comment) for a database, or None (with a note) when pgmp cannot reach what PgBouncer did."""
        host = opts.get("host")
        if host is None:
            sock = self.g["unix_socket_dir"]
            if not sock or sock.startswith("@"):
                self.note(e.where, label, "no host, and unix_socket_dir is not a directory pgmp can use: "
                          "PgBouncer connects through its unix socket directory; section left out",
                          left_out, unsafe=True)
                return None
            return resolve_path(self.ini.base, sock), "PgBouncer's default: the unix socket in unix_socket_dir"
        if host.startswith("@"):
            self.note(e.where, f"{label} host={host}", "pgmp has no abstract-namespace unix sockets: section "
                      "left out", left_out, unsafe=True)
            return None
        if "," in host:
            hosts = [h.strip() for h in host.split(",") if h.strip()]
            if any(h.startswith("@") for h in hosts):
                self.note(e.where, f"{label} host={host}", "pgmp has no abstract-namespace unix sockets: "
                          "section left out", left_out, unsafe=True)
                return None
            return hosts, "pgbouncer: host=" + host
        return host, None

    def database_option(self, t: _Table, e: Entry, label: str, key: str, value: str, opts: dict) -> None:
        g = self.g
        shown = "(not shown)" if key == "password" else value
        subject = f"{label} {key}={shown}"
        if key in ("dbname", "user", "password", "auth_dbname", "connect_query", "application_name"):
            t.set(key, value)
            if key == "connect_query":
                self.note(e.where, subject, "pgmp counts a failing connect_query as a failed login "
                                            "(PgBouncer logs and goes on)")
        elif key == "port":
            port = _atoi(value)
            if not 0 < port < 65536:
                raise ValueError("invalid port")
            t.set("port", port)
        elif key in ("pool_size", "min_pool_size", "reserve_pool", "reserve_pool_size", "max_db_connections"):
            self.database_size(t, e, subject, key, _atoi(value), opts)
        elif key == "pool_mode":
            t.set("pool_mode", _lookup(_POOL_MODES)(value))
        elif key in ("auth_user", "auth_query"):
            if value == (g[key] or None):
                return
            self.note(e.where, subject, f"pgmp has one {key} for every database ([pgbouncer]'s is "
                      f"{g[key]!r}): it would look users of this database up "
                      + ("with another query" if key == "auth_query" else "as another role, or not at all"),
                      t, unsafe=True)
        elif key == "query_wait_timeout":
            seconds = _atoi(value)                   # -1: not set; 0: no limit for this database
            if seconds < 0 or seconds == g["query_wait_timeout"]:
                return
            self.note(e.where, subject, "pgmp has one query_wait_timeout for every database "
                      f"({_number(g['query_wait_timeout'])}s)", t, unsafe=True)
        elif key == "server_lifetime":
            self.note(e.where, subject, "pgmp has one server_lifetime for every database "
                      f"({_number(g['server_lifetime'])}s)", t)
        elif key == "load_balance_hosts":
            if "," not in opts.get("host", ""):
                self.note(e.where, subject, "only matters with several hosts", t)
        elif key in ("client_encoding", "datestyle", "timezone"):
            self.note(e.where, subject, "pgmp cannot set server parameters per database: use ALTER DATABASE "
                      f"... SET {key} = ... on the server", t, unsafe=True)
        elif key == "max_db_client_connections":
            if _atoi(value) > 0:
                self.note(e.where, subject, _UNSAFE_WHEN_SET[key], t, unsafe=True)
        else:
            self.note(e.where, subject, "unknown to this importer: PgBouncer refuses unknown connection "
                      "parameters, or this is one newer than the importer", t, unsafe=True)

    def database_size(self, t: _Table, e: Entry, subject: str, key: str, n: int, opts: dict) -> None:
        if n < 0 or (key == "max_db_connections" and n == 0):
            return                                   # PgBouncer's "not set": [pgbouncer]'s value applies
        if key in ("reserve_pool", "reserve_pool_size"):
            if n and self.g["reserve_pool_timeout"] == 0:
                self.note(e.where, subject, "reserve_pool_timeout = 0 disables the reserve in PgBouncer: "
                          "written as 0")
                n = 0
            key = "reserve_pool_size"
        if key in ("pool_size", "max_db_connections") and n > 0:
            self.limits.append((n, f"{subject.rsplit(' ', 1)[0]} {key}"))
        if key == "min_pool_size":
            size = _atoi(opts.get("pool_size", "-1"))
            size = size if size >= 0 else self.g["default_pool_size"]
            if size >= 0 and n > size:
                self.note(e.where, subject, "capped at the pool size, as PgBouncer caps it")
                n = size
        t.set(key, n)

    # -- [users]
    def convert_users(self) -> None:
        for name, e in self.ini.sections["users"].items():
            t = _Table(f"users.{toml_key(name)}")
            try:
                pairs, warnings = parse_connstr(e.value)
            except ValueError as exc:
                self.errors.append(f"{e.where}: [users] {name}: syntax error in the user settings: {exc}")
                continue
            for warning in warnings:
                self.note(e.where, f"[users] {name}", warning)
            for key, value in dict(pairs).items():
                try:
                    self.user_option(t, e, f"[users] {name} {key}={value}", key, value)
                except ValueError as exc:
                    self.errors.append(f"{e.where}: [users] {name}: {key}={value}: {exc}")
            self.tables.append(t)

    # [users] settings pgmp has only instance-wide: the [pgbouncer] setting, and the values that mean
    # "not set" (the instance-wide value applies): a negative size, or a timeout of 0 (query_wait_timeout:
    # negative; its 0 means no limit).
    _USER_INSTANCE_WIDE = {
        "pool_size": ("default_pool_size", -1), "reserve_pool_size": ("reserve_pool_size", -1),
        "query_timeout": ("query_timeout", 0), "idle_transaction_timeout": ("idle_transaction_timeout", 0),
        "transaction_timeout": ("transaction_timeout", 0), "client_idle_timeout": ("client_idle_timeout", 0),
        "query_wait_timeout": ("query_wait_timeout", -1),
    }

    def user_option(self, t: _Table, e: Entry, subject: str, key: str, value: str) -> None:
        if key == "pool_mode":
            t.set("pool_mode", _lookup(_POOL_MODES)(value))
        elif key == "max_user_connections":
            n = _atoi(value)
            if n > 0:                                # else PgBouncer's "not set": [pgbouncer]'s value applies
                t.set("max_user_connections", n)
                self.limits.append((n, f"{subject.rsplit(' ', 1)[0]} {key}"))
        elif key in self._USER_INSTANCE_WIDE:
            setting, unset = self._USER_INSTANCE_WIDE[key]
            n = _atoi(value)
            # a user's pool size also wins over a database's own, which pgmp would apply instead
            overridden = key.endswith("pool_size") and key in self.database_keys()
            if n <= unset or (n == self.g[setting] and not overridden):
                return
            self.note(e.where, subject, f"pgmp has no per-user {key}: this user would get "
                      f"{setting} = {_number(self.g[setting])}", t, unsafe=True)
        elif key == "max_user_client_connections":
            if _atoi(value) > 0:
                self.note(e.where, subject, _UNSAFE_WHEN_SET[key], t, unsafe=True)
        else:
            self.note(e.where, subject, "unknown to this importer: PgBouncer refuses unknown user settings, "
                      "or this is one newer than the importer", t, unsafe=True)

    def database_keys(self) -> set[str]:
        """Every setting some [databases] entry sets (reserve_pool under its other name)."""
        keys: set[str] = set()
        for e in self.ini.sections["databases"].values():
            try:
                keys |= {k for k, _ in parse_connstr(e.value)[0]}
            except ValueError:
                pass                                 # convert_databases reports it
        return keys | ({"reserve_pool_size"} if "reserve_pool" in keys else set())

    # -- [peers]
    def convert_peers(self) -> None:
        for name, e in self.ini.sections["peers"].items():
            self.note(e.where, f"[peers] {name} = {e.value}", "pgmp forwards cancel requests among its own "
                      "workers only: one pgmp replaces peered PgBouncers on one host, but a cancel that "
                      "reaches another host is lost", self.main, unsafe=True)

    def note_workers(self) -> None:
        n, where = min(self.limits, default=(0, ""))
        more = (f"; the smallest here is {n} ({where}), so up to workers = {n} every pool keeps a server "
                "in every worker") if n > 1 else (f"; {where} is 1, so more workers would leave that pool "
                                                   "without servers in all but one") if n == 1 else ""
        self.note(self.ini.path, "workers = 1", "as PgBouncer, one process. pgmp can use more CPUs: with "
                  "workers = N each pool size and connection limit is split N ways" + more)

    # -- all of it
    def run(self) -> Converted:
        if self.errors:
            raise InvalidIni(self.errors)
        self.convert_main()
        self.check_main()
        self.convert_databases()
        self.convert_users()
        self.convert_peers()
        if self.errors:
            raise InvalidIni(self.errors)
        self.note_workers()
        return Converted(self.ini.path, self.ini.files, [self.main, *self.tables], self.notes)


def convert(ini: Ini, read_text: Callable[[str], str], resolve: Callable[[str], list[str]]) -> Converted:
    """pgmp.toml for a parsed PgBouncer configuration; InvalidIni for values PgBouncer would refuse."""
    return _Converter(ini, read_text, resolve).run()


# ----------------------------------------------------------------- IO

def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def resolve_listen(name: str) -> list[str]:
    """The addresses PgBouncer would listen on for a listen_addr host name (OSError when it has none)."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.strerror) from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def import_ini(path: str, relative_to: str | None = None, check_files: bool = True) -> Converted:
    """Read ``path`` and convert it; the result is also checked as ``pgmp config check`` would.

    What the check finds is added as unsafe notes (except the refusal of the
    blocker line an unsafe import carries on purpose).
    """
    from pgmp import config, files
    path = os.path.abspath(path)
    base = os.path.abspath(relative_to) if relative_to else os.path.dirname(path)
    result = convert(parse_ini(path, read_text, base), read_text, resolve_listen)
    problems: list[str] = []
    try:
        cfg = config.loads(result.toml)
    except config.ConfigError as exc:
        problems = [p.removeprefix("<string>: ") for p in exc.errors]
        problems = [p for p in problems if not p.startswith(f"[pgmp] {BLOCKER}:")]
        cfg = None
    if cfg is not None and check_files:
        try:
            files.check_files(cfg)
        except files.FileCheckError as exc:
            problems.append(str(exc))
    result.notes += [Note(path, CHECK, p, True) for p in problems
                     if not _already_reported(p, result.unsafe)]
    return result


def _already_reported(problem: str, unsafe: list[Note]) -> bool:
    """Whether a config check problem is about a file or text an unsafe note already names."""
    said = " ".join(n.text for n in unsafe)
    return problem in said or any(p in said for p in re.findall(r"/[^\s:'\"]+", problem))


def write_output(path: str, text: str, force: bool, mode: int) -> None:
    """Write ``text`` to ``path`` atomically, created with ``mode``; FileExistsError without ``force``."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not force:
        raise FileExistsError(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".pgmp-import-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def output_mode(ini_path: str) -> int:
    """The permissions of the written pgmp.toml: the ini's, which may hold the same passwords."""
    return stat.S_IMODE(os.stat(ini_path).st_mode) & 0o666
