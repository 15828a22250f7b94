"""Held servers in transaction mode (pgmp.pool.Pool.hold), through a real pgmp and PostgreSQL.

While no client waits, a server given back at a transaction boundary stays linked to its
client so that the next transaction crosses the C relay alone. To everyone else it must be
an idle server: counted as idle, taken by the next client that needs one, closed quietly
when PostgreSQL ends it, released by PAUSE and by the janitor's deadlines. With
PGMP_IMPL=python nothing is held, and every test here must pass the same way. A client over
TLS, whose pair only Python relays, is held too (it is spared the release and the next link);
the first tests run for it as well.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psycopg
import pytest

from pgmp.protocol import scanner
from tests.integration.test_pooling import dsn, no_servers_left, pooldb, raw_login, server_count, start  # noqa: F401
from tests.integration import rawpg
from tests.integration.test_lifecycle import client_bytes_queued, worker_pid
from tests.integration.test_tls import certs, tls_config  # noqa: F401
from tests.support import run, stop_process, wait_for
from tests.support.proxy import pgmp_env

ADMIN = "scram_user"
HOLDS = scanner.IMPL == "c"          # only the C relay holds servers


def console(proxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=ADMIN, dbname="pgmp"), autocommit=True, prepare_threshold=None)


def pool_row(proxy, db) -> dict:
    """This database's SHOW POOLS row."""
    with console(proxy) as adm:
        cur = adm.execute("SHOW POOLS")
        names = [d.name for d in cur.description]
        return next(dict(zip(names, r)) for r in cur.fetchall() if r[0] == db.name)


def servers(proxy, db) -> list[dict]:
    with console(proxy) as adm:
        cur = adm.execute("SHOW SERVERS")
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall() if r[names.index("database")] == db.name]


def held_count(pgmp, proxy, db) -> int:
    """sv_held of ``pgmp stats --json``, over the workers."""
    return sum(p.get("sv_held", 0) for w in proxy.stats()["workers"] for p in w["pools"] if p["database"] == db.name)


TLS = pytest.mark.parametrize("tls", [False, True], ids=["tcp", "client-tls"])


def tls_start(pgmp, pooldb, certs, tls: bool, **config):
    """start() with, if ``tls``, TLS required of clients; and the dsn parameters to match."""
    if tls:
        config.update(tls_config(certs, "require"))
    return start(pgmp, pooldb, **config), ({"sslmode": "require"} if tls else {})


def backend(conn) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


@TLS
def test_a_server_held_between_transactions_counts_as_idle_everywhere(pg, pgmp, pooldb, certs, tls):
    no_servers_left(pg, pooldb)
    proxy, params = tls_start(pgmp, pooldb, certs, tls, size=2, admin_users=[ADMIN])
    with psycopg.connect(dsn(proxy, pooldb, **params), autocommit=True) as conn:
        first = backend(conn)
        assert backend(conn) == first               # the same server for the next transaction
        row = pool_row(proxy, pooldb)
        assert (row["sv_active"], row["sv_idle"], row["cl_active"]) == (0, 1, 1), row
        [srv] = servers(proxy, pooldb)
        assert srv["state"] == "idle" and not srv["link"], srv
        assert srv["remote_pid"] == first
        assert held_count(pgmp, proxy, pooldb) == (1 if HOLDS else 0)
        with conn.transaction():                    # in a transaction: linked and active
            assert backend(conn) == first
            row = pool_row(proxy, pooldb)
            assert (row["sv_active"], row["sv_idle"]) == (1, 0), row
            assert held_count(pgmp, proxy, pooldb) == 0
    wait_for(lambda: pool_row(proxy, pooldb)["cl_active"] == 0, timeout=10)
    assert held_count(pgmp, proxy, pooldb) == 0     # its client left: an ordinary idle server


