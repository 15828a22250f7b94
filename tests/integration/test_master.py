"""The master process with real processes: workers, respawn, heartbeats, reload, stop modes, restart,
the CLI's control socket, pidfile, daemon mode and systemd notifications.

Every pgmp here is a real `python -m pgmp start`; masters that the harness did not start
(a restart's new master, a daemon) are tracked by pid and stopped by the `strays` fixture.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat as statmod
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.support import proxy as proxymod, wait_for
from tests.support.proxy import PgmpFactory
from tests.support.waiting import RUN_DIR_ENV, port_accepts, process_alive

cli = PgmpFactory.cli
ADMIN_SHUTDOWN = "57P01"
TITLE_WORKER = re.compile(r"^pgmp: worker (\d+) \[clients=\d+ servers=\d+\]")


# ---------------------------------------------------------------- helpers

def status(proxy, check: bool = True) -> dict:
    r = cli("status", "--json", "-c", proxy.config_path)
    if check:
        assert r.returncode == 0, f"pgmp status failed ({r.returncode}): {r.stderr}\n{proxy.log()}"
    return json.loads(r.stdout) if r.returncode == 0 else {}


def stats(proxy) -> dict:
    return proxy.stats()


def ready_workers(proxy, n: int, generation: int | None = None, timeout: float = 15.0) -> list[dict]:
    """Wait until `n` ready, non-draining workers (of `generation`, if given) are listed; return them."""
    def check():
        st = status(proxy, check=False)
        ws = [w for w in st.get("workers", []) if w["ready"] and not w["draining"]
              and (generation is None or w["generation"] == generation)]
        return ws if len(ws) == n else None
    return wait_for(check, timeout=timeout, message=lambda: f"{n} ready workers: {status(proxy, check=False)}"
                    f"\n{proxy.log()}")


def slot_pids(proxy) -> dict[int, int]:
    """slot -> pid of the ready, non-draining workers now (no waiting)."""
    return {w["slot"]: w["pid"] for w in status(proxy, check=False).get("workers", [])
            if w["ready"] and not w["draining"]}


def connect(proxy, **kw) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(**kw), autocommit=True)


def tree(pid: int) -> list[int]:
    """pid and its descendants (alive now)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def all_gone(pids) -> bool:
    return not any(process_alive(p) for p in pids)


def sqlstate_of(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    if state:
        return state
    diag = getattr(exc, "diag", None)
    return getattr(diag, "sqlstate", None)


def watch_notices(conn: psycopg.Connection) -> list[str]:
    """SQLSTATEs of messages the server sent outside a query (libpq passes an ErrorResponse that
    arrives while idle, e.g. pgmp's 57P01 right after a COMMIT's ReadyForQuery, to the notice handlers)."""
    seen: list[str] = []
    conn.add_notice_handler(lambda diag: seen.append(diag.sqlstate))
    return seen


def told_shutdown(exc: BaseException, notices: list[str]) -> bool:
    """The client learnt 57P01: as the error of its query, or as a message received while idle."""
    return (sqlstate_of(exc) == ADMIN_SHUTDOWN or "administrator command" in str(exc)
            or ADMIN_SHUTDOWN in notices)


def is_shutdown_or_closed(exc: BaseException) -> bool:
    """The error a client of a stopping pgmp may see: 57P01, or its connection closed."""
    return isinstance(exc, psycopg.OperationalError) and (
        sqlstate_of(exc) == ADMIN_SHUTDOWN or "administrator command" in str(exc)
        or "closed" in str(exc) or "consuming input failed" in str(exc) or "lost" in str(exc))


@pytest.fixture
def table(pg):
    """A fresh table in appdb that scram_user may write; dropped afterwards."""
    name = f"master_t_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int)")
    yield name
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"drop table if exists {name}")


def env_for_pgmp(monkeypatch, **extra: str) -> None:
    """Start the next pgmp processes of this test with extra environment variables."""
    base = proxymod.pgmp_env()
    monkeypatch.setattr(proxymod, "pgmp_env", lambda: {**base, **extra})


