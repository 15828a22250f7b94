"""The config schema, and the loader and validator of pgmp.toml built from it.

Every setting is declared once, as a row of SCHEMA. The loader, the
validator, ``pgmp config check`` (render_settings_table) and the settings
list of pgmp.toml(5) (render_man_settings) all read that table, and the
Config, DatabaseConfig and UserConfig record classes are generated from it.

Relative paths in the file are resolved against the file's directory, so a
config can be moved together with its userlist and certificates.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import textwrap
import tomllib
from dataclasses import dataclass, field

SECTIONS = ("pgmp", "databases", "users")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes, one of them the terminating NUL


class ConfigError(Exception):
    """An invalid config; str() is the whole operator-facing report, one problem a line."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives, what it accepts, its default and its documentation.

    ``kind`` names a parser in _PARSERS. ``default`` is written as in the file
    and parsed like a value from the file; None means "not set" and is then
    explained by ``default_doc``. ``inherit`` names the [pgmp] setting whose
    value is the default of a per-database or per-user setting.
    """

    name: str
    section: str
    kind: str
    default: object
    reloadable: bool
    doc: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    inherit: str | None = None
    default_doc: str | None = None


def _S(name, kind, default, doc, reload=True, **kw):
    return Setting(name, "pgmp", kind, default, reload, doc, **kw)


def _D(name, kind, default, doc, **kw):
    return Setting(name, "databases", kind, default, True, doc, **kw)


def _U(name, kind, default, doc, **kw):
    return Setting(name, "users", kind, default, True, doc, **kw)


KB, MB, GB = 1024, 1024 ** 2, 1024 ** 3
POOL_MODES = ("session", "transaction", "statement")
# server_require_auth's methods, libpq's require_auth names; "none": the server asks for nothing.
SERVER_AUTH_METHODS = ("password", "md5", "scram-sha-256", "none")
# Every name and operator schema-qualified: the lookup must not resolve anything through a search_path
# that a database owner controls (pgmp also pins search_path on the lookup connection).
# libpq's target_session_attrs and load_balance_hosts values
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "random", "round-robin")
AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil OPERATOR(pg_catalog.<) pg_catalog.now() THEN NULL"
              " ELSE rolpassword END FROM pg_catalog.pg_authid"
              " WHERE rolname OPERATOR(pg_catalog.=) $1 AND rolcanlogin")

SCHEMA: tuple[Setting, ...] = (
    # --- where clients connect (these need new sockets: restart) ---
    _S("listen_addr", "addrs", "127.0.0.1", 'Addresses for TCP clients: one, a list, or "*" for all (0.0.0.0 and ::); "" accepts unix socket clients only.', reload=False),
    _S("listen_port", "int", 6432, "TCP port to listen on; also names the unix socket .s.PGSQL.<port>.", reload=False, low=1, high=65535),
    _S("unix_socket_dir", "path", "/tmp", 'Directory of the unix socket .s.PGSQL.<port>; "" disables the unix socket.', reload=False),
    _S("unix_socket_mode", "mode", "0777", 'Permissions of the unix socket file, in octal (0o777 or "0777").', reload=False),
    # --- authentication ---
    _S("auth_type", "enum", "scram-sha-256", "How clients prove who they are: trust (no password), password (cleartext), md5 or scram-sha-256.", choices=("trust", "password", "md5", "scram-sha-256")),
    _S("auth_file", "path", "", 'Userlist of "user" "password-or-hash" lines; required unless auth_type is trust.'),
    _S("auth_user", "str", "", 'Server user that runs auth_query for clients missing from auth_file; "" disables auth_query. '
       "Its own password comes from auth_file (or the password of a database section whose user it is). "
       "Each worker logs in as auth_user, over a connection of its own that carries no client parameter "
       "and runs with search_path = pg_catalog, pg_temp, to auth_dbname (else the database the client asked for)."),
    _S("auth_dbname", "str", "", "Database section in which auth_query runs for every client, whatever database it asks for; "
       '"" = in the database the client asked for. Needed when a "*" section exists (a client could otherwise '
       "make auth_user run the query in any database, among objects its owner planted). Choose a database that "
       "only trusted roles own and create objects in."),
    _S("auth_query", "str", AUTH_QUERY, "Query run as auth_user that returns (user name, password hash) for the user name, "
       "bound as $1; no row or a NULL hash = the login fails like a wrong password. The default reads "
       "pg_authid, which needs a superuser: otherwise call a SECURITY DEFINER function. Write names "
       "schema-qualified. A lookup that fails (server down, auth_user cannot log in, no answer within "
       "server_connect_timeout) refuses the client with 08006."),
    _S("auth_max_iterations", "int", 100_000, "Largest SCRAM iteration count pgmp accepts: in an auth_file secret (refused at start "
       "and reload), from auth_query (that user cannot log in) or asked by a server (its login fails). Each "
       "derivation of a key costs CPU in proportion (about 30 ms per 100,000 here), before the client has proved "
       "anything; PostgreSQL's default is 4096.", low=1, high=2**31 - 1),
    _S("auth_mock_secret_file", "path", "", "File of at least 32 secret random bytes (make it once: head -c 32 /dev/urandom > FILE; "
       "chmod 600 FILE) from which pgmp derives the SCRAM salt it shows for users that do not exist, so that "
       "the salt stays the same in every worker, across restarts and auth_file edits, as a real user's does. "
       '"" = derived from auth_file\'s contents (changes when auth_file does), or random at start without auth_file.'),
    _S("auth_cache_ttl", "duration", 60, "How long each worker keeps a password hash that auth_query returned before asking "
       "again (0 = ask at every login; logins of the same user that arrive during a lookup always share it). "
       "An answer without a usable hash (no such user, expired or no password) is kept just as long, "
       "the same for users that do not exist as for real ones, so that timing cannot tell them apart: "
       "a role created in PostgreSQL logs in through pgmp after auth_cache_ttl, or at once after a reload, "
       "which empties the cache.", low=0),
    _S("admin_users", "strlist", [], "Users who may run every command of the admin console (the virtual database pgmp, "
       "alias pgbouncer), once authenticated as any client is; over the unix socket, pgmp's own OS user may also "
       "log in to it as user pgmp or pgbouncer without a password."),
    _S("stats_users", "strlist", [], "Users who may log in to the admin console and run its read-only SHOW commands."),
    _S("hba_file", "path", "", 'pg_hba.conf-style rules of which client may reach which database, and how; "" lets any client try auth_type.'),
    # --- pools ---
    _S("pool_mode", "enum", "session", "When a server returns to the pool: session (client leaves), transaction (transaction ends) or statement (statement ends).", choices=POOL_MODES),
    _S("default_pool_size", "int", 20, "Server connections per (database, user) pool, for the whole instance (split across workers).", low=0),
    _S("min_pool_size", "int", 0, "Server connections each pool keeps open even when idle.", low=0),
    _S("reserve_pool_size", "int", 0, "Extra server connections a pool may open once a client has waited reserve_pool_timeout.", low=0),
    _S("reserve_pool_timeout", "duration", 5, "How long a client waits for a server before its pool may use the reserve.", low=0),
    _S("max_client_conn", "int", 1000, "Client connections open at once, for the whole instance; more are refused at once with 53300 (sorry, too many clients already).", low=1),
    _S("max_db_connections", "int", 0, "Server connections per database over all its pools (0 = unlimited).", low=0),
    _S("max_user_connections", "int", 0, "Server connections per user over all their pools (0 = unlimited).", low=0),
    # --- memory bounds ---
    _S("max_message_size", "size", GB, "Largest protocol message length accepted from a client or server; a bigger one ends the connection.", low=KB, high=GB),
    _S("buffer_size", "size", 65536, "Receive buffer per connection; a larger message is streamed through, not assembled.", low=4096, high=GB),
    _S("max_unsent", "size", 262144, "Bytes queued for one destination before pgmp stops reading from its source (backpressure).", low=4096, high=GB),
    # --- processes ---
    _S("workers", "int", 0, "Worker processes, each with its own listener and pools (0 = one per CPU).", reload=False, low=0, high=1024),
    _S("shutdown_timeout", "duration", 30, "On SIGTERM, how long clients may finish their transactions before they are closed.", low=0),
    # --- timeouts ---
    _S("client_login_timeout", "duration", 60, "Time a client has to finish startup and authentication (0 = unlimited).", low=0),
    _S("server_connect_timeout", "duration", 15, "Time allowed to connect and log in to a server.", low=0),
    _S("server_login_retry", "duration", 15, "After a failed connect or login to a server, wait this long before trying it again.", low=0),
    _S("server_idle_timeout", "duration", 600, "Close a pooled server connection unused for this long (0 = never).", low=0),
    _S("server_lifetime", "duration", 3600, "Close a server connection at its next release once it is this old (0 = never).", low=0),
    _S("server_check_delay", "duration", 30, "Run server_check_query on a pooled server idle this long before reusing it (0 = every time).", low=0),
    _S("server_check_query", "str", "select 1", 'Query that checks an idle server before reuse; "" disables the check.'),
    _S("server_reset_query", "str", "DISCARD ALL", 'Query run on a server when its client session ends (session mode); "" runs none. A transaction-mode client pinned to its server always gets DISCARD ALL.'),
    _S("server_reset_timeout", "duration", 10, "Close a server whose reset or check query has not answered within this time (0 = wait forever).", low=0),
    _S("server_reset_query_always", "bool", False, "Also run server_reset_query at each release in transaction and statement modes."),
    _S("query_timeout", "duration", 0, "Cancel a query that runs longer than this (0 = off).", low=0),
    _S("query_wait_timeout", "duration", 120, "Disconnect a client that has waited this long for a server (0 = wait forever). A queued client is still read: if it disconnects it leaves the queue at once (what it sent is not run, as with PgBouncer), and what it sends meanwhile waits with its request (up to max_unsent bytes, then pgmp stops reading it). A reload times the clients already queued by the new value.", low=0),
    _S("idle_transaction_timeout", "duration", 0, "Disconnect a client idle inside a transaction for this long (0 = off).", low=0),
    _S("client_idle_timeout", "duration", 0, "Disconnect a client idle outside a transaction for this long (0 = off).", low=0),
    _S("cancel_wait_timeout", "duration", 10, "Drop a cancel request that cannot reach its server within this time (0 = wait forever).", low=0),
    # --- session state ---
    _S("max_parse_size", "size", MB, "Largest named Parse (prepared statement) message accepted in transaction and statement "
       "modes, where pgmp assembles it whole to key the statement by its text; a larger one ends the session "
       "with 54000. Unnamed statements stream through and are limited by max_message_size only.", low=KB, high=GB),
    _S("max_prepared_size", "size", 16 * MB, "Total size of the named statements one client keeps prepared in transaction and "
       "statement modes (pgmp holds their text to prepare them on whichever server the client gets); a Parse "
       "beyond it ends the session with 53400. Close (DEALLOCATE) statements no longer used.", low=KB, high=64 * GB),
    _S("max_prepared_statements", "int", 200, "Protocol-level prepared statements kept per server connection in transaction and statement modes (0 = not supported).", low=0),
    _S("track_extra_parameters", "strlist", ["IntervalStyle"], "Client parameters kept per client and set on each server it gets, besides client_encoding, DateStyle, TimeZone, standard_conforming_strings and application_name."),
    _S("application_name_add_host", "bool", False, "Append \" - <address>:<port>\" of the client to the application_name it logs in with (what its server connections show in pg_stat_activity)."),
    _S("tcp_keepalive", "bool", True, "Turn on TCP keepalive, with the kernel's timings, on client and server sockets."),
    # --- logging and files ---
    _S("logfile", "path", "", 'File to append the log to, reopened on reload; "" logs to stderr (the journal under systemd).'),
    _S("log_level", "enum", "info", "Least severe log messages written.", choices=("debug", "info", "warning", "error")),
    _S("log_connections", "bool", True, "Log each client login."),
    _S("log_disconnections", "bool", True, "Log each client disconnection and its reason."),
    _S("pidfile", "path", "", 'File the master writes its pid to, in a directory other users cannot write (a link, a file of another user or a world-writable directory without the sticky bit is refused); "" writes none.', reload=False),
    _S("control_socket", "path", "", "Unix socket that pgmp status, stats and reload talk to the master on.", reload=False,
       default_doc="\".pgmp.<listen_port>.ctl\" in the pidfile's directory, "
                   "or /tmp/.pgmp.<listen_port>.ctl without a pidfile"),
    # --- several hosts per database: roles, health, DNS ---
    _S("target_session_attrs", "enum", "any", "Which of a database's hosts its server connections go to, as libpq's "
       "target_session_attrs: any, read-write (default_transaction_read_only off), read-only (on, or a standby), "
       "primary (not in recovery), standby (in recovery), prefer-standby (a standby if one is usable, else any); "
       "the default of every database section.", choices=TARGET_SESSION_ATTRS),
    _S("load_balance_hosts", "enum", "disable", "How a new server connection picks among the hosts that fit "
       "target_session_attrs, as libpq's load_balance_hosts: disable (the first in the list), random, or "
       "round-robin (each pool in turn); the default of every database section.", choices=LOAD_BALANCE_HOSTS),
    _S("health_check_period", "duration", 5, "How often the master checks every host of the databases that "
       "choose among hosts (several hosts, or target_session_attrs other than any): connect, log in, "
       "SELECT pg_is_in_recovery() and the replay lag of standbys; the workers get the result "
       "(0 = off: workers learn a host's role when they log in to it).", low=0),
    _S("health_check_timeout", "duration", 5, "Time one health check may take to connect, log in and answer; "
       "longer counts as a failed check.", low=0.01),
    _S("health_check_user", "str", "", 'User the health checks log in as, on every host; "" = per host, the user of '
       "the first database section that lists the host and sets one, with that section's password or the user's "
       "auth_file secret (a SCRAM verifier cannot log in: give a plaintext or md5 secret). A host no credential "
       "reaches is checked by a TCP connect only, and its role is learned from the servers the workers open."),
    _S("health_check_password", "str", "", 'Password of health_check_user; "" = its auth_file secret.'),
    _S("health_check_dbname", "str", "", 'Database the health checks log in to; "" = the dbname of the database '
       'section the credentials come from ("postgres" for a "*" section).'),
    _S("host_ban_time", "duration", 30, "How long a host of a database with several hosts is left out after a "
       "failed connect, login or health check (the other hosts serve meanwhile; when none can, a banned host "
       "that its latest health check found up serves again). A database with one host retries after "
       "server_login_retry instead.", low=0.1),
    _S("max_replica_lag", "duration", 0, "Largest replay lag (now() - pg_last_xact_replay_timestamp(), 0 while "
       "the standby has replayed all it received) of a standby that serves read-only, standby and "
       "prefer-standby connections; a standby further behind leaves that read pool until it catches up "
       "(0 = no limit; the default of every database section).", low=0),
    _S("dns_max_ttl", "duration", 15, "How long the addresses of a host name are kept before they are looked up "
       "again; lookups run in a thread (workers) or a helper process (the master), never in the event loop.",
       low=0.1),
    _S("dns_nxdomain_ttl", "duration", 15, "How long a failed host name lookup is remembered before it is tried "
       "again (servers of that host fail at once meanwhile).", low=0.1),
    # --- monitoring ---
    _S("metrics_listen", "hostport", "", 'Address of the master\'s HTTP endpoint for Prometheus (GET /metrics) and load '
       'balancers (GET /health), as "host:port" with an IP address or localhost ("[::1]:9127" for IPv6); "" = off. '
       "Anyone who can connect can read the pools' names and figures: keep it on a loopback or private address. "
       "On reload the new address is bound before the old one is closed; if it cannot be bound, the reload fails."),
    # --- TLS to clients ---
    _S("client_tls_mode", "enum", "disable", "TLS for clients: disable, allow and prefer (accept it), require (refuse plaintext), verify-ca and verify-full (also require a certificate signed by client_tls_ca_file; verify-full: whose CN is the user name).", choices=("disable", "allow", "prefer", "require", "verify-ca", "verify-full")),
    _S("client_tls_cert_file", "path", "", "PEM certificate (chain) pgmp presents to clients; needed when client_tls_mode is not disable."),
    _S("client_tls_key_file", "path", "", 'PEM private key of client_tls_cert_file; "" = the key is in the certificate file.'),
    _S("client_tls_ca_file", "path", "", "PEM CA bundle that signs client certificates; needed for verify-ca and verify-full."),
    _S("client_tls_min_version", "enum", "TLSv1.2", "Oldest TLS version accepted from clients.", choices=("TLSv1.2", "TLSv1.3")),
    _S("client_tls_ciphers", "str", "", 'OpenSSL cipher list for TLSv1.2 client connections; "" = Python\'s defaults.'),
    # --- TLS to servers ---
    _S("server_tls_mode", "enum", "disable", "TLS to servers: disable, prefer (use it if offered), require (no certificate check), verify-ca (check the chain), verify-full (also the host name).", choices=("disable", "prefer", "require", "verify-ca", "verify-full")),
    _S("server_tls_ca_file", "path", "", 'PEM CA bundle for checking server certificates; "" = the system\'s CAs.'),
    _S("server_tls_cert_file", "path", "", 'PEM client certificate presented to servers; "" presents none.'),
    _S("server_tls_key_file", "path", "", 'PEM private key of server_tls_cert_file; "" = the key is in the certificate file.'),
    # --- what a server may ask of pgmp ---
    _S("server_require_auth", "methods", [], "Authentication methods a server may ask pgmp for, as libpq's "
       'require_auth: a list of password, md5, scram-sha-256 and none (the server asks for nothing), or of '
       '"!method" to allow all but those. A server that asks for another method (or lets pgmp in unasked '
       "when none is not allowed) is refused before pgmp sends anything. [] allows only scram-sha-256 when "
       "pgmp logs in with SCRAM keys or an auth_file SCRAM secret, and any method otherwise."),
    # --- [databases.<name>] ---
    _D("host", "hosts", "127.0.0.1", 'Server host name or IP address, or a unix socket directory (starts with /); '
       'or a list of them, each optionally with its own port: ["10.0.0.5", "10.0.0.6:5433", "[fd00::7]:5433", '
       '"/var/run/postgresql"] (a comma-separated string also works). target_session_attrs and load_balance_hosts '
       "choose among them."),
    _D("port", "int", 5432, "Server port of the hosts that do not give their own (for a socket directory: the .s.PGSQL.<port> file).", low=1, high=65535),
    _D("dbname", "str", None, "Database name on the server.", default_doc='the section name; for "*", the name the client asked for'),
    _D("user", "str", "", 'Server user for every client of this database; "" = each client\'s own user.'),
    _D("password", "str", "", 'Password of user; "" = taken from auth_file, or the client\'s own credentials.'),
    _D("pool_size", "int", None, "Server connections per (database, user) pool of this database.", low=0, inherit="default_pool_size"),
    _D("min_pool_size", "int", None, "Server connections each pool of this database keeps open when idle.", low=0, inherit="min_pool_size"),
    _D("reserve_pool_size", "int", None, "Reserve connections per pool of this database.", low=0, inherit="reserve_pool_size"),
    _D("pool_mode", "enum", None, "Pool mode of this database.", choices=POOL_MODES, inherit="pool_mode"),
    _D("max_db_connections", "int", None, "Server connections to this database over all its pools (0 = unlimited).", low=0, inherit="max_db_connections"),
    _D("server_require_auth", "methods", None, "server_require_auth of this database's server connections.",
       inherit="server_require_auth"),
    _D("connect_query", "str", "", 'Query run once on each new server connection after login, before any client uses it, within server_connect_timeout (a failure counts as a failed login); "" runs none.'),
    _D("auth_dbname", "str", None, "Database section in which auth_query runs for clients of this database.", inherit="auth_dbname"),
    _D("application_name", "str", "", 'application_name of server connections whose client sets none; "" sets none.'),
    _D("target_session_attrs", "enum", None, "target_session_attrs of this database's server connections "
       '(an alias section for the standbys: the same host list with "standby" or "prefer-standby").',
       choices=TARGET_SESSION_ATTRS, inherit="target_session_attrs"),
    _D("load_balance_hosts", "enum", None, "load_balance_hosts of this database's server connections.",
       choices=LOAD_BALANCE_HOSTS, inherit="load_balance_hosts"),
    _D("max_replica_lag", "duration", None, "max_replica_lag of this database's read pool.", low=0,
       inherit="max_replica_lag"),
    # --- [users.<name>] ---
    _U("pool_mode", "enum", None, "Pool mode of this user's pools; wins over the database's.", choices=POOL_MODES,
       default_doc="the database's pool_mode"),
    _U("max_user_connections", "int", None, "Server connections of this user over all pools (0 = unlimited).", low=0, inherit="max_user_connections"),
)


def describe_settings() -> list[Setting]:
    """Every setting, in schema order ([pgmp], then databases, then users)."""
    return list(SCHEMA)


def _settings(section: str) -> dict[str, Setting]:
    return {s.name: s for s in SCHEMA if s.section == section}


# ----------------------------------------------------------------- parsing

class _Invalid(ValueError):
    """A value does not fit its setting; the message says what was expected."""


def _show(value: object) -> str:
    """A value as the operator wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _range_text(s: Setting, fmt=str) -> str:
    if s.low is not None and s.high is not None:
        return f" {fmt(s.low)}..{fmt(s.high)}"
    if s.low is not None:
        return f" >= {fmt(s.low)}"
    return ""


