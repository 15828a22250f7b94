"""Descriptors and local files: accept() out of descriptors, refusals over max_client_conn, the pidfile,
the control socket and the client certificate's CN under client_tls_mode = verify-full.

Each test first shows the hole with a real pgmp (a worker whose RLIMIT_NOFILE is lowered
with prlimit, raw sockets over the limit, files planted where pgmp writes), then that a
session opened before keeps working.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.integration.rawpg import RawPG, ssl_request, startup_packet
from tests.integration.test_tls import certs, expect_refusal, hba_file, raw_tls, startup, tls_config  # noqa: F401
from tests.support import PASSWORDS, holds, wait_for
from tests.support.proxy import PgmpFactory, PgmpProcess

USER, DB = "scram_user", "appdb"
TOO_MANY = "53300"
cli = PgmpFactory.cli


def worker_pid(proxy) -> int:
    """The pid of the only worker of ``proxy``."""
    children = wait_for(lambda: psutil.Process(proxy.pid).children(), timeout=10)
    assert len(children) == 1, children
    return children[0].pid


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_stats(proxy) -> dict:
    (worker,) = proxy.stats()["workers"]
    return worker


def settled(proxy, clients: int) -> None:
    """Wait until the worker has exactly ``clients`` (start()'s readiness probe may still be open): its
    descriptors can then be counted without one closing later and leaving room below a lowered limit."""
    wait_for(lambda: worker_stats(proxy)["clients"] == clients, timeout=10,
             message=lambda: f"worker has not {clients} clients: {worker_stats(proxy)}")


# ================================================================ accept() without descriptors

ACCEPT_FAILED = re.compile(r"accept\(\) failed|accept failed")


def test_accept_out_of_descriptors_backs_off_and_recovers(pgmp):
    proxy = pgmp.start(workers=1, config={"log_connections": False, "log_disconnections": False})
    bystander = psycopg.connect(proxy.dsn(), autocommit=True)      # session mode: it keeps its server
    assert bystander.execute("select 'before'").fetchone() == ("before",)
    pid = worker_pid(proxy)
    worker = psutil.Process(pid)
    soft, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    extra: list[socket.socket] = []
    settled(proxy, 1)
    try:
        # room for 3 more descriptors in the worker: the 4th accepted connection hits EMFILE
        worker.rlimit(psutil.RLIMIT_NOFILE, (open_fds(pid) + 3, hard))
        for _ in range(20):                  # the kernel completes them all; the worker cannot take them
            extra.append(socket.create_connection((proxy.host, proxy.port), timeout=5))
        proxy.wait_log(r"accept\S* .*(Too many open files|too many open files)")
        before = cpu_seconds(pid)
        # a 2 s measurement window: a worker spinning on a ready listen socket burns it all
        def served():
            assert bystander.execute("select 'still here'").fetchone() == ("still here",)
        holds(served, 2.0)
        failures = [line for line in proxy.log().splitlines() if ACCEPT_FAILED.search(line)]
        assert 1 <= len(failures) <= 5, (len(failures), failures[:5])
        used = cpu_seconds(pid) - before
        assert used < 0.5, f"worker used {used:.2f}s of CPU in 2s while it could not accept"
    finally:
        for s in extra:
            s.close()
        worker.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))

    def new_client_served():
        try:
            with psycopg.connect(proxy.dsn(connect_timeout=3), autocommit=True) as c:
                return c.execute("select 'new client'").fetchone() == ("new client",)
        except psycopg.OperationalError:
            return False
    wait_for(new_client_served, timeout=15, message=lambda: f"no new client served:\n{proxy.log()[-3000:]}")
    proxy.wait_log(r"accept resumed after \d+ failures: too many open files")
    assert bystander.execute("select 'after'").fetchone() == ("after",)
    bystander.close()


def waiting_clients(proxy) -> int:
    return sum(p["cl_waiting"] for p in worker_stats(proxy)["pools"])


def test_out_of_descriptors_a_client_needing_a_new_server_waits_for_one(pgmp):
    """A client that needs a new server while its worker has no descriptor left is not dropped: it waits,
    as for a pool at its size, and gets the next server freed; the session holding one goes on."""
    proxy = pgmp.start(workers=1, config={"pool_mode": "transaction", "default_pool_size": 5})
    holder = psycopg.connect(proxy.dsn())                   # in a transaction: holds the pool's one server
    assert holder.execute("select 'holding'").fetchone() == ("holding",)
    waiter = psycopg.connect(proxy.dsn(), autocommit=True)  # logged in, no server between transactions
    pid = worker_pid(proxy)
    worker = psutil.Process(pid)
    soft, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    result: list = []
    settled(proxy, 2)
    thread = threading.Thread(target=lambda: result.append(_query(waiter, "select 'got a server'")))
    try:
        worker.rlimit(psutil.RLIMIT_NOFILE, (open_fds(pid), hard))
        thread.start()
        wait_for(lambda: waiting_clients(proxy) == 1, timeout=10, message=lambda: proxy.log()[-2000:])
        assert holder.execute("select 'still holding'").fetchone() == ("still holding",)
        holder.commit()                                     # frees the server: the waiter gets it
        thread.join(10)
        assert result == [("got a server",)], (result, proxy.log()[-2000:])
    finally:
        worker.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
        thread.join(10)
    holder.close()
    waiter.close()
    assert "Traceback" not in proxy.log() and "internal error" not in proxy.log(), proxy.log()


def _query(conn, sql):
    try:
        return conn.execute(sql).fetchone()
    except psycopg.Error as exc:
        return exc


# ================================================================ over max_client_conn

def admitted(proxy, n: int) -> list[psycopg.Connection]:
    """``n`` logged-in clients (a retry while start()'s readiness probe still counts as a client)."""
    def connect():
        try:
            return psycopg.connect(proxy.dsn(), autocommit=True)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) and "max_client_conn" not in str(exc):
                raise
            return None
    conns = [wait_for(connect, timeout=10) for _ in range(n)]
    for c in conns:
        assert c.execute("select 1").fetchone() == (1,)
    return conns


def refused_at_once(conn: RawPG, started: float) -> dict[str, str]:
    fields = conn.expect_error(timeout=5)
    assert conn.wait_closed(5)
    took = time.monotonic() - started
    assert fields.get("C") == TOO_MANY and fields.get("S") == "FATAL", fields
    assert fields.get("M") == "sorry, too many clients already", fields
    assert took < 1.0, f"refused after {took:.2f}s"
    return fields


def test_over_max_client_conn_startup_is_refused_at_once(pgmp):
    proxy = pgmp.start(workers=1, config={"max_client_conn": 2})
    held = admitted(proxy, 2)
    try:
        started = time.monotonic()
        with RawPG.connect(proxy.host, proxy.port) as conn:
            conn.send(startup_packet({"user": USER, "database": DB}))
            fields = refused_at_once(conn, started)
        assert "max_client_conn" in fields.get("D", ""), fields
        assert held[0].execute("select 'admitted'").fetchone() == ("admitted",)
    finally:
        for c in held:
            c.close()


def test_over_max_client_conn_silent_client_is_not_held(pgmp):
    """A client over the limit that sends nothing is closed within seconds, not at client_login_timeout."""
    proxy = pgmp.start(workers=1, config={"max_client_conn": 1, "client_login_timeout": 60})
    held = admitted(proxy, 1)
    try:
        started = time.monotonic()
        with RawPG.connect(proxy.host, proxy.port) as conn:
            fields = conn.expect_error(timeout=10)
            assert conn.wait_closed(5)
        took = time.monotonic() - started
        assert fields.get("C") == TOO_MANY, fields
        assert took < 3.5, f"an over-limit client that sent nothing was held {took:.2f}s"
    finally:
        for c in held:
            c.close()


def test_lingering_refused_clients_do_not_take_freed_slots(pgmp):
    """Connections being refused do not count as admitted: a slot freed meanwhile goes to the next client."""
    proxy = pgmp.start(workers=1, config={"max_client_conn": 2})
    held = admitted(proxy, 2)
    lingering = [RawPG.connect(proxy.host, proxy.port) for _ in range(5)]     # over the limit, silent
    try:
        held.pop().close()
        proxy.wait_log(r"disconnect: user=scram_user .*client sent Terminate")
        # the freed slot is taken by a new client although five refused ones are still connected
        with psycopg.connect(proxy.dsn(), autocommit=True) as c:
            assert c.execute("select 'got the slot'").fetchone() == ("got the slot",)
    finally:
        for conn in lingering:
            conn.close()
        for c in held:
            c.close()


# ================================================================ pidfile and control socket

PRECIOUS = "must not be overwritten\n"
NOBODY = 65534


def start_outcome(pgmp, **config) -> tuple[int | None, str]:
    """Run `pgmp start` on a config with these [pgmp] settings: (exit code or None if it started, its output)."""
    cfg = pgmp.write_config(config=config)
    proc = PgmpProcess(cfg, cfg.path.with_suffix(".log"))
    try:
        # (the port accepts as soon as it is bound, before the checks that follow: wait for "ready")
        wait_for(lambda: proc.poll() is not None or " ready: " in proc.log(), timeout=20,
                 message=lambda: f"pgmp neither started nor exited:\n{proc.log()}")
        code = proc.poll()
    finally:
        proc.stop()
    return code, proc.log()


def assert_refused(pgmp, *expected: str, **config) -> str:
    code, output = start_outcome(pgmp, **config)
    assert code is not None, f"pgmp started with {config}:\n{output}"
    assert code == 1, (code, output)
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, (text, output)
    return output


def precious_file(tmp_path: Path) -> Path:
    target = tmp_path / "precious"
    target.write_text(PRECIOUS)
    return target


def test_pidfile_symlink_is_refused_and_its_target_untouched(pgmp, tmp_path):
    target = precious_file(tmp_path)
    pidfile = tmp_path / "pgmp.pid"
    pidfile.symlink_to(target)
    assert_refused(pgmp, str(pidfile), "symbolic link", pidfile=str(pidfile))
    assert target.read_text() == PRECIOUS
    assert pidfile.is_symlink()


def test_pidfile_in_a_world_writable_directory_without_sticky_bit_is_refused(pgmp, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    pidfile = shared / "pgmp.pid"
    assert_refused(pgmp, str(shared), "sticky", pidfile=str(pidfile))
    assert not pidfile.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file owned by another user")
def test_pidfile_of_another_user_is_refused(pgmp, tmp_path):
    pidfile = tmp_path / "pgmp.pid"
    pidfile.write_text("1\n")
    os.chown(pidfile, NOBODY, NOBODY)
    assert_refused(pgmp, str(pidfile), f"uid {NOBODY}", pidfile=str(pidfile))
    assert pidfile.read_text() == "1\n"


def test_stale_pidfile_naming_a_live_process_that_is_not_pgmp_is_replaced(pgmp, tmp_path):
    pidfile = tmp_path / "pgmp.pid"
    # alive, and not pgmp, though "pgmp" is in its command line (an editor on pgmp.toml, say)
    other = subprocess.Popen(["pgmp-notes", "60"], executable=shutil.which("sleep"))
    try:
        pidfile.write_text(f"{other.pid}\n")
        proxy = pgmp.start(config={"pidfile": str(pidfile)})
        wait_for(lambda: pidfile.read_text() == f"{proxy.pid}\n", timeout=10,
                 message=lambda: f"pidfile holds {pidfile.read_text()!r}:\n{proxy.log()}")
        assert not pidfile.is_symlink()
        assert proxy.stop() == 0
        assert not pidfile.exists()
    finally:
        other.kill()
        other.wait()


def test_control_socket_path_taken_by_a_directory_is_refused(pgmp, tmp_path):
    path = tmp_path / "pgmp.ctl"
    path.mkdir()
    assert_refused(pgmp, str(path), "directory", control_socket=str(path))
    assert path.is_dir()


def test_control_socket_symlink_is_not_followed(pgmp, tmp_path):
    target = precious_file(tmp_path)
    path = tmp_path / "pgmp.ctl"
    path.symlink_to(target)
    assert_refused(pgmp, str(path), "symbolic link", control_socket=str(path))
    assert path.is_symlink() and target.read_text() == PRECIOUS


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a socket owned by another user")
def test_control_socket_of_another_user_is_refused(pgmp, tmp_path):
    path = tmp_path / "pgmp.ctl"
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(path))                        # a dead socket (nobody listens), owned by nobody
    planted.close()
    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    before = os.lstat(path)
    assert_refused(pgmp, str(path), f"uid {NOBODY}", control_socket=str(path))
    after = os.lstat(path)
    assert (after.st_ino, after.st_uid) == (before.st_ino, before.st_uid), "someone else's socket was replaced"


def test_stale_control_socket_of_ours_is_replaced(pgmp, tmp_path):
    path = tmp_path / "pgmp.ctl"
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(path))                        # left by a pgmp that died: ours, nobody listens
    planted.close()
    proxy = pgmp.start(config={"control_socket": str(path)})
    r = cli("status", "-c", proxy.config_path)
    assert r.returncode == 0, r
    assert proxy.stop() == 0
    assert not path.exists()


