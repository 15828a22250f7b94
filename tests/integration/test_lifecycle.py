"""Server lifecycle, client timeouts, pool limits and PAUSE/RESUME/RECONNECT through a real pgmp.

Every test runs on roles and databases of this module's own (made once per module and
xdist worker), so the server connections PostgreSQL shows for them are exactly the ones
the test's pgmp opened. Waits have deadlines; where a test must let time pass (a timeout
has to expire), it waits for a condition PostgreSQL or pgmp reports, not a fixed sleep.
Transaction pooling unless a test says otherwise; tests/integration/test_pooling.py has
the data-path tests of transaction mode, tests/integration/test_faults.py the ones that
restart a (private) PostgreSQL.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import psutil
import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg.pq import TransactionStatus

from tests.integration import rawpg
from tests.support import PASSWORDS, conninfo, holds, stop_process, wait_for

# ---- the module's roles and databases --------------------------------------------------------


@dataclass
class LcDB:
    user: str          # owner of both databases
    password: str
    user2: str         # a second role, for limits across pools
    password2: str
    name: str
    name2: str         # a second database, for max_user_connections


@pytest.fixture(scope="module")
def lc(pg):
    s = uuid.uuid4().hex[:10]
    db = LcDB(f"lc_{s}", f"pw_{s}", f"lc2_{s}", f"pw2_{s}", f"lcdb_{s}", f"lcdb2_{s}")
    pg.psql(f"CREATE ROLE {db.user} LOGIN PASSWORD '{db.password}';\n"
            f"CREATE ROLE {db.user2} LOGIN PASSWORD '{db.password2}';\n"
            f"CREATE DATABASE {db.name} OWNER {db.user};\n"
            f"CREATE DATABASE {db.name2} OWNER {db.user};\n")
    # server_check_query tests: a server whose backend pid is in "doomed" fails the check
    pg.psql(f"CREATE TABLE doomed (pid int); GRANT ALL ON doomed TO {db.user2};", user=db.user, db=db.name)
    yield db
    pg.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE);\n"
            f"DROP DATABASE IF EXISTS {db.name2} WITH (FORCE);\n"
            f"DROP ROLE IF EXISTS {db.user};\nDROP ROLE IF EXISTS {db.user2};\n")


def backends(pg, where: str) -> int:
    return int(pg.psql(f"select count(*) from pg_stat_activity where backend_type = 'client backend' and {where}"))


def server_count(pg, db: LcDB, user: str | None = None) -> int:
    """Server connections PostgreSQL has for the module's role (pgmp's, in these tests)."""
    return backends(pg, f"usename = '{user or db.user}'")


def superuser(pg) -> psycopg.Connection:
    """A superuser session on the cluster, over its unix socket."""
    return psycopg.connect(conninfo(host=pg.socket_dir, port=pg.port, user="postgres", dbname="postgres"),
                           autocommit=True)


def backend_alive(pg, pid: int) -> bool:
    return backends(pg, f"pid = {pid}") == 1


@pytest.fixture(autouse=True)
def no_servers_left(pg, lc):
    """Backends of an earlier test's pgmp may take a moment to exit."""
    wait_for(lambda: backends(pg, f"usename in ('{lc.user}', '{lc.user2}')") == 0, timeout=15,
             message="backends of the module's roles are still there from an earlier test")
    pg.psql("TRUNCATE doomed", user=lc.user, db=lc.name)


def start(pgmp, db: LcDB, size: int, mode: str = "transaction", databases=None, **config):
    """A pgmp in front of the module's databases: one worker, ``size`` servers per pool."""
    return pgmp.start(config={"pool_mode": mode, "default_pool_size": size, **config},
                      databases=databases if databases is not None else {db.name: {}, db.name2: {}},
                      users={**PASSWORDS, db.user: db.password, db.user2: db.password2})


def dsn(proxy, db: LcDB, user: str | None = None, dbname: str | None = None, **params) -> str:
    user = user or db.user
    return proxy.dsn(user=user, password=db.password if user == db.user else db.password2,
                     dbname=dbname or db.name, **params)


