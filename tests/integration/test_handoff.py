"""The C relay's hand-off (Server.handed_off), through a real pgmp and PostgreSQL.

In transaction mode, while clients wait for a server, C hands a server over itself at the
ReadyForQuery that ends a client's transaction: it sends the first queued client's request
and links the two, and Python takes in what happened. Every client must still see only its
own answers and its own settings, a SET committed in a transaction must not ride along to
the next client, a cancel must reach only its own query, and a client that hangs up while
queued must not be served. With PGMP_IMPL=python (or PGMP_RELAY_HANDOFF=0) Python hands
every server over and every test here must pass the same way.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import errors as pgerrors

from pgmp.protocol import scanner
from tests.integration.test_pooling import Threads, dsn, no_servers_left, pooldb, start  # noqa: F401
from tests.support import wait_for

HANDOFF = scanner.IMPL == "c" and os.environ.get("PGMP_RELAY_HANDOFF", "1") != "0"


def handoffs(proxy) -> int:
    return sum(w.get("relay_handoffs", 0) for w in proxy.stats()["workers"])


def assert_handed_off(proxy, before: int = 0) -> None:
    """With the C relay, C handed servers over (else the test would not test it)."""
    n = handoffs(proxy)
    if HANDOFF:
        assert n > before, "the C relay handed no server over: the test ran without contention"
    else:
        assert n == 0


def against_readers(reader, writer, writers: int, readers: int = 12) -> None:
    """``writers`` threads of ``writer(n)`` run to their end while ``readers`` threads of
    ``reader(n, stop)`` loop until then; both joined with deadlines, their errors raised."""
    stop = threading.Event()
    reading, writing = Threads(), Threads()
    for n in range(readers):
        reading.start(f"reader{n}", reader, n, stop)
    for n in range(writers):
        writing.start(f"writer{n}", writer, n)
    try:
        writing.join(120)
    finally:
        stop.set()
    reading.join(30)


def hammer(conninfo: str, marker: str, rounds: int, client_side: bool) -> None:
    """``rounds`` one-statement transactions that each return ``marker``: simple protocol
    (client-side binding) or unnamed extended-protocol statements."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn) if client_side else conn.cursor()
        for i in range(rounds):
            cur.execute("select %s::text, %s::int", (marker, i))
            assert cur.fetchone() == (marker, i), f"{marker} round {i} got another client's answer"


@pytest.mark.parametrize("client_side", [True, False], ids=["simple", "extended"])
def test_queued_clients_see_only_their_own_answers(pg, pgmp, pooldb, client_side):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2)
    threads = Threads()
    for n in range(24):
        threads.start(f"c{n}", hammer, dsn(proxy, pooldb), f"client-{n}-{uuid.uuid4().hex[:6]}", 150, client_side)
    threads.join(120)
    assert_handed_off(proxy)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "internal error" not in proxy.log()