@contextlib.contextmanager
def tcp_migrate_req():
    """net.ipv4.tcp_migrate_req=1 for the duration (root only), restored by the last user in the run.

    Several xdist workers may hold it at once: a count under a lock in the run directory
    decides who restores the saved value. Yields the value in force ("1", or the unchanged one).
    """
    knob = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    run_dir = os.environ.get(RUN_DIR_ENV)
    if os.geteuid() != 0 or not knob.exists() or not run_dir:
        yield knob.read_text().strip() if knob.exists() else "unsupported"
        return
    state, lock_path = Path(run_dir) / "tcp_migrate_req.json", Path(run_dir) / "tcp_migrate_req.lock"

    @contextlib.contextmanager
    def locked():
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    with locked():
        data = json.loads(state.read_text()) if state.exists() else {"saved": knob.read_text().strip(), "users": 0}
        try:
            knob.write_text("1")
        except OSError:
            yield data["saved"]
            return
        data["users"] += 1
        state.write_text(json.dumps(data))
    try:
        yield knob.read_text().strip()
    finally:
        with locked():
            data = json.loads(state.read_text())
            data["users"] -= 1
            if data["users"] <= 0:
                knob.write_text(data["saved"])
                state.unlink()
            else:
                state.write_text(json.dumps(data))


# ---------------------------------------------------------------- pgbench

PGBENCH_SCRIPT = "\\set aid random(1, 100000)\nSELECT :aid;\n"


def pgbench(pg, proxy, tmp_path: Path, *args: str) -> subprocess.Popen:
    """pgbench through pgmp with a read-only script needing no tables (no pgbench -i: tests share appdb)."""
    script = tmp_path / "select.sql"
    script.write_text(PGBENCH_SCRIPT)
    cmd = [str(Path(pg.bin_dir) / "pgbench"), "-n", "-f", str(script), "-h", proxy.host, "-p", str(proxy.port),
           "-U", "scram_user", *args, "appdb"]
    env = {**os.environ, "PGPASSWORD": "scram_pass", "PGCONNECT_TIMEOUT": "10"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def pgbench_result(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"pgbench did not finish within {timeout}s\n{out}\n{err}")

    def number(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None
    return {
        "rc": proc.returncode, "out": out, "err": err,
        "processed": number(r"number of transactions actually processed: (\d+)"),
        "failed": number(r"number of failed transactions: (\d+)"),
        "aborted": len(re.findall(r"client \d+ aborted", err)),
        "errors": [l for l in err.splitlines() if "error" in l.lower()],
    }


# ================================================================ workers

def test_workers_status_and_process_titles(pgmp):
    proxy = pgmp.start(workers=2)
    workers = ready_workers(proxy, 2)
    assert sorted(w["slot"] for w in workers) == [0, 1]
    assert len({w["pid"] for w in workers}) == 2
    st = status(proxy)
    assert st["pid"] == proxy.pid and st["generation"] == 0 and not st["stopping"]
    assert st["config"] == str(proxy.config_path)

    text = cli("status", "-c", proxy.config_path)
    assert text.returncode == 0, text.stderr
    assert re.search(rf"^state +running\npid +{proxy.pid}$", text.stdout, re.M), text.stdout
    for w in workers:
        assert re.search(rf"^ +{w['slot']} +{w['pid']} +0 +ready ", text.stdout, re.M), text.stdout

    def titles():
        master = " ".join(psutil.Process(proxy.pid).cmdline())
        kids = {c.pid: " ".join(c.cmdline()) for c in psutil.Process(proxy.pid).children()}
        ok = master.startswith("pgmp: master") and all(TITLE_WORKER.match(t) for t in kids.values())
        return (master, kids) if ok and len(kids) == 2 else None
    master_title, kids = wait_for(titles, timeout=5, message="process titles")
    assert set(kids) == {w["pid"] for w in workers}
    for w in workers:
        assert TITLE_WORKER.match(kids[w["pid"]]).group(1) == str(w["slot"])
    assert str(proxy.config_path) in master_title


def test_connections_spread_over_both_workers(pgmp):
    proxy = pgmp.start(workers=2, config={"default_pool_size": 50})    # 25 servers per worker
    ready_workers(proxy, 2)
    conns = [connect(proxy) for _ in range(20)]
    try:
        for i, c in enumerate(conns):
            assert c.execute("select %s::int", (i,)).fetchone()[0] == i
        report = stats(proxy)
        per_worker = {w["slot"]: w["clients"] for w in report["workers"]}
        assert sum(per_worker.values()) == 20
        assert per_worker[0] > 0 and per_worker[1] > 0, f"SO_REUSEPORT did not spread: {per_worker}"
    finally:
        for c in conns:
            c.close()


def test_kill_9_of_a_worker_spares_the_other_and_is_respawned(pgmp):
    proxy = pgmp.start(workers=2, config={"default_pool_size": 50})
    before = {w["slot"]: w["pid"] for w in ready_workers(proxy, 2)}
    conns = [connect(proxy) for _ in range(16)]
    try:
        for i, c in enumerate(conns):
            assert c.execute("select %s::int", (i,)).fetchone()[0] == i
        per_pid = {w["pid"]: w["clients"] for w in stats(proxy)["workers"]}
        victim_slot = max(before, key=lambda s: per_pid[before[s]])    # the one with more clients
        victim = before[victim_slot]
        on_victim = per_pid[victim]
        assert on_victim > 0 and sum(per_pid.values()) == 16

        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not process_alive(victim), timeout=5)
        # new connections right away: those that hash to the dead slot wait in its accept queue
        # (the master keeps the listening socket) until the respawned worker takes them
        for i in range(50):
            with connect(proxy) as c:
                assert c.execute("select %s::int", (i,)).fetchone()[0] == i

        ok, broken = 0, []
        for i, c in enumerate(conns):
            try:
                value = c.execute("select %s::int", (i + 1000,)).fetchone()[0]
            except psycopg.Error as exc:
                broken.append(exc)
                continue
            assert value == i + 1000                      # never a wrong result
            ok += 1
        assert all(isinstance(e, psycopg.OperationalError) for e in broken), broken
        assert len(broken) == on_victim, (broken, per_pid)
        assert ok == 16 - on_victim                      # clients of the other worker saw nothing

        def respawned():
            ws = {w["slot"]: w for w in status(proxy, check=False).get("workers", [])}
            w = ws.get(victim_slot)
            return w if w and w["pid"] != victim and w["ready"] else None
        new = wait_for(respawned, timeout=10, message=lambda: proxy.log())
        assert new["generation"] == 0
        assert {w["slot"]: w["pid"] for w in ready_workers(proxy, 2)}[1 - victim_slot] == before[1 - victim_slot]
        assert re.search(rf"worker {victim_slot} \(pid {victim}, generation 0\) exited with signal SIGKILL",
                         proxy.log())

        assert proxy.alive
    finally:
        for c in conns:
            c.close()


def test_respawn_backoff_when_a_worker_keeps_dying(pgmp):
    proxy = pgmp.start(workers=2)
    ready_workers(proxy, 2)
    for n in range(3):
        pid = slot_pids(proxy)[0]
        mark = len(proxy.log())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(slot_pids(proxy)) == 2 and slot_pids(proxy)[0] != pid, timeout=10,
                 message=lambda: proxy.log()[mark:])
    proxy.wait_log(r"worker 0 keeps dying; respawning in \d+\.\d+s")
    assert proxy.alive
    with connect(proxy) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_worker_that_fails_at_respawn_does_not_take_the_proxy_down(pgmp):
    """A worker respawned after the auth_file became invalid cannot start: pgmp keeps serving.

    The auth_file is read again by every worker at boot; the master validated it only at start
    (or reload). Once pgmp serves, a broken file must not stop it ("reload never kills the
    proxy"): the other worker goes on, the slot is retried with backoff, and fixing the file
    brings it back.
    """
    proxy = pgmp.start(workers=2)
    pid = {w["slot"]: w["pid"] for w in ready_workers(proxy, 2)}[1]
    auth_file = proxy.config_path.with_suffix(".users")
    good = auth_file.read_text()
    auth_file.write_text('"scram_user" "unterminated\n')
    os.kill(pid, signal.SIGKILL)
    proxy.wait_log(r"worker 1 could not start \(see the error above\)", timeout=15)
    log = proxy.log()
    # one line that names the file and the problem
    assert re.search(rf"worker 1 could not start: \w+: {re.escape(str(auth_file))}:1: .*quote", log), log
    assert proxy.alive
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as c:      # worker 0 still serves
        assert c.execute("select 1").fetchone() == (1,)
    auth_file.write_text(good)
    workers = ready_workers(proxy, 2, timeout=30)
    assert {w["slot"] for w in workers} == {0, 1}


