"""The link's sans-IO rules (pgmp.link): transaction tracking, session state that follows a client, pinning, release."""
from __future__ import annotations

import pytest

from pgmp.link import CLOSE, KEEP, REFUSE_BLOCK, RELEASE, RESET, REUSE, Link, ServerSession
from pgmp.prepared import Pipeline, StatementCache
from pgmp.protocol.messages import frame, query
from pgmp.stats import PoolStats

Q, S, F, P, B, E, D, C, H, COPY_DATA, COPY_DONE, COPY_FAIL = (ord(c) for c in "QSFPBEDCHdcf")
IDLE, IN_TX, FAILED_TX = ord("I"), ord("T"), ord("E")


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- transaction tracking ---------------------------------------------------------------------

def test_query_sync_and_function_call_are_counted_until_their_ready_for_query():
    tx = Link()
    assert tx.idle and tx.between_requests
    for kind in (Q, S, F):
        tx.client_frame(kind)
    assert tx.outstanding == 3 and not tx.idle and not tx.between_requests
    tx.server_ready(1, IDLE)
    tx.server_ready(1, IDLE)
    assert tx.outstanding == 1 and not tx.idle
    tx.server_ready(1, IDLE)
    assert tx.idle


def test_extended_messages_without_sync_are_not_counted_but_leave_the_server_unsynced():
    tx = Link()
    for kind in (P, B, D, E, C, H, COPY_DATA):
        tx.client_frame(kind)
    assert tx.outstanding == 0 and tx.idle and tx.unsynced
    assert tx.leave(False, False)[0] == CLOSE
    tx.client_frame(S)
    tx.server_ready(1, IDLE)
    assert not tx.unsynced and tx.leave(False, False)[0] == REUSE


def test_open_or_failed_transaction_is_between_requests_but_not_idle():
    tx = Link()
    tx.client_frame(Q)
    tx.server_ready(1, IN_TX)
    assert tx.between_requests and not tx.idle
    tx.client_frame(Q)
    tx.server_ready(1, FAILED_TX)
    assert tx.between_requests and not tx.idle
    tx.client_frame(Q)
    tx.server_ready(1, IDLE)
    assert tx.idle


def test_more_ready_for_query_than_requests_never_goes_negative():
    tx = Link()
    tx.server_ready(1, IDLE)
    assert tx.outstanding == 0 and tx.idle
    tx.client_frame(Q)
    tx.server_ready(3, IDLE)
    assert tx.outstanding == 0


@pytest.mark.parametrize("end", [COPY_DONE, COPY_FAIL])
def test_copy_in_ignores_sync_until_copy_done_or_fail(end):
    tx = Link()
    tx.client_frame(Q)                      # COPY t FROM STDIN
    tx.server_copy_in()
    assert not tx.idle and not tx.between_requests
    for kind in (COPY_DATA, S, H, COPY_DATA, S):
        tx.client_frame(kind)              # the server ignores Sync and Flush in COPY IN
    assert tx.outstanding == 1
    tx.client_frame(end)
    assert not tx.copy_in and tx.outstanding == 1
    tx.server_ready(1, IDLE)
    assert tx.idle


def test_extended_copy_in_sync_after_copy_done_is_counted():
    tx = Link()
    for kind in (P, B, E, H):
        tx.client_frame(kind)
    tx.server_copy_in()
    tx.client_frame(COPY_DATA)
    tx.client_frame(COPY_DONE)
    tx.client_frame(S)                       # after CopyDone the server answers this Sync
    assert tx.outstanding == 1
    tx.server_ready(1, IDLE)
    assert tx.idle


def test_extended_copy_in_with_a_sync_sent_before_copy_in_response():
    """libpq sends Bind/Execute/Sync at once; the server in COPY IN ignores that Sync and answers
    only the Sync sent after CopyDone."""
    tx = Link()
    for kind in (P, B, E, S):
        tx.client_frame(kind)
    assert tx.outstanding == 1
    tx.server_copy_in()
    assert not tx.idle
    for kind in (COPY_DATA, COPY_DONE, S):
        tx.client_frame(kind)
    tx.server_ready(1, IDLE)
    assert tx.idle and tx.outstanding == 0