def _check_range(s: Setting, n: float, expected: str) -> None:
    if (s.low is not None and n < s.low) or (s.high is not None and n > s.high):
        raise _Invalid(expected)


def _parse_str(s: Setting, v: object) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"expected a string, got {_show(v)}")
    if "\0" in v:
        raise _Invalid("must not contain a NUL character")
    return v


@dataclass(frozen=True)
class HostSpec:
    """One host of a database: a name or IP address and its port, or a unix socket directory."""

    host: str
    port: int

    @property
    def unix(self) -> bool:
        return self.host.startswith("/")

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        if self.unix:
            return f"{self.host}/.s.PGSQL.{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_BRACKETED = re.compile(r"\[([^\[\]]+)\](?::([0-9]{1,5}))?")


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """(host, port or None) of one entry of a database's host list; ValueError says what is wrong.

    "10.0.0.6:5433", "db1.internal", "[fd00::7]:5433", "fd00::7" (no port), "/var/run/postgresql".
    """
    if entry.startswith("/"):
        if any(c.isspace() for c in entry):
            raise ValueError(f"a socket directory must not contain spaces, got {_show(entry)}")
        return entry.rstrip("/") or "/", None
    m = _BRACKETED.fullmatch(entry)
    if m:
        host, port = m[1], m[2]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}]: brackets are for IPv6 addresses only") from None
    elif entry.count(":") > 1:
        try:
            ipaddress.IPv6Address(entry)
        except ValueError:
            raise ValueError(f'{_show(entry)} is not an IPv6 address (with a port: "[address]:port")') from None
        host, port = entry, None
    else:
        host, _, port = entry.partition(":")
        port = port if _ else None
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"expected a host name, IP address or socket directory (starting with /), "
                             f"optionally with :port, got {_show(entry)}")
        if port is not None and not port.isdigit():
            raise ValueError(f"expected a port number after the colon, got {_show(entry)}")
    if port is not None:
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port} of {_show(entry)} is not in 1..65535")
        port = int(port)
    return host, port