def test_worker_that_cannot_load_its_tls_certificate_stops_pgmp(pgmp, tmp_path):
    """client_tls_cert_file that is not a certificate: `pgmp start` fails with exit 1 naming the file,
    whether the CLI or master catches it or the workers fail at boot (the master then stops)."""
    cert = tmp_path / "not-a-cert.pem"
    cert.write_text("this is not PEM\n")
    cfg = pgmp.write_config(config={"client_tls_mode": "require", "client_tls_cert_file": str(cert)})
    r = cli("start", "-c", cfg.path, timeout=30)
    assert r.returncode == 1, r
    assert "client_tls_cert_file" in r.stderr or str(cert) in r.stderr, r.stderr
    assert not port_accepts(cfg.host, cfg.port)
    assert not Path(f"/tmp/.pgmp.{cfg.port}.ctl").exists(), "control socket left behind"


def test_pgmp_profile_writes_each_worker_s_profile_when_it_stops(pgmp, monkeypatch, tmp_path):
    """PGMP_PROFILE=DIR (for developers): every worker runs under cProfile and writes
    worker-SLOT-PID.prof there when a stop drains it; the profile shows the loop ran."""
    import pstats
    out = tmp_path / "profiles"
    out.mkdir()
    env_for_pgmp(monkeypatch, PGMP_PROFILE=str(out))
    proxy = pgmp.start(workers=2)
    pids = {w["slot"]: w["pid"] for w in ready_workers(proxy, 2)}
    with psycopg.connect(proxy.dsn(), connect_timeout=5, autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert proxy.stop() == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"worker-{slot}-{pid}.prof" for slot, pid in pids.items()), files
    for name in files:
        stats = pstats.Stats(str(out / name))
        assert any(func[2] == "run_once" for func in stats.stats), name      # the loop's rounds