def test_ready_for_query_ends_copy_mode():
    tx = Link()
    tx.client_frame(Q)
    tx.server_copy_in()
    tx.server_ready(1, IDLE)                 # e.g. the COPY failed on the server side
    assert not tx.copy_in and tx.idle


def test_stats_count_queries_and_transactions_with_their_times():
    clock, stats = Clock(10.0), PoolStats()
    tx = Link(clock=clock, stats=stats)
    tx.client_frame(Q)                       # BEGIN at 10.0
    clock.now = 10.5
    tx.server_ready(1, IN_TX)
    clock.now = 11.0
    tx.client_frame(Q)                       # INSERT at 11.0
    clock.now = 11.25
    tx.server_ready(1, IN_TX)
    clock.now = 12.0
    tx.client_frame(Q)                       # COMMIT at 12.0
    clock.now = 12.5
    tx.server_ready(1, IDLE)
    assert stats.query_count == 3
    assert stats.query_time_us == 1_250_000
    assert stats.xact_count == 1
    assert stats.xact_time_us == 2_500_000
    # a pipelined request: the query time runs from the first request to the last answer
    clock.now = 20.0
    tx.client_frame(S)
    clock.now = 20.1
    tx.client_frame(S)
    clock.now = 20.3
    tx.server_ready(1, IDLE)
    clock.now = 21.0
    tx.server_ready(1, IDLE)
    assert stats.query_count == 5
    assert stats.query_time_us == 1_250_000 + 1_000_000
    assert stats.xact_count == 2
    assert stats.xact_time_us == 2_500_000 + 1_000_000


def test_no_stats_without_a_pool():
    tx = Link()
    tx.client_frame(Q)
    tx.server_ready(1, IDLE)                 # no clock, no stats: nothing to do
    assert tx.idle




# ---- transaction mode: session state follows the client -----------------------------------------

def pooled(settings=None, statement_mode=False):
    """A logged-in transaction-mode link attached to a fresh server session."""
    link = Link(dict(settings or {}), frozenset({"application_name"}), name="u@db")
    link.logged_in(Clock(), PoolStats(), Pipeline(StatementCache()), statement_mode=statement_mode)
    srv = ServerSession(100)
    link.attach(srv)
    return link, srv


ERROR = frame(b"E", b"SERROR\0C22012\0Mdivision by zero\0\0")


def simple(link, sql: str, status=IDLE, error=False):
    """The client runs ``sql`` as one simple Query; the server answers (with an error if asked)."""
    assert link.client_frame(Q, sql.encode() + b"\0") is None
    if error:
        link.server_frame(ord("E"), ERROR)
    link.server_frame(ord("Z"), frame(b"Z", bytes([status])))


def test_session_set_outside_a_block_follows_the_client_to_another_server():
    link, srv = pooled()
    simple(link, "SET default_transaction_read_only TO on")
    assert link.settings == {"default_transaction_read_only": "on"}
    assert srv.applied == {"default_transaction_read_only": "on"}   # the server holds it already
    assert link.attach(srv) is None                                  # so it costs no round trip
    other = ServerSession(100)
    assert b"set_config('default_transaction_read_only', 'on', false)" in link.attach(other)


def test_what_one_client_set_is_reset_before_the_next_client_uses_the_server():
    a, srv = pooled()
    simple(a, "SET statement_timeout = '1234ms'; SET ROLE other")
    b = Link({}, frozenset(), name="b@db")
    assert b.attach(srv) == query("RESET role;RESET statement_timeout")


def test_set_in_a_block_counts_only_when_it_commits():
    link, srv = pooled()
    simple(link, "BEGIN", IN_TX)
    simple(link, "SET search_path TO a, b", IN_TX)
    assert link.settings == {}
    simple(link, "COMMIT")
    assert link.settings == {"search_path": "a, b"}
    simple(link, "BEGIN", IN_TX)
    simple(link, "SET search_path TO c", IN_TX)
    simple(link, "ROLLBACK")
    assert link.settings == {"search_path": "a, b"}
    simple(link, "BEGIN; SET search_path TO d", IN_TX)
    simple(link, "SELECT 1/0", FAILED_TX, error=True)
    simple(link, "COMMIT")                                  # of a failed block: a rollback
    assert link.settings == {"search_path": "a, b"}


