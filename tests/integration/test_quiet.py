"""Quiet pairs (pgmp.crelay.Quiet), through a real pgmp and PostgreSQL.

While a pair's traffic is plain simple-protocol round trips, the C relay keeps their
bookkeeping itself and Python sees no record. What Python reports and decides must not
change: the pool's counts are exact, the timeouts fire on time, a queued client gets the
server at the busy client's next boundary, server_lifetime ends a server that never goes
idle. With PGMP_IMPL=python nothing is quiet and every test here must pass the same way.
"""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgmp.protocol import scanner
from tests.integration import rawpg
from tests.integration.test_held_servers import ADMIN, console
from tests.integration.test_pooling import no_servers_left, pooldb, raw_login, start  # noqa: F401
from tests.support import wait_for
from tests.support.waiting import holds

QUIET = scanner.IMPL == "c"          # only the C relay keeps pairs quiet


def stats_row(proxy, db) -> dict:
    with console(proxy) as adm:
        cur = adm.execute("SHOW STATS")
        names = [d.name for d in cur.description]
        return next(dict(zip(names, r)) for r in cur.fetchall() if r[0] == db.name)


def quiet_reads(pgmp, proxy) -> int:
    return sum(w.get("relay_quiet_reads", 0) for w in proxy.stats()["workers"])