def test_heartbeat_timeout_kills_a_hung_worker(pgmp, monkeypatch):
    env_for_pgmp(monkeypatch, PGMP_HEARTBEAT_TIMEOUT="1.5")
    proxy = pgmp.start(workers=2)
    pids = {w["slot"]: w["pid"] for w in ready_workers(proxy, 2)}
    hung = pids[0]
    os.kill(hung, signal.SIGSTOP)
    try:
        proxy.wait_log(rf"worker 0 \(pid {hung}, generation 0\) missed its heartbeats for \d+s: sending SIGABRT",
                       timeout=10)
        proxy.wait_log(rf"worker 0 \(pid {hung}, generation 0\) did not exit after SIGABRT: sending SIGKILL",
                       timeout=15)
        wait_for(lambda: not process_alive(hung), timeout=5)
        def respawned():
            ws = slot_pids(proxy)
            return ws if len(ws) == 2 and ws[0] != hung else None
        new = wait_for(respawned, timeout=10, message=lambda: proxy.log())
        assert new[1] == pids[1]                            # the other worker was left alone
        assert re.search(rf"worker 0 \(pid {hung}, generation 0\) exited with signal SIGKILL", proxy.log())
        assert proxy.alive
    finally:
        if process_alive(hung):
            os.kill(hung, signal.SIGKILL)


# ================================================================ reload

def test_reload_live_setting(pgmp):
    proxy = pgmp.start()
    ready_workers(proxy, 1)
    proxy.rewrite_config(config={"default_pool_size": 7, "log_level": "debug"})
    r = cli("reload", "-c", proxy.config_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"reloaded: .*default_pool_size", r.stdout) and "log_level" in r.stdout
    assert "generation 0" in r.stdout
    proxy.wait_log(r"configuration reloaded from .*default_pool_size, log_level")
    assert [w["pid"] for w in ready_workers(proxy, 1)] == [w["pid"] for w in status(proxy)["workers"]]
    with connect(proxy) as c:
        assert c.execute("select 1").fetchone() == (1,)
    report = stats(proxy)
    sizes = [p["pool_size"] for w in report["workers"] for p in w["pools"] if p["database"] == "appdb"]
    assert sizes == [7], report
    # nothing changed: still a success
    r = cli("reload", "-c", proxy.config_path)
    assert r.returncode == 0 and "no changes" in r.stdout


def test_sighup_under_load_loses_nothing(pg, pgmp, tmp_path):
    proxy = pgmp.start(workers=2, auth_type="trust")
    ready_workers(proxy, 2)
    bench = pgbench(pg, proxy, tmp_path, "-T", "8", "-c", "4", "-j", "2")
    try:
        def xacts():
            return sum(p["query_count"] for w in stats(proxy)["workers"] for p in w["pools"])
        for n in range(3):
            seen = wait_for(xacts, timeout=10)
            wait_for(lambda: xacts() > seen + 20, timeout=10, message="pgbench makes no progress")
            mark = len(proxy.log())
            proxy.rewrite_config(config={"default_pool_size": 10 + n, "log_level": "info"})
            proxy.signal(signal.SIGHUP)
            proxy.wait_log(r"configuration reloaded from", start=mark)
        result = pgbench_result(bench, timeout=40)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    print(f"pgbench with 3 SIGHUPs: processed={result['processed']} failed={result['failed']} "
          f"aborted={result['aborted']}")
    assert result["rc"] == 0, result
    assert result["failed"] in (0, None) and result["aborted"] == 0, result
    assert result["processed"] > 0
    assert proxy.log().count("configuration reloaded from") == 3
    assert "reload failed" not in proxy.log()