def test_a_lone_set_config_with_literals_is_followed_like_a_set():
    link, srv = pooled()
    simple(link, "SELECT set_config('myapp.y', 'w', false)")
    assert not link.pinned and link.settings == {"myapp.y": "w"}


def test_set_local_and_failed_implicit_transactions_change_nothing():
    link, srv = pooled()
    simple(link, "BEGIN; SET LOCAL work_mem = '64MB'; COMMIT")
    simple(link, "SET work_mem = '1MB'; SELECT 1/0", error=True)
    assert link.settings == {} and srv.applied == {}


def test_reset_goes_back_to_the_startup_value_and_reset_all_keeps_the_role():
    link, srv = pooled({"application_name": "app"})
    simple(link, "SET application_name = 'x'; SET ROLE r; SET work_mem = '2MB'")
    assert link.settings == {"application_name": "x", "role": "r", "work_mem": "2MB"}
    simple(link, "RESET application_name")
    assert link.settings["application_name"] == "app"
    simple(link, "RESET ALL")
    assert link.settings == {"application_name": "app", "role": "r"}
    simple(link, "DISCARD ALL")
    assert link.settings == {"application_name": "app"} and srv.applied == {}


def test_links_with_the_same_login_settings_share_them_and_never_each_others_changes():
    """SHARED_STARTUPS: one dict for every Link that logged in with the same settings (memory per
    idle client), taken at the end of the login only (what an unauthenticated peer sends is never
    kept); what one session SETs, RESETs or takes from a ParameterStatus stays its own."""
    before = Link({"application_name": "app", "work_mem": "1MB"}, frozenset(), name="u@db")
    assert type(before.startup) is dict                 # not logged in yet: its own
    a, srv_a = pooled({"application_name": "app", "work_mem": "1MB"})
    b, srv_b = pooled({"application_name": "app", "work_mem": "1MB"})
    c, _ = pooled({"application_name": "other"})
    assert a.startup is b.startup and a.startup is not c.startup and a.startup is not before.startup
    simple(a, "SET work_mem = '64MB'; SET application_name = 'a'")
    simple(a, "RESET ALL")
    simple(a, "SET statement_timeout = '5s'")
    a.parameter_status("application_name", "renamed")
    assert b.settings == {"application_name": "app", "work_mem": "1MB"} == b.startup
    assert a.startup == {"application_name": "app", "work_mem": "1MB"}
    simple(b, "DISCARD ALL")
    assert b.settings == {"application_name": "app", "work_mem": "1MB"}
    d, _ = pooled({"application_name": "app", "work_mem": "1MB"})
    assert d.settings == {"application_name": "app", "work_mem": "1MB"} and d.startup is b.startup


def test_an_idle_pooled_link_holds_no_queue_of_answers():
    """Pipeline.expect is () until something is owed and again after the transaction (an empty
    deque costs 760 bytes per idle client); the next transaction makes a new one."""
    link, srv = pooled()
    assert link.pipeline.expect == ()
    link.client_frame(ord("Q"), b"select 1\0")
    assert type(link.pipeline.expect).__name__ == "deque" and len(link.pipeline.expect) == 1
    link.server_frame(ord("Z"), frame(b"Z", b"I"))
    simple(link, "select 2")
    link.detach()
    assert link.pipeline.expect == ()
    link.attach(srv)
    simple(link, "select 3")
    assert not link.pipeline.expect


def test_extended_protocol_set_is_recorded_at_its_sync():
    link, srv = pooled()
    assert link.client_frame(P, b"\0SET lock_timeout = 5\0\0\0") is None
    assert link.client_frame(B, b"\0\0\0\0\0\0\0\0") is None
    link.client_frame(E, b"\0\0\0\0\0")
    link.client_frame(S, b"")
    assert link.settings == {}
    link.server_ready(1, IDLE)
    assert link.settings == {"lock_timeout": "5"}


def test_an_error_before_the_sync_drops_the_batch():
    link, srv = pooled()
    link.client_frame(P, b"\0SET lock_timeout = 5\0\0\0")
    link.client_frame(B, b"\0\0\0\0\0\0\0\0")
    link.client_frame(E, b"\0\0\0\0\0")
    link.client_frame(H, b"")
    link.server_error()                      # answered before the Sync was even sent
    link.client_frame(S, b"")
    link.server_ready(1, IDLE)
    assert link.settings == {}


