"""Several hosts per database against a real primary and a streaming standby (pg_basebackup -R).

The standby streams from the run's shared primary; it is made once for this
module (per xdist worker) and stopped by pid at its end. What is checked:
where server connections land (inet_server_port() through pgmp tells the
host), target_session_attrs and load_balance_hosts, alias databases for the
primary and the standbys, a banned host coming back after host_ban_time, a
lagging standby leaving the read pool and rejoining it, and the admin
console's SHOW HOSTS / SHOW DNS_HOSTS.
"""
from __future__ import annotations

import contextlib
import struct
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgmp.protocol.messages import frame, ready_for_query
from tests.support import free_port, wait_for
from tests.support.cluster import start_server, start_standby, stop_cluster, stop_server, wal_replayed
from tests.support.fakeserver import PARAMS, FakeServer, login_ok
from tests.support.shared import current_run_dir

CHECKS = {"health_check_period": 0.3, "health_check_timeout": 2, "health_check_user": "scram_user",
          "admin_users": ["scram_user"]}


@pytest.fixture(scope="module")
def standby(pg):
    base = Path(tempfile.mkdtemp(prefix="standby-", dir=current_run_dir()))
    base.chmod(0o711)
    node = start_standby(pg, base)
    pg.psql("CREATE TABLE IF NOT EXISTS hosts_lag (id serial, at timestamptz DEFAULT now())", user="scram_user",
            db="appdb")
    wait_for(lambda: wal_replayed(pg, node), timeout=30, message="the standby never caught up")
    yield node
    stop_cluster(base)


def hosts(*clusters) -> list[str]:
    return [f"{c.host}:{c.port}" for c in clusters]


def server_port(proc, dbname: str = "appdb", **kw) -> int:
    with psycopg.connect(proc.dsn(dbname=dbname, **kw), autocommit=True) as conn:
        return conn.execute("SELECT inet_server_port()").fetchone()[0]


def ports_of_sessions(proc, n: int, dbname: str = "appdb") -> list[int]:
    """The server port each of ``n`` simultaneous session-mode clients got."""
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(psycopg.connect(proc.dsn(dbname=dbname), autocommit=True)) for _ in range(n)]
        return [c.execute("SELECT inet_server_port()").fetchone()[0] for c in conns]


def console(proc, sql: str) -> list[dict]:
    with psycopg.connect(proc.dsn(dbname="pgmp"), autocommit=True) as conn:
        cur = conn.execute(sql)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def host_rows(proc, database: str) -> dict[int, dict]:
    return {r["port"]: r for r in console(proc, "SHOW HOSTS") if r["database"] == database}


def roles_known(proc, database: str, expected: dict[int, str]):
    rows = host_rows(proc, database)
    return all(rows.get(port, {}).get("role") == role for port, role in expected.items()) and rows


# ---- where connections go ------------------------------------------------------------------

@pytest.mark.parametrize("checks", [CHECKS, {"health_check_period": 0}], ids=["health-checks", "no-checks"])
def test_read_write_goes_to_the_primary_even_with_the_standby_listed_first(pgmp, pg, standby, checks):
    proc = pgmp.start(config=checks, databases={
        "appdb": {"host": hosts(standby, pg), "target_session_attrs": "read-write"}})
    if checks["health_check_period"]:
        wait_for(lambda: roles_known(proc, "appdb", {standby.port: "standby", pg.port: "primary"}), timeout=10)
    for _ in range(5):
        assert server_port(proc) == pg.port
    with psycopg.connect(proc.dsn()) as conn:                  # and writes work there
        conn.execute("INSERT INTO hosts_lag DEFAULT VALUES")
    if not checks["health_check_period"]:
        # the worker learnt the standby's role from its in_hot_standby at login, and closed it
        assert "does not fit target_session_attrs=read-write" in proc.log()


@pytest.mark.parametrize("balance", ["round-robin", "random"])
def test_read_only_traffic_spreads_over_the_hosts(pgmp, pg, standby, balance):
    proc = pgmp.start(config=CHECKS, databases={
        "appdb": {"host": hosts(pg, standby), "load_balance_hosts": balance}})
    wait_for(lambda: roles_known(proc, "appdb", {standby.port: "standby", pg.port: "primary"}), timeout=10)
    ports = ports_of_sessions(proc, 20)
    if balance == "round-robin":
        assert sorted(ports) == sorted([pg.port, standby.port] * 10)
    else:
        assert set(ports) == {pg.port, standby.port}        # 2**-19 to fail by chance


def test_disable_uses_the_first_host_that_fits(pgmp, pg, standby):
    proc = pgmp.start(config=CHECKS, databases={"appdb": {"host": hosts(standby, pg)}})
    assert set(ports_of_sessions(proc, 6)) == {standby.port}