def test_reload_invalid_config_keeps_the_old_one(pgmp):
    proxy = pgmp.start()
    ready_workers(proxy, 1)
    good = proxy.config_path.read_text()
    proxy.rewrite_config(config={"default_pool_size": "lots"})
    mark = len(proxy.log())
    r = cli("reload", "-c", proxy.config_path)
    assert r.returncode != 0
    assert "default_pool_size" in r.stderr, r.stderr
    assert "reload failed" in r.stderr
    proxy.wait_log(r"reload failed, keeping the running configuration", start=mark)
    assert "default_pool_size" in proxy.log()[mark:]
    with connect(proxy) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert proxy.alive
    # SIGHUP with the same bad file: logged, still running
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(r"reload failed", start=mark)
    assert proxy.alive
    # back to good: reload works again
    proxy.config_path.write_text(good)
    assert cli("reload", "-c", proxy.config_path).returncode == 0


def test_reload_workers_1_to_2_starts_a_new_generation(pgmp, table):
    proxy = pgmp.start(workers=1)
    old = ready_workers(proxy, 1, generation=0)[0]
    in_tx = psycopg.connect(proxy.dsn())                  # stays in a transaction across the reload
    notices = watch_notices(in_tx)
    in_tx.execute(f"insert into {table} values (1)")

    stop = threading.Event()
    failures, done = [], [0]

    def keep_connecting():
        while not stop.is_set():
            try:
                with connect(proxy) as c:
                    c.execute("select 1")
                done[0] += 1
            except psycopg.Error as exc:
                failures.append(repr(exc))
    t = threading.Thread(target=keep_connecting)
    try:
        with tcp_migrate_req():
            t.start()
            wait_for(lambda: done[0] >= 5, timeout=10)
            proxy.rewrite_config(workers=2)
            r = cli("reload", "-c", proxy.config_path)
            assert r.returncode == 0, r.stderr
            assert "workers" in r.stdout and "generation 1" in r.stdout, r.stdout
            new = ready_workers(proxy, 2, generation=1)
            assert old["pid"] not in {w["pid"] for w in new}
            st = status(proxy)
            assert st["generation"] == 1
            draining = [w for w in st["workers"] if w["generation"] == 0]
            assert [(w["pid"], w["draining"]) for w in draining] == [(old["pid"], True)], st
            n = done[0]
            wait_for(lambda: done[0] >= n + 20, timeout=15, message="connections during the drain")
            stop.set()
            t.join(30)
        # the transaction on the old generation completes, then its client is closed
        in_tx.execute(f"insert into {table} values (2)")
        in_tx.commit()
        with pytest.raises(psycopg.OperationalError) as info:
            in_tx.execute("select 1")
        assert told_shutdown(info.value, notices), (info.value, notices)
        wait_for(lambda: not process_alive(old["pid"]), timeout=10, message=lambda: proxy.log())
        wait_for(lambda: all(w["generation"] == 1 for w in status(proxy)["workers"]), timeout=5)
        assert len(status(proxy)["workers"]) == 2
    finally:
        stop.set()
        if t.is_alive():
            t.join(30)
        in_tx.close()
    print(f"connections during the new generation: {done[0]} ok, {len(failures)} failed")
    assert not failures, failures[:5]
    with psycopg.connect(proxy.dsn()) as c:
        assert c.execute(f"select count(*) from {table}").fetchone() == (2,)


# ================================================================ stop

def _stop(proxy, how: str, mode: str, wait: bool = False):
    if how == "signal":
        proxy.signal({"graceful": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode])
        return None
    args = ["stop", "-c", proxy.config_path, "--mode", mode]
    if not wait:
        args.append("--no-wait")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"pgmp stopped ({mode}, pid {proxy.pid})" in r.stdout
    return r


@pytest.mark.parametrize("how", ["cli", "signal"])
def test_graceful_stop_lets_the_transaction_finish(pg, pgmp, table, how):
    proxy = pgmp.start(workers=2)
    ready_workers(proxy, 2)
    in_tx = psycopg.connect(proxy.dsn())
    notices = watch_notices(in_tx)
    in_tx.execute(f"insert into {table} values (1)")       # BEGIN; insert … (not committed)
    idle = [connect(proxy) for _ in range(4)]              # at least one on each worker, surely
    for c in idle:
        c.execute("select 1")
    fresh = connect(proxy)                                 # logged in, no request yet
    fresh_notices = watch_notices(fresh)
    try:
        _stop(proxy, how, "graceful")
        wait_for(lambda: proxy.log().count("draining (graceful)") == 2, timeout=5, message=proxy.log)
        # a client that connected just before the stop is served its first transaction
        assert fresh.execute("select 42").fetchone() == (42,)
        with pytest.raises(psycopg.OperationalError) as info:
            fresh.execute("select 1")
        assert told_shutdown(info.value, fresh_notices), (info.value, fresh_notices)
        # idle clients are closed at once, with 57P01
        for c in idle:
            with pytest.raises(psycopg.OperationalError) as info:
                c.execute("select 1")
            assert sqlstate_of(info.value) == ADMIN_SHUTDOWN or "administrator command" in str(info.value), \
                repr(info.value)
        assert proxy.alive, "pgmp exited with a transaction in flight"
        # the open transaction completes
        in_tx.execute(f"insert into {table} values (2)")
        in_tx.commit()
        with pytest.raises(psycopg.OperationalError) as info:
            in_tx.execute("select 1")
        assert told_shutdown(info.value, notices), (info.value, notices)
        assert proxy.process.wait(10) == 0
    finally:
        in_tx.close()
        fresh.close()
        for c in idle:
            c.close()
    with psycopg.connect(pg.dsn()) as c:
        assert c.execute(f"select count(*) from {table}").fetchone() == (2,)