def host_specs(entries, default_port: int) -> tuple[HostSpec, ...]:
    """The HostSpecs of a parsed host list; entries without a port get ``default_port``."""
    out = []
    for entry in entries:
        host, port = parse_host_entry(entry)
        out.append(HostSpec(host, port or default_port))
    return tuple(out)


def _parse_hosts(s: Setting, v: object) -> tuple[str, ...]:
    """A host, a comma-separated string of them, or a list; each entry is checked, the list kept as written."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise _Invalid(f"expected a host or a list of hosts, got {_show(v)}")
    entries = []
    for item in items:
        item = item.strip()
        if not item or "\0" in item:
            raise _Invalid(f"expected a host name, IP address or socket directory, got {_show(v)}")
        try:
            parse_host_entry(item)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        entries.append(item)
    return tuple(entries)


def _parse_int(s: Setting, v: object) -> int:
    expected = f"expected an integer{_range_text(s)}, got {_show(v)}"
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Invalid(expected)
    _check_range(s, v, expected)
    return v


def _parse_bool(s: Setting, v: object) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"expected true or false, got {_show(v)}")
    return v


def _parse_enum(s: Setting, v: object) -> str:
    if v not in s.choices:
        raise _Invalid(f"expected one of {', '.join(s.choices)}; got {_show(v)}")
    return v


_DURATION_UNITS = {"": 1.0, "us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "kb": KB, "mb": MB, "gb": GB, "tb": 1024 * GB}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def _parse_duration(s: Setting, v: object) -> float:
    expected = (f"expected a duration in seconds{_range_text(s)} (a number, or a string like"
                f' "500ms", "30s", "5min", "1h"), got {_show(v)}')
    if isinstance(v, str):
        m = _NUMBER_UNIT.fullmatch(v)
        if not m or m[2] not in _DURATION_UNITS:
            raise _Invalid(expected)
        seconds = float(m[1]) * _DURATION_UNITS[m[2]]
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        seconds = float(v)
    else:
        raise _Invalid(expected)
    _check_range(s, seconds, expected)
    return seconds


def _human_size(n: float) -> str:
    for unit, factor in (("GB", GB), ("MB", MB), ("kB", KB)):
        if n >= factor and n % factor == 0:
            return f"{int(n // factor)}{unit}"
    return str(int(n))


def _parse_size(s: Setting, v: object) -> int:
    expected = (f"expected a size in bytes{_range_text(s, _human_size)} (an integer, or a string like"
                f' "64kB", "1MB", "1GB"), got {_show(v)}')
    if isinstance(v, str):
        m = _NUMBER_UNIT.fullmatch(v)
        if not m or m[2].lower() not in _SIZE_UNITS:
            raise _Invalid(expected)
        size = int(float(m[1]) * _SIZE_UNITS[m[2].lower()])
    elif isinstance(v, int) and not isinstance(v, bool):
        size = v
    else:
        raise _Invalid(expected)
    _check_range(s, size, expected)
    return size


def _parse_mode(s: Setting, v: object) -> int:
    expected = f'expected an octal file mode 0..0777 (0o777 or "0777"), got {_show(v)}'
    if isinstance(v, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", v):
        mode = int(v.removeprefix("0o"), 8)
    elif isinstance(v, int) and not isinstance(v, bool):
        mode = v
    else:
        raise _Invalid(expected)
    if not 0 <= mode <= 0o777:
        raise _Invalid(expected + (" (a decimal number: write 0o777)" if isinstance(v, int) else ""))
    return mode


def _parse_strlist(s: Setting, v: object) -> tuple[str, ...]:
    """A list of strings; a single comma-separated string is read as PgBouncer does."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise _Invalid(f"expected a list of strings, got {_show(v)}")
    items = [i.strip() for i in items if i.strip()]
    for item in items:
        if "\0" in item or any(c.isspace() for c in item):
            raise _Invalid(f"{item!r} is not a name (no spaces or NUL)")
    return tuple(dict.fromkeys(items))