def connect(proxy, db: LcDB, **kw) -> psycopg.Connection:
    return psycopg.connect(dsn(proxy, db, **kw), autocommit=True)


def raw_login(proxy, db: LcDB) -> rawpg.RawPG:
    conn = rawpg.RawPG.connect(proxy.host, proxy.port)
    conn.login(user=db.user, password_text=db.password, database=db.name)
    return conn


def pid_of(conn: psycopg.Connection) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


def pool_stats(pgmp, proxy, db: LcDB) -> dict:
    """The module's pool in `pgmp stats --json` (one worker), {} while it does not exist."""
    for worker in proxy.stats()["workers"]:
        for pool in worker["pools"]:
            if pool["database"] == db.name and pool["user"] == db.user:
                return pool
    return {}


class Sampler:
    """Samples a count from PostgreSQL in a thread until stopped; .samples, .max."""

    def __init__(self, fn, interval: float = 0.1):
        self.fn, self.interval = fn, interval
        self.samples: list[int] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_event.is_set():
            self.samples.append(self.fn())
            self.stop_event.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(10)

    @property
    def max(self) -> int:
        return max(self.samples) if self.samples else 0


class Background:
    """Run one call in a thread; .result / .error once done."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self.done = threading.Event()

        def target():
            try:
                self.result = fn(*args)
            except BaseException as exc:           # noqa: BLE001 - inspected by the test
                self.error = exc
            finally:
                self.done.set()
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait(self, timeout: float):
        assert self.done.wait(timeout), f"still running after {timeout:g}s"
        return self


# ---- server_idle_timeout, min_pool_size, server_lifetime -------------------------------------

def test_server_idle_timeout_closes_an_idle_server(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=5, server_idle_timeout=1)
    with connect(proxy, lc) as conn:
        pid = pid_of(conn)
        used = time.monotonic()
        assert server_count(pg, lc) == 1
        wait_for(lambda: not backend_alive(pg, pid), timeout=6,
                 message=lambda: f"idle server {pid} not closed after server_idle_timeout=1\n{proxy.log()[-2000:]}")
        assert time.monotonic() - used >= 0.9, "closed before it was idle for server_idle_timeout"
        assert server_count(pg, lc) == 0
        # the client stays logged in and gets a new server
        assert pid_of(conn) != pid
    assert "server_idle_timeout" in proxy.log()


def test_min_pool_size_keeps_servers_open_past_server_idle_timeout(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=5, server_idle_timeout=1, min_pool_size=2)
    conns = [connect(proxy, lc) for _ in range(4)]
    try:
        # a login made the pool: the janitor fills it up to min_pool_size without any query
        wait_for(lambda: server_count(pg, lc) == 2, timeout=6, message="min_pool_size=2 not reached")
        for conn in conns:                       # four transactions at once: four servers
            conn.execute("BEGIN")
            conn.execute("select 1")
        assert server_count(pg, lc) == 4
        for conn in conns:
            conn.execute("COMMIT")
        # idle for server_idle_timeout: closed down to min_pool_size, not below
        wait_for(lambda: server_count(pg, lc) == 2, timeout=8,
                 message=lambda: f"not back to min_pool_size\n{proxy.log()[-2000:]}")
        def two():
            assert server_count(pg, lc) == 2
        holds(two, 3, interval=0.2)              # three more janitor rounds
        assert conns[0].execute("select 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()


def test_server_lifetime_replaces_a_server_at_its_next_release(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=1, server_lifetime=1)
    with connect(proxy, lc) as conn:
        conn.execute("BEGIN")
        pid = pid_of(conn)
        wait_for(lambda: float(pg.psql(f"select extract(epoch from now() - backend_start) from pg_stat_activity "
                                       f"where pid = {pid}") or 0) > 1.5, timeout=5)
        # older than server_lifetime, but in use: never closed under its client
        assert pid_of(conn) == pid
        assert backend_alive(pg, pid)
        conn.execute("COMMIT")
        wait_for(lambda: not backend_alive(pg, pid), timeout=5,
                 message=lambda: f"server {pid} outlived server_lifetime after its release\n{proxy.log()[-2000:]}")
        assert pid_of(conn) != pid
    assert "server_lifetime reached" in proxy.log()


# ---- dead and failing servers -----------------------------------------------------------------

CHECK_DOOMED = "select 1 / (1 - count(*)) from doomed where pid = pg_backend_pid()"


def test_server_failing_the_check_query_is_replaced_without_error(pg, pgmp, lc):
    """server_check_delay = 0: every reuse is checked; a server whose check fails is closed and the
    waiting client gets a new one, without hearing of it."""
    proxy = start(pgmp, lc, size=3, server_check_delay=0, server_check_query=CHECK_DOOMED)
    with connect(proxy, lc) as conn:
        pid = pid_of(conn)
        assert pid_of(conn) == pid               # the check passes: the same server again
        pg.psql(f"INSERT INTO doomed VALUES ({pid})", user=lc.user, db=lc.name)
        new = pid_of(conn)
        assert new != pid
        assert conn.info.transaction_status == TransactionStatus.IDLE
        wait_for(lambda: not backend_alive(pg, pid), timeout=5)
    assert "division by zero" in proxy.log()


def test_failed_server_check_opens_one_replacement_not_two(pg, pgmp, lc):
    """One waiting client needs one new server. (Pool.resetting is decremented twice for a server whose
    check fails -- in _reset_done and again in server_closed -- and the surplus makes _grow open one more.)"""
    proxy = start(pgmp, lc, size=3, server_check_delay=0, server_check_query=CHECK_DOOMED)
    with connect(proxy, lc) as conn:
        pid = pid_of(conn)
        pg.psql(f"INSERT INTO doomed VALUES ({pid})", user=lc.user, db=lc.name)
        assert pid_of(conn) != pid
        wait_for(lambda: not backend_alive(pg, pid), timeout=5)
        assert conn.execute("select 1").fetchone() == (1,)
        stats = pool_stats(pgmp, proxy, lc)
        assert server_count(pg, lc) == 1, (f"one client, one query at a time, yet {server_count(pg, lc)} servers; "
                                           f"pool: {stats}")


def test_idle_server_terminated_by_postgresql_is_replaced_without_error(pg, pgmp, lc):
    """Issue 5 fault, default settings: pg_terminate_backend on a pooled idle server; the next client
    that gets the pool does not see an error."""
    proxy = start(pgmp, lc, size=1)
    with connect(proxy, lc) as conn:
        pid = pid_of(conn)
        with superuser(pg) as su:
            assert su.execute("select pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)
        new = pid_of(conn)                      # the same client
        assert new != pid
        with connect(proxy, lc) as other:         # and a new one
            assert pid_of(other) == new
    assert server_count(pg, lc) == 1


def worker_pid(proxy) -> int:
    children = psutil.Process(proxy.pid).children()
    assert len(children) == 1, children
    return children[0].pid


def local_port(conn: psycopg.Connection) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return sock.getsockname()[1]


def client_bytes_queued(server_port: int, client_port: int) -> bool:
    """True when the kernel holds unread bytes from the client at pgmp's end of its TCP connection."""
    want_local, want_remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want_local and parts[2] == want_remote:
                return int(parts[4].split(":")[1], 16) > 0
    return False


