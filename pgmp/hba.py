"""Host-based access rules: parse pg_hba.conf-style files and find the rule for a connection (sans-IO)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CONN_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "reject", "password", "md5", "scram-sha-256", "cert")
# PostgreSQL methods that make no sense for (or are not implemented by) a pooler.
UNSUPPORTED_METHODS = ("peer", "ident", "ldap", "radius", "pam", "gss", "sspi", "bsd")
CLIENTCERT_VALUES = ("verify-ca", "verify-full")

_BLANKS = " \t\r"  # what PostgreSQL's tokenizer treats as field separators


class HbaError(Exception):
    """An invalid hba file; str() is one "<path>:<line>: <problem>" per problem, a line each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class _LineError(Exception):
    """A problem on the line being parsed; parse_hba adds the path and line number."""


class _Token(NamedTuple):
    text: str
    quoted: bool  # any part was double-quoted: keywords lose their meaning

    def is_keyword(self, word: str) -> bool:
        return not self.quoted and self.text == word


@dataclass(frozen=True)
class HbaRule:
    """One record. ``databases``/``users``/``network`` None mean "all".

    ``sameuser`` is the ``sameuser`` database keyword: the rule also matches
    when the database name equals the user name. A database field of only
    ``replication`` leaves ``databases`` empty: the rule never matches.
    """

    lineno: int
    conn_type: str  # one of CONN_TYPES
    databases: frozenset[str] | None
    users: frozenset[str] | None
    network: IPNetwork | None
    method: str  # one of METHODS
    options: dict[str, str] = field(default_factory=dict, hash=False)
    sameuser: bool = False

    def matches(self, *, conn_type: str, database: str, user: str,
                ips: tuple[IPAddress, ...], tls: bool) -> bool:
        """Whether this rule applies; ``ips`` are the client's address forms (see HbaRules.match)."""
        if self.conn_type == "local":
            if conn_type != "local":
                return False
        else:
            if conn_type != "host" or (self.conn_type == "hostssl" and not tls) \
                    or (self.conn_type == "hostnossl" and tls):
                return False
            if self.network is not None and not any(
                    ip.version == self.network.version and ip in self.network for ip in ips):
                return False
        if self.databases is not None and database not in self.databases \
                and not (self.sameuser and database == user):
            return False
        return self.users is None or user in self.users


@dataclass(frozen=True)
class HbaRules:
    """The rules of one file, in file order."""

    rules: tuple[HbaRule, ...]

    def match(self, *, conn_type: str, database: str, user: str, addr: str | None,
              tls: bool) -> HbaRule | None:
        """The first rule that applies to the connection, or None (PostgreSQL then refuses it).

        ``conn_type`` is "local" (unix socket, ``addr`` None) or "host" (TCP,
        ``addr`` the client's IP address text). An IPv4-mapped IPv6 address
        (``::ffff:1.2.3.4``) also matches IPv4 rules.
        """
        if conn_type == "local":
            ips: tuple[IPAddress, ...] = ()
        elif conn_type == "host":
            if addr is None:
                raise ValueError("a host connection needs the client's address")
            ip = ipaddress.ip_address(addr)
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            ips = (ip,) if mapped is None else (ip, mapped)
        else:
            raise ValueError(f"conn_type must be 'local' or 'host', not {conn_type!r}")
        for rule in self.rules:
            if rule.matches(conn_type=conn_type, database=database, user=user, ips=ips, tls=tls):
                return rule
        return None


def no_match_message(*, addr: str | None, user: str, database: str, tls: bool) -> str:
    """PostgreSQL's FATAL 28000 text for a connection no rule matches."""
    host = "[local]" if addr is None else addr
    encryption = "SSL encryption" if tls else "no encryption"
    return f'no pg_hba.conf entry for host "{host}", user "{user}", database "{database}", {encryption}'