def _parse_methods(s: Setting, v: object) -> tuple[str, ...]:
    """server_require_auth: methods, or "!methods" (not both), as libpq's require_auth."""
    items = _parse_strlist(s, v)
    for item in items:
        method = item.removeprefix("!")
        if method in ("gss", "sspi", "oauth"):
            raise _Invalid(f"pgmp does not log in to servers with {method}; allowed: {', '.join(SERVER_AUTH_METHODS)}")
        if method not in SERVER_AUTH_METHODS:
            raise _Invalid(f'unknown method {item!r}: expected {", ".join(SERVER_AUTH_METHODS)}, '
                           'each optionally prefixed with "!"')
    if len({item.startswith("!") for item in items}) > 1:
        raise _Invalid('list either the methods to allow or "!methods" to refuse, not both (as libpq\'s require_auth)')
    if items and items[0].startswith("!") and len(items) == len(SERVER_AUTH_METHODS):
        raise _Invalid("refuses every method: no server could be logged in to")
    return items


def _parse_addrs(s: Setting, v: object) -> tuple[str, ...]:
    """Listen addresses: "*" is every IPv4 and IPv6 address; "" is none (unix socket only)."""
    addrs = _parse_strlist(s, v)
    expanded: list[str] = []
    for addr in addrs:
        expanded += ["0.0.0.0", "::"] if addr == "*" else [addr]
    return tuple(dict.fromkeys(expanded))