# ================================================================ client_tls_mode = verify-full: CN = user name

def verify_full(certs, **extra) -> dict:
    return tls_config(certs, "verify-full", client_tls_ca_file=str(certs.ca), **extra)


# (auth_type, hba rule or None): every way a TCP login can reach the TLS check
VERIFY_FULL_PATHS = [
    ("scram-sha-256", None),
    ("trust", None),
    ("md5", None),
    ("scram-sha-256", "hostssl all all 127.0.0.1/32 scram-sha-256\n"),
    ("scram-sha-256", "hostssl all all 127.0.0.1/32 trust\n"),
    ("scram-sha-256", "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n"),
    ("scram-sha-256", "host all all 127.0.0.1/32 md5\n"),
]


@pytest.mark.parametrize("auth_type, rule", VERIFY_FULL_PATHS)
def test_verify_full_refuses_a_certificate_of_another_user(pgmp, certs, tmp_path, auth_type, rule):
    extra = {"hba_file": hba_file(tmp_path, rule)} if rule else {}
    proxy = pgmp.start(config=verify_full(certs, **extra), auth_type=auth_type)
    # md5_user's certificate (CN=md5_user), logging in as scram_user
    with raw_tls(proxy, cert=certs.client["md5_user"]) as conn:
        fields = expect_refusal(conn, startup(user="scram_user"))
    assert fields["C"] == "28000" and fields["S"] == "FATAL", fields
    assert fields["M"] == 'certificate authentication failed for user "scram_user"', fields
    assert re.search(r"login failed: user=scram_user .*client_tls_mode = verify-full: certificate CN "
                     r"'md5_user' is not the user name", proxy.log()), proxy.log()
    # the right certificate logs in
    with raw_tls(proxy, cert=certs.client["scram_user"]) as conn:
        conn.login(user="scram_user", password_text=PASSWORDS["scram_user"])
        assert conn.scalar("select current_user") == "scram_user"