def quiet_client(pg, pgmp, pooldb, mode: str = "transaction", size: int = 1, **config):
    """A pgmp, and a raw client logged in through it whose pair has gone quiet (a few plain
    round trips)."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=size, mode=mode, admin_users=[ADMIN], **config)
    conn = raw_login(proxy.host, proxy.port, pooldb)
    for i in range(5):
        sent_query(conn, f"select {i}")
    return proxy, conn


def sent_query(conn: rawpg.RawPG, sql: str) -> int:
    """Run ``sql`` (simple protocol, no error expected); the bytes the client sent."""
    msgs = conn.query(sql)
    assert not [m for m in msgs if m.type == b"E"], msgs
    return len(rawpg.query(sql))


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_the_counts_of_quiet_round_trips_are_exact(pg, pgmp, pooldb, mode):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2, mode=mode, admin_users=[ADMIN])
    with raw_login(proxy.host, proxy.port, pooldb) as conn:
        sent = sent_query(conn, "select 0")
        before, reads = stats_row(proxy, pooldb), quiet_reads(pgmp, proxy)
        sent = 0
        for i in range(200):
            sent += sent_query(conn, f"select {i}")
        for i in range(40):
            sent += sent_query(conn, "BEGIN") + sent_query(conn, f"select {i}") + sent_query(conn, "COMMIT")
        after = stats_row(proxy, pooldb)
        if QUIET:
            # (each Python event or timer ends it: the next round trip's two reads are records)
            assert quiet_reads(pgmp, proxy) - reads >= 2 * 320 - 60, "the pair was not quiet"
    assert after["total_query_count"] - before["total_query_count"] == 320
    assert after["total_xact_count"] - before["total_xact_count"] == 240
    assert after["total_received"] - before["total_received"] == sent
    assert after["total_query_time"] > before["total_query_time"]
    assert after["total_xact_time"] > before["total_xact_time"]
    if mode == "transaction":
        # every transaction is an assignment: the first of the held server, or a queued one's
        assert after["total_server_assignment_count"] - before["total_server_assignment_count"] == 240


def test_a_client_queued_behind_a_busy_quiet_pair_gets_the_server(pg, pgmp, pooldb):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=1, admin_users=[ADMIN], query_wait_timeout=10)
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy():
        try:
            with raw_login(proxy.host, proxy.port, pooldb) as conn:
                while not stop.is_set():
                    sent_query(conn, "select 1")
        except BaseException as exc:           # noqa: BLE001 - reported below
            errors.append(exc)

    with raw_login(proxy.host, proxy.port, pooldb) as other:
        t = threading.Thread(target=busy, daemon=True)
        t.start()
        try:
            if QUIET:
                base = quiet_reads(pgmp, proxy)
                wait_for(lambda: quiet_reads(pgmp, proxy) > base + 100, timeout=20,
                         message="the busy client's pair never went quiet")
            for i in range(20):                 # each needs the busy client's server
                started = time.monotonic()
                assert other.scalar(f"select {i}") == str(i)
                assert time.monotonic() - started < 5
        finally:
            stop.set()
            t.join(timeout=20)
    assert not errors, errors
    assert not t.is_alive()


def test_server_lifetime_ends_the_server_of_a_client_that_never_pauses(pg, pgmp, pooldb):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=1, admin_users=[ADMIN], server_lifetime=1)
    with raw_login(proxy.host, proxy.port, pooldb) as conn:
        first = conn.scalar("select pg_backend_pid()")
        deadline = time.monotonic() + 15
        pid = first
        while pid == first and time.monotonic() < deadline:
            pid = conn.scalar("select pg_backend_pid()")
        assert pid != first, "the server outlived server_lifetime while its client kept it busy"
    assert "server_lifetime" in proxy.log()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_query_timeout_cancels_a_query_that_crossed_a_quiet_pair(pg, pgmp, pooldb, mode):
    proxy, conn = quiet_client(pg, pgmp, pooldb, mode, query_timeout=1)
    with conn:
        started = time.monotonic()
        conn.send(rawpg.query("select pg_sleep(6)"))
        err = conn.expect_error(timeout=10)
        assert err["C"] == "57014", err
        assert 0.9 <= time.monotonic() - started < 4.5
        conn.read_until(b"Z", timeout=5)
        assert conn.scalar("select 'still here'") == "still here"


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_idle_transaction_timeout_after_a_begin_that_crossed_a_quiet_pair(pg, pgmp, pooldb, mode):
    proxy, conn = quiet_client(pg, pgmp, pooldb, mode, idle_transaction_timeout=1)
    with conn:
        sent_query(conn, "BEGIN")
        began = time.monotonic()
        err = conn.expect_error(timeout=8)
        assert time.monotonic() - began >= 0.9
        assert "idle_transaction_timeout" in err["M"], err
        assert conn.wait_closed()


def test_client_idle_timeout_after_quiet_round_trips(pg, pgmp, pooldb):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=1, admin_users=[ADMIN], client_idle_timeout=1)
    with raw_login(proxy.host, proxy.port, pooldb) as conn:
        busy_until = time.monotonic() + 2.5          # busy for longer than the timeout: not idle
        i = 0
        while time.monotonic() < busy_until:
            sent_query(conn, f"select {i}")
            i += 1
        last = time.monotonic()
        err = conn.expect_error(timeout=8)
        assert time.monotonic() - last >= 0.9        # idle since its last answer, not since login
        assert "client_idle_timeout" in err["M"], err


def test_pause_waits_for_a_quiet_pair_s_open_transaction_and_resume_goes_on(pg, pgmp, pooldb):
    proxy, conn = quiet_client(pg, pgmp, pooldb)
    with conn:
        sent_query(conn, "BEGIN")                    # C passed it: the server is in use
        with console(proxy) as adm:
            done = threading.Event()

            def pause():
                adm.execute(f"PAUSE {pooldb.name}")
                done.set()

            t = threading.Thread(target=pause, daemon=True)
            t.start()

            def waiting():
                assert not done.is_set(), "PAUSE returned with the transaction open"

            holds(waiting, 1.0)                       # PAUSE waits for the transaction
            sent_query(conn, "COMMIT")
            wait_for(done.is_set, timeout=10, message="PAUSE did not return after the COMMIT")
            t.join(timeout=5)
            adm.execute(f"RESUME {pooldb.name}")
        assert conn.scalar("select 42") == "42"


def test_a_quiet_pair_s_held_server_that_postgres_ends_is_replaced_without_an_error(pg, pgmp, pooldb):
    proxy, conn = quiet_client(pg, pgmp, pooldb, size=2)
    with conn:
        first = conn.scalar("select pg_backend_pid()")
        assert pg.psql(f"select pg_terminate_backend({first})") == "t"
        wait_for(lambda: pg.psql(f"select count(*) from pg_stat_activity where pid = {first}") == "0",
                 timeout=10, message="the backend did not exit")
        second = conn.scalar("select pg_backend_pid()")   # no error: the client had no server in use
        assert second != first
        assert conn.scalar("select 1") == "1"
    assert "08006" not in proxy.log()


@pytest.mark.parametrize("prepare", [None, 0], ids=["unnamed", "prepared"])
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_extended_protocol_round_trips_are_quiet_and_counted_exactly(pg, pgmp, pooldb, mode, prepare):
    """psycopg's unnamed Parse/Bind/Describe/Execute/Sync batches, or its named prepared
    statements (prepare_threshold 0: a Parse once, then Bind/Execute/Sync of the name, which in
    transaction mode C rewrites to pgmp's name for it)."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2, mode=mode, admin_users=[ADMIN], max_prepared_statements=100)
    with psycopg.connect(proxy.dsn(user=pooldb.user, password=pooldb.password, dbname=pooldb.name),
                         autocommit=True, prepare_threshold=prepare) as conn:
        conn.execute("select %s::int", (0,))
        conn.execute("select %s::int + 1", (0,))
        conn.execute("select 0")
        before, reads = stats_row(proxy, pooldb), quiet_reads(pgmp, proxy)
        for i in range(150):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        for i in range(30):
            with conn.transaction():
                assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
        after = stats_row(proxy, pooldb)
        if QUIET:
            assert quiet_reads(pgmp, proxy) - reads >= 2 * 240 - 60, "the pair was not quiet"
    assert after["total_query_count"] - before["total_query_count"] == 240
    assert after["total_xact_count"] - before["total_xact_count"] == 180