_HOST_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^\s:\[\]]+):([0-9]{1,5})")


def split_host_port(value: str) -> tuple[str, int]:
    """("127.0.0.1", 9127) from "127.0.0.1:9127", ("::1", 9127) from "[::1]:9127"; localhost is 127.0.0.1.

    ValueError says what is wrong. Only IP addresses: nothing here waits for DNS.
    """
    m = _HOST_PORT.fullmatch(value)
    if not m:
        raise ValueError(f'expected "host:port" (an IPv6 address in brackets: "[::1]:9127"), got {_show(value)}')
    host, port = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
    if m[1] is not None and ip.version != 6:
        raise ValueError(f"[{host}]: brackets are for IPv6 addresses only")
    if m[1] is None and ip.version == 6:
        raise ValueError(f'write an IPv6 address in brackets: "[{host}]:{port}"')
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    return host, int(port)


def _parse_hostport(s: Setting, v: object) -> str:
    """An address to listen on as "host:port", or "" for none."""
    v = _parse_str(s, v)
    if v:
        try:
            split_host_port(v)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    return v


_PARSERS = {
    "str": _parse_str, "path": _parse_str, "int": _parse_int,
    "bool": _parse_bool, "enum": _parse_enum, "duration": _parse_duration, "size": _parse_size,
    "mode": _parse_mode, "strlist": _parse_strlist, "addrs": _parse_addrs, "methods": _parse_methods,
    "hostport": _parse_hostport, "hosts": _parse_hosts,
}
_PYTYPES = {
    "str": str, "path": str, "int": int, "bool": bool, "enum": str, "duration": float,
    "size": int, "mode": int, "strlist": tuple[str, ...], "addrs": tuple[str, ...], "methods": tuple[str, ...],
    "hostport": str, "hosts": tuple[str, ...],
}