def test_verify_full_with_psycopg(pgmp, certs):
    proxy = pgmp.start(config=verify_full(certs))
    params = dict(host="localhost", hostaddr="127.0.0.1", sslmode="verify-full", sslrootcert=str(certs.ca))
    bob, alice = certs.client["scram_user"], certs.client["md5_user"]
    with psycopg.connect(proxy.dsn(**params, sslcert=str(bob[0]), sslkey=str(bob[1]))) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    with pytest.raises(psycopg.OperationalError, match='certificate authentication failed for user "scram_user"'):
        psycopg.connect(proxy.dsn(**params, sslcert=str(alice[0]), sslkey=str(alice[1])))


def test_over_max_client_conn_tls_client_that_stalls_is_not_held(pgmp, certs):
    """SSLRequest over the limit gets 'S' (PostgreSQL answers it before looking at the limit); a client that
    then never starts its handshake is closed within seconds."""
    proxy = pgmp.start(workers=1, config=tls_config(certs, "prefer", max_client_conn=1))
    held = admitted(proxy, 1)
    try:
        started = time.monotonic()
        with RawPG.connect(proxy.host, proxy.port) as conn:
            conn.send(ssl_request())
            assert conn.read_exact(1) == b"S"
            assert conn.wait_closed(5)
        took = time.monotonic() - started
        assert took < 3.5, took
        # and one that completes the handshake gets 53300 inside TLS, at once
        with raw_tls(proxy) as conn:
            started = time.monotonic()
            conn.send(startup())
            refused_at_once(conn, started)
    finally:
        for c in held:
            c.close()