def test_alias_databases_for_the_primary_and_the_standbys(pgmp, pg, standby):
    both = hosts(pg, standby)
    proc = pgmp.start(config={**CHECKS, "pool_mode": "transaction"}, databases={
        "appdb": {"host": both, "target_session_attrs": "read-write"},
        "appdb_ro": {"host": both, "dbname": "appdb", "target_session_attrs": "standby"}})
    wait_for(lambda: roles_known(proc, "appdb_ro", {standby.port: "standby", pg.port: "primary"}), timeout=10)
    for _ in range(3):
        assert server_port(proc, "appdb") == pg.port
        assert server_port(proc, "appdb_ro") == standby.port
    with psycopg.connect(proc.dsn(dbname="appdb_ro")) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO hosts_lag DEFAULT VALUES")


def test_a_standby_target_waits_while_no_standby_is_listed(pgmp, pg):
    proc = pgmp.start(config={**CHECKS, "query_wait_timeout": 1, "client_login_timeout": 2},
                      databases={"appdb": {"host": hosts(pg), "target_session_attrs": "standby"}})
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="login"):
        server_port(proc)
    assert time.monotonic() - started >= 1.5          # it waited for a standby, then client_login_timeout
    assert "no host fits target_session_attrs=standby" in proc.log()


# ---- health ----------------------------------------------------------------------------------

def test_a_banned_host_comes_back_after_host_ban_time(pgmp, pg, standby):
    ban = 4.0
    proc = pgmp.start(config={**CHECKS, "host_ban_time": ban}, databases={
        "appdb": {"host": hosts(pg, standby), "load_balance_hosts": "round-robin"}})
    wait_for(lambda: roles_known(proc, "appdb", {standby.port: "standby"}), timeout=10)
    stop_server(standby)
    try:
        wait_for(lambda: host_rows(proc, "appdb")[standby.port]["state"] in ("down", "banned"), timeout=10)
        assert set(ports_of_sessions(proc, 4)) == {pg.port}
    finally:
        start_server(standby)
    # it answers again, but stays banned until host_ban_time has passed since its last failure
    up_at = time.monotonic()
    wait_for(lambda: host_rows(proc, "appdb")[standby.port]["state"] == "banned", timeout=10)
    row = host_rows(proc, "appdb")[standby.port]
    assert row["banned_until"] is not None and row["role"] == "standby"
    # (a pool reuses its idle servers first: each step asks for 4 sessions more than the last, all new servers)
    assert set(ports_of_sessions(proc, 8)) == {pg.port}
    wait_for(lambda: host_rows(proc, "appdb")[standby.port]["state"] == "up", timeout=ban + 5)
    back = time.monotonic() - up_at
    assert back <= ban + 2
    assert ports_of_sessions(proc, 12).count(standby.port) == 2
    log = proc.log()
    assert f"host 127.0.0.1:{standby.port} is down" in log and f"host 127.0.0.1:{standby.port} answers again" in log


def test_a_lagging_standby_leaves_the_read_pool_and_rejoins(pgmp, pg, standby):
    proc = pgmp.start(config={**CHECKS, "pool_mode": "transaction"}, databases={
        "appdb_ro": {"host": hosts(pg, standby), "dbname": "appdb", "target_session_attrs": "prefer-standby",
                     "max_replica_lag": 1}})
    pg.psql("INSERT INTO hosts_lag DEFAULT VALUES", db="appdb")     # a replay timestamp to measure from
    wait_for(lambda: wal_replayed(pg, standby), timeout=10)
    wait_for(lambda: host_rows(proc, "appdb_ro")[standby.port]["state"] == "up", timeout=10)
    with psycopg.connect(proc.dsn(dbname="appdb_ro"), autocommit=True) as conn:
        port = lambda: conn.execute("SELECT inet_server_port()").fetchone()[0]   # noqa: E731
        assert port() == standby.port
        standby.psql("SELECT pg_wal_replay_pause()")
        try:
            def behind():
                pg.psql("INSERT INTO hosts_lag DEFAULT VALUES", db="appdb")
                return host_rows(proc, "appdb_ro")[standby.port]["state"] == "lagging"
            wait_for(behind, timeout=15, interval=0.2)
            assert float(host_rows(proc, "appdb_ro")[standby.port]["lag"]) > 1
            # the same client's next transaction runs on the primary: the standby's server left the pool
            wait_for(lambda: port() == pg.port, timeout=5)
            assert "out of the read pool" in proc.log()
        finally:
            standby.psql("SELECT pg_wal_replay_resume()")
        wait_for(lambda: host_rows(proc, "appdb_ro")[standby.port]["state"] == "up", timeout=15)
        wait_for(lambda: port() == standby.port, timeout=5)
    assert "back in the read pool" in proc.log()