# ----------------------------------------------------------------- records

def _field(s: Setting) -> tuple:
    pytype = _PYTYPES[s.kind]
    if s.default is None and not s.inherit:
        pytype = pytype | None
    return s.name, pytype, field(repr=s.name != "password")  # keep passwords out of logs


def _record(name: str, section: str, doc: str, head=(), tail=(), namespace=None):
    """A frozen dataclass with one field per setting of ``section``."""
    fields = [_field(s) for s in SCHEMA if s.section == section]
    cls = dataclasses.make_dataclass(name, [*head, *fields, *tail], frozen=True, namespace=namespace)
    cls.__module__, cls.__doc__ = __name__, doc
    return cls


def _unix_socket_path(directory: str, port: int) -> str:
    return os.path.join(directory, f".s.PGSQL.{port}") if directory else ""


DatabaseConfig = _record(
    "DatabaseConfig", "databases", "A [databases.<name>] section, with inherited values filled in; "
    "``hosts`` is its host list as HostSpecs (the section's port where an entry gives none).",
    head=[("name", str)],
    namespace={"hosts": functools.cached_property(lambda db: host_specs(db.host, db.port))})
UserConfig = _record(
    "UserConfig", "users", "A [users.<name>] section; pool_mode is None when the user does not set it.",
    head=[("name", str)])
Config = _record(
    "Config", "pgmp",
    "A validated config: every [pgmp] setting as an attribute (durations in float seconds, "
    "sizes in int bytes, paths absolute), plus the databases and users sections.",
    head=[("path", str)],
    tail=[("databases", dict), ("users", dict)],
    namespace={"unix_socket_path": property(
        lambda cfg: _unix_socket_path(cfg.unix_socket_dir, cfg.listen_port),
        doc='The unix socket file clients connect to, "" when disabled.')})


# ----------------------------------------------------------------- loading

def _section_label(section: str, name: str | None = None) -> str:
    """How a section is written in the file: [pgmp], [databases.appdb], [databases."*"]."""
    if name is None:
        return f"[{section}]"
    key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
    return f"[{section}.{key}]"


def _section_pattern(section: str) -> str:
    """A section in documentation: [pgmp], [databases.<name>], [users.<name>]."""
    return "[pgmp]" if section == "pgmp" else f"[{section}.<name>]"


def _suggest(word: str, candidates, fmt: str = "{}") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {fmt.format(close[0])}?" if close else ""