def load_hba(path: str | os.PathLike) -> HbaRules:
    """Read and parse the hba file at ``path``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HbaError([f"{path}: cannot read the hba file: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise HbaError([f"{path}:{line}: not valid UTF-8"]) from None
    return parse_hba(text, path)


def parse_hba(text: str, path: str = "<string>") -> HbaRules:
    """Parse pg_hba.conf-style ``text``; raise HbaError listing every bad line."""
    rules: list[HbaRule] = []
    errors: list[str] = []
    for lineno, line in _logical_lines(text):
        try:
            fields = _tokenize(line)
            if fields:
                rules.append(_parse_rule(lineno, fields))
        except _LineError as e:
            errors.append(f"{path}:{lineno}: {e}")
    if not errors and not rules:
        errors.append(f"{path}: the hba file contains no rules, so every connection would be refused")
    if errors:
        raise HbaError(errors)
    return HbaRules(tuple(rules))


# ---------------------------------------------------------------- lexing

def _logical_lines(text: str):
    """(first line number, text) of each record, joining lines that end in a backslash."""
    start, parts = 0, []
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not parts:
            start = lineno
        raw = raw.removesuffix("\r")
        if raw.endswith("\\"):  # continues even inside quotes and comments, as in PostgreSQL
            parts.append(raw[:-1])
            continue
        parts.append(raw)
        yield start, "".join(parts)
        parts = []
    if parts:  # the last line ended with a backslash
        yield start, "".join(parts)


def _tokenize(line: str) -> list[list[_Token]]:
    """The fields of a line, each a list of its comma-separated tokens; [] for a blank line."""
    fields: list[list[_Token]] = []
    i = 0
    while True:
        i = _skip_blanks(line, i)
        if i >= len(line) or line[i] == "#":
            return fields
        tokens = []
        while True:
            token, i, comma = _read_token(line, i)
            if not token.text and not token.quoted:
                raise _LineError("empty item in a comma-separated list")
            tokens.append(token)
            if not comma:
                break
            i = _skip_blanks(line, i)
        fields.append(tokens)


def _skip_blanks(line: str, i: int) -> int:
    while i < len(line) and line[i] in _BLANKS:
        i += 1
    return i


def _read_token(line: str, i: int) -> tuple[_Token, int, bool]:
    """The token at ``i``, the index after it, and whether a comma ended it."""
    chars: list[str] = []
    quoted = in_quote = False
    while i < len(line):
        c = line[i]
        if not in_quote and (c in _BLANKS or c == "#"):
            break
        i += 1
        if not in_quote and c == ",":
            return _Token("".join(chars), quoted), i, True
        if c == '"':
            if in_quote and line.startswith('"', i):  # "" inside quotes is a literal "
                chars.append('"')
                i += 1
            else:
                in_quote, quoted = not in_quote, True
            continue
        chars.append(c)
    if in_quote:
        raise _LineError("unterminated quoted string")
    return _Token("".join(chars), quoted), i, False


# ---------------------------------------------------------------- parsing

def _parse_rule(lineno: int, fields: list[list[_Token]]) -> HbaRule:
    rest = list(fields)

    def take(what: str) -> list[_Token]:
        if not rest:
            raise _LineError(f"end of line before the {what}")
        return rest.pop(0)

    conn_type = _single(take("connection type"), "connection type").text
    if conn_type in ("include", "include_if_exists", "include_dir"):
        raise _LineError(f'"{conn_type}" directives are not supported by pgmp; put all rules in one file')
    if conn_type in ("hostgssenc", "hostnogssenc"):
        raise _LineError(f'connection type "{conn_type}" is not supported: pgmp has no GSSAPI encryption')
    if conn_type not in CONN_TYPES:
        raise _LineError(f'invalid connection type "{conn_type}" (expected one of {", ".join(CONN_TYPES)})')
    databases, sameuser = _parse_databases(take("database"))
    users = _parse_users(take("user"))
    network = None if conn_type == "local" else _parse_address(take("address"), take)
    method = _single(take("authentication method"), "authentication method").text
    if method in UNSUPPORTED_METHODS:
        raise _LineError(f'authentication method "{method}" is not supported by pgmp'
                         f' (supported: {", ".join(METHODS)})')
    if method not in METHODS:
        raise _LineError(f'invalid authentication method "{method}" (supported: {", ".join(METHODS)})')
    if method == "cert" and conn_type != "hostssl":
        raise _LineError('authentication method "cert" is only supported on "hostssl" rows')
    options = _parse_options([t for f in rest for t in f], conn_type, method)
    return HbaRule(lineno, conn_type, databases, users, network, method, options, sameuser)


def _single(tokens: list[_Token], what: str) -> _Token:
    if len(tokens) > 1:
        raise _LineError(f"multiple values given for the {what}")
    return tokens[0]


def _reject_special(token: _Token, what: str) -> None:
    if token.quoted:
        return
    if token.text.startswith("@"):
        raise _LineError(f"{what} file inclusion ({token.text}) is not supported by pgmp; list the names")
    if token.text.startswith("/"):
        raise _LineError(f"{what} regular expressions ({token.text}) are not supported by pgmp")


def _parse_databases(tokens: list[_Token]) -> tuple[frozenset[str] | None, bool]:
    names: set[str] = set()
    sameuser = False
    for token in tokens:
        if token.is_keyword("all"):
            return None, False
        if token.is_keyword("sameuser"):
            sameuser = True
        elif token.is_keyword("replication"):
            pass  # pgmp refuses replication connections: matches nothing
        elif not token.quoted and token.text in ("samerole", "samegroup"):
            raise _LineError(f'database keyword "{token.text}" is not supported by pgmp (it needs role membership)')
        else:
            _reject_special(token, "database")
            names.add(token.text)
    return frozenset(names), sameuser


def _parse_users(tokens: list[_Token]) -> frozenset[str] | None:
    names: set[str] = set()
    for token in tokens:
        if token.is_keyword("all"):
            return None
        if not token.quoted and token.text.startswith("+"):
            raise _LineError(f"group membership ({token.text}) is not supported by pgmp; list the user names")
        _reject_special(token, "user")
        names.add(token.text)
    return frozenset(names)


def _parse_ip(text: str) -> IPAddress | None:
    if "%" in text:  # no zone ids in rules
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _parse_address(tokens: list[_Token], take) -> IPNetwork | None:
    token = _single(tokens, "address")
    text = token.text
    if token.is_keyword("all"):
        return None
    if not token.quoted and text in ("samehost", "samenet"):
        raise _LineError(f'address keyword "{text}" is not supported by pgmp; write the addresses as CIDR')
    if "/" in text:
        addr_text, _, bits = text.partition("/")
        ip = _parse_ip(addr_text)
        if ip is None:
            raise _LineError(f'invalid IP address "{addr_text}"')
        if not (bits.isascii() and bits.isdigit()) or int(bits) > ip.max_prefixlen:
            raise _LineError(f'invalid CIDR mask in address "{text}"')
        prefix = int(bits)
    else:
        ip = _parse_ip(text)
        if ip is None:
            raise _LineError(f'"{text}" is not an IP address; host names are not supported in hba rules'
                             " (pgmp does not resolve them): write the address as CIDR")
        prefix = _mask_prefix(_single(take("netmask"), "netmask").text, ip)
    network_type = ipaddress.IPv4Network if ip.version == 4 else ipaddress.IPv6Network
    return network_type((ip, prefix), strict=False)


def _mask_prefix(text: str, ip: IPAddress) -> int:
    """The prefix length of netmask ``text`` (e.g. 255.255.255.0 -> 24)."""
    mask = _parse_ip(text)
    if mask is None or mask.version != ip.version:
        raise _LineError(f'invalid IP mask "{text}" for address {ip}')
    width = mask.max_prefixlen
    host_bits = ~int(mask) & ((1 << width) - 1)
    if host_bits & (host_bits + 1):  # the ones are not contiguous from the left
        raise _LineError(f'invalid IP mask "{text}": not a contiguous netmask')
    return width - host_bits.bit_length()


def _parse_options(tokens: list[_Token], conn_type: str, method: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for token in tokens:
        name, eq, value = token.text.partition("=")
        if not eq:
            raise _LineError(f'authentication option not in name=value format: "{token.text}"')
        if name in options:
            raise _LineError(f'authentication option "{name}" given twice')
        if name == "clientcert":
            if conn_type != "hostssl":
                raise _LineError('clientcert can only be configured for "hostssl" rows')
            if value not in CLIENTCERT_VALUES:
                raise _LineError(f'invalid value for clientcert: "{value}" (expected verify-ca or verify-full)')
            if method == "cert" and value != "verify-full":
                raise _LineError('clientcert only accepts "verify-full" when using "cert" authentication')
        elif name == "map":
            if method != "cert":
                raise _LineError('authentication option "map" is only valid for authentication method "cert"')
            if not value:
                raise _LineError('authentication option "map" needs a map name')
        else:
            raise _LineError(f'unrecognized authentication option name: "{name}"'
                             " (pgmp supports clientcert and map)")
        options[name] = value
    return options