@TLS
def test_another_client_takes_a_held_server_and_each_sees_only_its_own_state(pg, pgmp, pooldb, certs, tls):
    no_servers_left(pg, pooldb)
    proxy, params = tls_start(pgmp, pooldb, certs, tls, size=1, admin_users=[ADMIN])
    with psycopg.connect(dsn(proxy, pooldb, **params), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        a.execute("set application_name = 'client_a'")
        b.execute("set search_path = schema_c")
        pid = backend(a)
        for _ in range(20):                         # one server, taken back and forth
            assert a.execute("select current_setting('application_name'), current_setting('search_path'), "
                             "pg_backend_pid()").fetchone() == ("client_a", '"$user", public', pid)
            assert b.execute("select current_setting('application_name'), current_setting('search_path'), "
                             "pg_backend_pid()").fetchone() == ("", "schema_c", pid)
        assert server_count(pg, pooldb) == 1


@TLS
def test_a_held_server_that_postgres_ends_is_replaced_without_an_error(pg, pgmp, pooldb, certs, tls):
    no_servers_left(pg, pooldb)
    proxy, params = tls_start(pgmp, pooldb, certs, tls, size=2, admin_users=[ADMIN])
    with psycopg.connect(dsn(proxy, pooldb, **params), autocommit=True) as conn:
        first = backend(conn)
        assert pg.psql(f"select pg_terminate_backend({first})") == "t"
        wait_for(lambda: server_count(pg, pooldb) == 0, timeout=10, message="the backend did not exit")
        if HOLDS:                                   # a held server's EOF is an event of its own: closed now
            wait_for(lambda: not any(s["remote_pid"] == first for s in servers(proxy, pooldb)), timeout=10,
                     message=lambda: f"pgmp still lists the ended server {first}:\n{proxy.log()}")
        second = backend(conn)                      # no error: the client had no server in use
        assert second != first
        assert "08006" not in proxy.log()              # no client was told of a lost server


def test_pause_completes_with_a_held_server_and_resume_hands_it_out_again(pg, pgmp, pooldb):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2, admin_users=[ADMIN])
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        pid = backend(conn)
        with console(proxy) as adm:
            adm.execute(f"PAUSE {pooldb.name}")     # returns once no server is in use
            row = pool_row(proxy, pooldb)
            assert (row["sv_active"], row["sv_idle"]) == (0, 1), row
            assert held_count(pgmp, proxy, pooldb) == 0
            adm.execute(f"RESUME {pooldb.name}")
        assert backend(conn) == pid


def test_server_idle_timeout_closes_a_held_server_and_the_client_goes_on(pg, pgmp, pooldb):
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2, admin_users=[ADMIN], server_idle_timeout=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        first = backend(conn)
        wait_for(lambda: server_count(pg, pooldb) == 0, timeout=10,
                 message=lambda: f"the idle server was not closed:\n{proxy.log()}")
        assert "server_idle_timeout" in proxy.log()
        assert backend(conn) != first


def _control_queued(pid: int) -> bool:
    """True when a unix socket of process ``pid`` (the worker's control channel) has bytes unread."""
    out = run(["ss", "-x", "-p", "-H"], timeout=10).stdout
    return any(f"pid={pid}," in line and int(line.split()[2]) > 0 for line in out.splitlines())


def test_pause_in_the_batch_of_a_query_to_a_held_server_waits_for_it(pg, pgmp, pooldb):
    """A PAUSE (a control message) and a client's Query to its held server in one epoll batch, the
    PAUSE first: C relays the Query, and only then does Python see the PAUSE. The held server is in
    use by then; PAUSE must not take it back (which lost the Query and left its client waiting)."""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=2, admin_users=[ADMIN])
    with raw_login(proxy.host, proxy.port, pooldb) as conn:
        pid = raw_backend(conn)                     # its server is held now
        worker = worker_pid(proxy)
        stop_process(worker)
        try:
            pause = subprocess.Popen([sys.executable, "-m", "pgmp", "pause", pooldb.name, "-c",
                                      str(proxy.config_path), "--timeout", "20"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=pgmp_env())
            wait_for(lambda: _control_queued(worker), timeout=10, message="the PAUSE never reached the worker")
            conn.send(rawpg.query("select pg_backend_pid()"))
            wait_for(lambda: client_bytes_queued(proxy.port, conn.sock.getsockname()[1]), timeout=5,
                     message="the client's query never reached pgmp's socket")
        finally:
            os.kill(worker, signal.SIGCONT)
        out, _ = pause.communicate(timeout=30)
        assert pause.returncode == 0 and "paused" in out, out
        if HOLDS:
            # The Query crossed C before Python saw the PAUSE: PAUSE waited for its answer.
            answer = conn.read_until(b"Z", timeout=15)
            pgmp.cli("resume", pooldb.name, "-c", proxy.config_path, check=True)
        else:
            # Nothing is held: whichever Python read first wins. If the PAUSE did, the Query
            # waits for RESUME; either way it is answered, once.
            pgmp.cli("resume", pooldb.name, "-c", proxy.config_path, check=True)
            answer = conn.read_until(b"Z", timeout=15)
        rows = [rawpg.data_row(m.payload) for m in answer if m.type == b"D"]
        assert len(rows) == 1 and rows[0][0].isdigit(), answer
        if HOLDS:
            assert rows == [[str(pid)]], answer
        assert "relayed bytes" not in proxy.log(), proxy.log()[-3000:]
        assert raw_backend(conn) > 0


def raw_backend(conn) -> int:
    conn.send(rawpg.query("select pg_backend_pid()"))
    rows = [rawpg.data_row(m.payload) for m in conn.read_until(b"Z") if m.type == b"D"]
    return int(rows[0][0])
