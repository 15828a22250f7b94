"""Faults with real processes: PostgreSQL restarted under load, a server that is starting up (57P03),
many clients on a small pool. Transaction pooling.

These tests restart and reconfigure PostgreSQL, so they run on a PRIVATE cluster of this module
(one per xdist worker that runs them), never on the shared `pg` cluster other tests use meanwhile.
pgmp runs with two workers, so "server count never above the pool size" covers the split of
pool sizes across workers.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.support import PASSWORDS, conninfo, run, wait_for
from tests.support.cluster import Cluster, _server_user_kwargs, start_cluster, stop_cluster
from tests.support.shared import current_run_dir

USER, DB = "scram_user", "appdb"


@pytest.fixture(scope="module")
def private_pg() -> Cluster:
    """A PostgreSQL of this module's own, with the pgbench tables (scale 1) in appdb."""
    base = current_run_dir() / f"pg-faults-{uuid.uuid4().hex[:8]}"
    cluster = start_cluster(base)
    try:
        run([Path(cluster.bin_dir) / "pgbench", "-i", "-q", "-s", "1"], env=direct_env(cluster), timeout=120)
        yield cluster
    finally:
        stop_cluster(base)


def direct_env(cluster: Cluster) -> dict[str, str]:
    return {"PGHOST": cluster.host, "PGPORT": str(cluster.port), "PGUSER": USER, "PGPASSWORD": PASSWORDS[USER],
            "PGDATABASE": DB, "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"}


def proxy_env(cluster: Cluster, proxy) -> dict[str, str]:
    return {**direct_env(cluster), "PGHOST": proxy.host, "PGPORT": str(proxy.port)}