@pytest.mark.parametrize("settings", [
    pytest.param({}, id="default-settings"),
    pytest.param({"server_check_delay": 0}, id="server_check_delay-0"),
])
def test_terminated_idle_server_whose_fatal_pgmp_reads_after_the_next_query(pg, pgmp, lc, settings):
    """The worker is stopped while a client's query arrives and then the idle server's backend is
    terminated: when it runs again both sockets are readable, the client's first. The dead server must
    not be handed to the client (issue 5: "the next client ... does not see an error")."""
    proxy = start(pgmp, lc, size=1, **settings)
    conn = connect(proxy, lc)
    try:
        pid = pid_of(conn)
        worker = worker_pid(proxy)
        client_port = local_port(conn)
        with superuser(pg) as su:
            stop_process(worker)
            try:
                query = Background(pid_of, conn)
                wait_for(lambda: client_bytes_queued(proxy.port, client_port), timeout=5,
                         message="the client's query never reached pgmp's socket")
                assert su.execute("select pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)
            finally:
                os.kill(worker, signal.SIGCONT)
        query.wait(15)
        assert query.error is None, f"the client got the dead server: {query.error!r}"
        assert query.result != pid
    finally:
        conn.close()


def test_server_terminated_mid_transaction_gives_the_client_its_fatal(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=1)
    with connect(proxy, lc) as conn:
        conn.execute("BEGIN")
        pid = pid_of(conn)
        pg.psql(f"select pg_terminate_backend({pid}, 5000)")
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert info.value.sqlstate == "57P01" or "terminating connection due to administrator command" \
            in str(info.value), repr(info.value)
    # the pool is not stuck on the dead server
    with connect(proxy, lc) as conn:
        assert pid_of(conn) != pid
    assert server_count(pg, lc) == 1


# ---- client timeouts --------------------------------------------------------------------------

def test_query_timeout_cancels_the_query_and_the_session_stays_usable(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=2, query_timeout=1)
    with connect(proxy, lc) as conn:
        pid = pid_of(conn)
        started = time.monotonic()
        with pytest.raises(pgerrors.QueryCanceled):
            conn.execute("select pg_sleep(5)")
        took = time.monotonic() - started
        assert 0.9 <= took < 3.5, took
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
        # a query shorter than query_timeout is left alone; so is a transaction's total time
        with conn.transaction():
            conn.execute("select pg_sleep(0.6)")
            conn.execute("select pg_sleep(0.6)")
        # inside a transaction: cancelled, the transaction is aborted, ROLLBACK works
        conn.execute("BEGIN")
        with pytest.raises(pgerrors.QueryCanceled):
            conn.execute("select pg_sleep(5)")
        assert conn.info.transaction_status == TransactionStatus.INERROR
        conn.execute("ROLLBACK")
        assert conn.execute("select 1").fetchone() == (1,)
    # cancelled, not closed (the next query may have found it still held for its cancel)
    assert backend_alive(pg, pid)
    assert "query_timeout" in proxy.log()


def test_idle_transaction_timeout_disconnects_the_client(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=1, idle_transaction_timeout=1)
    with raw_login(proxy, lc) as conn:
        pid = int(conn.scalar("select pg_backend_pid()"))
        assert [m.type for m in conn.query("BEGIN")][-1] == b"Z"
        began = time.monotonic()
        err = conn.expect_error(timeout=6)
        assert time.monotonic() - began >= 0.9
        assert "idle_transaction_timeout" in err["M"], err
        assert err["S"] == "FATAL"
        assert conn.wait_closed()
    # the server was in a transaction: closed, not reused
    wait_for(lambda: not backend_alive(pg, pid), timeout=5)
    with connect(proxy, lc) as other:
        assert other.execute("select now() = statement_timestamp()").fetchone() == (True,)


def test_client_idle_timeout_disconnects_an_idle_client_only(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=2, client_idle_timeout=1)
    with raw_login(proxy, lc) as idle, raw_login(proxy, lc) as busy:
        assert idle.scalar("select 1") == "1"
        began = time.monotonic()
        busy.send(rawpg.query("select pg_sleep(2.5)"))     # a running query is not idleness
        err = idle.expect_error(timeout=6)
        assert time.monotonic() - began >= 0.9
        assert "client_idle_timeout" in err["M"], err
        assert idle.wait_closed()
        msgs = busy.read_until(b"Z", timeout=10)
        assert b"E" not in [m.type for m in msgs], msgs
        assert busy.scalar("select 2") == "2"


# ---- reserve pool -----------------------------------------------------------------------------

@pytest.mark.parametrize("reserve", [1, 0])
def test_reserve_pool_serves_a_client_that_waited_reserve_pool_timeout(pg, pgmp, lc, reserve):
    proxy = start(pgmp, lc, size=1, reserve_pool_size=reserve, reserve_pool_timeout=0.5, query_wait_timeout=3)
    with connect(proxy, lc) as a, connect(proxy, lc) as b, Sampler(lambda: server_count(pg, lc)) as sampler:
        a.execute("BEGIN")
        a_pid = pid_of(a)
        started = time.monotonic()
        if reserve:
            b_pid = pid_of(b)
            waited = time.monotonic() - started
            assert 0.4 <= waited < 2.8, waited          # reserve_pool_timeout, checked once a second
            assert b_pid != a_pid
            assert server_count(pg, lc) == 2
            assert "using the reserve pool" in proxy.log()
        else:
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                pid_of(b)
            assert time.monotonic() - started >= 2.8
        a.execute("COMMIT")
    assert sampler.max <= 1 + reserve, sampler.samples


# ---- max_db_connections / max_user_connections --------------------------------------------------

def run_clients(proxy, lc, who: list[tuple[str, str]], rounds: int) -> list:
    """One thread per (user, dbname): ``rounds`` short transactions each; the errors."""
    errors = []

    def client(user, dbname, n):
        try:
            with connect(proxy, lc, user=user, dbname=dbname) as conn:
                for i in range(rounds):
                    with conn.transaction():
                        assert conn.execute("select pg_sleep(0.02), %s::int", (i,)).fetchone() == ("", i)
        except Exception as exc:                  # noqa: BLE001 - reported by the test
            errors.append(f"{user}@{dbname}#{n}: {exc!r}")

    threads = [threading.Thread(target=client, args=(u, d, n), daemon=True) for n, (u, d) in enumerate(who)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()], "clients still running after 60s"
    return errors


def test_max_db_connections_caps_servers_across_users_and_clients_queue(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=5, max_db_connections=2, query_wait_timeout=8)
    who = [(lc.user, lc.name)] * 4 + [(lc.user2, lc.name)] * 4
    with Sampler(lambda: backends(pg, f"datname = '{lc.name}'")) as sampler:
        errors = run_clients(proxy, lc, who, rounds=10)
    assert not errors, f"{errors}\n{proxy.log()[-3000:]}"
    assert 0 < sampler.max <= 2, sampler.samples


def test_max_user_connections_caps_servers_across_databases_and_clients_queue(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=5, max_user_connections=2, query_wait_timeout=8)
    who = [(lc.user, lc.name)] * 4 + [(lc.user, lc.name2)] * 4
    with Sampler(lambda: server_count(pg, lc)) as sampler:
        errors = run_clients(proxy, lc, who, rounds=10)
    assert not errors, f"{errors}\n{proxy.log()[-3000:]}"
    assert 0 < sampler.max <= 2, sampler.samples


@pytest.mark.parametrize("limit", ["max_db_connections", "max_user_connections"])
def test_idle_servers_of_another_pool_do_not_starve_a_pool_at_the_limit(pg, pgmp, lc, limit):
    """The limit is reached by one pool's servers, all idle; a client of another pool of the same
    database (or user) must get a server -- an idle one of the other pool is closed to make room, as
    PgBouncer does -- instead of failing or waiting out query_wait_timeout."""
    proxy = start(pgmp, lc, size=5, query_wait_timeout=5, **{limit: 2})
    if limit == "max_db_connections":
        other = dict(user=lc.user2, dbname=lc.name)
    else:
        other = dict(user=lc.user, dbname=lc.name2)
    with connect(proxy, lc) as a1, connect(proxy, lc) as a2:
        for conn in (a1, a2):
            conn.execute("BEGIN")
            conn.execute("select 1")
        for conn in (a1, a2):
            conn.execute("COMMIT")
        assert server_count(pg, lc) == 2                      # both idle in the first pool now
        started = time.monotonic()
        try:
            with connect(proxy, lc, **other) as b:
                assert b.execute("select 'served'").fetchone() == ("served",)
        except psycopg.OperationalError as exc:
            pytest.fail(f"a client of another pool could not get a server after "
                        f"{time.monotonic() - started:.1f}s with {limit}=2 reached by idle servers: {exc}")
        assert time.monotonic() - started < 3
        assert backends(pg, f"usename in ('{lc.user}', '{lc.user2}')") <= 2


def test_a_waiting_client_gets_the_server_another_pool_keeps_idle_at_max_db_connections(pg, pgmp, lc):
    """Warm pools: user2's pool keeps one idle server, user1's pool has the other one in a transaction.
    A second transaction of user1 must not wait out query_wait_timeout while a server sits idle."""
    proxy = start(pgmp, lc, size=5, query_wait_timeout=4, max_db_connections=2)
    with connect(proxy, lc, user=lc.user2) as b, connect(proxy, lc) as a1, connect(proxy, lc) as a2:
        assert b.execute("select 1").fetchone() == (1,)       # user2's pool: one server, idle
        a1.execute("BEGIN")
        a1.execute("select 1")                              # user1's pool: the other one, busy
        started = time.monotonic()
        try:
            assert a2.execute("select 'served'").fetchone() == ("served",)
        except psycopg.OperationalError as exc:
            pytest.fail(f"waited {time.monotonic() - started:.1f}s while user2's server was idle: {exc}")
        assert time.monotonic() - started < 3
        a1.execute("COMMIT")
    assert backends(pg, f"datname = '{lc.name}'") <= 2


@pytest.mark.parametrize("limit", ["max_db_connections", "max_user_connections"])
def test_login_to_a_cold_pool_at_the_limit_waits_for_room_instead_of_failing(pg, pgmp, lc, limit):
    """The limit is reached by another pool's servers, all busy in transactions. A client whose pool
    is new (no server parameters yet) must queue like any client and log in once a server is free,
    not get "no server available" at once."""
    proxy = start(pgmp, lc, size=5, query_wait_timeout=10, **{limit: 2})
    other = dict(user=lc.user2, dbname=lc.name) if limit == "max_db_connections" else dict(user=lc.user,
                                                                                             dbname=lc.name2)
    with connect(proxy, lc) as a1, connect(proxy, lc) as a2:
        for conn in (a1, a2):
            conn.execute("BEGIN")
            conn.execute("select 1")                     # both servers busy
        login = Background(lambda: connect(proxy, lc, **other))
        try:
            assert not login.done.wait(1.0), f"the login did not wait for a server: {login.error!r}"
        finally:
            for conn in (a1, a2):
                conn.execute("COMMIT")
        login.wait(10)
        assert login.error is None, f"{login.error!r}\n{proxy.log()[-2000:]}"
        with login.result as b:
            assert b.execute("select 'served'").fetchone() == ("served",)
    assert backends(pg, f"usename in ('{lc.user}', '{lc.user2}')") <= 2


def test_min_pool_size_does_not_evict_other_pools_at_max_db_connections(pg, pgmp, lc):
    """min_pool_size 2 per pool, max_db_connections 2, two users' pools of one database, no queries:
    the limit caps the pools below their minimum. Filling a minimum is no demand that may close
    another pool's idle server (PgBouncer evicts only for waiting clients), else the two pools take
    each other's servers in turn at every janitor round."""
    proxy = start(pgmp, lc, size=5, min_pool_size=2, max_db_connections=2)
    with connect(proxy, lc) as a, connect(proxy, lc, user=lc.user2) as b:
        assert a.execute("select 1").fetchone() == (1,) and b.execute("select 1").fetchone() == (1,)
        pids = lambda: pg.psql(f"select string_agg(pid::text, ',' order by pid) from pg_stat_activity "  # noqa: E731
                               f"where datname = '{lc.name}' and backend_type = 'client backend'")
        wait_for(lambda: backends(pg, f"datname = '{lc.name}'") == 2, timeout=5)
        before = pids()
        mark = len(pg.log())
        def at_most_two():
            assert backends(pg, f"datname = '{lc.name}'") <= 2
        holds(at_most_two, 3.5, interval=0.2)                # three janitor rounds
        logins = len(re.findall(rf"connection authorized: user=lc2?_\w+ database={lc.name}", pg.log()[mark:]))
        assert logins == 0 and pids() == before, \
            f"{logins} new server logins without any client demand (servers {before} -> {pids()})\n" \
            f"{proxy.log()[-2000:]}"


# ---- pause / resume / reconnect through the CLI -------------------------------------------------

def pool_command(pgmp, proxy, *args: str):
    return pgmp.cli(*args, "-c", str(proxy.config_path), timeout=60)


def test_pause_waits_for_the_open_transaction_and_resume_releases_the_queue(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=2)
    with connect(proxy, lc) as a, connect(proxy, lc) as b:
        a.execute("BEGIN")
        a.execute("insert into doomed values (-1)")
        mark = len(proxy.log())
        pause = Background(pool_command, pgmp, proxy, "pause", lc.name)
        # the CLI asks again and again while the transaction is open
        wait_for(lambda: len(re.findall(rf"pause {lc.name}: 1 pools", proxy.log()[mark:])) >= 3, timeout=10,
                 message=lambda: proxy.log()[mark:])
        assert not pause.done.is_set(), pause.result
        # a new transaction during the pause waits for a server, though one is free
        b_query = Background(lambda: b.execute("select count(*) from doomed").fetchone())
        wait_for(lambda: pool_stats(pgmp, proxy, lc).get("cl_waiting") == 1, timeout=10)
        assert not pause.done.is_set()
        a.execute("COMMIT")
        pause.wait(10)
        assert pause.error is None and pause.result.returncode == 0, pause.result
        assert f"paused {lc.name}" in pause.result.stdout
        assert not b_query.done.is_set(), "a transaction started during the pause"
        assert pool_stats(pgmp, proxy, lc).get("cl_waiting") == 1
        resumed = pool_command(pgmp, proxy, "resume", lc.name)
        assert resumed.returncode == 0 and f"resumed {lc.name}" in resumed.stdout, resumed
        b_query.wait(10)
        assert b_query.error is None and b_query.result == (1,), b_query.error
        assert a.execute("select 1").fetchone() == (1,)


def test_pause_timeout_exits_1_and_the_pause_stays_in_force(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=2)
    with connect(proxy, lc) as a, connect(proxy, lc) as b:
        a.execute("BEGIN")
        a.execute("select 1")
        started = time.monotonic()
        res = pool_command(pgmp, proxy, "pause", lc.name, "--timeout", "1")
        assert res.returncode == 1, res
        assert 0.9 <= time.monotonic() - started < 10
        assert "pause stays in force" in res.stderr, res.stderr
        assert "1 servers in use" in res.stderr or "still 1" in res.stderr, res.stderr
        b_query = Background(lambda: b.execute("select 'after resume'").fetchone())
        wait_for(lambda: pool_stats(pgmp, proxy, lc).get("cl_waiting") == 1, timeout=10)
        assert pool_stats(pgmp, proxy, lc).get("paused") is True
        a.execute("COMMIT")                 # the transaction ends; the pause does not
        assert a.info.transaction_status == TransactionStatus.IDLE
        assert not b_query.done.wait(0.5), "the pause ended with the transaction"
        assert pool_command(pgmp, proxy, "resume", lc.name).returncode == 0
        b_query.wait(10)
        assert b_query.error is None and b_query.result == ("after resume",), b_query.error


def test_pause_of_all_databases_also_holds_pools_made_after_it(pg, pgmp, lc):
    """`pgmp pause` without a database pauses everything: a (database, user) pool that first logs in
    during the pause must not run transactions either. (Worker.pool_command records only a named
    database in paused_dbs, and get_pool pauses a new pool only if its database is in there.)"""
    proxy = start(pgmp, lc, size=2)
    with connect(proxy, lc) as a:
        assert a.execute("select 1").fetchone() == (1,)
        res = pool_command(pgmp, proxy, "pause")
        assert res.returncode == 0 and "paused all databases" in res.stdout, res
        with connect(proxy, lc, user=lc.user2) as b:          # a new pool, made during the pause
            query = Background(lambda: b.execute("select 'after resume'").fetchone())
            try:
                assert not query.done.wait(1.5), f"a new pool ran a transaction during the pause: {query.result}"
            finally:
                assert pool_command(pgmp, proxy, "resume").returncode == 0
            query.wait(10)
            assert query.error is None and query.result == ("after resume",), query.error


def test_reconnect_closes_idle_servers_now_and_busy_ones_at_release(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=2)
    with connect(proxy, lc) as a, connect(proxy, lc) as b:
        b.execute("BEGIN")
        busy = pid_of(b)
        idle = pid_of(a)                         # a's server goes back to the pool
        assert idle != busy
        res = pool_command(pgmp, proxy, "reconnect", lc.name)
        assert res.returncode == 0 and f"reconnecting {lc.name}" in res.stdout, res
        wait_for(lambda: not backend_alive(pg, idle), timeout=5, message="idle server not closed by reconnect")
        assert backend_alive(pg, busy)
        assert pid_of(b) == busy                 # in use: the transaction goes on on its server
        b.execute("COMMIT")
        wait_for(lambda: not backend_alive(pg, busy), timeout=5, message="busy server not closed at its release")
        fresh = {pid_of(a), pid_of(b)}
        assert not fresh & {idle, busy}, fresh
    assert server_count(pg, lc) <= 2


def test_server_closed_by_reconnect_after_its_reset_is_not_replaced_without_demand(pg, pgmp, lc):
    """Session mode: the server a client leaves after `pgmp reconnect` runs server_reset_query, then is
    closed (pgmp reconnect) while its state is still RESET. Nobody waits and min_pool_size is 0, so the
    pool must stay empty. (Pool.resetting is decremented in _reset_done and again in server_closed; at
    -1, every _grow "needs" one more server than its waiters, so one is opened for nobody at once.)"""
    proxy = start(pgmp, lc, size=3, mode="session")
    with connect(proxy, lc) as conn:
        pid = pid_of(conn)
        assert pool_command(pgmp, proxy, "reconnect", lc.name).returncode == 0
    wait_for(lambda: not backend_alive(pg, pid), timeout=5, message="server not closed at its release")
    stats = pool_stats(pgmp, proxy, lc)
    opened = stats.get("sv_idle", 0) + stats.get("sv_login", 0) + stats.get("sv_active", 0)
    assert opened == 0, f"no client, min_pool_size 0, yet the pool has servers: {stats}"


# ---- server_login_retry -----------------------------------------------------------------------

def test_server_login_retry_fails_fast_after_a_failed_server_login(pg, pgmp, lc):
    proxy = start(pgmp, lc, size=2, server_login_retry=15,
                  databases={lc.name: {"user": lc.user2, "password": "not-the-password"}})
    pattern = f'password authentication failed for user "{lc.user2}"'
    mark = len(pg.log())
    with rawpg.RawPG.connect(proxy.host, proxy.port) as first:
        with pytest.raises(rawpg.ServerError) as info:
            first.login(user=lc.user, password_text=lc.password, database=lc.name)
    assert info.value.fields["C"] == "28P01", info.value.fields
    assert pattern in info.value.fields["M"]
    wait_for(lambda: pattern in pg.log()[mark:], timeout=5)
    started = time.monotonic()
    with rawpg.RawPG.connect(proxy.host, proxy.port) as second:
        with pytest.raises(rawpg.ServerError) as info:
            second.login(user=lc.user, password_text=lc.password, database=lc.name)
    assert time.monotonic() - started < 0.5, "the second client was not failed fast"
    assert info.value.fields["C"] == "28P01", info.value.fields
    # a login attempt for the second client would have come before its answer
    assert pg.log()[mark:].count(pattern) == 1, pg.log()[mark:]