@pytest.mark.parametrize("how", ["cli", "signal"])
def test_fast_stop_closes_clients_at_once(pg, pgmp, table, how):
    proxy = pgmp.start(workers=2)
    workers = [w["pid"] for w in ready_workers(proxy, 2)]
    in_tx = psycopg.connect(proxy.dsn())
    notices = watch_notices(in_tx)
    in_tx.execute(f"insert into {table} values (1)")
    try:
        started = time.monotonic()
        _stop(proxy, how, "fast", wait=True)
        assert proxy.process.wait(10) == 0
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"fast stop took {elapsed:.1f}s"
        assert all_gone(workers)
        with pytest.raises(psycopg.OperationalError) as info:
            in_tx.execute(f"insert into {table} values (2)")
        assert is_shutdown_or_closed(info.value) or ADMIN_SHUTDOWN in notices, (info.value, notices)
    finally:
        in_tx.close()
    with psycopg.connect(pg.dsn()) as c:
        assert c.execute(f"select count(*) from {table}").fetchone() == (0,)   # rolled back


@pytest.mark.parametrize("how", ["cli", "signal"])
def test_immediate_stop_ends_every_process(pgmp, how):
    proxy = pgmp.start(workers=2)
    pids = [proxy.pid] + [w["pid"] for w in ready_workers(proxy, 2)]
    conn = psycopg.connect(proxy.dsn())
    conn.execute("select 1")                                # in a transaction, with a server
    try:
        _stop(proxy, how, "immediate", wait=True)
        wait_for(lambda: all_gone(pids), timeout=5, message=f"processes left of {pids}")
        assert proxy.process.wait(5) == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()


def test_shutdown_timeout_closes_a_lingering_transaction(pgmp, table):
    proxy = pgmp.start(config={"shutdown_timeout": 2})
    ready_workers(proxy, 1)
    in_tx = psycopg.connect(proxy.dsn())
    notices = watch_notices(in_tx)
    in_tx.execute(f"insert into {table} values (1)")            # and then idle in the transaction
    try:
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(r"draining \(graceful\)")
        code = proxy.process.wait(15)
        elapsed = time.monotonic() - started
        print(f"SIGTERM with shutdown_timeout=2s: exit {code} after {elapsed:.2f}s")
        assert code == 0
        assert 1.8 <= elapsed < 3.5, f"exited after {elapsed:.2f}s"
        assert "shutdown_timeout (2s) reached" in proxy.log()
        with pytest.raises(psycopg.OperationalError) as info:
            in_tx.execute("select 1")
        assert told_shutdown(info.value, notices), (info.value, notices)
    finally:
        in_tx.close()


# ================================================================ pidfile, control socket, CLI

def test_pidfile_refuses_a_second_start_and_ignores_a_stale_one(pgmp, tmp_path):
    pidfile = tmp_path / "pgmp.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")                       # stale: that process is gone
    proxy = pgmp.start(config={"pidfile": str(pidfile)})
    # the listening sockets accept before the pidfile is written (see Master.start): wait for it
    wait_for(lambda: pidfile.read_text().strip() == str(proxy.pid), timeout=10,
             message=lambda: f"pidfile still holds {pidfile.read_text()!r}, pgmp is pid {proxy.pid}")

    second = cli("start", "-c", proxy.config_path, timeout=20)
    assert second.returncode == 1, second
    assert f"already running (pid {proxy.pid}" in second.stderr, second.stderr
    assert proxy.alive and int(pidfile.read_text()) == proxy.pid
    with connect(proxy) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert proxy.stop() == 0
    assert not pidfile.exists(), "pidfile left after a clean stop"