def pg_ctl(cluster: Cluster, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    # -l again on restart: without it the new postmaster would write to pg_ctl's stdout, our pipe
    return run([Path(cluster.bin_dir) / "pg_ctl", *args, "-D", cluster.datadir], timeout=timeout,
               **_server_user_kwargs())


def superuser(cluster: Cluster) -> psycopg.Connection:
    return psycopg.connect(conninfo(host=cluster.socket_dir, port=cluster.port, user="postgres", dbname="postgres",
                                    connect_timeout=10), autocommit=True)


def start(pgmp, cluster: Cluster, size: int, workers: int = 2, **config):
    return pgmp.start(config={"pool_mode": "transaction", "default_pool_size": size, **config},
                      databases={DB: {"host": cluster.host, "port": cluster.port}}, workers=workers)


def server_count(conn: psycopg.Connection) -> int:
    return conn.execute("select count(*) from pg_stat_activity where usename = %s and backend_type = 'client backend'",
                        (USER,)).fetchone()[0]


class Sampler:
    """Counts pgmp's server connections (the test role's backends) every 0.1 s in a thread."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.samples: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = superuser(self.cluster)
                self.samples.append(server_count(conn))
            except psycopg.Error as exc:          # PostgreSQL restarting: reconnect
                self.errors.append(str(exc))
                conn = None
            self.stop.wait(0.1)
        if conn is not None:
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)

    @property
    def max(self) -> int:
        return max(self.samples, default=0)


def psql_through(proxy, cluster: Cluster, sql: str = "select 'ok'") -> subprocess.CompletedProcess:
    return run(["psql", "-X", "-A", "-t", "-c", sql], env=proxy_env(cluster, proxy), timeout=30, check=False)


def pgbench(cluster: Cluster, proxy, *args: str, prefix: Path | None = None) -> subprocess.Popen:
    cmd = [str(Path(cluster.bin_dir) / "pgbench"), "-n", *args]
    if prefix is not None:
        cmd += ["-l", "--log-prefix", str(prefix)]
    return subprocess.Popen(cmd, env={**os.environ, **proxy_env(cluster, proxy)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=prefix.parent if prefix else None)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"pgbench still running after {timeout:g}s:\n{out[-3000:]}") from None
    return out


def pool_totals(pgmp, proxy) -> dict:
    """Counters and gauges of the appdb pool summed over pgmp's workers (`pgmp stats --json`)."""
    data = proxy.stats()
    total: dict = {}
    for worker in data["workers"]:
        for pool in worker["pools"]:
            if pool["database"] == DB and pool["user"] == USER:
                for key, value in pool.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        total[key] = total.get(key, 0) + value
    return total


def read_latency_logs(prefix: Path) -> tuple[list[int], dict[str, int], int]:
    """pgbench -l files: latencies in µs of completed transactions, transactions per client, failed ones."""
    lat: list[int] = []
    per_client: dict[str, int] = {}
    failed = 0
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                if parts[2].isdigit():
                    lat.append(int(parts[2]))
                    per_client[parts[0]] = per_client.get(parts[0], 0) + 1
                else:
                    failed += 1
    return lat, per_client, failed


# ---- PostgreSQL restarted under load ------------------------------------------------------------

def test_postgresql_restart_under_pgbench_load(pgmp, private_pg):
    size = 10
    # Clients queued when the servers die make pgmp reconnect while PostgreSQL is still down; that
    # failed login then holds new logins off for server_login_retry (its own test is below), so
    # keep it short here: this test is about coming back after the restart.
    proxy = start(pgmp, private_pg, size=size, server_login_retry=1)
    load = pgbench(private_pg, proxy, "-c", "20", "-j", "2", "-T", "6")
    try:
        with superuser(private_pg) as su:
            wait_for(lambda: server_count(su) >= size // 2, timeout=20, message="pgbench never got going through pgmp")
        assert pool_totals(pgmp, proxy).get("xact_count", 0) > 0
        pg_ctl(private_pg, "restart", "-m", "fast", "-w", "-t", "60", "-l", private_pg.logfile)
        restarted = time.monotonic()
        # a fresh psql through pgmp works again within seconds
        attempts = []

        def psql_works():
            res = psql_through(proxy, private_pg)
            attempts.append(res.stderr.strip() or res.stdout.strip())
            return res.returncode == 0 and res.stdout.strip() == "ok"
        wait_for(psql_works, timeout=30, interval=0.2,
                 message=lambda: f"no working psql through pgmp 30s after the restart; last errors: "
                                 f"{attempts[-3:]}\n{proxy.log()[-3000:]}")
        recovery = time.monotonic() - restarted
        print(f"\nPostgreSQL restart: a fresh psql through pgmp worked {recovery:.2f}s after pg_ctl restart "
              f"returned ({len(attempts)} attempts; first error: {attempts[0] if len(attempts) > 1 else '-'})")
        out = finish(load, 60)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
    # the clients in flight got an error (pgbench aborts a client on a lost connection)
    assert load.returncode != 0 and re.search(r"client \d+ (script \d+ )?aborted", out), out[-3000:]
    assert recovery < 5, f"recovery took {recovery:.1f}s; psql errors meanwhile: {attempts}"

    # no pool stays stuck: the full load works again, within the pool size
    with Sampler(private_pg) as sampler:
        again = finish(pgbench(private_pg, proxy, "-c", "20", "-j", "2", "-T", "3"), 60)
    assert "number of failed transactions: 0" in again and re.search(r"processed: [1-9]", again), again
    assert 0 < sampler.max <= size, sampler.samples
    # no server connection leaks, in PostgreSQL or in pgmp's books
    with superuser(private_pg) as su:
        assert server_count(su) <= size
        totals = pool_totals(pgmp, proxy)
        assert totals.get("sv_login", 0) == 0 and totals.get("sv_active", 0) == 0, totals
        assert totals.get("sv_idle", 0) == server_count(su), totals


def test_postgresql_down_then_up_again_pool_recovers_after_server_login_retry(pgmp, private_pg):
    """PostgreSQL stopped for a while (connections refused), then started: clients meanwhile get a
    clear error at once, and once it is up a new client is served no later than server_login_retry
    after the failed attempt."""
    retry = 2
    proxy = start(pgmp, private_pg, size=4, workers=1, server_login_retry=retry)
    assert psql_through(proxy, private_pg).stdout.strip() == "ok"          # a warm pool: params cached
    pg_ctl(private_pg, "stop", "-m", "fast", "-w", "-t", "60")
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="could not connect to server|Connection refused"):
                conn.execute("select 1")
            assert time.monotonic() - started < 2
        failed_at = time.monotonic()
        # within server_login_retry: failed fast, without a new connection attempt
        res = psql_through(proxy, private_pg)
        assert res.returncode != 0 and time.monotonic() - failed_at < retry, res
    finally:
        pg_ctl(private_pg, "start", "-w", "-t", "60", "-l", private_pg.logfile)
    wait_for(lambda: psql_through(proxy, private_pg).stdout.strip() == "ok", timeout=retry + 5, interval=0.2,
             message=lambda: proxy.log()[-3000:])
    assert time.monotonic() - failed_at < retry + 5


# ---- 57P03: the server is starting up -----------------------------------------------------------

def test_client_arriving_while_postgresql_starts_up_is_served_once_it_is_up(pgmp, private_pg):
    """A standby with hot_standby = off answers every login with 57P03 ("not accepting connections")
    for as long as it stays in recovery: a deterministic stand-in for a server that is starting up.
    pgmp must treat 57P03 as temporary: keep the client waiting and retry, then serve it once the
    server is promoted -- within server_connect_timeout, and without the server_login_retry penalty."""
    conf = Path(private_pg.datadir) / "postgresql.conf"
    original = conf.read_text()
    signal_file = Path(private_pg.datadir) / "standby.signal"
    pg_ctl(private_pg, "stop", "-m", "fast", "-w", "-t", "60")
    try:
        conf.write_text(original + "\nhot_standby = off\n")
        signal_file.touch()
        owner = os.stat(private_pg.datadir)
        os.chown(signal_file, owner.st_uid, owner.st_gid)
        mark = len(private_pg.log())
        pg_ctl(private_pg, "start", "-W", "-l", private_pg.logfile)
        wait_for(lambda: "entering standby mode" in private_pg.log()[mark:], timeout=30,
                 message=lambda: private_pg.log()[mark:])
        proxy = start(pgmp, private_pg, size=2, server_connect_timeout=15, server_login_retry=15)

        result: dict = {}

        def client():
            try:
                with psycopg.connect(proxy.dsn(host=proxy.host, connect_timeout=30)) as conn:
                    result["row"] = conn.execute("select pg_is_in_recovery(), 'served'").fetchone()
            except Exception as exc:                      # noqa: BLE001 - checked below
                result["error"] = exc
            result["at"] = time.monotonic()
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        refused = re.compile(r"FATAL:  the database system is (not yet accepting connections|"
                             r"not accepting connections|starting up)")
        # pgmp tried, got 57P03, and tried again: the client is still waiting, not failed
        wait_for(lambda: len(refused.findall(private_pg.log()[mark:])) >= 3, timeout=15,
                 message=lambda: f"{private_pg.log()[mark:]}\n{proxy.log()[-2000:]}")
        assert thread.is_alive(), result
        pg_ctl(private_pg, "promote", "-w", "-t", "60")
        promoted = time.monotonic()
        thread.join(20)
        assert not thread.is_alive(), "the client was not served 20s after the promotion"
        assert "error" not in result, f"{result['error']!r}\n{proxy.log()[-3000:]}"
        assert result["row"] == (False, "served")
        print(f"\n57P03: client served {result['at'] - promoted:.2f}s after the promotion")
        assert result["at"] - promoted < 5
    finally:
        conf.write_text(original)
        if signal_file.exists():                          # still a standby: make it a primary again
            pg_ctl(private_pg, "promote", "-w", "-t", "60")
        wait_for(lambda: accepts_logins(private_pg), timeout=30)


def accepts_logins(cluster: Cluster) -> bool:
    try:
        with psycopg.connect(cluster.dsn(connect_timeout=5)) as conn:
            return not conn.execute("select pg_is_in_recovery()").fetchone()[0]
    except psycopg.OperationalError:
        return False


# ---- many clients on a small pool ---------------------------------------------------------------

def many_clients_on_a_small_pool(pgmp, private_pg, tmp_path, clients: int, seconds: int, size: int = 10):
    proxy = start(pgmp, private_pg, size=size, auth_type="md5", max_client_conn=clients + 100,
                  query_wait_timeout=120)
    prefix = tmp_path / "pgbench_log"
    with Sampler(private_pg) as sampler:
        proc = pgbench(private_pg, proxy, "-S", "-M", "extended", "-c", str(clients), "-j", "2",
                       "-T", str(seconds), prefix=prefix)
        out = finish(proc, seconds + 120)
    totals = pool_totals(pgmp, proxy)
    lat, per_client, failed = read_latency_logs(prefix)
    assert proc.returncode == 0, out[-3000:]
    assert "number of failed transactions: 0" in out, out[-3000:]
    assert not re.search(r"client \d+ (script \d+ )?aborted", out), out[-3000:]
    assert failed == 0
    assert sampler.samples and 0 < sampler.max <= size, sampler.samples
    assert len(per_client) == clients, f"only {len(per_client)} of {clients} clients completed a transaction"
    avg_wait_ms = totals["wait_time_us"] / totals["wait_count"] / 1000 if totals.get("wait_count") else 0.0
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    print(f"\n{clients} clients on a pool of {size} (2 workers) for {seconds}s: "
          f"tps {tps[1] if tps else '?'}, {len(lat)} transactions, "
          f"max latency (wait included) {max(lat) / 1000:.1f} ms, "
          f"p99 {sorted(lat)[int(len(lat) * 0.99)] / 1000:.1f} ms, "
          f"pgmp avg_wait {avg_wait_ms:.2f} ms over {totals.get('wait_count', 0)} waits, "
          f"transactions per client min {min(per_client.values())} max {max(per_client.values())}, "
          f"servers sampled max {sampler.max} ({len(sampler.samples)} samples)")
    return lat, per_client


def test_200_clients_on_a_pool_of_10_for_5s(pgmp, private_pg, tmp_path):
    many_clients_on_a_small_pool(pgmp, private_pg, tmp_path, clients=200, seconds=5)


@pytest.mark.slow
def test_1000_clients_on_a_pool_of_10_for_30s(pgmp, private_pg, tmp_path):
    lat, per_client = many_clients_on_a_small_pool(pgmp, private_pg, tmp_path, clients=1000, seconds=30)
    # fair queueing: every client completed transactions (asserted above), none got far fewer than the others
    lo, hi = min(per_client.values()), max(per_client.values())
    assert hi <= 10 * lo, f"transactions per client from {lo} to {hi}"