class _Loader:
    """Turns the parsed TOML document into a Config, collecting every problem on the way."""

    def __init__(self, path: str):
        self.path = path
        self.base = os.getcwd() if path == "<string>" else os.path.dirname(path)
        self.errors: list[str] = []

    def error(self, *parts: str) -> None:
        """Record a problem: error("[pgmp] listen_port", "expected ...") or error("whole message")."""
        self.errors.append(f"{self.path}: " + ": ".join(parts))

    def values(self, label: str, section: str, table: dict, **defaults) -> dict:
        """Parse one section's table: unknown keys, then each setting's value or default."""
        schema = _settings(section)
        for key in table:
            if key in schema:
                continue
            home = [_section_pattern(o) for o in SECTIONS if o != section and key in _settings(o)]
            where = f" here; it belongs in {' or '.join(home)}" if home else ""
            self.error(f"{label} {key}", f"unknown setting{where}{_suggest(key, schema)}")
        out = {}
        for s in schema.values():
            if s.name not in table and s.inherit:
                out[s.name] = defaults[s.inherit]
                continue
            raw = table.get(s.name, s.default)
            try:
                out[s.name] = None if raw is None else self.resolve(s, _PARSERS[s.kind](s, raw))
            except _Invalid as e:
                self.error(f"{label} {s.name}", str(e))
                out[s.name] = None
        return out

    def resolve(self, s: Setting, value):
        if s.kind == "path" and value:
            return os.path.normpath(os.path.join(self.base, value))
        return value

    def tables(self, doc: dict, section: str) -> dict[str, dict]:
        """The named sub-tables of [databases] or [users]."""
        tables = doc.get(section, {})
        if not isinstance(tables, dict):
            self.error(f"{section} must be tables like {_section_pattern(section)}, got {_show(tables)}")
            return {}
        out = {}
        for name, table in tables.items():
            label = _section_label(section, name)
            if name == "" or "\0" in name:
                self.error(f"{label}: a {section[:-1]} name must be non-empty and contain no NUL")
            elif not isinstance(table, dict):
                example = ", ".join(list(_settings(section))[:3])
                pgbouncer = " (pgmp does not read PgBouncer connect strings)" if isinstance(table, str) else ""
                self.error(f"[{section}] {name}", f"expected a table {label} with settings such as "
                                                  f"{example}, got {_show(table)}{pgbouncer}")
            else:
                out[name] = table
        return out

    def load(self, doc: dict) -> Config:
        for key in (k for k in doc if k not in SECTIONS):
            if key in _settings("pgmp"):
                self.error(f"{key} is outside any section; put it under [pgmp]")
            else:
                self.error(f"unknown section [{key}]{_suggest(key, SECTIONS, '[{}]')}"
                           " (sections: [pgmp], [databases.<name>], [users.<name>])")
        top = doc.get("pgmp", {})
        if not isinstance(top, dict):
            self.error(f"pgmp must be the [pgmp] table, got {_show(top)}")
            top = {}
        g = self.values("[pgmp]", "pgmp", top)
        databases = {name: self.database(name, table, g)
                     for name, table in self.tables(doc, "databases").items()}
        users = {name: self.user(name, table, g) for name, table in self.tables(doc, "users").items()}
        if not self.errors:
            self.check(g)
            self.check_auth_dbname(g, databases)
        if self.errors:
            raise ConfigError("\n".join(self.errors), self.errors)
        return Config(path=self.path, databases=databases, users=users, **g)

    def database(self, name: str, table: dict, g: dict) -> DatabaseConfig:
        label = _section_label("databases", name)
        db = self.values(label, "databases", table, **g)
        if db["dbname"] is None:
            db["dbname"] = "" if name == "*" else name  # "*": filled in by database_for()
        elif db["dbname"] == "":
            self.error(f"{label} dbname", "must not be empty (leave it out to use the section name)")
        if db["host"] is not None and db["port"] is not None:
            seen = set()
            for spec in host_specs(db["host"], db["port"]):
                if spec.key in seen:
                    self.error(f"{label} host", f"{spec} is listed twice")
                seen.add(spec.key)
        own = "pool_size" in table or "min_pool_size" in table  # else [pgmp]'s check reports it
        low, high = db["min_pool_size"], db["pool_size"]
        if own and None not in (low, high) and low > high:
            self.error(f"{label} min_pool_size", f"{low} is larger than pool_size {high}")
        return DatabaseConfig(name=name, **db)

    def user(self, name: str, table: dict, g: dict) -> UserConfig:
        return UserConfig(name=name, **self.values(_section_label("users", name), "users", table, **g))

    def check_auth_dbname(self, g: dict, databases: dict) -> None:
        """auth_dbname names a database section of its own (never "*"); a "*" section with auth_user needs one."""
        if not g["auth_user"]:
            return
        checks = [("[pgmp]", None, g["auth_dbname"])]
        checks += [(_section_label("databases", name), name, db.auth_dbname) for name, db in databases.items()
                   if db.auth_dbname != g["auth_dbname"] or (name == "*" and not db.auth_dbname)]
        for label, name, target in checks:
            if target == "*":
                self.error(f"{label} auth_dbname", 'must name a database section, not "*": auth_query '
                           "must run in a database the configuration names")
            elif target and target not in databases:
                self.error(f"{label} auth_dbname", f"no [databases.{target}] section: auth_dbname names the "
                           "section whose server and database auth_query runs in")
            elif name == "*" and not target:
                self.error(f"{label} auth_dbname", 'a "*" section lets a client pick any database, and auth_query '
                           "would run there as auth_user among objects that database's owner created: set "
                           "auth_dbname (in [pgmp] or this section) to a database only trusted roles own")

    def check(self, g: dict) -> None:
        """Rules that involve more than one [pgmp] setting; fills in the derived control_socket."""
        if g["auth_type"] != "trust" and not g["auth_file"]:
            self.error("[pgmp] auth_file", f'auth_type = "{g["auth_type"]}" needs an auth_file '
                       '(lines of "user" "password"); set auth_file, or auth_type = "trust"')
        if g["auth_user"] and not g["auth_query"].strip():
            self.error("[pgmp] auth_query", "must not be empty when auth_user is set")
        if g["health_check_password"] and not g["health_check_user"]:
            self.error("[pgmp] health_check_password", "is set but health_check_user is not: set the user the "
                       "health checks log in as, or remove the password")
        if g["min_pool_size"] > g["default_pool_size"]:
            self.error("[pgmp] min_pool_size",
                       f"{g['min_pool_size']} is larger than default_pool_size {g['default_pool_size']}")
        if not g["listen_addr"] and not g["unix_socket_dir"]:
            self.error("[pgmp] listen_addr",
                       'nothing to listen on: listen_addr and unix_socket_dir are both ""')
        tls = g["client_tls_mode"]
        if tls != "disable" and not g["client_tls_cert_file"]:
            self.error("[pgmp] client_tls_cert_file", f'client_tls_mode = "{tls}" needs a certificate')
        if tls in ("verify-ca", "verify-full") and not g["client_tls_ca_file"]:
            self.error("[pgmp] client_tls_ca_file",
                       f'client_tls_mode = "{tls}" needs the CA that signs client certificates')
        if not g["control_socket"]:
            run_dir = os.path.dirname(g["pidfile"]) if g["pidfile"] else "/tmp"
            g["control_socket"] = os.path.join(run_dir, f".pgmp.{g['listen_port']}.ctl")
        unix_socket = _unix_socket_path(g["unix_socket_dir"], g["listen_port"])
        for name, sock in (("unix_socket_dir", unix_socket), ("control_socket", g["control_socket"])):
            if len(os.fsencode(sock)) > UNIX_PATH_MAX:
                self.error(f"[pgmp] {name}", f"socket path {sock!r} is longer than {UNIX_PATH_MAX} bytes")