def _python_for(user: str) -> list[str] | None:
    """A command line that runs this pgmp's Python as `user` (the venv may live where `user` cannot go)."""
    candidates = [([sys.executable], {})]
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system:
        paths = os.pathsep.join([str(proxymod.REPO_ROOT), sysconfig.get_paths()["purelib"],
                                 sysconfig.get_paths()["platlib"]])
        candidates.append(([system], {"PYTHONPATH": paths}))
    for cmd, env in candidates:
        probe = subprocess.run(["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()),
                                *cmd, "-m", "pgmp", "--version"], capture_output=True, text=True, cwd="/",
                               timeout=60)
        if probe.returncode == 0:
            return ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    return None


def test_control_socket_is_private(pgmp):
    from pgmp import config as configmod
    proxy = pgmp.start()
    path = configmod.load(str(proxy.config_path)).control_socket
    st = os.stat(path)
    assert statmod.S_ISSOCK(st.st_mode)
    assert statmod.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.geteuid()

    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to try the socket as another user")
    python = _python_for("nobody")
    if python is None:
        pytest.skip("no Python that user nobody can run pgmp with")
    # a copy of the config that nobody can read (the test's tmp_path is private to root)
    shared = Path(os.environ[RUN_DIR_ENV]) / f"nobody-{proxy.port}"
    shared.mkdir(mode=0o755)
    try:
        copy = shared / "pgmp.toml"
        copy.write_text(proxy.config_path.read_text().replace(
            'auth_file = "', f'auth_file = "{proxy.config_path.parent}/'))
        copy.chmod(0o644)
        for command in (["stop", "--mode", "immediate"], ["status"], ["reload"]):
            r = subprocess.run(["runuser", "-u", "nobody", "--", *python, "-m", "pgmp", *command, "-c", str(copy)],
                               capture_output=True, text=True, cwd="/", timeout=60)
            assert r.returncode == 4, (command, r)
            assert "permission denied" in r.stderr, r.stderr
        assert proxy.alive
        with connect(proxy) as c:
            assert c.execute("select 1").fetchone() == (1,)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_cli_when_not_running(pgmp):
    cfg = pgmp.write_config()
    r = cli("status", "-c", cfg.path)
    assert r.returncode == 3, r
    assert "not running" in r.stderr
    for command in ("stop", "reload", "stats", "restart"):
        r = cli(command, "-c", cfg.path)
        assert r.returncode == 1 and "not running" in r.stderr, (command, r)


def test_stats_after_traffic(pgmp):
    from pgmp import stats as statsmod
    proxy = pgmp.start(workers=2, config={"default_pool_size": 50})
    workers = {w["pid"] for w in ready_workers(proxy, 2)}
    conns = [connect(proxy) for _ in range(8)]
    try:
        for c in conns:
            for _ in range(5):
                assert len(c.execute("select repeat('x', 1000)").fetchone()[0]) == 1000
            with c.transaction():
                c.execute("select 1")
                c.execute("select 2")
        report = stats(proxy)
    finally:
        for c in conns:
            c.close()
    assert report["master"]["pid"] == proxy.pid and report["master"]["rss"] > 0
    assert {w["pid"] for w in report["workers"]} == workers
    assert all(w["rss"] > 0 and w["cpu"] >= 0 for w in report["workers"])
    assert not report["missing"]
    rows = [p for w in report["workers"] for p in w["pools"]]
    assert rows and {(p["database"], p["user"]) for p in rows} == {("appdb", "scram_user")}
    total = statsmod.merge(rows)
    assert total["query_count"] >= 8 * 7, total
    assert total["xact_count"] > 0 and total["bytes_in"] > 0 and total["bytes_out"] > 8 * 5 * 1000, total

    text = cli("stats", "-c", proxy.config_path)
    assert text.returncode == 0, text.stderr
    assert re.search(r"^appdb +scram_user ", text.stdout, re.M) and "TOTAL" in text.stdout, text.stdout
    for label in ("master", "worker 0", "worker 1"):
        assert re.search(rf"^{label}\s+\d+", text.stdout, re.M), text.stdout


# ================================================================ systemd, restart, daemon

def test_systemd_notifications(pgmp, monkeypatch):
    path = Path(os.environ[RUN_DIR_ENV]) / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(15)

    def message() -> dict[str, str]:
        data = receiver.recv(65536).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    try:
        env_for_pgmp(monkeypatch, NOTIFY_SOCKET=str(path))
        proxy = pgmp.start(workers=2)
        ready = message()
        assert ready.get("READY") == "1", ready
        assert ready.get("MAINPID") == str(proxy.pid)
        assert re.match(r"2 workers, \d+ clients, \d+ servers", ready.get("STATUS", "")), ready

        proxy.rewrite_config(config={"log_level": "debug"})
        assert cli("reload", "-c", proxy.config_path).returncode == 0
        reloading = message()
        assert reloading.get("RELOADING") == "1" and "MONOTONIC_USEC" in reloading, reloading
        again = message()
        assert again.get("READY") == "1" and "STATUS" in again, again

        proxy.signal(signal.SIGTERM)
        stopping = message()
        assert stopping.get("STOPPING") == "1", stopping
        assert proxy.process.wait(10) == 0
    finally:
        receiver.close()
        path.unlink(missing_ok=True)