def test_a_set_committed_in_a_transaction_stays_with_its_client(pg, pgmp, pooldb):
    """A SET in a transaction becomes the client's session setting at COMMIT, which C relays:
    the server it was set on must not then go to a queued client as if it had the pool's
    settings."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2)

    def setter(n: int) -> None:
        mine = f"{1001 + n}ms"
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            for i in range(40):
                cur.execute("BEGIN")
                cur.execute(f"SET statement_timeout = '{mine}'")
                cur.execute("select 1")
                cur.execute("COMMIT")
                cur.execute("select current_setting('statement_timeout')")
                assert cur.fetchone() == (mine,), f"setter {n} lost its setting"

    def reader(n: int, stop) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            while not stop.is_set():
                cur.execute("select current_setting('statement_timeout')")
                assert cur.fetchone() == ("0",), f"reader {n} got another client's statement_timeout"

    against_readers(reader, setter, writers=4)
    assert_handed_off(proxy)
    assert "internal error" not in proxy.log()


@pytest.mark.parametrize("change", ["set_config", "temp table"])
def test_a_request_with_session_effects_keeps_its_server_from_the_queue(pg, pgmp, pooldb, change):
    """Python relays a request whose text may change the session and learns its effect at the
    answer, which C may relay (its tag is SELECT or CREATE TABLE): meanwhile the server must not
    be handed to a queued client as if it were clean."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2)

    def changer(n: int) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            for i in range(30):
                if change == "set_config":
                    cur.execute("select set_config('search_path', 'schema_a', false)")
                    cur.execute("select current_setting('search_path')")
                    assert cur.fetchone() == ("schema_a",), f"changer {n} lost its search_path"
                    cur.execute("select set_config('search_path', '\"$user\", public', false)")
                else:
                    cur.execute(f"create temp table if not exists mine_{n} (x int)")
                    cur.execute(f"insert into mine_{n} values ({i})")
                    cur.execute(f"select count(*) from mine_{n}")
                    assert cur.fetchone() == (i + 1,), f"changer {n} lost its temp table"

    def reader(n: int, stop) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            while not stop.is_set():
                cur.execute("select current_setting('search_path'), "
                            "(select count(*) from pg_class where relnamespace = pg_my_temp_schema())")
                path, temps = cur.fetchone()
                assert path == '"$user", public', f"reader {n} got another client's search_path {path}"
                assert temps == 0, f"reader {n} is on a server with another client's temp table"

    against_readers(reader, changer, writers=3)
    assert "internal error" not in proxy.log()


def test_clients_with_other_login_settings_keep_them_and_their_turn(pg, pgmp, pooldb):
    """Only clients with the pool's common login settings get servers from C; the others keep
    their place in the queue, get theirs from Python and see their own settings."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2)

    def client(app: str) -> None:
        with psycopg.connect(dsn(proxy, pooldb, application_name=app), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            for _ in range(100):
                cur.execute("select current_setting('application_name')")
                assert cur.fetchone() == (app,), f"{app} saw another client's application_name"

    threads = Threads()
    for n in range(16):
        threads.start(f"c{n}", client, "common" if n % 4 else f"own-{n}")
    threads.join(120)
    assert_handed_off(proxy)


def test_a_cancel_under_contention_reaches_only_its_own_query(pg, pgmp, pooldb):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2)
    stop = threading.Event()
    before = handoffs(proxy)

    def busy(n: int) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            while not stop.is_set():
                cur.execute("select %s::int", (n,))
                assert cur.fetchone() == (n,)

    busy_threads = Threads()
    for n in range(12):
        busy_threads.start(f"busy{n}", busy, n)
    try:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            for _ in range(5):
                timer = threading.Timer(0.3, conn.cancel)
                timer.start()
                t0 = time.monotonic()
                with pytest.raises(pgerrors.QueryCanceled):
                    conn.execute("select pg_sleep(20)")
                timer.join()
                assert time.monotonic() - t0 < 10
                assert conn.execute("select 7").fetchone() == (7,)
    finally:
        stop.set()
    busy_threads.join(60)
    assert_handed_off(proxy, before)


def test_a_client_that_hangs_up_while_queued_is_not_served(pg, pgmp, pooldb):
    """Clients that send a query and close at once, among busy ones: the queue (Python's and
    C's) loses them; the others go on and the servers stay usable."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=1)

    def busy(n: int, stop) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            while not stop.is_set():
                cur.execute("select %s::int, pg_sleep(0.001)", (n,))
                assert cur.fetchone()[0] == n

    def quitter(n: int) -> None:
        for _ in range(20):
            conn = psycopg.connect(dsn(proxy, pooldb), autocommit=True)
            conn.pgconn.send_query(b"select 1")     # and leave before the answer
            conn.pgconn.finish()

    against_readers(busy, quitter, writers=4, readers=8)
    wait_for(lambda: all(p["cl_waiting"] == 0 for w in proxy.stats()["workers"] for p in w["pools"]), timeout=10,
             message="clients still counted as waiting after they left")
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
