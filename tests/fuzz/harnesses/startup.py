"""Fuzz the first packets of a client connection: pgmp/protocol/startup.py, then the settings they ask for.

Input: the bytes a client sends first, read as pgmp's client does (packet_length on
each 4-byte head, then parse of the whole packet; SSLRequest/GSSENCRequest may come
before the StartupMessage). A StartupMessage's parameters then go through
session.client_settings (startup options included) and session.settings_query.

Documented errors: ClientProtocolError (packet_length, parse, parse_options,
client_settings). Invariants: a parsed StartupMessage has a user, no NUL in any name or
value, and re-encodes to the same parameters; the settings query built from a client's
values is one SELECT of pg_catalog.set_config(name, value, false) calls whose string
literals read back, with pgmp's own SQL lexer, as exactly those names and values (no
client value can end a literal and add SQL).
"""
from pgmp.errors import ClientProtocolError
from pgmp.protocol import messages, startup
from pgmp.protocol.sql import _tokens
from pgmp.session import client_settings, settings_query
from tests.fuzz.harnesses._common import check

MAX_LEN = 4096


def one_input(data: bytes) -> None:
    pos, n = 0, len(data)
    while n - pos >= 4:
        try:
            length = startup.packet_length(data[pos:pos + 4])
        except ClientProtocolError:
            return
        check(8 <= length <= messages.MAX_STARTUP_PACKET, f"packet_length accepted {length}")
        if n - pos < length:
            return
        packet = data[pos:pos + length]
        pos += length
        try:
            sp = startup.parse(packet)
        except ClientProtocolError:
            return
        if sp.kind in ("ssl", "gssenc"):
            continue
        if sp.kind == "cancel":
            check(length == 16, "a cancel request of the wrong length was accepted")
            return
        check(sp.kind == "startup", f"unknown packet kind {sp.kind!r}")
        _startup_packet(sp)
        return


def _startup_packet(sp) -> None:
    check(sp.user != "", "a StartupMessage without a user was accepted")
    check("replication" not in sp.params, "replication parameter left in params")
    for name, value in sp.params.items():
        check("\0" not in name and "\0" not in value and name, f"bad parameter {name!r}={value!r}")
    if sp.minor == 0 and not sp.unrecognized:
        again = startup.parse(messages.startup_message(sp.params))
        check(again.params == sp.params, f"re-encoded startup parameters differ: {again.params} != {sp.params}")
    try:
        settings = client_settings(sp)
    except ClientProtocolError:
        return
    query = settings_query(settings, {}, {})
    if query is None:
        check(not settings, f"no settings query for {settings}")
        return
    _check_settings_query(query, settings)


def _check_settings_query(query: bytes, settings: dict[str, str]) -> None:
    check(query[:1] == b"Q" and query.endswith(b"\0") and query[5:].count(b"\0") == 1,
          "the settings query is not one Query message")
    sql = query[5:-1].decode("utf-8", "surrogateescape")
    tokens = _tokens(sql)
    check(tokens[:1] == [("word", "select")], f"settings query does not start with SELECT: {sql!r}")
    calls, i = {}, 1
    # pg_catalog . set_config ( 'name' , 'value' , false ) [, ...]
    while i < len(tokens):
        call = tokens[i:i + 10]
        shape = [t[0] if t[0] == "str" else t for t in call]
        check(shape == [("word", "pg_catalog"), ("op", "."), ("word", "set_config"), ("op", "("), "str",
                        ("op", ","), "str", ("op", ","), ("word", "false"), ("op", ")")],
              f"unexpected tokens in the settings query {sql!r}: {call}")
        calls[call[4][1]] = call[6][1]
        i += 10
        if i < len(tokens):
            check(tokens[i] == ("op", ","), f"unexpected token {tokens[i]} in {sql!r}")
            i += 1
    check(calls == settings, f"the settings query sets {calls}, the client asked for {settings}")