def test_zero_downtime_restart(pg, pgmp, tmp_path, strays):
    proxy = pgmp.start(workers=2, auth_type="trust", config={"default_pool_size": 40})
    old_workers = [w["pid"] for w in ready_workers(proxy, 2)]
    with tcp_migrate_req() as migrate:
        bench = pgbench(pg, proxy, tmp_path, "-C", "-T", "8", "-c", "4", "-j", "2")
        try:
            def queries():
                return sum(p["query_count"] for w in stats(proxy)["workers"] for p in w["pools"])
            wait_for(lambda: queries() > 50, timeout=10, message="pgbench makes no progress")
            r = cli("restart", "-c", proxy.config_path, timeout=60)
            m = re.search(r"new master pid (\d+)", r.stdout) or re.search(
                r"restart: new master started \(pid (\d+)\)", proxy.log())
            if m:
                strays.append(int(m.group(1)))
            assert r.returncode == 0, (r, proxy.log())
            new_pid = int(m.group(1))
            st = status(proxy)
            assert st["pid"] == new_pid != proxy.pid
            assert proxy.process.wait(30) == 0, "the old master did not drain and exit"
            assert all_gone(old_workers)
            new_workers = ready_workers(proxy, 2)
            strays.extend(w["pid"] for w in new_workers)
            result = pgbench_result(bench, timeout=40)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait()
    print(f"\nrestart under pgbench -C (tcp_migrate_req={migrate}): processed={result['processed']} "
          f"failed={result['failed']} aborted clients={result['aborted']} exit={result['rc']}")
    for line in result["errors"]:
        print("  pgbench:", line)
    assert result["processed"] and result["processed"] > 0
    assert result["aborted"] == 0 and result["failed"] in (0, None) and result["rc"] == 0, result
    with connect(proxy) as c:
        assert c.execute("select 1").fetchone() == (1,)
    # the new master is a pgmp like any other: stop it with the CLI
    r = cli("stop", "-c", proxy.config_path, timeout=60)
    assert r.returncode == 0, r
    wait_for(lambda: all_gone([new_pid, *[w["pid"] for w in new_workers]]), timeout=10)


def test_daemon_start_and_stop(pgmp, tmp_path, strays):
    pidfile, logfile = tmp_path / "daemon.pid", tmp_path / "daemon.log"
    cfg = pgmp.write_config(config={"pidfile": str(pidfile), "logfile": str(logfile)})
    r = cli("start", "--daemon", "-c", cfg.path, timeout=30)
    if pidfile.exists():
        strays.append(int(pidfile.read_text()))
    assert r.returncode == 0, (r, logfile.read_text() if logfile.exists() else "")
    pid = int(pidfile.read_text())                      # written before the command returned
    assert process_alive(pid)
    assert os.getsid(pid) != os.getsid(0)              # its own session (double fork: not its leader)
    with psycopg.connect(proxymod.conninfo(host=cfg.host, port=cfg.port, user="scram_user",
                                           password="scram_pass", dbname="appdb", connect_timeout=10)) as c:
        assert c.execute("select 1").fetchone() == (1,)
    # the worker may serve a client a moment before the master has logged "ready"
    wait_for(lambda: "ready" in logfile.read_text(), timeout=10, message="the daemon never logged ready")
    r = cli("stop", "-c", cfg.path, timeout=60)
    assert r.returncode == 0, r
    assert not process_alive(pid)
    assert not pidfile.exists()
    assert "pgmp stopped" in logfile.read_text()


def test_daemon_that_cannot_start_says_so(pgmp, tmp_path, strays):
    """The detached pgmp cannot bind (192.0.2.1 is TEST-NET-1, not an address of this host):
    `pgmp start --daemon` must not report success."""
    logfile, pidfile = tmp_path / "daemon.log", tmp_path / "daemon.pid"
    cfg = pgmp.write_config(config={"listen_addr": "192.0.2.1", "pidfile": str(pidfile), "logfile": str(logfile)})
    r = cli("start", "--daemon", "-c", cfg.path, timeout=30)
    if pidfile.exists():                                # it did start after all: stop it after the test
        strays.append(int(pidfile.read_text()))
    assert r.returncode == 1, r
    assert str(logfile) in r.stderr
    assert re.search(r"cannot start: cannot listen on 192\.0\.2\.1:\d+", logfile.read_text())
    assert not pidfile.exists()