@pytest.mark.parametrize("sql, reason", [
    ("SELECT set_config('a.b', current_user, false)", "set_config"),
    ("SELECT pg_advisory_lock(42)", "advisory lock"),
    ("LISTEN ch", "LISTEN"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("CREATE TEMP TABLE tt (x int)", "temporary"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD"),
])
def test_state_that_cannot_move_pins_the_client_and_is_discarded_when_it_leaves(sql, reason):
    link, srv = pooled()
    simple(link, sql)
    assert reason in link.pinned
    assert link.after_ready() == KEEP
    assert link.leave(False, False)[0] == RESET


def test_prepare_transaction_does_not_pin():
    link, srv = pooled()
    simple(link, "BEGIN", IN_TX)
    simple(link, "PREPARE TRANSACTION 'gid'")
    assert not link.pinned and link.after_ready() == RELEASE


def test_savepoints_around_a_set_pin():
    link, srv = pooled()
    simple(link, "BEGIN; SAVEPOINT s; SET work_mem = '3MB'; ROLLBACK TO s", IN_TX)
    simple(link, "COMMIT")
    assert "savepoint" in link.pinned


def test_a_session_command_pgmp_could_not_read_pins():
    link, srv = pooled()
    link.client_frame(Q, None)               # a Query too large to assemble: streamed, unread
    link.command_complete(b"SET\0")
    link.server_ready(1, IDLE)
    assert link.pinned


def test_statement_mode_refuses_a_block():
    link, srv = pooled(statement_mode=True)
    simple(link, "BEGIN", IN_TX)
    assert link.after_ready() == REFUSE_BLOCK
    link2, _ = pooled()
    simple(link2, "BEGIN", IN_TX)
    assert link2.after_ready() == KEEP


# ---- bad input and leaving ----------------------------------------------------------------------

def test_parse_without_its_nul_is_postgresqls_protocol_violation():
    from pgmp.errors import ClientProtocolError
    link, srv = pooled()
    with pytest.raises(ClientProtocolError) as exc:
        link.client_frame(P, b"\0SELECT 1")
    assert exc.value.sqlstate == "08P01" and exc.value.message == "invalid string in message"


@pytest.mark.parametrize("mid_message, internal", [(True, False), (False, True)])
def test_a_half_sent_message_or_an_unanswered_internal_query_closes_the_server(mid_message, internal):
    link, _ = pooled()
    assert link.leave(mid_message, internal)[0] == CLOSE


def test_leaving_in_copy_or_in_a_transaction_closes_the_server():
    link, _ = pooled()
    simple(link, "BEGIN", IN_TX)
    assert link.leave(False, False) == (CLOSE, "client left inside a transaction")
    simple(link, "COMMIT")
    link.client_frame(Q, b"COPY t FROM STDIN\0")
    link.server_copy_in()
    assert link.leave(False, False)[0] == CLOSE


def test_reset_query_forgets_only_what_it_clears():
    srv = ServerSession(10)
    srv.applied.update({"role": "r", "work_mem": "1MB"})
    srv.statements.add(b"pgmp_1")
    srv.after_reset("select 1")
    assert srv.applied == {"role": "r", "work_mem": "1MB"} and srv.statements.has(b"pgmp_1")
    srv.after_reset("RESET ALL")
    assert srv.applied == {"role": "r"} and srv.statements.has(b"pgmp_1")
    srv.after_reset("DISCARD ALL")
    assert srv.applied == {} and not srv.statements.has(b"pgmp_1")


def test_a_ready_for_query_without_its_status_is_a_broken_server():
    """Found by the link fuzz harness: ``Z 00 00 00 04`` raised IndexError in server_frame."""
    from pgmp.errors import ServerProtocolError
    link, _ = pooled()
    assert link.client_frame(Q, b"select 1\0") is None
    for payload in (b"", b"IT"):
        with pytest.raises(ServerProtocolError, match="ReadyForQuery of length"):
            link.server_frame(ord("Z"), frame(b"Z", payload))
    assert not link.idle                    # nothing was counted: the server is closed, not reused
