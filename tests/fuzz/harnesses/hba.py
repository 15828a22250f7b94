"""Fuzz the hba file parser: pgmp/hba.py load_hba, then HbaRules.match on connections the input describes.

Input: the file's bytes (read through load_hba, UTF-8 check included), optionally
followed by a line "#@ conn_type database user address tls" naming a connection to match.

Documented errors: HbaError (the file), ValueError (match given a bad address).
Invariants: every rule has a known connection type and method, "local" rules no
network; match answers a rule of the file or None; the first matching rule is the one
answered; parsing is deterministic.
"""
import os
import tempfile

from pgmp.hba import CONN_TYPES, METHODS, HbaError, load_hba, parse_hba
from tests.fuzz.harnesses._common import check

MAX_LEN = 4096
_PATH = os.path.join(tempfile.mkdtemp(prefix="pgmp-fuzz-hba-"), "pg_hba.conf")
_DEFAULT_CONNECTIONS = (("local", "db", "alice", None, False), ("host", "db", "alice", "127.0.0.1", False),
                        ("host", "appdb", "bob", "::ffff:10.1.2.3", True), ("host", "x", "y", "::1", False))


def _connections(data: bytes):
    yield from _DEFAULT_CONNECTIONS
    for line in data.split(b"\n"):
        if line.startswith(b"#@ "):
            words = line[3:].decode("utf-8", "replace").split(" ")
            if len(words) == 5:
                yield words[0], words[1], words[2], None if words[3] == "-" else words[3], words[4] == "t"


def one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        rules = load_hba(_PATH)
    except HbaError as exc:
        check(exc.errors and all(e.startswith(_PATH) for e in exc.errors), f"HbaError without a place: {exc}")
        return
    check(rules == parse_hba(data.decode("utf-8"), _PATH), "parsing twice differs")
    for rule in rules.rules:
        check(rule.conn_type in CONN_TYPES and rule.method in METHODS, f"unknown type or method in {rule}")
        check(rule.conn_type != "local" or rule.network is None, f"a local rule with a network: {rule}")
    for conn_type, database, user, addr, tls in _connections(data):
        try:
            found = rules.match(conn_type=conn_type, database=database, user=user, addr=addr, tls=tls)
        except ValueError:
            continue
        check(found is None or found in rules.rules, "match answered a rule that is not in the file")
        first = next((r for r in rules.rules if _applies(r, conn_type, database, user, addr, tls)), None)
        check(found is first, f"match answered {found}, the first rule that applies is {first}")


def _applies(rule, conn_type, database, user, addr, tls) -> bool:
    """The rule's conditions, checked plainly (the reference for match)."""
    import ipaddress
    if rule.conn_type == "local":
        if conn_type != "local":
            return False
    else:
        if conn_type != "host" or (rule.conn_type == "hostssl" and not tls) or (rule.conn_type == "hostnossl" and tls):
            return False
        if rule.network is not None:
            ip = ipaddress.ip_address(addr)
            forms = [ip] + ([ip.ipv4_mapped] if getattr(ip, "ipv4_mapped", None) else [])
            if not any(f.version == rule.network.version and f in rule.network for f in forms):
                return False
    if rule.databases is not None and database not in rule.databases and not (rule.sameuser and database == user):
        return False
    return rule.users is None or user in rule.users
