"""Transaction pooling's extended-protocol bookkeeping (pgmp.prepared), bytes in and bytes out.

Every test builds real protocol frames, hands them to a :class:`Pipeline` the way
pgmp.client and pgmp.server do (client frames of the reported types, server frames
of ``RESPONSE_TYPES``), and looks at exactly what reaches the server and the client.

The last part is a model check: a tiny PostgreSQL (:class:`ModelServer`) answers
what pgmp forwards, and what a client sees through pgmp must equal what the same
tiny server would have answered that client directly.
"""
from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pgmp.prepared import (CLOSE_COMPLETE, PARSE_COMPLETE, RESPONSE_TYPES, SYNTHETIC, Pipeline,
                           ServerStatements, StatementCache)
from pgmp.errors import PgmpError
from pgmp.protocol.messages import error_response, frame, parse_fields, read_cstr

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

# What pgmp.client reports to the Pipeline (POOLED_FLAGS minus Terminate, which it handles first)
CLIENT_REPORTED = b"QSFcfPBCDE"
# What pgmp.server reports to the Pipeline in transaction mode ('S' is ParameterStatus: never the Pipeline's)
SERVER_REPORTED = b"ZG" + RESPONSE_TYPES


# ---- frontend messages ---------------------------------------------------------------

def parse(name: bytes, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    body = name + b"\0" + sql + b"\0" + _I16.pack(len(types)) + b"".join(_U32.pack(t) for t in types)
    return frame(b"P", body)


def bind(stmt: bytes, portal: bytes = b"", params: tuple[bytes, ...] = ()) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + _I16.pack(0) + _I16.pack(len(params))
    for p in params:
        body += _I32.pack(len(p)) + p
    return frame(b"B", body + _I16.pack(0))


def describe(what: bytes, name: bytes) -> bytes:
    return frame(b"D", what + name + b"\0")


def close(what: bytes, name: bytes) -> bytes:
    return frame(b"C", what + name + b"\0")


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return frame(b"E", portal + b"\0" + _I32.pack(max_rows))


def query(sql: bytes) -> bytes:
    return frame(b"Q", sql + b"\0")


SYNC = frame(b"S")
FLUSH = frame(b"H")
COPY_DONE = frame(b"c")


def copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


# ---- backend messages ----------------------------------------------------------------

BIND_COMPLETE = frame(b"2")
NO_DATA = frame(b"n")


def row(*values: bytes) -> bytes:
    return frame(b"D", _I16.pack(len(values)) + b"".join(_I32.pack(len(v)) + v for v in values))


def command_complete(tag: bytes) -> bytes:
    return frame(b"C", tag + b"\0")


def ready(status: bytes = b"I") -> bytes:
    return frame(b"Z", status)


def error(sqlstate: str = "22012", message: str = "division by zero") -> bytes:
    return error_response(sqlstate, message, "ERROR")


def row_description(label: bytes) -> bytes:
    """Not a well-formed RowDescription: the tests only need a 'T' frame that says which statement it describes."""
    return frame(b"T", label)


PARAM_DESCRIPTION = frame(b"t", _I16.pack(0))
COPY_IN_RESPONSE = frame(b"G", b"\0" + _I16.pack(0))


def split(data: bytes) -> list[bytes]:
    """Complete frames of a byte string (what pgmp sends instead of a frame may hold several)."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = _U32.unpack_from(data, pos + 1)
        out.append(bytes(data[pos:pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data), f"a partial frame in {data!r}"
    return out


def kinds(frames: list[bytes]) -> bytes:
    return b"".join(f[:1] for f in frames)


# ---- one client relayed to one server, as client.py and server.py drive a Pipeline ----

class Relay:
    """A client's Pipeline between the client and one server; records what each side receives."""

    def __init__(self, cache: StatementCache | None = None, srv: ServerStatements | None = None,
                 pipeline: Pipeline | None = None, limit: int = 0):
        self.cache = cache if cache is not None else StatementCache()
        self.pl = pipeline if pipeline is not None else Pipeline(self.cache)
        self.srv = srv if srv is not None else ServerStatements(limit)
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []

    def client(self, *frames: bytes) -> list[bytes]:
        """One read from the client holding ``frames``; returns what pgmp sends the server for them."""
        sent = []
        for f in frames:
            kind = f[0]
            r = None
            if kind in CLIENT_REPORTED:
                r = self.pl.client_frame(kind, f[5:] if kind in b"PBCD" else b"", self.srv)
            sent += [f] if r is None else split(r)
        self.to_server += sent
        pl = self.pl
        if pl.expect and pl.expect[0][0] == SYNTHETIC:          # as ClientConnection.on_data does
            self.to_client += split(pl.synthetic_ready())
        return sent

    def server(self, *frames: bytes) -> list[bytes]:
        """Frames from the server; returns what pgmp passes on to the client for them."""
        got = []
        for f in frames:
            kind = f[0]
            r = None
            if kind in SERVER_REPORTED:
                r = self.pl.server_frame(kind, memoryview(f), self.srv)
            got += [f] if r is None else split(r)
        self.to_client += got
        return got

    def switch(self, srv: ServerStatements) -> None:
        """The transaction ended; the next one runs on another server."""
        assert self.pl.idle, self.pl.expect
        self.srv = srv


SQL1, SQL2, SQL3 = b"select 1", b"select 2", b"select 3"


# ---- StatementCache and ServerStatements ---------------------------------------------

def test_statement_cache_one_name_per_statement_text_and_types():
    cache = StatementCache()
    a = cache.name_for(b"select $1\0" + _I16.pack(0))
    b = cache.name_for(b"select $1\0" + _I16.pack(1) + _U32.pack(23))
    assert (a, b) == (b"pgmp_1", b"pgmp_2")
    assert cache.name_for(b"select $1\0" + _I16.pack(0)) == a


def test_server_statements_lru():
    srv = ServerStatements(2)
    assert srv.add(b"a") == [] and srv.add(b"b") == []
    assert srv.names == {b"a": False, b"b": False}
    srv.confirm(b"a")
    assert srv.names[b"a"] is True
    assert srv.has(b"a")                       # a is now the most recently used
    assert srv.add(b"c") == [b"b"]
    assert list(srv.names) == [b"a", b"c"]
    assert not srv.has(b"b")
    srv.forget(b"a")
    srv.forget(b"nothing")
    assert list(srv.names) == [b"c"]
    srv.clear()
    assert not srv.names


def test_server_statements_limit_zero_keeps_everything():
    srv = ServerStatements(0)
    for i in range(500):
        assert srv.add(b"s%d" % i) == []
    assert len(srv.names) == 500


# ---- Parse ---------------------------------------------------------------------------

def test_named_parse_on_server_without_it_is_rewritten_and_its_parse_complete_forwarded():
    r = Relay()
    sent = r.client(parse(b"S_1", SQL1, (23,)))
    assert sent == [parse(b"pgmp_1", SQL1, (23,))]
    assert r.srv.names == {b"pgmp_1": False}
    assert r.pl.statements == {b"S_1": SQL1 + b"\0" + _I16.pack(1) + _U32.pack(23)}
    assert r.server(PARSE_COMPLETE) == [PARSE_COMPLETE]
    assert r.srv.names == {b"pgmp_1": True}
    sent = r.client(bind(b"S_1", params=(b"42",)), execute(), SYNC)
    assert sent == [bind(b"pgmp_1", params=(b"42",)), execute(), SYNC]
    r.server(BIND_COMPLETE, row(b"42"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"12DCZ"
    assert r.pl.idle


def test_parse_of_a_statement_the_server_has_is_answered_by_pgmp_in_order():
    cache = StatementCache()
    srv = ServerStatements(0)
    first = Relay(cache, srv)                   # another client prepared the statement on this server
    first.client(parse(b"a", SQL1), SYNC)
    first.server(PARSE_COMPLETE, ready())
    r = Relay(cache, srv)
    sent = r.client(parse(b"P_0", SQL1), bind(b"P_0"), execute(), SYNC)
    assert sent == [bind(b"pgmp_1"), execute(), SYNC]
    assert r.to_client == [PARSE_COMPLETE]       # sent at once: nothing is owed before it
    r.server(BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"12DCZ"
    assert r.pl.idle


def test_synthetic_parse_complete_waits_for_the_responses_owed_before_it():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    # unnamed statement first, then a Parse pgmp answers itself, all in one pipeline
    sent = r.client(parse(b"", SQL2), bind(b""), execute(), parse(b"S_2", SQL1), bind(b"S_2"), execute(), SYNC)
    assert sent == [parse(b"", SQL2), bind(b""), execute(), bind(b"pgmp_1"), execute(), SYNC]
    r.to_client.clear()
    assert r.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"2")) == [PARSE_COMPLETE, BIND_COMPLETE, row(b"2")]
    assert r.to_client == [PARSE_COMPLETE, BIND_COMPLETE, row(b"2")]
    # the ParseComplete of S_2 goes right after the CommandComplete of the first Execute
    assert r.server(command_complete(b"SELECT 1")) == [command_complete(b"SELECT 1"), PARSE_COMPLETE]
    r.server(BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"12DC12DCZ"
    assert r.pl.idle


def test_two_client_names_for_one_statement_share_the_server_name():
    r = Relay()
    sent = r.client(parse(b"a", SQL1), parse(b"b", SQL1), bind(b"b"), execute(), SYNC)
    assert sent == [parse(b"pgmp_1", SQL1), bind(b"pgmp_1"), execute(), SYNC]
    r.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"112DCZ"


def test_same_text_with_other_parameter_types_is_another_statement():
    r = Relay()
    sent = r.client(parse(b"a", b"select $1", (23,)), parse(b"b", b"select $1", (25,)), SYNC)
    assert sent == [parse(b"pgmp_1", b"select $1", (23,)), parse(b"pgmp_2", b"select $1", (25,)), SYNC]


def test_unnamed_statements_and_portals_pass_untouched():
    r = Relay()
    msgs = [parse(b"", SQL1), bind(b""), describe(b"S", b""), describe(b"P", b""), execute(),
            close(b"S", b""), close(b"P", b""), SYNC]
    assert r.client(*msgs) == msgs
    answers = [PARSE_COMPLETE, BIND_COMPLETE, PARAM_DESCRIPTION, row_description(b"x"), row_description(b"x"),
               row(b"1"), command_complete(b"SELECT 1"), CLOSE_COMPLETE, CLOSE_COMPLETE, ready()]
    assert r.server(*answers) == answers
    assert r.pl.idle and not r.srv.names and not r.pl.statements


def test_named_portal_close_and_describe_pass_untouched():
    r = Relay()
    r.client(parse(b"S_1", SQL1))
    msgs = [bind(b"S_1", portal=b"C_1"), describe(b"P", b"C_1"), execute(b"C_1", 10), close(b"P", b"C_1"), SYNC]
    assert r.client(*msgs) == [bind(b"pgmp_1", portal=b"C_1")] + msgs[1:]
    r.server(PARSE_COMPLETE, BIND_COMPLETE, row_description(b"x"), row(b"1"), frame(b"s"),
             CLOSE_COMPLETE, ready(b"T"))
    assert kinds(r.to_client) == b"12TDs3Z"
    assert r.pl.idle


# ---- Bind / Describe of a statement the server lacks ---------------------------------

def test_bind_on_a_server_without_the_statement_injects_a_parse_whose_answer_is_dropped():
    r = Relay()
    r.client(parse(b"S_1", SQL1, (23,)), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.switch(ServerStatements(0))
    r.to_client.clear()
    sent = r.client(bind(b"S_1", params=(b"7",)), execute(), SYNC)
    assert sent == [parse(b"pgmp_1", SQL1, (23,)), bind(b"pgmp_1", params=(b"7",)), execute(), SYNC]
    assert r.server(PARSE_COMPLETE) == []
    r.server(BIND_COMPLETE, row(b"7"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"2DCZ"
    assert r.srv.names == {b"pgmp_1": True}
    # the next Bind on this server needs no Parse
    assert r.client(bind(b"S_1"), execute(), SYNC) == [bind(b"pgmp_1"), execute(), SYNC]


def test_a_stale_plan_error_goes_to_the_client_and_the_next_bind_prepares_the_statement_afresh():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.client(bind(b"S_1"), execute(), SYNC)
    stale = error("0A000", "cached plan must not change result type")
    assert r.server(stale, ready()) == [stale, ready()]
    sent = r.client(bind(b"S_1"), execute(), SYNC)
    assert sent == [close(b"S", b"pgmp_1"), parse(b"pgmp_1", SQL1), bind(b"pgmp_1"), execute(), SYNC]
    assert r.server(CLOSE_COMPLETE, PARSE_COMPLETE) == []
    r.server(BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    assert r.srv.names == {b"pgmp_1": True}
    assert r.client(bind(b"S_1"), execute(), SYNC) == [bind(b"pgmp_1"), execute(), SYNC]


def test_describe_statement_is_rewritten_and_prepared_where_missing():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    assert r.client(describe(b"S", b"S_1"), SYNC) == [describe(b"S", b"pgmp_1"), SYNC]
    r.server(PARAM_DESCRIPTION, row_description(b"x"), ready())
    r.switch(ServerStatements(0))
    r.to_client.clear()
    assert r.client(describe(b"S", b"S_1"), SYNC) == [parse(b"pgmp_1", SQL1), describe(b"S", b"pgmp_1"), SYNC]
    r.server(PARSE_COMPLETE, PARAM_DESCRIPTION, NO_DATA, ready())
    assert kinds(r.to_client) == b"tnZ"
    assert r.pl.idle


# ---- Close -----------------------------------------------------------------------------

def test_close_statement_is_answered_by_pgmp_and_the_server_keeps_it():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.to_client.clear()
    assert r.client(close(b"S", b"S_1"), SYNC) == [SYNC]
    assert r.to_client == [CLOSE_COMPLETE]
    r.server(ready())
    assert kinds(r.to_client) == b"3Z"
    assert b"S_1" not in r.pl.statements
    assert r.srv.has(b"pgmp_1")                 # kept for other clients
    # the client's name is gone: a Bind of it goes to the server as it is (and fails there)
    assert r.client(bind(b"S_1"), SYNC) == [bind(b"S_1"), SYNC]


def test_close_complete_waits_for_earlier_responses():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.to_client.clear()
    r.client(bind(b"S_1"), execute(), close(b"S", b"S_1"), SYNC)
    assert r.to_client == []
    r.server(BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"2DC3Z"


# ---- LRU eviction ----------------------------------------------------------------------

def test_eviction_closes_the_least_recently_used_statement_and_drops_its_close_complete():
    r = Relay(limit=2)
    r.client(parse(b"a", SQL1), parse(b"b", SQL2), SYNC)
    r.server(PARSE_COMPLETE, PARSE_COMPLETE, ready())
    r.client(bind(b"a"), execute(), SYNC)              # a is now more recent than b
    r.server(BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    r.to_client.clear()
    sent = r.client(parse(b"c", SQL3), bind(b"c"), execute(), SYNC)
    assert sent == [close(b"S", b"pgmp_2"), parse(b"pgmp_3", SQL3), bind(b"pgmp_3"), execute(), SYNC]
    assert r.server(CLOSE_COMPLETE) == []
    r.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"3"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"12DCZ"
    assert list(r.srv.names) == [b"pgmp_1", b"pgmp_3"]
    # b comes back with an injected Parse, evicting a
    sent = r.client(bind(b"b"), execute(), SYNC)
    assert sent == [close(b"S", b"pgmp_1"), parse(b"pgmp_2", SQL2), bind(b"pgmp_2"), execute(), SYNC]
    r.to_client.clear()
    r.server(CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, row(b"2"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"2DCZ"
    assert r.pl.idle


# ---- errors ----------------------------------------------------------------------------

def test_error_mid_pipeline_skips_to_sync_and_forgets_pending_statements():
    cache = StatementCache()
    srv = ServerStatements(0)
    other = Relay(cache, srv)
    other.client(parse(b"x", SQL3), SYNC)                       # pgmp_1 = SQL3 is on the server
    other.server(PARSE_COMPLETE, ready())
    r = Relay(cache, srv)
    sent = r.client(parse(b"S_1", b"select 1/0"), bind(b"S_1"), execute(),
                    parse(b"S_2", SQL2), parse(b"S_3", SQL3), bind(b"S_2"), execute(), SYNC)
    assert sent == [parse(b"pgmp_2", b"select 1/0"), bind(b"pgmp_2"), execute(),
                    parse(b"pgmp_3", SQL2), bind(b"pgmp_3"), execute(), SYNC]
    assert r.to_client == []                      # S_3's ParseComplete is owed after S_2's
    # the server fails the first Execute and discards everything up to the Sync
    r.server(PARSE_COMPLETE, BIND_COMPLETE, error(), ready())
    assert kinds(r.to_client) == b"12EZ"          # no ParseComplete for S_2 nor S_3
    assert r.pl.idle and not r.pl.skipping
    assert r.srv.names == {b"pgmp_1": True, b"pgmp_2": True}   # pgmp_3 never reached the server
    # S_2's Parse never ran, so S_2 does not exist, as on a direct server: its Bind goes on
    # untouched and the server answers 26000
    assert r.client(bind(b"S_2"), execute(), SYNC) == [bind(b"S_2"), execute(), SYNC]


def test_error_of_an_injected_parse_is_the_clients_and_forgets_the_statement():
    r = Relay()
    r.client(parse(b"S_1", b"select * from t"), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.switch(ServerStatements(0))
    r.to_client.clear()
    r.client(bind(b"S_1"), execute(), SYNC)
    r.server(error("42P01", 'relation "t" does not exist'), ready())
    assert kinds(r.to_client) == b"EZ"
    assert not r.srv.names and r.pl.idle


def test_error_before_the_sync_was_sent_skips_what_follows_until_sync():
    r = Relay()
    r.client(parse(b"known", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.to_client.clear()
    r.client(parse(b"S_1", b"select 1/0"), bind(b"S_1"), execute(), FLUSH)
    r.server(PARSE_COMPLETE, BIND_COMPLETE, error())
    assert r.pl.skipping and r.pl.idle
    # the server discards all this; pgmp passes it on as it is and owes nothing for it
    late = [parse(b"S_2", SQL2), parse(b"S_3", SQL1), bind(b"S_3"), execute(), close(b"S", b"known")]
    assert r.client(*late) == late
    assert r.to_client == [PARSE_COMPLETE, BIND_COMPLETE, error()]          # no synthetic '1' nor '3'
    assert b"S_2" not in r.pl.statements and b"known" in r.pl.statements
    assert r.client(SYNC) == [SYNC]
    assert not r.pl.skipping
    r.server(ready())
    assert kinds(r.to_client) == b"12EZ"
    assert r.pl.idle


def test_error_in_a_multi_statement_query_does_not_skip_the_pipeline_after_it():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.to_client.clear()
    sent = r.client(query(b"select 1; select 1/0; select 3"), parse(b"S_2", SQL1), bind(b"S_2"), execute(), SYNC)
    # a Query ahead might be DISCARD ALL: the statement is closed (a no-op if gone) and prepared again
    assert sent == [query(b"select 1; select 1/0; select 3"), frame(b"C", b"Spgmp_1\0"), parse(b"pgmp_1", SQL1),
                    bind(b"pgmp_1"), execute(), SYNC]
    r.server(row_description(b"x"), row(b"1"), command_complete(b"SELECT 1"), error(), ready(b"I"))
    assert kinds(r.to_client) == b"TDCEZ"
    r.server(CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, row(b"1"), command_complete(b"SELECT 1"), ready())
    assert kinds(r.to_client) == b"TDCEZ12DCZ"
    assert r.pl.idle


def test_simple_queries_are_owed_their_ready_for_query():
    r = Relay()
    assert r.client(query(b"select 1"), query(b"select 2")) == [query(b"select 1"), query(b"select 2")]
    r.server(row_description(b"x"), row(b"1"), command_complete(b"SELECT 1"), ready())
    assert not r.pl.idle
    r.server(frame(b"I"), ready())                 # EmptyQueryResponse is not an Execute's answer here
    assert r.pl.idle


def test_error_in_copy_from_stdin_by_query():
    r = Relay()
    r.client(query(b"copy t from stdin"))
    r.server(COPY_IN_RESPONSE)
    assert r.client(copy_data(b"x\n"), frame(b"f", b"nope\0")) == [copy_data(b"x\n"), frame(b"f", b"nope\0")]
    r.server(error("57014", "COPY from stdin failed: nope"), ready())
    assert r.pl.idle and kinds(r.to_client) == b"GEZ"


def test_function_call_and_empty_query_by_execute():
    r = Relay()
    r.client(frame(b"F", b"\0\0\0\x01" + b"\0" * 8))
    r.server(frame(b"V", _I32.pack(-1)), ready())
    assert r.pl.idle
    r.client(parse(b"S_1", b""), bind(b"S_1"), execute(), parse(b"S_2", b""), SYNC)
    r.server(PARSE_COMPLETE, BIND_COMPLETE, frame(b"I"))
    assert kinds(r.to_client) == b"VZ12I1"          # EmptyQueryResponse answers the Execute
    r.server(ready())
    assert r.pl.idle


# ---- COPY FROM STDIN through Execute -------------------------------------------------

def test_copy_in_by_execute_with_a_sync_pipelined_before_copy_in_response():
    r = Relay()
    r.client(parse(b"", b"copy t from stdin"), bind(b""), execute(), SYNC)
    assert len(r.pl.expect) == 4
    r.server(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN_RESPONSE)
    # the server in COPY IN ignores that Sync: pgmp no longer waits for its ReadyForQuery
    assert len(r.pl.expect) == 1
    r.client(copy_data(b"1\n"), COPY_DONE, SYNC)
    r.server(command_complete(b"COPY 1"), ready())
    assert kinds(r.to_client) == b"12GCZ"
    assert r.pl.idle


def test_copy_in_by_execute_without_early_sync():
    r = Relay()
    r.client(parse(b"", b"copy t from stdin"), bind(b""), execute(), FLUSH)
    r.server(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN_RESPONSE)
    assert len(r.pl.expect) == 1                 # the Execute, answered at CommandComplete
    r.client(copy_data(b"1\n"), COPY_DONE, SYNC)
    r.server(command_complete(b"COPY 1"), ready())
    assert r.pl.idle


# ---- DISCARD ALL / DEALLOCATE ALL ----------------------------------------------------

@pytest.mark.parametrize("tag", [b"DISCARD ALL", b"DEALLOCATE ALL"])
def test_discard_all_forgets_the_clients_and_the_servers_statements(tag):
    r = Relay()
    r.client(parse(b"S_1", SQL1), parse(b"S_2", SQL2), SYNC)
    r.server(PARSE_COMPLETE, PARSE_COMPLETE, ready())
    r.client(query(tag))
    r.server(command_complete(tag), ready())
    assert not r.pl.statements and not r.srv.names
    assert r.pl.idle
    # as on a real server: S_1 does not exist any more, and Parse S_1 goes to the server again
    assert r.client(bind(b"S_1"), SYNC) == [bind(b"S_1"), SYNC]
    r.server(error("26000", 'prepared statement "S_1" does not exist'), ready())
    assert r.client(parse(b"S_1", SQL1), SYNC) == [parse(b"pgmp_1", SQL1), SYNC]


def test_other_command_tags_keep_the_statements():
    r = Relay()
    r.client(parse(b"S_1", SQL1), SYNC)
    r.server(PARSE_COMPLETE, ready())
    r.client(query(b"discard temp"))
    r.server(command_complete(b"DISCARD TEMP"), ready())
    assert r.pl.statements and r.srv.names


# =====================================================================================
# Model check: pgmp + a tiny server == the tiny server alone
# =====================================================================================

OK_SQL = (b"q1", b"q2", b"q3")
RUNTIME_ERROR_SQL = b"err"           # parses, fails when executed
SYNTAX_ERROR_SQL = b"bad"            # fails at Parse


class ModelServer:
    """A tiny PostgreSQL for the extended protocol.

    Named and unnamed statements, portals (gone at Sync), discard-until-Sync after an
    error; a Close of a statement leaves its portals alone, as in PostgreSQL.

    strict: this server sits behind pgmp. Misusing pgmp's own names (a Parse of a
    pgmp_* that exists, a Bind or Describe of one that does not) or a client's named
    Parse reaching the server raise AssertionError: those are pgmp bugs, not errors
    to report to the client.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.stmts: dict[bytes, bytes] = {}
        self.portals: dict[bytes, bytes] = {}
        self.skipping = False
        self.copying = False
        self.log: list[bytes] = []

    def _error(self, sqlstate: str, message: str) -> list[bytes]:
        self.skipping = True
        return [error(sqlstate, message)]

    def feed(self, f: bytes) -> list[bytes]:
        self.log.append(f)
        kind, body = f[:1], f[5:]
        if kind == b"H":
            return []
        if kind == b"S":
            self.skipping = False
            self.portals.clear()
            return [ready()]
        if kind == b"Q":
            return self._query(read_cstr(body, 0)[0])
        if self.skipping:
            return []
        if kind == b"P":
            name, pos = read_cstr(body, 0)
            sql, _ = read_cstr(body, pos)
            if self.strict and name and not name.startswith(b"pgmp_"):
                raise AssertionError(f"the client's statement name {name!r} reached the server in a Parse")
            if name and name in self.stmts:
                if self.strict:
                    raise AssertionError(f"pgmp sent Parse {name!r}, which the server already has")
                return self._error("42P05", f"prepared statement {name!r} already exists")
            if sql == SYNTAX_ERROR_SQL:
                if not name:
                    self.stmts.pop(b"", None)
                return self._error("42601", "syntax error")
            self.stmts[name] = sql
            return [PARSE_COMPLETE]
        if kind == b"B":
            portal, pos = read_cstr(body, 0)
            name, _ = read_cstr(body, pos)
            if name not in self.stmts:
                if self.strict and name.startswith(b"pgmp_"):
                    raise AssertionError(f"pgmp sent Bind of {name!r}, which the server does not have")
                return self._error("26000", f"prepared statement {name!r} does not exist")
            self.portals[portal] = self.stmts[name]
            return [BIND_COMPLETE]
        if kind == b"D":
            what, name = body[:1], read_cstr(body, 1)[0]
            if what == b"S":
                if name not in self.stmts:
                    if self.strict and name.startswith(b"pgmp_"):
                        raise AssertionError(f"pgmp sent Describe of {name!r}, which the server does not have")
                    return self._error("26000", f"prepared statement {name!r} does not exist")
                return [PARAM_DESCRIPTION, row_description(self.stmts[name])]
            if name not in self.portals:
                return self._error("34000", f"portal {name!r} does not exist")
            return [row_description(self.portals[name])]
        if kind == b"C":
            what, name = body[:1], read_cstr(body, 1)[0]
            (self.stmts if what == b"S" else self.portals).pop(name, None)
            return [CLOSE_COMPLETE]
        if kind == b"E":
            name = read_cstr(body, 0)[0]
            if name not in self.portals:
                return self._error("34000", f"portal {name!r} does not exist")
            sql = self.portals[name]
            if sql == RUNTIME_ERROR_SQL:
                return self._error("22012", "division by zero")
            return [row(sql), command_complete(b"SELECT 1")]
        raise AssertionError(f"the model does not know message {kind!r}")

    def _query(self, sql: bytes) -> list[bytes]:
        if self.skipping:
            return []
        self.stmts.pop(b"", None)
        self.portals.clear()
        if sql == b"DISCARD ALL":
            self.stmts.clear()
            return [command_complete(b"DISCARD ALL"), ready()]
        if sql in (RUNTIME_ERROR_SQL, SYNTAX_ERROR_SQL):
            return [error("22012" if sql == RUNTIME_ERROR_SQL else "42601", "query failed"), ready()]
        return [row_description(sql), row(sql), command_complete(b"SELECT 1"), ready()]

    def server_names(self) -> set[bytes]:
        return {n for n in self.stmts if n}


def comparable(frames: list[bytes]) -> list[tuple]:
    """What a client can tell apart: each frame's type and body, an error by its SQLSTATE."""
    out = []
    for f in frames:
        if f[:1] == b"E":
            out.append((b"E", parse_fields(f[5:]).get("C")))
        else:
            out.append((f[:1], f[5:]))
    return out


class PooledServer:
    """A server connection behind pgmp: the model server and pgmp's idea of its statements."""

    def __init__(self, limit: int):
        self.model = ModelServer(strict=True)
        self.statements = ServerStatements(limit)

    def check_in_step(self) -> None:
        """Between transactions pgmp's statements of a server are exactly the server's."""
        assert set(self.statements.names) == self.model.server_names(), (
            f"pgmp thinks the server has {sorted(self.statements.names)}, "
            f"it has {sorted(self.model.server_names())}")
        assert all(self.statements.names.values()), f"unconfirmed statements left: {self.statements.names}"


def run_batch(pl: Pipeline, server: PooledServer, frames: list[bytes], deliveries: list[int] | None = None
              ) -> list[bytes]:
    """Relay one batch (ending with its last ReadyForQuery) through pgmp; what the client receives.

    After the i-th client frame, ``deliveries[i]`` of the server's pending frames reach pgmp
    (the rest arrive at the end), so server answers interleave with client frames.
    """
    to_client: list[bytes] = []
    pending: deque[bytes] = deque()

    def deliver(f: bytes) -> None:
        r = pl.server_frame(f[0], memoryview(f), server.statements) if f[0] in SERVER_REPORTED else None
        to_client.extend([f] if r is None else split(r))

    for i, f in enumerate(frames):
        kind = f[0]
        r = None
        if kind in CLIENT_REPORTED:
            r = pl.client_frame(kind, f[5:] if kind in b"PBCD" else b"", server.statements)
        for out in ([f] if r is None else split(r)):
            pending.extend(server.model.feed(out))
        if pl.expect and pl.expect[0][0] == SYNTHETIC:
            to_client.extend(split(pl.synthetic_ready()))
        for _ in range(min(deliveries[i] if deliveries else 0, len(pending))):
            deliver(pending.popleft())
    while pending:
        deliver(pending.popleft())
    return to_client


class Scenario:
    """Clients behind pgmp on a few servers, each compared with the same client on its own server."""

    def __init__(self, nclients: int = 1, nservers: int = 1, limit: int = 0):
        cache = StatementCache()
        self.pipelines = [Pipeline(cache) for _ in range(nclients)]
        self.direct = [ModelServer() for _ in range(nclients)]
        self.servers = [PooledServer(limit) for _ in range(nservers)]

    def batch(self, frames: list[bytes], client: int = 0, server: int = 0,
              deliveries: list[int] | None = None) -> tuple[list[tuple], list[tuple]]:
        """Run one batch both ways; (through pgmp, directly) as comparable lists."""
        pl = self.pipelines[client]
        srv = self.servers[server]
        via = run_batch(pl, srv, frames, deliveries)
        assert pl.idle and not pl.skipping, f"pipeline not empty after the batch: {pl.expect}"
        srv.check_in_step()
        direct = [out for f in frames for out in self.direct[client].feed(f)]
        return comparable(via), comparable(direct)

    def check(self, frames: list[bytes], client: int = 0, server: int = 0) -> list[tuple]:
        via, direct = self.batch(frames, client, server)
        assert via == direct
        return via


def test_model_transaction_pooling_basics():
    s = Scenario(nclients=2, nservers=2, limit=2)
    s.check([parse(b"s1", b"q1"), bind(b"s1"), execute(), SYNC], client=0, server=0)
    s.check([parse(b"s1", b"q2"), parse(b"s2", b"q1"), bind(b"s2"), execute(), SYNC], client=1, server=0)
    s.check([bind(b"s1"), execute(), describe(b"S", b"s1"), SYNC], client=0, server=1)
    s.check([parse(b"s3", b"q3"), bind(b"s3"), execute(), bind(b"s1"), execute(), SYNC], client=1, server=1)
    s.check([query(b"DISCARD ALL")], client=1, server=0)
    s.check([bind(b"s1"), execute(), SYNC], client=0, server=0)


def test_model_close_skipped_by_an_error_leaves_the_evicted_statement_on_the_server():
    """BUG: an eviction Close that the server discards (error earlier in the pipeline) is
    still taken as done; pgmp later sends a Parse for a name the server already has
    (PostgreSQL answers 42P05 "prepared statement pgmp_N already exists")."""
    s = Scenario(limit=1)
    s.check([parse(b"a", b"q1"), SYNC])                       # pgmp_1 = q1 on the server
    # an error, then a Parse that makes pgmp evict pgmp_1: the server discards both the Close and the Parse
    s.check([parse(b"", b"err"), bind(b""), execute(), parse(b"b", b"q2"), SYNC])
    # pgmp now believes the server lacks pgmp_1 and prepares it again
    s.check([bind(b"a"), execute(), SYNC])


def test_model_close_and_parse_discarded_after_an_error_keep_the_old_statement():
    """BUG: a Close and a Parse of a client name that the server discards after an
    error still change pgmp's map of the client's names, so the next Bind runs
    another statement than the one PostgreSQL would run."""
    s = Scenario()
    s.check([parse(b"s1", b"q1"), SYNC])
    s.check([bind(b"nope"), execute(), close(b"S", b"s1"), parse(b"s1", b"q2"), SYNC])
    s.check([bind(b"s1"), execute(), SYNC])               # PostgreSQL: q1's row


def test_parse_of_a_name_in_use_is_refused_with_42p05():
    """PostgreSQL refuses a Parse of a statement name in use (42P05). pgmp cannot put that error
    in the middle of a pipeline without also skipping the client's messages up to its Sync, so it
    raises 42P05 and the session ends (PgBouncer disconnects such a client too); the name keeps
    its first statement until then."""
    s = Scenario()
    s.check([parse(b"s1", b"q1"), SYNC])
    pl = s.pipelines[0]
    with pytest.raises(PgmpError) as err:
        pl.client_frame(ord("P"), parse(b"s1", b"q2")[5:], s.servers[0].statements)
    assert err.value.sqlstate == "42P05"
    assert b"s1" in str(err.value).encode()
    assert pl.statements[b"s1"] == b"q1\0" + struct.pack("!h", 0)


# ---- the property ------------------------------------------------------------------------

NAMES = (b"s1", b"s2", b"s3")
NEVER_PARSED = b"s9"


def show(frames: list[bytes]) -> str:
    """A batch as text for hypothesis reports: P(s1,q1) B(s1) E S ..."""
    out = []
    for f in frames:
        kind, body = f[:1].decode(), f[5:]
        if kind == "P":
            name, pos = read_cstr(body, 0)
            out.append(f"P({name.decode()},{read_cstr(body, pos)[0].decode()})")
        elif kind == "B":
            out.append(f"B({read_cstr(body, read_cstr(body, 0)[1])[0].decode()})")
        elif kind in "DC":
            out.append(f"{kind}{body[:1].decode()}({read_cstr(body, 1)[0].decode()})")
        elif kind == "Q":
            out.append(f"Q({read_cstr(body, 0)[0].decode()})")
        else:
            out.append(kind)
    return " ".join(out)


class ModelClient:
    """What a well-behaved client knows: the names it holds (as the server answered) and its own direct server."""

    def __init__(self):
        self.believed: set[bytes] = set()      # named statements it holds, assuming the batch succeeds


def draw_batch(data, client: ModelClient, errors: bool = True) -> list[bytes]:
    """A batch a driver could send: optionally a Query, then extended messages and a Sync.

    The client re-Parses a name only after closing it, and binds only names it holds,
    its unnamed statement of this batch, or (errors=True) a name it never used, which
    fails as on a real server. errors=False: nothing in the batch fails.
    """
    frames: list[bytes] = []
    if data.draw(st.booleans(), label="query first"):
        texts = [b"q1", b"DISCARD ALL"] + ([RUNTIME_ERROR_SQL] if errors else [])
        frames.append(query(data.draw(st.sampled_from(texts), label="query")))
        if data.draw(st.booleans(), label="query only"):
            return frames
    believed = set() if frames == [query(b"DISCARD ALL")] else set(client.believed)
    unnamed = False
    portal = False                         # the unnamed portal exists (errors=False only needs it)
    sqls = OK_SQL + ((RUNTIME_ERROR_SQL, SYNTAX_ERROR_SQL) if errors else ())
    for _ in range(data.draw(st.integers(0, 7), label="messages")):
        op = data.draw(st.sampled_from(["parse", "bind", "describe_s", "describe_p", "close_s", "close_p",
                                        "execute", "flush"]), label="op")
        if op == "parse":
            free = [n for n in NAMES if n not in believed] + [b""]
            name = data.draw(st.sampled_from(free), label="parse name")
            frames.append(parse(name, data.draw(st.sampled_from(sqls), label="sql")))
            if name:
                believed.add(name)
            else:
                unnamed = True
        elif op in ("bind", "describe_s"):
            usable = sorted(believed) + ([NEVER_PARSED] if errors else []) + ([b""] if unnamed else [])
            if not usable:
                continue
            name = data.draw(st.sampled_from(usable), label="statement")
            frames.append(bind(name) if op == "bind" else describe(b"S", name))
            portal = portal or op == "bind"
        elif op in ("describe_p", "execute"):
            if errors or portal:
                frames.append(describe(b"P", b"") if op == "describe_p" else execute())
        elif op == "close_s":
            name = data.draw(st.sampled_from(NAMES + (NEVER_PARSED,)), label="close name")
            frames.append(close(b"S", name))
            believed.discard(name)
        elif op == "close_p":
            frames.append(close(b"P", b""))
            portal = False
        else:
            frames.append(FLUSH)
    frames.append(SYNC)
    return frames


@settings(max_examples=400, deadline=None, derandomize=True, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), limit=st.sampled_from([0, 1, 2, 3]), nservers=st.integers(1, 3))
def test_model_pgmp_answers_like_a_direct_server(data, limit, nservers):
    """Random batches of two clients on pooled servers: each client sees what its own server would send."""
    s = Scenario(nclients=2, nservers=nservers, limit=limit)
    clients = [ModelClient(), ModelClient()]
    for _ in range(data.draw(st.integers(1, 8), label="batches")):
        c = data.draw(st.integers(0, 1), label="client")
        srv = data.draw(st.integers(0, nservers - 1), label="server")
        frames = draw_batch(data, clients[c])
        deliveries = data.draw(st.lists(st.integers(0, 3), min_size=len(frames), max_size=len(frames)),
                               label="deliveries")
        note(f"client {c} on server {srv}: {show(frames)}  (deliveries {deliveries})")
        via, direct = s.batch(frames, client=c, server=srv, deliveries=deliveries)
        assert via == direct
        # the client learns from the answers which of its names exist now
        clients[c].believed = s.direct[c].server_names()
        assert set(s.pipelines[c].statements) >= clients[c].believed


@settings(max_examples=300, deadline=None, derandomize=True, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), limit=st.sampled_from([0, 1, 2, 3]), nservers=st.integers(1, 3))
def test_model_pgmp_answers_like_a_direct_server_without_errors(data, limit, nservers):
    """The same property for batches without any error: only eviction, reuse, Close and server switches."""
    s = Scenario(nclients=2, nservers=nservers, limit=limit)
    clients = [ModelClient(), ModelClient()]
    for _ in range(data.draw(st.integers(1, 8), label="batches")):
        c = data.draw(st.integers(0, 1), label="client")
        srv = data.draw(st.integers(0, nservers - 1), label="server")
        frames = draw_batch(data, clients[c], errors=False)
        deliveries = data.draw(st.lists(st.integers(0, 3), min_size=len(frames), max_size=len(frames)),
                               label="deliveries")
        note(f"client {c} on server {srv}: {show(frames)}  (deliveries {deliveries})")
        via, direct = s.batch(frames, client=c, server=srv, deliveries=deliveries)
        assert via == direct
        assert not any(f[0] == b"E" for f in direct), "the batch was meant to be without errors"
        clients[c].believed = s.direct[c].server_names()


def test_model_discard_all_then_a_pipelined_parse_of_a_new_statement():
    """BUG: the CommandComplete of DISCARD ALL clears pgmp's maps after pgmp already
    handled a Parse that the client pipelined behind it; the server has that
    statement, pgmp believes it does not (and the client's name is forgotten)."""
    s = Scenario()
    s.check([query(b"DISCARD ALL"), parse(b"s1", b"q1"), SYNC])
    s.check([bind(b"s1"), execute(), SYNC])


def test_model_discard_all_then_a_pipelined_parse_of_a_statement_the_server_had():
    """BUG: pgmp answers the Parse itself (the server has the statement), rewrites the
    Bind, and the DISCARD ALL that runs before them on the server drops the statement:
    PostgreSQL answers the Bind with 26000."""
    s = Scenario(nclients=2)
    s.check([parse(b"x", b"q1"), SYNC], client=1)
    s.check([query(b"DISCARD ALL"), parse(b"s1", b"q1"), bind(b"s1"), execute(), SYNC])


def test_statement_cache_is_bounded_and_never_reuses_a_name():
    cache = StatementCache(max_entries=100, max_bytes=10_000)
    hot = b"select 1\0\0\0"
    hot_name = cache.name_for(hot)
    names = set()
    for i in range(1000):
        names.add(cache.name_for(b"select %d\0\0\0" % i + b"x" * (i % 50)))
        cache.name_for(hot)                                     # used all along: stays
    assert len(cache.names) <= 100 and cache.bytes <= 10_000
    assert cache.bytes == sum(map(len, cache.names))
    assert cache.name_for(hot) == hot_name
    # an evicted statement comes back under a new name: a name never stands for two texts
    again = cache.name_for(b"select 0\0\0\0")
    assert again not in names and again != hot_name
    # one statement larger than the byte budget is still named (and the only one kept)
    big = cache.name_for(b"y" * 20_000)
    assert list(cache.names.values()) == [big]