def loads(text: str, path: str = "<string>", overrides: dict | None = None) -> Config:
    """Parse and validate config text; relative paths resolve against dirname(path) (cwd for "<string>").

    ``overrides`` are [pgmp] values (as TOML would give them) that win over the file's: the admin
    console's SET.
    """
    if path != "<string>":
        path = os.path.abspath(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if overrides:
        top = doc.setdefault("pgmp", {})
        if isinstance(top, dict):
            top.update(overrides)
    return _Loader(path).load(doc)


_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def value_from_text(name: str, text: str):
    """A [pgmp] setting's value from text (the admin console's SET key = value), as TOML would give it.

    Raises ConfigError when the setting does not exist, cannot change while pgmp runs, or the text
    is not of its type; range and cross-setting checks are the loader's.
    """
    s = _settings("pgmp").get(name)
    if s is None:
        raise ConfigError(f"unknown setting {name!r}{_suggest(name, _settings('pgmp'))}")
    if not s.reloadable:
        raise ConfigError(f"{name} cannot change while pgmp runs: edit the file and restart pgmp")
    if s.kind == "bool":
        if text.lower() in _TRUE or text.lower() in _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{name}: expected on or off, got {text!r}")
    if s.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
    if s.kind in ("duration", "size") and re.fullmatch(r"\s*\d+\s*", text):
        return int(text)
    return text           # strings, enums, paths, durations and sizes with units, comma lists


def value_text(s: Setting, value) -> str:
    """A setting's value as the admin console's SHOW CONFIG prints it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"          # as PgBouncer shows its booleans
    if s.kind == "mode":
        return f"0{value:o}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(value)
    return str(value)


def default_value_text(s: Setting) -> str:
    """The schema default of ``s`` as value_text prints it (its documentation when it has no plain default)."""
    if s.default is None or s.default_doc:
        return ""
    value = _PARSERS[s.kind](s, s.default)
    return value_text(s, value)


def load(path: str) -> Config:
    """Read, parse and validate the config file at ``path``."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (at line {line}, byte {e.start})") from None
    return loads(text, path)


# ----------------------------------------------------------------- queries

def database_for(cfg: Config, name: str) -> DatabaseConfig | None:
    """The database a client asking for ``name`` gets: its own section, else the "*" fallback."""
    if name in cfg.databases:
        return cfg.databases[name]
    fallback = cfg.databases.get("*")
    if fallback is None:
        return None
    return dataclasses.replace(fallback, name=name, dbname=fallback.dbname or name)


def pool_mode_for(db: DatabaseConfig, user: UserConfig | None) -> str:
    """The pool mode of a (database, user) pool: the user's if set, else the database's."""
    return user.pool_mode if user is not None and user.pool_mode else db.pool_mode


def diff(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(changed settings that apply on reload, changed settings that need a new worker generation).

    Changed database and user sections are reported as "databases.<name>" and
    "users.<name>"; they always apply on reload.
    """
    reload, restart = [], []
    for s in SCHEMA:
        if s.section == "pgmp" and getattr(old, s.name) != getattr(new, s.name):
            (reload if s.reloadable else restart).append(s.name)
    for section in ("databases", "users"):
        a, b = getattr(old, section), getattr(new, section)
        reload += [f"{section}.{n}" for n in sorted(a.keys() | b.keys()) if a.get(n) != b.get(n)]
    return reload, restart


# ----------------------------------------------------------------- documentation

_KIND_TEXT = {
    "str": "string", "path": "path (relative: to the config file's directory)", "bool": "boolean",
    "mode": "octal file mode", "strlist": "list of strings", "addrs": "address or list of addresses",
    "methods": 'list of password, md5, scram-sha-256, none (or of "!method")',
    "hostport": '"host:port" (IPv6: "[address]:port") or ""',
    "hosts": 'host, "host:port", "[IPv6]:port" or socket directory, or a list of them',
}


def _type_text(s: Setting) -> str:
    if s.kind == "enum":
        return "one of " + " | ".join(s.choices)
    if s.kind == "int":
        return "integer" + _range_text(s)
    if s.kind == "duration":
        return "duration in seconds" + _range_text(s) + ' (or "500ms", "30s", "5min", "1h")'
    if s.kind == "size":
        return "size in bytes" + _range_text(s, _human_size) + ' (or "64kB", "1MB", "1GB")'
    return _KIND_TEXT[s.kind]


def _default_text(s: Setting) -> str:
    if s.default_doc:
        return s.default_doc
    if s.inherit:
        return f"inherited from [pgmp] {s.inherit}"
    if s.kind in ("int", "duration"):
        return f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
    if s.kind == "size":
        human = _human_size(s.default)
        return str(s.default) if human == str(s.default) else f"{s.default} ({human})"
    if s.kind == "bool":
        return "true" if s.default else "false"
    if isinstance(s.default, list):
        return "[" + ", ".join(f'"{v}"' for v in s.default) + "]"
    return f'"{s.default}"'


def render_settings_table() -> str:
    """Plain-text reference of every setting, one block each (for `pgmp config check`)."""
    blocks = []
    for s in SCHEMA:
        label = _section_pattern(s.section)
        doc = textwrap.fill(s.doc, width=78, initial_indent="    ", subsequent_indent="    ")
        blocks.append(f"{label} {s.name}\n"
                      f"    type: {_type_text(s)}\n"
                      f"    default: {_default_text(s)}\n"
                      f"    reload: {'yes' if s.reloadable else 'no (restart)'}\n"
                      f"{doc}\n")
    return "\n".join(blocks)


def _roff(text: str) -> str:
    """One line of roff text: backslashes escaped, "-" kept a copyable ASCII hyphen."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def render_man_settings() -> str:
    """The settings list of pgmp.toml(5) in roff: a .SS per section, a .TP per setting."""
    out = []
    for section in SECTIONS:
        out.append(f'.SS "{_section_pattern(section)}"')
        for s in (s for s in SCHEMA if s.section == section):
            out += [".TP", f".B {s.name}", _roff(s.doc), ".br",
                    _roff(f"Type: {_type_text(s)}."), ".br",
                    _roff(f"Default: {_default_text(s)}."), ".br",
                    "Reload: " + ("yes." if s.reloadable else "no, needs a restart.")]
    return "\n".join(out) + "\n"
