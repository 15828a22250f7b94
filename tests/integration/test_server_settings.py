"""Server-side settings through a real pgmp: connect_query, application_name_add_host,
logfile reopening on reload, server_reset_timeout and server_check_query.

The tests run on the role and database of their own module (the `pooldb` fixture of
test_pooling.py, made once for this module), so that the server backends PostgreSQL shows
for that role are the ones this test's pgmp opened. Every wait has a deadline; where time
must pass (a timeout has to expire) the test waits for what pgmp or PostgreSQL reports.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import psycopg
import pytest

from tests.integration import test_pooling
from tests.integration.test_pooling import PoolDB, dsn, no_servers_left
from tests.support import PASSWORDS, wait_for

# test_pooling's fixtures, used here too: the module's own role and database, a fresh table in it
pooldb = test_pooling.pooldb
table = test_pooling.table


def start_db(pgmp, db: PoolDB, size: int, mode: str = "transaction", database: dict | None = None,
             extra_databases: dict | None = None, **config):
    """Like test_pooling.start(), with settings of the database section (connect_query, ...)."""
    return pgmp.start(config={"pool_mode": mode, "default_pool_size": size, **config},
                      databases={db.name: dict(database or {}), **(extra_databases or {})},
                      users={**PASSWORDS, db.user: db.password})


def connect(proxy, db: PoolDB, **params) -> psycopg.Connection:
    return psycopg.connect(dsn(proxy, db, **params), autocommit=True)


def one(conn: psycopg.Connection, sql: str, params=None):
    return conn.execute(sql, params).fetchone()[0]


def backends_of(pg, db: PoolDB) -> list[int]:
    out = pg.psql(f"select pid from pg_stat_activity where usename = '{db.user}' order by pid")
    return [int(p) for p in out.split()]


def terminate_backends(pg, db: PoolDB) -> None:
    """End every backend of the module's role (e.g. one still sleeping in a reset query)."""
    pg.psql(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{db.user}'")
    wait_for(lambda: not backends_of(pg, db), timeout=10,
             message=lambda: f"backends of {db.user} survive pg_terminate_backend: {backends_of(pg, db)}")


@pytest.fixture
def clean(pg, pgmp, pooldb):
    """No backend of the module's role before the test, none left behind after it (pgmp stopped first)."""
    no_servers_left(pg, pooldb)
    yield pooldb
    pgmp.stop_all()
    terminate_backends(pg, pooldb)


other_role = test_pooling.other_role


# ---- connect_query -----------------------------------------------------------------------------

def test_connect_query_runs_on_the_server_before_the_client_uses_it(pg, pgmp, clean):
    db = clean
    proxy = start_db(pgmp, db, size=1,
                     database={"connect_query": "SELECT set_config('myapp.connected', 'yes', false)"})
    with connect(proxy, db) as conn:
        for _ in range(3):                                  # separate transactions, the same server
            with conn.transaction():
                assert one(conn, "select current_setting('myapp.connected', true)") == "yes"
    # a second client on the same pooled server sees it too
    with connect(proxy, db) as conn:
        assert one(conn, "select current_setting('myapp.connected', true)") == "yes"
    assert len(backends_of(pg, db)) == 1


def test_connect_query_runs_once_per_server_connection(pg, pgmp, clean, table):
    db = clean
    proxy = start_db(pgmp, db, size=1,
                     database={"connect_query": f"INSERT INTO {table} (x, who) VALUES (pg_backend_pid(), 'cq')"})

    def rows() -> list[int]:
        out = pg.psql(f"select x from {table} where who = 'cq' order by x", user=db.user, db=db.name)
        return [int(x) for x in out.split()]

    pids = set()
    for _ in range(3):                                      # three clients, three transactions each
        with connect(proxy, db) as conn:
            for _ in range(3):
                with conn.transaction():
                    pids.add(one(conn, "select pg_backend_pid()"))
    assert len(pids) == 1, pids
    first = pids.pop()
    assert rows() == [first], "connect_query must run exactly once on the one server connection"

    # A new server connection (the old one terminated) runs it once more, and only once.
    pg.psql(f"select pg_terminate_backend({first})")
    wait_for(lambda: first not in backends_of(pg, db), timeout=10, message=f"backend {first} still there")
    with connect(proxy, db) as conn:
        second = {one(conn, "select pg_backend_pid()") for _ in range(3)}
    assert len(second) == 1 and first not in second, (first, second)
    assert rows() == sorted([first, *second]), "one connect_query row per server backend"


def test_failing_connect_query_fails_the_client_and_pgmp_stays_up(pg, pgmp, clean):
    db = clean
    proxy = start_db(pgmp, db, size=1, database={"connect_query": "SELECT 1/0"},
                     extra_databases={"gooddb": {"dbname": db.name}})
    for attempt in range(2):     # the server's login failure, then the same error during server_login_retry
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            connect(proxy, db).close()
        assert "connect_query" in str(excinfo.value), (attempt, str(excinfo.value))
        assert "division by zero" in str(excinfo.value), (attempt, str(excinfo.value))
        assert time.monotonic() - started < 5, "the failure must be reported, not waited out"
    proxy.wait_log(r"connect_query failed: division by zero")
    assert proxy.alive, proxy.log()
    # pgmp still serves: another database section (no connect_query) on the same server database
    with psycopg.connect(proxy.dsn(user=db.user, password=db.password, dbname="gooddb"), autocommit=True) as conn:
        assert one(conn, "select 1") == 1
    assert proxy.alive, proxy.log()


# ---- application_name_add_host -------------------------------------------------------------------

def test_a_server_lost_during_connect_query_is_replaced(pg, pgmp, clean):
    """A server that dies while its connect_query runs is a failed login: the pool opens another
    (it once stayed counted as "connecting" for good, and every later login timed out)."""
    db = clean
    proxy = start_db(pgmp, db, size=1, database={"connect_query": "SELECT pg_sleep(2)"},
                     client_login_timeout=8, server_login_retry=0)
    first: dict = {}

    def login():
        try:
            connect(proxy, db).close()
        except psycopg.Error as exc:
            first["error"] = exc
    thread = threading.Thread(target=login, daemon=True)
    thread.start()
    wait_for(lambda: pg.psql(f"select count(*) from pg_stat_activity where usename = '{db.user}' "
                             "and query = 'SELECT pg_sleep(2)' and state = 'active'") == "1",
             timeout=10, message="connect_query never started")
    terminate_backends(pg, db)
    thread.join(10)
    assert not thread.is_alive()
    assert "error" in first, "the login on the killed server succeeded"
    with connect(proxy, db, connect_timeout=6) as conn:
        assert one(conn, "SELECT 1") == 1


def local_port(conn: psycopg.Connection) -> int:
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def test_application_name_add_host_shows_the_client_address(pg, pgmp, clean):
    db = clean
    proxy = start_db(pgmp, db, size=2, mode="session", application_name_add_host=True)
    with connect(proxy, db, application_name="app") as conn:
        want = f"app - 127.0.0.1:{local_port(conn)}"
        assert one(conn, "show application_name") == want
        assert conn.info.parameter_status("application_name") == want
        pid = one(conn, "select pg_backend_pid()")
        assert one(conn, "select application_name from pg_stat_activity where pid = pg_backend_pid()") == want
        # as PostgreSQL itself shows it, outside pgmp
        assert pg.psql(f"select application_name from pg_stat_activity where pid = {pid}") == want


# ---- logfile -------------------------------------------------------------------------------------

def test_logfile_is_reopened_on_reload_after_rotation(pg, pgmp, clean, tmp_path):
    db = clean
    logfile = tmp_path / "pgmp-rotated.log"
    proxy = start_db(pgmp, db, size=1, logfile=str(logfile), log_connections=True)

    def login_line(conn) -> str:
        return f"login: user={db.user} db={db.name} from 127.0.0.1:{local_port(conn)}"

    def wait_line(path, line: str):
        wait_for(lambda: path.exists() and line in path.read_text(errors="replace"), timeout=10,
                 message=lambda: f"no {line!r} in {path}:\n"
                                 f"{path.read_text(errors='replace') if path.exists() else '(no file)'}"
                                 f"\n--- pgmp stderr ---\n{proxy.log()}")

    with connect(proxy, db) as conn:
        first = login_line(conn)
        assert one(conn, "select 1") == 1
    wait_line(logfile, first)

    rotated = tmp_path / "pgmp-rotated.log.1"
    os.rename(logfile, rotated)                             # as logrotate does (no copytruncate)
    r = pgmp.cli("reload", "-c", proxy.config_path, timeout=20)
    assert r.returncode == 0, (r.stdout, r.stderr, proxy.log())

    wait_line(logfile, "configuration reloaded from")      # the master's own line, in the new file
    with connect(proxy, db) as conn:
        second = login_line(conn)
        assert one(conn, "select 1") == 1
    wait_line(logfile, second)                              # the worker's, in the new file too
    assert second not in rotated.read_text(errors="replace"), "the worker kept writing to the rotated file"
    assert first in rotated.read_text(errors="replace")
    assert proxy.alive


# ---- server_reset_timeout -------------------------------------------------------------------------

def test_server_reset_timeout_replaces_a_server_whose_reset_hangs(pg, pgmp, clean):
    db = clean
    proxy = start_db(pgmp, db, size=1, mode="session",
                     server_reset_query="SELECT pg_sleep(30)", server_reset_timeout=1)
    with connect(proxy, db) as conn:
        assert one(conn, "select 1") == 1
        first = one(conn, "select pg_backend_pid()")

    started = time.monotonic()
    with psycopg.connect(dsn(proxy, db, connect_timeout=8), autocommit=True) as conn:
        assert one(conn, "select 1") == 1
        second = one(conn, "select pg_backend_pid()")
    elapsed = time.monotonic() - started
    assert second != first, "the server whose reset did not answer must not be reused"
    assert elapsed < 5, f"the next client waited {elapsed:.1f}s for a server"
    proxy.wait_log(r"no answer to 'SELECT pg_sleep\(30\)' within server_reset_timeout", timeout=5)


# ---- server_check_query ---------------------------------------------------------------------------

def test_server_check_query_keeps_what_the_last_client_left(pg, pgmp, clean, other_role):
    db = clean
    proxy = start_db(pgmp, db, size=1, server_check_delay=0)
    with connect(proxy, db) as a, connect(proxy, db) as b:
        a.execute(f"SET ROLE {other_role}")
        assert one(a, "select current_user") == other_role
        a_pid = one(a, "select pg_backend_pid()")
        for n in range(2):                                  # two transactions, after a check each
            with b.transaction():
                got = b.execute("select current_user, pg_backend_pid()").fetchone()
            assert got == (db.user, a_pid), (n, got, "(pool_size 1: the server client A left its role on)")
        # ...and A's role follows A back onto the server
        assert one(a, "select current_user") == other_role
    assert len(backends_of(pg, db)) == 1