def test_show_hosts_and_dns_hosts(pgmp, pg, standby):
    proc = pgmp.start(config={**CHECKS, "dns_max_ttl": 30}, databases={
        "appdb": {"host": [f"localhost:{pg.port}", f"{standby.host}:{standby.port}"]},
        "sock": {"host": pg.socket_dir, "port": pg.port, "dbname": "appdb", "target_session_attrs": "primary"}})
    assert server_port(proc) == pg.port                  # a worker looked localhost up too
    wait_for(lambda: roles_known(proc, "appdb", {standby.port: "standby", pg.port: "primary"}), timeout=10)
    wait_for(lambda: {(r["state"], r["last_check"] is not None) for r in host_rows(proc, "appdb").values()}
             == {("up", True)}, timeout=10,
             message=lambda: f"not all up: {host_rows(proc, 'appdb')}")
    rows = console(proc, "SHOW HOSTS")
    assert list(rows[0]) == ["database", "host", "port", "role", "state", "lag", "banned_until", "last_check"]
    by = {(r["database"], r["host"], r["port"]): r for r in rows}
    primary = by[("appdb", "localhost", pg.port)]
    assert (primary["role"], primary["state"], primary["lag"], primary["banned_until"]) == \
        ("primary", "up", None, None)
    assert primary["last_check"] is not None
    replica = by[("appdb", standby.host, standby.port)]
    assert (replica["role"], replica["state"]) == ("standby", "up") and float(replica["lag"]) >= 0
    assert by[("sock", pg.socket_dir, pg.port)]["role"] == "primary"
    dns = console(proc, "SHOW DNS_HOSTS")
    assert list(dns[0]) == ["hostname", "ttl", "addrs"]
    entry = next(r for r in dns if r["hostname"] == "localhost")
    assert 0 < entry["ttl"] <= 30 and "127.0.0.1" in entry["addrs"].split(",")
    dbs = {r["name"]: r for r in console(proc, "SHOW DATABASES")}
    assert dbs["appdb"]["host"] == f"localhost:{pg.port},{standby.host}:{standby.port}"
    assert dbs["appdb"]["load_balance_hosts"] == "disable"


def test_host_state_in_the_metrics(pgmp, pg, standby):
    """The master's health checks reach Prometheus: up, role, ban and replica lag per host."""
    port = free_port()
    proc = pgmp.start(config={**CHECKS, "metrics_listen": f"127.0.0.1:{port}"}, databases={
        "appdb": {"host": hosts(pg, standby), "target_session_attrs": "prefer-standby"}})
    wait_for(lambda: roles_known(proc, "appdb", {standby.port: "standby", pg.port: "primary"}), timeout=10)

    def samples():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        return {(s.name, s.labels.get("port")): s.value
                for f in text_string_to_metric_families(body) for s in f.samples if s.name.startswith("pgmp_host_")}

    wait_for(lambda: ("pgmp_host_up", str(standby.port)) in samples(), timeout=10)
    got = samples()
    assert got[("pgmp_host_up", str(pg.port))] == 1 and got[("pgmp_host_up", str(standby.port))] == 1
    assert got[("pgmp_host_in_recovery", str(pg.port))] == 0
    assert got[("pgmp_host_in_recovery", str(standby.port))] == 1
    assert got[("pgmp_host_banned", str(pg.port))] == 0
    assert got[("pgmp_host_replica_lag_seconds", str(standby.port))] >= 0
    assert ("pgmp_host_replica_lag_seconds", str(pg.port)) not in got        # a primary has no lag


# ---- PostgreSQL 13 and older: no in_hot_standby at login -----------------------------------

def role_answer(in_recovery: str, read_only: str) -> bytes:
    cols = b"".join(name + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
                    for name in (b"pg_is_in_recovery", b"current_setting"))
    row = struct.pack("!h", 2) + b"".join(struct.pack("!i", len(v)) + v for v in (in_recovery, read_only))
    return (frame(b"T", struct.pack("!h", 2) + cols) + frame(b"D", row) + frame(b"C", b"SELECT 1\0")
            + ready_for_query(b"I"))


def old_server(in_recovery: bytes, read_only: bytes):
    """A server that reports no role at login (PostgreSQL 13): pgmp must ask before it serves."""
    def script(conn):
        conn.send(login_ok(params=PARAMS))                 # (PARAMS has no in_hot_standby)
        msg = conn.read()
        if msg is None:
            return
        assert msg[0] == b"Q" and b"pg_is_in_recovery()" in msg[1], msg
        conn.send(role_answer(in_recovery, read_only))
        conn.serve()
    return script


def test_a_server_that_reports_no_role_is_asked_before_it_serves(pgmp):
    with FakeServer(old_server(b"t", b"on")) as standby, FakeServer(old_server(b"f", b"off")) as primary:
        proc = pgmp.start(config={"health_check_period": 0, "pool_mode": "transaction"}, databases={
            "appdb": {"host": [f"127.0.0.1:{standby.port}", f"127.0.0.1:{primary.port}"],
                      "target_session_attrs": "read-write"}})
        with psycopg.connect(proc.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == "fake"
        assert len(primary.connections) == 1 and len(standby.connections) == 1
        assert standby.connections[0].received[-1][0] == b"X"       # closed: it is a standby
        assert f"host 127.0.0.1:{standby.port} does not fit target_session_attrs=read-write" in proc.log()
