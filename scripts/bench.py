#!/usr/bin/env python3
"""Benchmark pgmp against PgBouncer and PostgreSQL itself, with pgbench, in one run.

Everything runs on this machine over loopback, in a private temp dir:

1. a throwaway PostgreSQL cluster (fsync off, scram-sha-256 over TCP), role and
   database ``bench`` filled by ``pgbench -i -s <scale>``;
2. for each pool mode asked for (``--pool-mode session,transaction``): PgBouncer
   (``--pgbouncer PATH``, any version) and one pgmp per worker count
   (``--workers 1,2`` gives the targets pgmp-w1 and pgmp-w2), all with the same pool
   settings (default_pool_size 20, max_client_conn 1000, scram-sha-256 with the same
   plaintext userlist, logging left at each one's defaults, into a file);
3. pgbench scenarios, each run against every target in turn (direct, pgbouncer,
   pgmp...) so that drift (page cache, autovacuum, other jobs) hits all targets alike;
   every run logs each transaction (``pgbench -l``), which gives the latency
   percentiles, and samples the proxy's CPU time every 0.1 s, which gives its CPU per
   transaction in the steady state (from the moment every client has completed a
   transaction to the moment the first one stops: logins and logouts left out);
4. the headline table, proxy CPU seconds per 1000 transactions (the whole process
   tree: pgmp's master and workers, the PgBouncer process) with the ratios
   pgmp/PgBouncer, since on a shared machine tps moves with the machine and CPU per
   transaction much less; then tps with the ratios against PgBouncer and against
   direct; then latency avg/p50/p99/p99.9; then every run's details; pgmp's master and
   worker RSS; and a JSON file with all of it plus the machine description (cores,
   load average before and after).

In session mode a proxy needs a server connection per client, so the pool size there
is raised to fit the largest client count (500 clients: pool 625, PostgreSQL
max_connections to match), and a proxy is restarted after a run with more clients
than the base pool of 20, so that its idle server connections do not take the
connection slots the next target needs. In transaction mode the pool is 20.

PgBouncer before 1.21 cannot run ``-M prepared`` in transaction mode (``prepared statement
"P_0" already exists``): such a run is reported as failed (an expected failure, which does
not make the exit status 1). From 1.21 ``max_prepared_statements = 200`` is set (the
default from 1.22 on), so it can.

``--pin`` pins with taskset: pgbench and PostgreSQL on some CPUs, the proxy on the
others (one per pgmp worker, each worker on its own), as far as the machine has cores;
what was pinned, and what could not be, is printed and kept in the JSON.

``--idle N`` is a separate mode: it opens N idle, logged-in client connections (startup
and SCRAM done by a small asyncio client here) to PgBouncer and then to each pgmp, and
prints the growth of the proxy's RSS per idle client (per pgmp worker too).

``--tls`` turns on TLS between pgbench and the target for every target: PgBouncer
(client_tls_sslmode = require), pgmp (client_tls_mode = "require") and PostgreSQL itself
(ssl = on, for the direct baseline); pgbench connects with sslmode=require. The
certificates are made by this script in the temp dir (trustme, or the cryptography
package). The proxies' own connections to PostgreSQL stay in cleartext. The connect
scenario then measures TLS handshake + SCRAM login per connection.

Everything started is stopped by pid in a ``finally`` block (also on Ctrl-C and
SIGTERM) and the temp dir is removed. Run it through ``scripts/bench``, which
makes sure the venv and the Debian packages are there.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import dataclasses
import datetime as dt
import glob
import hashlib
import hmac
import json
import math
import os
import platform
import pwd
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
USER = "bench"
DBNAME = "bench"
PG_SUPERUSER = "postgres"   # the OS user that runs initdb/postgres/pgbouncer when we are root
POOL_SIZE = 20
SESSION_POOL_HEADROOM = 1.25   # session mode: pool = clients x this (pgmp splits a pool over its workers)
MAX_CLIENT_CONN = 1000
PG_MIN_MAX_CONNECTIONS = 300
CPU_SAMPLE_INTERVAL = 0.1   # seconds between samples of the proxy's CPU time during a run
MAX_PREPARED_STATEMENTS = 200   # PgBouncer >= 1.21 (its default from 1.22)
# pgbench's -T clock runs while its clients log in, one after the other per thread (SCRAM each,
# and in session mode a server login behind each): a run with many clients gets this much
# longer per client above 16, so that -T seconds of it are left with every client running
LOGIN_ALLOWANCE_PER_CLIENT = 0.04   # 500 clients: 20 s (logins took 5-13 s on the loaded 2-core VM)
# Ports come from below the kernel's ephemeral range (32768-60999), so the many
# outgoing connections of the -C scenario cannot take one, and never from the
# well-known ports a system postgres or the Debian pgbouncer service may hold.
PORT_RANGE = (20000, 32000)
RESERVED_PORTS = {5432, 5433, 6432, 6433}
TARGET_KINDS = ("direct", "pgbouncer", "pgmp")
POOL_MODES = ("session", "transaction")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- scenarios

@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    args: tuple[str, ...]
    clients: int
    doc: str
    tpcb: bool = False               # the read-write script: reset its tables before each target run


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("select-simple", ("-S", "-M", "simple", "-c", "16", "-j", "2"), 16,
             "select-only, simple protocol, 16 clients"),
    Scenario("select-extended", ("-S", "-M", "extended", "-c", "16", "-j", "2"), 16,
             "select-only, extended protocol (unnamed statements), 16 clients"),
    Scenario("select-prepared", ("-S", "-M", "prepared", "-c", "16", "-j", "2"), 16,
             "select-only, named prepared statements, 16 clients"),
    Scenario("latency-c1", ("-S", "-M", "simple", "-c", "1", "-j", "1"), 1,
             "select-only, simple protocol, 1 client (round-trip latency)"),
    Scenario("connect", ("-S", "-M", "simple", "-C", "-c", "16", "-j", "2"), 16,
             "select-only with a new connection (scram login) per transaction: tps = connections/s"),
    Scenario("tpcb", ("-M", "simple", "-c", "16", "-j", "2"), 16,
             "default TPC-B-like read-write script, simple protocol, 16 clients", tpcb=True),
    Scenario("select-simple-c500", ("-S", "-M", "simple", "-c", "500", "-j", "2"), 500,
             "select-only, simple protocol, 500 clients (transaction mode: on a pool of 20)"),
    Scenario("select-extended-c500", ("-S", "-M", "extended", "-c", "500", "-j", "2"), 500,
             "select-only, extended protocol, 500 clients (transaction mode: on a pool of 20)"),
    Scenario("select-prepared-c500", ("-S", "-M", "prepared", "-c", "500", "-j", "2"), 500,
             "select-only, named prepared statements, 500 clients (transaction mode: on a pool of 20)"),
)
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}
SCENARIO_ALIASES = {"select-c500": "select-simple-c500"}     # its name before the -M variants came



def run_seconds(sc: Scenario, duration: int) -> int:
    """pgbench -T of a scenario: the asked duration plus the login allowance of its clients."""
    return duration + math.ceil(max(0, sc.clients - 16) * LOGIN_ALLOWANCE_PER_CLIENT)


def pool_size_for(mode: str, scenarios: list[Scenario]) -> int:
    """default_pool_size of both proxies in a pool mode: 20, or in session mode enough for every client."""
    if mode == "transaction":
        return POOL_SIZE
    most = max((s.clients for s in scenarios), default=POOL_SIZE)
    return max(POOL_SIZE, math.ceil(most * SESSION_POOL_HEADROOM)) if most > POOL_SIZE else POOL_SIZE


# --------------------------------------------------------------------------- TLS

@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of the certificate the targets show pgbench (for 127.0.0.1 and localhost)."""
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> TlsFiles:
    """A CA and a server certificate signed by it, with trustme or else the cryptography package."""
    directory.mkdir(mode=0o755)
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    try:
        import trustme
    except ImportError:
        trustme = None
    if trustme is not None:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(ca_path))
        leaf.cert_chain_pems[0].write_to_path(str(cert_path))
        leaf.private_key_pem.write_to_path(str(key_path))
    else:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            sys.exit("bench: --tls needs the trustme or the cryptography package in the venv "
                     "(.venv/bin/pip install trustme)")
        import ipaddress
        now = dt.datetime.now(dt.timezone.utc)

        def build(subject, issuer, pub, signer, ca: bool, sans=None):
            b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
                 .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                 .not_valid_after(now + dt.timedelta(days=30))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if sans:
                b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            return b.sign(signer, hashes.SHA256())
        ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgmp bench CA")])
        leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        ca_cert = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
        leaf = build(leaf_name, ca_name, leaf_key.public_key(), ca_key, False,
                     [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
        ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    os.chmod(key_path, 0o600)            # PostgreSQL refuses a key others can read
    chown_pg(directory, ca_path, cert_path, key_path)
    return TlsFiles(ca_path, cert_path, key_path)


# --------------------------------------------------------------------------- helpers

def free_port(taken: set[int]) -> int:
    for _ in range(1000):
        port = random.randint(*PORT_RANGE)
        if port in RESERVED_PORTS or port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free TCP port found in %d-%d" % PORT_RANGE)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05, alive=None):
    """Poll predicate until it is true or the deadline passes; alive() false = give up early."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def is_root() -> bool:
    return os.geteuid() == 0


def as_pg_user() -> dict:
    """Popen arguments that run a command as the postgres OS user when we are root.

    Same effect as ``runuser -u postgres --`` but the child's pid is the real
    server's pid (no su/runuser process in between), so we can stop it by pid.
    """
    if not is_root():
        return {}
    pw = pwd.getpwnam(PG_SUPERUSER)
    env = dict(os.environ, HOME=pw.pw_dir, USER=PG_SUPERUSER, LOGNAME=PG_SUPERUSER)
    return dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=env)


def chown_pg(*paths: Path) -> None:
    if is_root():
        pw = pwd.getpwnam(PG_SUPERUSER)
        for p in paths:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def run(cmd: list[str], *, pg_user: bool = False, env: dict | None = None, timeout: float = 600,
        check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    kw = as_pg_user() if pg_user else {}
    if env is not None:
        kw["env"] = {**kw.get("env", os.environ), **env}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          start_new_session=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc


def proc_tree_cpu(pid: int | None, system_only: bool = False) -> float | None:
    """CPU seconds (user+system, or system alone) of a process, its live descendants and the
    children they reaped.

    A child reaped while we read the tree would be counted nowhere (gone from the
    list, not yet in the parent's children times when we read those): read the
    root's children times before and after, and read the tree again if they moved.
    """
    if pid is None:
        return None

    def reaped(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.children_user + t.children_system

    def spent(t) -> float:
        if system_only:
            return t.system + t.children_system
        return t.user + t.system + t.children_user + t.children_system

    try:
        root = psutil.Process(pid)
        for _ in range(20):
            before = reaped(root)
            total = 0.0
            for p in [root] + root.children(recursive=True):
                try:
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                total += spent(t)
            if reaped(root) == before:
                break
        return total
    except psutil.Error:
        return None


def stop_pid(pid: int, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Send sig, wait until the process (and its descendants) are gone, SIGKILL them at the deadline."""
    try:
        proc = psutil.Process(pid)
        family = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return
    try:
        proc.send_signal(sig)
    except psutil.Error:
        return
    gone, alive = psutil.wait_procs(family, timeout=timeout)
    if alive:
        log(f"{name}: still running {timeout:.0f} s after signal {signal.Signals(sig).name}; SIGKILL "
            + ", ".join(str(p.pid) for p in alive))
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def process_role(p: psutil.Process, root_pid: int) -> str:
    """'master' for the root of a proxy tree, 'worker N' for a pgmp worker (its process title), else 'child'."""
    if p.pid == root_pid:
        return "master"
    try:
        m = re.search(r"worker (\d+)", " ".join(p.cmdline()))
    except psutil.Error:
        m = None
    return f"worker {m.group(1)}" if m else "child"


def tree_processes(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def process_memory(pid: int | None) -> list[dict]:
    """RSS and USS of each process of a proxy tree, with its role (master, worker N)."""
    rows = []
    for p in tree_processes(pid):
        try:
            full = p.memory_full_info()
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        m = re.search(r"clients=(\d+)", title)
        rows.append({"pid": p.pid, "role": process_role(p, pid), "rss_bytes": full.rss, "uss_bytes": full.uss,
                     "rss_mb": round(full.rss / 2 ** 20, 1), "uss_mb": round(full.uss / 2 ** 20, 1),
                     "clients_in_title": int(m.group(1)) if m else None})
    rows.sort(key=lambda r: (r["role"] != "master", r["role"]))
    return rows


def memory_text(rows: list[dict]) -> str:
    if not rows:
        return "-"
    total = sum(r["rss_bytes"] for r in rows)
    parts = [f"{r['role']} {r['rss_mb']} MB" for r in rows]
    return (f"RSS {total / 2 ** 20:.1f} MB" + (f" ({', '.join(parts)})" if len(rows) > 1 else "")
            + f", USS {sum(r['uss_bytes'] for r in rows) / 2 ** 20:.1f} MB")


class CpuSampler:
    """Samples the CPU time of a fixed set of processes (a proxy tree) every interval, in a thread.

    The processes are listed once, at the start: sampling is then a read of
    /proc/<pid>/stat per process, cheap enough for 10 samples a second. The
    samples are (wall clock time, CPU seconds), the clock pgbench's log uses.
    """

    def __init__(self, pid: int | None, interval: float = CPU_SAMPLE_INTERVAL):
        self.procs = tree_processes(pid)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), self._cpu()))
            if self._stop.wait(self.interval):
                self.samples.append((time.time(), self._cpu()))
                return

    def __enter__(self):
        if self.procs:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.procs:
            self._stop.set()
            self._thread.join(timeout=5)

    def at(self, t: float) -> float | None:
        """CPU seconds at wall clock time t, interpolated between the samples around it."""
        s = self.samples
        if len(s) < 2 or t < s[0][0] or t > s[-1][0]:
            return None
        lo, hi = 0, len(s) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if s[mid][0] <= t:
                lo = mid
            else:
                hi = mid
        (t0, c0), (t1, c1) = s[lo], s[hi]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)


# --------------------------------------------------------------------------- pinning

@dataclasses.dataclass
class PinPlan:
    """Which CPUs pgbench + PostgreSQL get, and which each proxy (and each pgmp worker) gets."""
    load: list[int]              # pgbench and PostgreSQL
    proxy: list[int]             # the proxies, in order: a pgmp worker i takes proxy[i % len]
    notes: list[str]

    @staticmethod
    def cpulist(cpus) -> str:
        return ",".join(str(c) for c in sorted(set(cpus)))

    def taskset(self, cpus) -> list[str]:
        return ["taskset", "-c", self.cpulist(cpus)]

    def worker_cpus(self, workers: int) -> list[int]:
        return [self.proxy[i % len(self.proxy)] for i in range(max(workers, 1))]


def plan_pinning(cpus: list[int], max_workers: int, with_proxy: bool) -> PinPlan:
    """Split the CPUs we may use between the load (pgbench + PostgreSQL) and the proxy.

    The proxy wants one CPU per pgmp worker (PgBouncer one); the load keeps the
    rest, at least one. Where that leaves a worker without a core of its own, the
    workers share the proxy's CPUs, and the plan says so.
    """
    cpus = sorted(cpus)
    if len(cpus) < 2:
        raise SystemExit(f"bench: --pin needs at least 2 CPUs; this process may use {len(cpus)} ({cpus})")
    if not with_proxy:
        return PinPlan(cpus, [], [f"no proxy target: pgbench and PostgreSQL on cpus {PinPlan.cpulist(cpus)}"])
    want = max(1, max_workers)
    n_proxy = min(want, len(cpus) - 1)
    plan = PinPlan(cpus[:len(cpus) - n_proxy], cpus[len(cpus) - n_proxy:], [])
    plan.notes.append(f"pgbench and PostgreSQL on cpu {plan.cpulist(plan.load)}; the proxy on cpu "
                      f"{plan.cpulist(plan.proxy)} (PgBouncer on cpu {plan.proxy[0]}; pgmp worker i on "
                      f"cpu[i], its master on all of the proxy's cpus)")
    if want > n_proxy:
        plan.notes.append(f"{want} pgmp workers need {want} cpus of their own and pgbench + PostgreSQL at least "
                          f"one more, but this machine lets us use {len(cpus)}: the workers share cpu "
                          f"{plan.cpulist(plan.proxy)}, so no run here shows a second core's worth of scaling")
    return plan


def pin_process_tree(proxy: Proxy, plan: PinPlan) -> list[str]:
    """Pin each pgmp worker to its own CPU (the master keeps the proxy set it was started with)."""
    lines = []
    wanted = plan.worker_cpus(getattr(proxy, "workers", 1))
    for p in tree_processes(proxy.pid):
        role = process_role(p, proxy.pid) if proxy.kind == "pgmp" else "process"
        m = re.match(r"worker (\d+)", role)
        try:
            if m:
                os.sched_setaffinity(p.pid, {wanted[int(m.group(1)) % len(wanted)]})
            lines.append(f"{proxy.label} {role} pid {p.pid}: cpu {PinPlan.cpulist(os.sched_getaffinity(p.pid))}")
        except OSError as exc:
            lines.append(f"{proxy.label} {role} pid {p.pid}: could not pin ({exc})")
    return lines


# --------------------------------------------------------------------------- a login client (idle mode, readiness)

class LoginFailed(Exception):
    pass


def _frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def _startup(user: str, db: str, app: str) -> bytes:
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db), ("application_name", app)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


_SALTED: dict[tuple[bytes, int], bytes] = {}    # (salt, iterations) -> salted password: PBKDF2 once per salt


class ScramClient:
    """The client side of SCRAM-SHA-256 (RFC 5802/7677, no channel binding), with salted passwords cached."""

    def __init__(self, password: str):
        self.password = password.encode()
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def initial(self) -> bytes:
        msg = ("n,," + self.first_bare).encode()
        return b"SCRAM-SHA-256\0" + struct.pack("!i", len(msg)) + msg

    def final(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        if not fields["r"].startswith(self.nonce):
            raise LoginFailed("SCRAM: the server's nonce does not extend ours")
        salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
        salted = _SALTED.get((salt, iterations))
        if salted is None:
            salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
            if len(_SALTED) < 64:
                _SALTED[(salt, iterations)] = salted
        without_proof = f"c=biws,r={fields['r']}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def check(self, server_final: bytes) -> None:
        text = server_final.decode()
        if not text.startswith("v=") or base64.b64decode(text[2:]) != self.server_signature:
            raise LoginFailed(f"SCRAM: wrong server signature ({text[:60]})")


def client_tls_context(tls: TlsFiles | None) -> ssl.SSLContext | None:
    """What pgbench's sslmode=require does, plus checking the certificate against our CA."""
    return ssl.create_default_context(cafile=str(tls.ca)) if tls is not None else None


async def login(port: int, password: str, app: str = "bench-idle", timeout: float = 60.0,
                tls: ssl.SSLContext | None = None):
    """Connect and log in (SSLRequest and TLS when tls, startup, SCRAM or cleartext/md5 password) up to
    ReadyForQuery; (reader, writer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        if tls is not None:
            writer.write(struct.pack("!ii", 8, 80877103))              # SSLRequest
            if await asyncio.wait_for(reader.readexactly(1), timeout) != b"S":
                raise LoginFailed("the server refused TLS")
            await asyncio.wait_for(writer.start_tls(tls, server_hostname=HOST), timeout)
        writer.write(_startup(USER, DBNAME, app))
        scram: ScramClient | None = None
        while True:
            head = await asyncio.wait_for(reader.readexactly(5), timeout)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            if kind == b"R":
                code = struct.unpack("!i", body[:4])[0]
                if code == 10:                       # AuthenticationSASL
                    scram = ScramClient(password)
                    writer.write(_frame(b"p", scram.initial()))
                elif code == 11:                     # AuthenticationSASLContinue
                    writer.write(_frame(b"p", scram.final(body[4:])))
                elif code == 12:                     # AuthenticationSASLFinal
                    scram.check(body[4:])
                elif code == 3:                      # cleartext password
                    writer.write(_frame(b"p", password.encode() + b"\0"))
                elif code == 5:                      # md5
                    inner = hashlib.md5(password.encode() + USER.encode()).hexdigest()
                    writer.write(_frame(b"p", b"md5" + hashlib.md5(inner.encode() + body[4:8]).hexdigest().encode()
                                        + b"\0"))
                elif code != 0:
                    raise LoginFailed(f"authentication request {code} not supported")
            elif kind == b"E":
                fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
                raise LoginFailed(f"{fields.get(b'C', '?')}: {fields.get(b'M', body[:80])}")
            elif kind == b"Z":
                return reader, writer
    except BaseException:
        writer.close()
        raise


async def close_client(writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(_frame(b"X", b""))
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
    except (OSError, TimeoutError):
        pass


def login_works(port: int, password: str, tls: ssl.SSLContext | None = None) -> bool:
    """One full login round trip: the proxy answers its clients (not only its kernel's accept queue)."""
    async def once():
        _, w = await login(port, password, app="bench-ready", timeout=5.0, tls=tls)
        await close_client(w)
    try:
        asyncio.run(once())
        return True
    except (OSError, LoginFailed, TimeoutError, asyncio.IncompleteReadError):
        return False


# --------------------------------------------------------------------------- the servers

class Postgres:
    def __init__(self, tmp: Path, bindir: Path, port: int, tls: TlsFiles | None = None,
                 max_connections: int = PG_MIN_MAX_CONNECTIONS, pin: list[str] | None = None):
        self.tmp, self.bindir, self.port, self.tls = tmp, bindir, port, tls
        self.max_connections, self.pin = max_connections, pin or []
        self.datadir = tmp / "data"
        self.logfile = tmp / "postgres.log"
        self.pid: int | None = None
        self.started = False

    def bin(self, name: str) -> str:
        return str(self.bindir / name)

    def start(self) -> None:
        run([self.bin("initdb"), "-D", str(self.datadir), "-U", PG_SUPERUSER, "-E", "UTF8",
             "--locale=C", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"], pg_user=True)
        settings = {
            "port": str(self.port),
            "listen_addresses": f"'{HOST}'",
            "unix_socket_directories": f"'{self.tmp}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "max_connections": str(self.max_connections),
            "shared_buffers": "128MB",
            "password_encryption": "'scram-sha-256'",
            # keep a checkpoint from landing inside one target's run and not the others'
            "max_wal_size": "4GB",
            "checkpoint_timeout": "30min",
            "ssl": "off",
        }
        if self.tls is not None:      # pgbench's direct connections use TLS like its proxied ones
            settings.update({"ssl": "on", "ssl_cert_file": f"'{self.tls.cert}'",
                             "ssl_key_file": f"'{self.tls.key}'"})
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# pgmp scripts/bench.py\n")
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        (self.datadir / "pg_hba.conf").write_text(
            "# pgmp scripts/bench.py\n"
            "local all all trust\n"
            f"host all all {HOST}/32 scram-sha-256\n")
        self.started = True   # from here on, stop() has something to try
        # under taskset (--pin) the postmaster, and every backend it forks, inherit the CPU set
        run([*self.pin, self.bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
             "start"], pg_user=True, timeout=90)
        self.pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        wait_until(lambda: port_accepts(self.port), 30, "PostgreSQL TCP port")

    def psql(self, *sql: str, db: str = "postgres") -> str:
        """Run statements over the unix socket as the superuser, each in its own -c (own transaction)."""
        cmd = [self.bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.tmp),
               "-p", str(self.port), "-U", PG_SUPERUSER, "-d", db]
        for stmt in sql:
            cmd += ["-c", stmt]
        return run(cmd).stdout.strip()

    def backends(self) -> int:
        """Client backends of the bench role (the proxies' server connections and pgbench's direct ones)."""
        return int(self.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}'"))

    def stop(self) -> None:
        if not self.started:
            return
        try:
            run([self.bin("pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30", "stop"],
                pg_user=True, timeout=45)
        except Exception as exc:   # noqa: BLE001 - fall back to signals, by pid
            log(f"pg_ctl stop failed ({exc}); stopping the postmaster by pid")
            if self.pid:
                stop_pid(self.pid, "postgres", signal.SIGQUIT, timeout=10)


@dataclasses.dataclass
class ProxySettings:
    pool_mode: str
    pool_size: int
    max_client_conn: int
    tls: TlsFiles | None = None
    pin: PinPlan | None = None


class Proxy:
    """A pooler we start, watch and stop by pid: PgBouncer or pgmp."""

    kind = "proxy"

    def __init__(self, tmp: Path, label: str, port: int, pg_port: int, password: str, settings: ProxySettings):
        self.tmp, self.label, self.port, self.pg_port = tmp, label, port, pg_port
        self.password, self.settings = password, settings
        self.pool_mode, self.tls = settings.pool_mode, settings.tls
        self.dir = tmp / f"{label}-{settings.pool_mode}"
        self.dir.mkdir()
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.dir / "stderr.log"
        self.starts = 0
        self.pinned: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict:
        return {}

    def pin_cpus(self) -> list[int]:
        return self.settings.pin.proxy[:1] if self.settings.pin else []

    @property
    def logfile(self) -> Path:
        raise NotImplementedError

    def ready(self) -> bool:
        return port_accepts(self.port) and login_works(self.port, self.password, client_tls_context(self.tls))

    def start(self) -> None:
        self.starts += 1
        prefix = self.settings.pin.taskset(self.pin_cpus()) if self.settings.pin else []
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(prefix + self.command(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=self.dir, start_new_session=True, **self.popen_kwargs())
        try:
            wait_until(self.ready, 30, f"{self.label} logging in a client on port {self.port}", interval=0.1,
                       alive=self.alive)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {self.stderr_path}\n{tail(self.stderr_path)}\n"
                               f"--- {self.logfile}\n{tail(self.logfile)}") from None
        if self.settings.pin:
            self.pinned = pin_process_tree(self, self.settings.pin)

    def stop(self) -> None:
        if self.alive():
            stop_pid(self.proc.pid, self.label, signal.SIGTERM, timeout=15)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def diagnostics(self) -> str:
        return (f"{self.label} exited with {self.proc.returncode if self.proc else '?'}; last log lines:\n"
                f"{tail(self.stderr_path, 8)}\n{tail(self.logfile, 8)}").strip()


def pgbouncer_version(binary: str) -> tuple[str, tuple[int, ...]]:
    """The first line of `pgbouncer --version` and the (major, minor) in it."""
    text = cmd_version([binary, "--version"])
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return text, (tuple(int(g) for g in m.groups() if g is not None) if m else (0, 0))


class PgBouncer(Proxy):
    kind = "pgbouncer"

    def __init__(self, *a, binary: str, **kw):
        self.binary = binary
        self.version_text, self.version = pgbouncer_version(binary)
        super().__init__(*a, **kw)
        chown_pg(self.dir)
        self.ini = self.dir / "pgbouncer.ini"
        self.userlist = self.dir / "userlist.txt"
        self.pidfile = self.dir / "pgbouncer.pid"
        self.userlist.write_text(f'"{USER}" "{self.password}"\n')
        os.chmod(self.userlist, 0o600)
        s = self.settings
        # Everything not set here is PgBouncer's default: log_connections and
        # log_disconnections on, TCP_NODELAY on client and server sockets (always), pkt_buf 4096.
        text = f"""\
; pgmp scripts/bench.py, for {self.version_text}
[databases]
{DBNAME} = host={HOST} port={self.pg_port} dbname={DBNAME}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir = {self.tmp}
auth_type = scram-sha-256
auth_file = {self.userlist}
pool_mode = {s.pool_mode}
default_pool_size = {s.pool_size}
max_client_conn = {s.max_client_conn}
logfile = {self.logfile}
pidfile = {self.pidfile}
"""
        if self.version >= (1, 21):
            # protocol-level named prepared statements in transaction mode (ignored in session mode)
            text += f"max_prepared_statements = {MAX_PREPARED_STATEMENTS}\n"
        if self.tls is not None:
            text += (f"client_tls_sslmode = require\n"
                     f"client_tls_cert_file = {self.tls.cert}\n"
                     f"client_tls_key_file = {self.tls.key}\n")
        self.ini.write_text(text)
        chown_pg(self.ini, self.userlist)

    @property
    def logfile(self) -> Path:
        return self.dir / "pgbouncer.log"

    def command(self) -> list[str]:
        # foreground (so the pid is ours); -q: log only to logfile, not also to stderr
        return [self.binary, "-q", str(self.ini)]

    def popen_kwargs(self) -> dict:
        return as_pg_user()


class Pgmp(Proxy):
    kind = "pgmp"

    def __init__(self, *a, workers: int, **kw):
        self.workers = workers
        super().__init__(*a, **kw)
        self.toml = self.dir / "pgmp.toml"
        (self.dir / "userlist.txt").write_text(f'"{USER}" "{self.password}"\n')
        os.chmod(self.dir / "userlist.txt", 0o600)
        s = self.settings
        tls = ""
        if self.tls is not None:
            tls = (f'client_tls_mode = "require"\nclient_tls_cert_file = "{self.tls.cert}"\n'
                   f'client_tls_key_file = "{self.tls.key}"\n')
        # log_level, log_connections and log_disconnections stay at their defaults
        # (info, true, true), as PgBouncer's stay at theirs (it logs connections too).
        self.toml.write_text(f"""\
# pgmp scripts/bench.py
[pgmp]
listen_addr = "{HOST}"
listen_port = {self.port}
unix_socket_dir = "{self.tmp}"
auth_type = "scram-sha-256"
auth_file = "userlist.txt"
pool_mode = "{s.pool_mode}"
default_pool_size = {s.pool_size}
max_client_conn = {s.max_client_conn}
workers = {self.workers}
logfile = "pgmp.log"
pidfile = "pgmp.pid"
{tls}
[databases.{DBNAME}]
host = "{HOST}"
port = {self.pg_port}
dbname = "{DBNAME}"
""")

    @property
    def logfile(self) -> Path:
        return self.dir / "pgmp.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pgmp", "start", "-c", str(self.toml)]

    def pin_cpus(self) -> list[int]:
        return sorted(set(self.settings.pin.worker_cpus(self.workers))) if self.settings.pin else []

    def worker_pids(self) -> list[int]:
        """The workers, known by their process title; without setproctitle, the master's children."""
        procs = tree_processes(self.pid)[1:]
        titled = [p.pid for p in procs if process_role(p, self.pid).startswith("worker")]
        return titled or [p.pid for p in procs]

    def ready(self) -> bool:
        # the master binds the listeners before its workers run: wait for all of them, then a login
        return len(self.worker_pids()) >= self.workers and super().ready()


# --------------------------------------------------------------------------- pgbench

LINE_RES = {
    "processed": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "latency_avg_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "conn_time_ms": re.compile(r"^(?:initial|average) connection time = ([\d.]+) ms", re.M),
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
}
ABORTED_RE = re.compile(r"client \d+ aborted|aborted in command", re.M)


def percentile(sorted_values: list[int], q: float) -> float | None:
    """Nearest-rank percentile of a sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclasses.dataclass
class TxLog:
    """What pgbench's per-transaction logs (-l) of one run say."""
    latencies_us: list[int]              # sorted
    ends: list[float]                    # wall clock end time of each completed transaction, sorted
    failed: int
    per_client: dict[str, int]
    first_end: dict[str, float]          # per client: when its first transaction ended
    last_end: dict[str, float]           # per client: when its last transaction ended

    def steady_window(self, share: float = 1.0) -> tuple[float, float] | None:
        """From the moment `share` of the clients that completed anything have completed a transaction
        to the moment the first client completed its last: (with share 1) all clients logged in and running."""
        if not self.first_end:
            return None
        firsts = sorted(self.first_end.values())
        start = firsts[max(0, math.ceil(share * len(firsts)) - 1)]
        end = min(self.last_end.values())
        return (start, end) if end > start else None

    def completed_between(self, start: float, end: float) -> int:
        return bisect.bisect_right(self.ends, end) - bisect.bisect_right(self.ends, start)


def read_tx_log(prefix: Path) -> TxLog:
    """Every pgbench -l log file of one run (one per thread), read and removed.

    PostgreSQL 15 log line: client_id transaction_no time script_no time_epoch time_us [...],
    time = transaction duration in µs, or "failed"/"skipped"; time_epoch.time_us = when it ended.
    """
    lat: list[int] = []
    ends: list[float] = []
    bad = 0
    per_client: dict[str, int] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                if not parts[2].isdigit():
                    bad += 1
                    continue
                client = parts[0]
                end = int(parts[4]) + int(parts[5]) / 1e6
                lat.append(int(parts[2]))
                ends.append(end)
                per_client[client] = per_client.get(client, 0) + 1
                if client not in first or end < first[client]:
                    first[client] = end
                if client not in last or end > last[client]:
                    last[client] = end
        os.unlink(path)
    lat.sort()
    ends.sort()
    return TxLog(lat, ends, bad, per_client, first, last)


def latency_figures(lat_us: list[int]) -> dict:
    """avg, p50, p99, p99.9 and max in ms of a sorted list of latencies in µs."""
    if not lat_us:
        return {"log_avg_ms": None, "p50_ms": None, "p99_ms": None, "p99_9_ms": None, "max_ms": None}
    return {"log_avg_ms": round(sum(lat_us) / len(lat_us) / 1000, 3),
            "p50_ms": round(percentile(lat_us, 50) / 1000, 3),
            "p99_ms": round(percentile(lat_us, 99) / 1000, 3),
            "p99_9_ms": round(percentile(lat_us, 99.9) / 1000, 3),
            "max_ms": round(lat_us[-1] / 1000, 3)}


@dataclasses.dataclass
class Target:
    name: str                 # direct, pgbouncer, pgmp or pgmp-w<N>
    port: int
    proxy: Proxy | None = None
    workers: int | None = None


class Runner:
    def __init__(self, args, pg: Postgres, pgbench: str, logs: Path, password: str, pin: PinPlan | None):
        self.args, self.pg, self.pgbench, self.logs, self.password = args, pg, pgbench, logs, password
        self.pin = pin
        self.current: subprocess.Popen | None = None
        self.seq = 0

    def reset_tpcb(self) -> None:
        # what pgbench does before a run unless -n; done here directly (not through
        # the target) and identically before every target's run of the read-write script
        self.pg.psql("VACUUM pgbench_branches", "VACUUM pgbench_tellers", "TRUNCATE pgbench_history", db=DBNAME)

    def run(self, sc: Scenario, target: Target, mode: str) -> dict:
        self.seq += 1
        res: dict = {"scenario": sc.name, "pool_mode": mode, "target": target.name, "workers": target.workers,
                     "clients": sc.clients, "pgbench_args": list(sc.args),
                     "duration_s": run_seconds(sc, self.args.duration),
                     "tps": None, "latency_avg_ms": None, "log_avg_ms": None, "p50_ms": None, "p99_ms": None,
                     "p99_9_ms": None, "failed": None, "processed": None, "aborted_clients": 0, "errors": [],
                     "notes": []}
        if target.name == "direct" and sc.clients > self.pg.max_connections - 10:
            res["skipped"] = f"{sc.clients} clients > PostgreSQL max_connections {self.pg.max_connections}"
            return res
        proxy = target.proxy
        if proxy is not None and not proxy.alive():
            note = f"{proxy.label} was not running before this run ({proxy.diagnostics()}); restarted it"
            log(note)
            res["notes"].append(note)
            try:
                proxy.start()
            except RuntimeError as exc:
                res["errors"].append(f"restart of {proxy.label} failed: {exc}")
                return res
        if sc.tpcb:
            try:
                self.reset_tpcb()
            except RuntimeError as exc:
                res["notes"].append(f"could not reset the pgbench tables before the run: {exc}")

        prefix = self.logs / f"run{self.seq:03d}-{mode}-{sc.name}-{target.name}"
        pin = self.pin.taskset(self.pin.load) if self.pin else []
        cmd = [*pin, self.pgbench, "-h", HOST, "-p", str(target.port), "-U", USER, "-n",
               "-T", str(res["duration_s"]), "-l", "--log-prefix", str(prefix), *sc.args, DBNAME]
        env = dict(os.environ, PGPASSWORD=self.password, PGSSLMODE="require" if self.args.tls else "disable",
                   PGGSSENCMODE="disable",
                   PGAPPNAME="pgbench")
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGOPTIONS"):
            env.pop(k, None)
        res["command"] = " ".join(cmd)

        proxy_pid = proxy.pid if proxy else None
        cpu0 = {"proxy": proc_tree_cpu(proxy_pid), "postgres": proc_tree_cpu(self.pg.pid),
                "proxy_system": proc_tree_cpu(proxy_pid, system_only=True)}
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sys0 = psutil.cpu_times()
        t0 = time.monotonic()
        # generous: -T bounds the run, but a stuck proxy must not hang the benchmark
        timeout = res["duration_s"] * 2 + 60 + sc.clients * 0.1
        with CpuSampler(proxy_pid) as sampler:
            self.current = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=env, cwd=self.logs, start_new_session=True)
            try:
                out, _ = self.current.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.current.send_signal(signal.SIGINT)
                try:
                    out, _ = self.current.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    self.current.kill()
                    out, _ = self.current.communicate()
                res["errors"].append(f"pgbench did not finish within {timeout:.0f} s; interrupted")
        rc = self.current.returncode
        self.current = None
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sys1 = psutil.cpu_times()
        cpu1 = {"proxy": proc_tree_cpu(proxy_pid), "postgres": proc_tree_cpu(self.pg.pid),
                "proxy_system": proc_tree_cpu(proxy_pid, system_only=True)}

        res["rc"] = rc
        res["wall_s"] = round(wall, 2)
        for key, rx in LINE_RES.items():
            m = rx.search(out)
            if m:
                res[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
        res["aborted_clients"] = len(ABORTED_RE.findall(out))
        errs = []
        for line in out.splitlines():
            if ("error" in line.lower() or "fatal" in line.lower()) and line not in errs:
                errs.append(line.strip())
        res["errors"] += errs[:5]
        if rc != 0 and not errs:
            res["errors"].append(f"pgbench exited with {rc}")
        if not res["errors"] and not res.get("processed"):
            res["errors"].append("no transaction completed"
                                 + (f" (initial connection time {res['conn_time_ms']} ms)" if res.get("conn_time_ms")
                                    else " (the clients' logins took the whole duration?)"))
        res["pgbench_output"] = out[-4000:]

        txlog = read_tx_log(prefix)
        self.note_latencies(res, txlog, sc)
        tx = res["processed"] or 0
        self.note_cpu(res, tx, cpu0, cpu1, ru0, ru1, sys0, sys1, wall)
        self.note_steady_cpu(res, txlog, sampler)
        if proxy is not None and not proxy.alive():
            note = f"{proxy.label} died during this run: {proxy.diagnostics()}"
            log(note)
            res["errors"].append(note)
        if res["errors"] and isinstance(proxy, PgBouncer) and mode == "transaction" \
                and "prepared" in sc.args and proxy.version < (1, 21):
            version = ".".join(map(str, proxy.version))
            res["expected_failure"] = (f"PgBouncer {version} has no protocol-level prepared statements in "
                                       "transaction mode (added in 1.21)")
        return res

    @staticmethod
    def note_latencies(res: dict, txlog: TxLog, sc: Scenario) -> None:
        lat, per_client = txlog.latencies_us, txlog.per_client
        res["samples"] = len(lat)
        res["clients_with_tx"] = len(per_client)
        if per_client:
            res["tx_per_client_min_max"] = [min(per_client.values()) if len(per_client) == sc.clients else 0,
                                            max(per_client.values())]
        lo_hi = res.get("tx_per_client_min_max")
        if lo_hi and lo_hi[0] and lo_hi[1] > 10 * lo_hi[0]:
            res["notes"].append(f"unfair: transactions per client from {lo_hi[0]} to {lo_hi[1]}")
        if lat and len(per_client) < sc.clients:
            # the latency log has completed transactions only: a starved client is not in p99
            res["notes"].append(f"only {len(per_client)} of {sc.clients} clients completed a transaction "
                                "(p99 covers completed ones only)")
        res.update(latency_figures(lat))
        if res["failed"] is None and (res.get("rc") != 0 or txlog.failed):
            res["failed"] = txlog.failed

    @staticmethod
    def note_cpu(res, tx, cpu0, cpu1, ru0, ru1, sys0, sys1, wall) -> None:
        cpu = {}
        for k in ("proxy", "proxy_system", "postgres"):
            if cpu0[k] is not None and cpu1[k] is not None:
                cpu[k] = round(cpu1[k] - cpu0[k], 3)
        cpu["pgbench"] = round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 3)
        # whatever else ran on the machine meanwhile (other jobs skew a 2-core benchmark):
        # all busy CPU time minus ours (proxy, our PostgreSQL, pgbench)
        busy = sum(getattr(sys1, f) - getattr(sys0, f) for f in sys1._fields if f not in ("idle", "iowait",
                                                                                         "guest", "guest_nice"))
        cpu["machine_busy"] = round(busy, 3)
        other = busy - sum(cpu.get(k, 0.0) for k in ("proxy", "postgres", "pgbench"))
        cpu["other"] = round(max(other, 0.0), 3)
        res["background_load"] = round(max(other, 0.0) / wall, 2) if wall > 0 else None
        if res["background_load"] and res["background_load"] > 0.15:
            res["notes"].append(f"background load {res['background_load']:.2f} CPU")
        res["cpu_s"] = cpu
        res["cpu_s_per_1000_tx"] = {k: (round(v / tx * 1000, 4) if tx else None) for k, v in cpu.items()
                                    if k in ("proxy", "proxy_system", "postgres", "pgbench")}

    def note_steady_cpu(self, res: dict, txlog: TxLog, sampler: CpuSampler) -> None:
        """The proxy's CPU per 1000 transactions over the steady window (logins and logouts left out).

        Where a few clients start late (PgBouncer opens its server connections one by one, so in
        session mode the last of 500 clients may wait many seconds for its first transaction), the
        window starts once 95% of the clients have run one: at most 5% of the logins fall inside it.
        """
        res["steady"] = None
        if not sampler.procs or res["errors"]:
            return
        need = 0.3 * self.args.duration
        share, window = 1.0, txlog.steady_window(1.0)
        if window is None or window[1] - window[0] < need:
            share, window = 0.95, txlog.steady_window(0.95)
        if window is None or window[1] - window[0] < need:
            got = 0.0 if window is None else window[1] - window[0]
            res["notes"].append(f"no steady window: 95% of the clients were running together for only {got:.2f} s")
            return
        start, end = window
        if share < 1.0:
            res["notes"].append("steady window from the moment 95% of the clients had completed a transaction "
                                "(some started late)")
        c0, c1 = sampler.at(start), sampler.at(end)
        n = txlog.completed_between(start, end)
        if c0 is None or c1 is None or n == 0:
            return
        res["steady"] = {"clients_share": share, "window_s": round(end - start, 3), "tx": n,
                         "tps": round(n / (end - start), 1),
                         "proxy_cpu_s": round(c1 - c0, 4),
                         "proxy_cpu_s_per_1000_tx": round((c1 - c0) / n * 1000, 5),
                         "proxy_cpu_load": round((c1 - c0) / (end - start), 3),
                         "samples": len(sampler.samples)}


# --------------------------------------------------------------------------- report

def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec)


def ratio(a, b, spec: str = ".2f") -> str:
    return format(a / b, spec) if a is not None and b else "-"


def status_text(r: dict) -> str:
    if r.get("skipped"):
        return "skipped: " + r["skipped"]
    bits = []
    if r.get("errors"):
        bits.append("FAILED (expected)" if r.get("expected_failure") else "FAILED")
    if r.get("aborted_clients"):
        bits.append(f"{r['aborted_clients']} clients aborted")
    if r.get("errors"):
        bits.append(r["errors"][0][:90])
    bits += [n[:90] for n in r.get("notes", [])]
    return "; ".join(bits)


def table(headers: list[str], rows: list[list[str]], align: str = "l") -> list[str]:
    """Columns as wide as their widest cell, aligned by align ('l'/'r' per column; the last letter repeats)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    align = align + "r" if len(align) == 1 else align
    align = align + align[-1] * (len(headers) - len(align))

    def line(cells):
        return "  ".join(str(c).ljust(w) if align[i] == "l" else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(headers), "-" * len(line(headers))]
    out += [line(r) for r in rows]
    return out


class Report:
    """The tables of one pool mode's runs."""

    def __init__(self, results: list[dict], mode: str, scenarios: list[Scenario], targets: list[str]):
        self.mode, self.scenarios, self.targets = mode, scenarios, targets
        self.by_key = {(r["scenario"], r["target"]): r for r in results if r["pool_mode"] == mode}
        self.proxies = [t for t in targets if t != "direct"]
        self.pgmps = [t for t in targets if t.startswith("pgmp")]

    def get(self, sc: str, target: str, ok_only: bool = True) -> dict | None:
        r = self.by_key.get((sc, target))
        if r is None or r.get("skipped"):
            return None
        if ok_only and r.get("errors"):
            return None
        return r

    def tps(self, sc, t):
        r = self.get(sc, t)
        return r["tps"] if r and r.get("tps") else None

    def cpu_per_1k(self, sc, t) -> tuple[float | None, bool | str]:
        """(proxy CPU s per 1000 tx, True for the steady-state figure, "~" for the 95%-of-clients one)."""
        r = self.get(sc, t)
        if r is None:
            return None, False
        if r.get("steady"):
            return r["steady"]["proxy_cpu_s_per_1000_tx"], r["steady"]["clients_share"] >= 1.0 or "~"
        return r.get("cpu_s_per_1000_tx", {}).get("proxy"), False

    def headline(self) -> list[str]:
        if not self.proxies:
            return []
        out = [(f"[{self.mode} mode] proxy CPU seconds per 1000 transactions (process tree: pgmp master + "
                "workers, the PgBouncer process; steady state: all clients running, logins left out; "
                "~ = from when 95% of the clients ran; * = whole run)")]
        heads = ["scenario"] + self.proxies
        if "pgbouncer" in self.proxies:
            heads += [f"{t}/pgb" for t in self.pgmps]
        rows = []
        for sc in self.scenarios:
            row, vals = [sc.name], {}
            for t in self.proxies:
                v, steady = self.cpu_per_1k(sc.name, t)
                vals[t] = v
                mark = "~" if steady == "~" else "" if steady or v is None else "*"
                row.append(fmt(v, ".4f") + mark)
            if "pgbouncer" in self.proxies:
                row += [ratio(vals[t], vals["pgbouncer"]) for t in self.pgmps]
            rows.append(row)
        out += table(heads, rows)
        totals = []
        for t in self.proxies:
            cpu = tx = 0.0
            for sc in self.scenarios:
                r = self.get(sc.name, t)
                if r and r.get("steady"):
                    cpu += r["steady"]["proxy_cpu_s"]
                    tx += r["steady"]["tx"]
            if tx:
                totals.append(f"{t} {cpu / tx * 1000:.4f}")
        if totals:
            out.append("over all scenarios (steady windows): " + ", ".join(totals) + " CPU s per 1000 tx")
        return out

    def tps_table(self) -> list[str]:
        out = [f"[{self.mode} mode] tps (connect: new connections per second) and ratios"]
        heads = ["scenario"] + self.targets
        pairs = []
        for t in self.proxies:
            if t != "pgbouncer" and "pgbouncer" in self.targets:
                pairs.append((t, "pgbouncer"))
            if "direct" in self.targets:
                pairs.append((t, "direct"))
        heads += [f"{a}/{'pgb' if b == 'pgbouncer' else b}" for a, b in pairs]
        rows = []
        for sc in self.scenarios:
            row = [sc.name] + [fmt(self.tps(sc.name, t), ".1f") for t in self.targets]
            row += [ratio(self.tps(sc.name, a), self.tps(sc.name, b)) for a, b in pairs]
            rows.append(row)
        return out + table(heads, rows)

    def latency_table(self) -> list[str]:
        out = [f"[{self.mode} mode] latency in ms from pgbench's per-transaction log (avg from pgbench's summary)"]
        heads = ["scenario", "target", "avg", "p50", "p99", "p99.9", "max", "avg/pgb", "p99/pgb"]
        rows = []
        for sc in self.scenarios:
            base = self.get(sc.name, "pgbouncer")
            for t in self.targets:
                r = self.get(sc.name, t)
                if r is None:
                    continue
                rel = t.startswith("pgmp") and base is not None
                rows.append([sc.name, t, fmt(r.get("latency_avg_ms"), ".3f"), fmt(r.get("p50_ms"), ".3f"),
                             fmt(r.get("p99_ms"), ".3f"), fmt(r.get("p99_9_ms"), ".3f"), fmt(r.get("max_ms"), ".2f"),
                             ratio(r.get("latency_avg_ms"), base.get("latency_avg_ms")) if rel else "",
                             ratio(r.get("p99_ms"), base.get("p99_ms")) if rel else ""])
        return out + table(heads, rows, align="llr")

    def details(self) -> list[str]:
        out = [(f"[{self.mode} mode] every run: whole-run CPU s per 1000 tx (proxy tree incl. logins, of it "
                "the kernel's (proxy sys), all PostgreSQL backends, pgbench) and notes")]
        heads = ["scenario", "target", "-T s", "login s", "tx", "tps", "failed", "proxy", "proxy sys",
                 "proxy steady", "postgres", "pgbench", "other load", "notes"]
        rows = []
        for sc in self.scenarios:
            for t in self.targets:
                r = self.by_key.get((sc.name, t))
                if r is None:
                    continue
                per = r.get("cpu_s_per_1000_tx", {})
                shown = r if not r.get("errors") else {}   # a failed run's figures are not comparable
                steady = (r.get("steady") or {}).get("proxy_cpu_s_per_1000_tx")
                login = r.get("conn_time_ms")
                rows.append([sc.name, t, fmt(r.get("duration_s"), "d"), fmt(login / 1000 if login else None, ".2f"),
                             fmt(r.get("processed"), "d"), fmt(shown.get("tps"), ".1f"),
                             fmt(r.get("failed"), "d"), fmt(per.get("proxy"), ".4f"),
                             fmt(per.get("proxy_system"), ".4f"), fmt(steady, ".4f"),
                             fmt(per.get("postgres"), ".4f"), fmt(per.get("pgbench"), ".4f"),
                             fmt(r.get("background_load"), ".2f"), status_text(r)])
        return out + table(heads, rows, align="ll" + "r" * 11 + "l")

    def render(self) -> str:
        parts = [self.headline(), self.tps_table(), self.latency_table(), self.details()]
        return "\n\n".join("\n".join(p) for p in parts if p)


# --------------------------------------------------------------------------- idle clients (--idle N)

IDLE_LOGIN_CONCURRENCY = 32


def settled_memory(pid: int, timeout: float = 10.0) -> list[dict]:
    """The proxy tree's memory once its RSS stops moving (two reads 0.5 s apart within 1%), or at the deadline."""
    deadline = time.monotonic() + timeout
    rows = process_memory(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = process_memory(pid)
        a, b = sum(r["rss_bytes"] for r in rows), sum(r["rss_bytes"] for r in again)
        rows = again
        if a and abs(b - a) <= 0.01 * a:
            break
    return rows


async def hold_idle_clients(proxy: Proxy, n: int, password: str) -> dict:
    """Log n clients in and keep them idle; the proxy tree's memory before and with them."""
    tls = client_tls_context(proxy.tls)
    _, w = await login(proxy.port, password, tls=tls)          # warm up: the pool's first server connection
    await close_client(w)
    before = settled_memory(proxy.pid)
    pairs: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(IDLE_LOGIN_CONCURRENCY)

    async def one():
        async with gate:
            try:
                pairs.append(await login(proxy.port, password, tls=tls))
            except (OSError, LoginFailed, TimeoutError, asyncio.IncompleteReadError) as exc:
                key = f"{type(exc).__name__}: {exc}"[:120]
                errors[key] = errors.get(key, 0) + 1
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120 + n * 0.02)
        login_s = time.monotonic() - t0
        after = settled_memory(proxy.pid)
        # every client still there? a proxy that dropped idle clients would look cheap: an idle
        # client must have nothing to read (no error, no EOF)
        probes = [asyncio.ensure_future(r.read(1)) for r, _ in pairs]
        _, pending = await asyncio.wait(probes, timeout=0.5) if probes else (set(), set())
        for p in pending:
            p.cancel()
        alive = len(pending)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*(close_client(w) for _, w in pairs), return_exceptions=True)
    return {"before": before, "after": after, "logged_in": len(pairs), "still_open": alive,
            "login_errors": errors, "login_s": round(login_s, 2)}


def idle_summary(label: str, mode: str, n: int, res: dict) -> dict:
    before = {r["role"]: r for r in res["before"]}
    after = {r["role"]: r for r in res["after"]}
    rb, ra = sum(r["rss_bytes"] for r in res["before"]), sum(r["rss_bytes"] for r in res["after"])
    ub, ua = sum(r["uss_bytes"] for r in res["before"]), sum(r["uss_bytes"] for r in res["after"])
    held = res["logged_in"] or 1
    per_process = []
    for role, a in after.items():
        b = before.get(role)
        grow = a["rss_bytes"] - b["rss_bytes"] if b else None
        clients = a.get("clients_in_title")
        per_process.append({"role": role, "pid": a["pid"], "rss_before_mb": b["rss_mb"] if b else None,
                            "rss_after_mb": a["rss_mb"], "clients": clients,
                            "bytes_per_client": round(grow / clients) if grow is not None and clients else None})
    return {"target": label, "pool_mode": mode, "clients_asked": n, **{k: res[k] for k in
            ("logged_in", "still_open", "login_errors", "login_s")},
            "rss_before_mb": round(rb / 2 ** 20, 1), "rss_after_mb": round(ra / 2 ** 20, 1),
            "uss_before_mb": round(ub / 2 ** 20, 1), "uss_after_mb": round(ua / 2 ** 20, 1),
            "rss_bytes_per_client": round((ra - rb) / held), "uss_bytes_per_client": round((ua - ub) / held),
            "processes": per_process, "memory_before": res["before"], "memory_after": res["after"]}


def render_idle(rows: list[dict]) -> str:
    heads = ["mode", "target", "clients", "login s", "RSS before MB", "RSS after MB", "RSS B/client",
             "USS B/client", "notes"]
    body = []
    for r in rows:
        notes = []
        if r["logged_in"] < r["clients_asked"]:
            notes.append(f"only {r['logged_in']} logged in: " + "; ".join(f"{k} x{v}" for k, v in
                                                                          list(r["login_errors"].items())[:2]))
        if r["still_open"] < r["logged_in"]:
            notes.append(f"{r['logged_in'] - r['still_open']} closed by the proxy while idle")
        body.append([r["pool_mode"], r["target"], str(r["logged_in"]), fmt(r["login_s"], ".1f"),
                     fmt(r["rss_before_mb"]), fmt(r["rss_after_mb"]), str(r["rss_bytes_per_client"]),
                     str(r["uss_bytes_per_client"]), "; ".join(notes)])
    out = ["idle logged-in clients held open: growth of the proxy tree's memory per client"]
    out += table(heads, body, align="ll" + "r" * 6 + "l")
    for r in rows:
        if len(r["processes"]) > 1:
            out.append(f"  {r['target']} ({r['pool_mode']}): " + ", ".join(
                f"{p['role']} {fmt(p['rss_before_mb'])} -> {p['rss_after_mb']} MB"
                + (f" ({p['clients']} clients, {p['bytes_per_client']} B each)" if p["clients"] else "")
                for p in r["processes"]))
    return "\n".join(out)


# --------------------------------------------------------------------------- machine

def cmd_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(pg: Postgres, pgbouncer_bin: str | None, pgbench: str) -> dict:
    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = cmd_version(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"])
    return {
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_mb": psutil.virtual_memory().total // 2 ** 20,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "pgbouncer_binary": pgbouncer_bin,
        "pgbouncer_version": pgbouncer_version(pgbouncer_bin)[0] if pgbouncer_bin else None,
        "postgres_version": cmd_version([pg.bin("postgres"), "--version"]),
        "pgbench_version": cmd_version([pgbench, "--version"]),
        "pgmp_version": cmd_version([sys.executable, "-c", "import pgmp; print(pgmp.__version__)"]),
        "pgmp_scanner_impl": cmd_version([sys.executable, "-c",
                                          "import pgmp.protocol.scanner as s; print(s.IMPL)"]),
        "pgmp_git": git,
    }


def find_pg_bindir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(re.search(r"/(\d+)/bin", p).group(1)))
    if cands:
        return Path(cands[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    sys.exit("bench: PostgreSQL server binaries not found (install postgresql or pass --pg-bin)")


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to at least want where we may (the hard limit too, with CAP_SYS_RESOURCE),
    else as far as the hard limit; the proxies inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass       # no CAP_SYS_RESOURCE (a container): the hard limit stays
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------- arguments

def csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv):
    names = ", ".join(s.name for s in SCENARIOS)
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="pgbench: direct PostgreSQL vs PgBouncer vs pgmp, over TCP with scram-sha-256, on a private "
                    "cluster; headline: the proxies' CPU seconds per 1000 transactions.",
        epilog="Scenarios: " + "; ".join(f"{s.name} = {s.doc}" for s in SCENARIOS))
    p.add_argument("--duration", "-T", type=int, default=10, help="seconds per pgbench run (default 10)")
    p.add_argument("--quick", action="store_true", help="3 s per run (overrides --duration)")
    p.add_argument("--scenarios", default="", help=f"comma-separated subset of: {names} (default: all)")
    p.add_argument("--targets", default=",".join(TARGET_KINDS),
                   help="comma-separated subset of direct,pgbouncer,pgmp (pgmp: one target per --workers value)")
    p.add_argument("--workers", default="1",
                   help="pgmp's workers setting, or a list (1,2): one pgmp per value in the same run, targets "
                        "pgmp-w1, pgmp-w2 (default 1)")
    p.add_argument("--pool-mode", default=None,
                   help="pool_mode of BOTH PgBouncer and pgmp, or a list (session,transaction) run one after "
                        "the other in the same run (default session; with --idle transaction, since pgmp's "
                        "session mode gives each client its server at login)")
    p.add_argument("--pgbouncer", default=None,
                   help="the PgBouncer binary, any version (default: pgbouncer from PATH, or /usr/sbin/pgbouncer)")
    p.add_argument("--pin", action="store_true",
                   help="taskset: pgbench and PostgreSQL on some CPUs, the proxy on the others (one per pgmp "
                        "worker) as far as there are cores; prints what was pinned")
    p.add_argument("--idle", type=int, default=0, metavar="N",
                   help="instead of pgbench: hold N idle logged-in clients on PgBouncer and then on each pgmp, "
                        "and print the proxy's RSS growth per client")
    p.add_argument("--tls", action="store_true",
                   help="TLS between pgbench and every target (PgBouncer, pgmp, PostgreSQL for direct): "
                        "certificates made in the temp dir, pgbench sslmode=require")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (default 10)")
    p.add_argument("--json", default=None,
                   help="where to write the results (default bench-results/bench-<timestamp>.json in the repo)")
    p.add_argument("--pg-bin", default=None, help="PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) for inspection")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 3
    if args.duration < 1:
        p.error("--duration must be at least 1")
    if args.idle < 0:
        p.error("--idle must be a positive number of clients")
    args.target_list = csv_list(args.targets)
    for t in args.target_list:
        if t not in TARGET_KINDS:
            p.error(f"unknown target {t!r}; choose from {', '.join(TARGET_KINDS)}")
    try:
        args.worker_list = [int(w) for w in csv_list(args.workers)]
    except ValueError:
        p.error(f"--workers takes numbers separated by commas, not {args.workers!r}")
    if not args.worker_list or any(w < 1 for w in args.worker_list):
        p.error("--workers: each value must be at least 1")
    args.worker_list = list(dict.fromkeys(args.worker_list))
    if args.pool_mode is None:
        args.pool_mode = "transaction" if args.idle else "session"
    args.mode_list = list(dict.fromkeys(csv_list(args.pool_mode)))
    for m in args.mode_list:
        if m not in POOL_MODES:
            p.error(f"unknown pool mode {m!r}; choose from {', '.join(POOL_MODES)}")
    if not args.mode_list:
        p.error("--pool-mode: give session, transaction or both")
    chosen = []
    for n in csv_list(args.scenarios):
        n = SCENARIO_ALIASES.get(n, n)
        if n not in SCENARIO_BY_NAME:
            p.error(f"unknown scenario {n!r}; choose from {names}")
        chosen.append(SCENARIO_BY_NAME[n])
    args.scenario_list = chosen or list(SCENARIOS)
    if args.idle and "pgbouncer" not in args.target_list and "pgmp" not in args.target_list:
        p.error("--idle needs a proxy target (pgbouncer, pgmp)")
    return args


def pgmp_label(workers: int, worker_list: list[int]) -> str:
    return "pgmp" if len(worker_list) == 1 else f"pgmp-w{workers}"


# --------------------------------------------------------------------------- main

class Bench:
    """One run of the benchmark: the cluster, the proxies of each pool mode, the results."""

    def __init__(self, args, tmp: Path, bindir: Path, pgbench: str, pgbouncer_bin: str | None):
        self.args, self.tmp, self.pgbench, self.pgbouncer_bin = args, tmp, pgbench, pgbouncer_bin
        self.password = secrets.token_urlsafe(18)
        self.ports: set[int] = set()
        self.tls = make_certs(tmp / "tls") if args.tls else None
        self.logs = tmp / "pgbench-logs"
        self.logs.mkdir()
        n_proxies = ("pgbouncer" in args.target_list) + len(args.worker_list) * ("pgmp" in args.target_list)
        self.pin = None
        if args.pin:
            if not shutil.which("taskset"):
                sys.exit("bench: --pin needs taskset (Debian package util-linux)")
            self.pin = plan_pinning(sorted(os.sched_getaffinity(0)),
                                    max(args.worker_list) if "pgmp" in args.target_list else 1, n_proxies > 0)
        most = max(s.clients for s in args.scenario_list)
        max_conn = max(PG_MIN_MAX_CONNECTIONS, most + POOL_SIZE * n_proxies + 50)
        self.pg = Postgres(tmp, bindir, free_port(self.ports), tls=self.tls, max_connections=max_conn,
                           pin=self.pin.taskset(self.pin.load) if self.pin else None)
        self.proxies: list[Proxy] = []       # every proxy ever made: the cleanup stops them all
        self.runner: Runner | None = None
        self.results: list[dict] = []
        self.memory: dict[str, dict[str, list[dict]]] = {}
        self.pinned: list[str] = []
        self.pool_sizes: dict[str, int] = {}
        self.targets_by_mode: dict[str, list[str]] = {}

    def setup_cluster(self, fill: bool) -> None:
        log(f"temp dir {self.tmp}; PostgreSQL {self.pg.bindir} on port {self.pg.port} "
            f"(max_connections {self.pg.max_connections})")
        self.pg.start()
        self.pg.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")
        self.pg.psql(f"CREATE DATABASE {DBNAME} OWNER {USER}")
        if fill:
            log(f"pgbench -i -s {self.args.scale}")
            run([self.pgbench, "-i", "-q", "-s", str(self.args.scale), "-h", HOST, "-p", str(self.pg.port), "-U",
                 USER, DBNAME], env={"PGPASSWORD": self.password, "PGSSLMODE": "disable"}, timeout=900,
                cwd=str(self.logs))
            self.pg.psql("CHECKPOINT")
        if self.pin:
            self.pinned.append(f"postgres postmaster pid {self.pg.pid}: cpu "
                               f"{PinPlan.cpulist(os.sched_getaffinity(self.pg.pid))}; pgbench: cpu "
                               f"{PinPlan.cpulist(self.pin.load)}")

    def proxy_specs(self, kind: str) -> list[tuple[str, int | None]]:
        """(label, pgmp workers or None for PgBouncer) of the proxies a target kind stands for."""
        if kind == "pgbouncer":
            return [("pgbouncer", None)]
        return [(pgmp_label(w, self.args.worker_list), w) for w in self.args.worker_list]

    def make_proxy(self, label: str, workers: int | None, settings: ProxySettings) -> Proxy:
        port = free_port(self.ports)
        if workers is None:
            proxy = PgBouncer(self.tmp, label, port, self.pg.port, self.password, settings, binary=self.pgbouncer_bin)
        else:
            proxy = Pgmp(self.tmp, label, port, self.pg.port, self.password, settings, workers=workers)
        self.proxies.append(proxy)       # before it starts: the cleanup stops whatever it got to
        return proxy

    def start_proxies(self, mode: str, settings: ProxySettings) -> list[Target]:
        targets: list[Target] = []
        for kind in self.args.target_list:
            if kind == "direct":
                targets.append(Target("direct", self.pg.port))
                continue
            for label, workers in self.proxy_specs(kind):
                proxy = self.make_proxy(label, workers, settings)
                proxy.start()
                log(f"{label} pid {proxy.pid} on port {proxy.port} ({mode} mode, pool {settings.pool_size}"
                    + (f", workers {workers}" if workers else f", {proxy.version_text}") + ")")
                self.pinned += [f"[{mode}] {line}" for line in proxy.pinned]
                targets.append(Target(label, proxy.port, proxy, workers))
        return targets

    def stop_proxies(self, targets: list[Target]) -> None:
        for t in targets:
            if t.proxy is not None:
                t.proxy.stop()

    def settle_servers(self, sc: Scenario, target: Target, mode: str, n_proxies: int, res: dict) -> None:
        """After a session-mode run with more clients than the base pool: restart the proxy (its idle
        server connections would take the slots the next target needs) and wait for the backends to go."""
        if sc.clients <= POOL_SIZE:
            return
        if mode == "session" and target.proxy is not None:
            log(f"restarting {target.proxy.label}: its {sc.clients} idle server connections would take the next "
                "target's PostgreSQL connection slots")
            try:
                target.proxy.restart()
            except RuntimeError as exc:
                res["notes"].append(f"restart after the run failed: {exc}")
        limit = POOL_SIZE * n_proxies + 10
        try:
            wait_until(lambda: self.pg.backends() <= limit, 60, f"PostgreSQL back to at most {limit} backends",
                       interval=0.2)
        except RuntimeError as exc:
            log(str(exc))

    def run_mode(self, mode: str) -> None:
        settings = ProxySettings(mode, pool_size_for(mode, self.args.scenario_list), MAX_CLIENT_CONN, self.tls,
                                 self.pin)
        self.pool_sizes[mode] = settings.pool_size
        targets = self.start_proxies(mode, settings)
        self.targets_by_mode[mode] = [t.name for t in targets]
        n_proxies = sum(1 for t in targets if t.proxy)
        try:
            total = len(self.args.scenario_list) * len(targets)
            log(f"[{mode}] {total} runs of {self.args.duration} s: "
                f"{', '.join(s.name for s in self.args.scenario_list)} x {', '.join(t.name for t in targets)}")
            for i, sc in enumerate(self.args.scenario_list):
                for j, target in enumerate(targets):
                    r = self.runner.run(sc, target, mode)
                    self.results.append(r)
                    steady = (r.get("steady") or {}).get("proxy_cpu_s_per_1000_tx")
                    log(f"[{mode} {i * len(targets) + j + 1}/{total}] {sc.name:<20} {target.name:<9} "
                        f"tps {fmt(r['tps'], '.1f')} avg {fmt(r['latency_avg_ms'], '.3f')} ms "
                        f"p99 {fmt(r['p99_ms'], '.3f')} ms proxy cpu/1k tx {fmt(steady, '.4f')} {status_text(r)}")
                    self.settle_servers(sc, target, mode, n_proxies, r)
            self.memory[mode] = {t.name: process_memory(t.proxy.pid) for t in targets
                                 if t.proxy is not None and t.proxy.alive()}
        finally:
            self.stop_proxies(targets)

    def run_idle(self, mode: str, n: int) -> list[dict]:
        rows = []
        settings = ProxySettings(mode, POOL_SIZE, max(MAX_CLIENT_CONN, 2 * n + 100), self.tls, self.pin)
        self.pool_sizes[mode] = settings.pool_size
        # one proxy at a time: each holds the clients alone
        kinds = [k for k in self.args.target_list if k != "direct"]
        self.targets_by_mode[mode] = []
        for kind in kinds:
            for label, workers in self.proxy_specs(kind):
                proxy = self.make_proxy(label, workers, settings)
                self.targets_by_mode[mode].append(label)
                try:
                    proxy.start()
                    self.pinned += [f"[{mode}] {line}" for line in proxy.pinned]
                    log(f"[{mode}] {label}: logging in {n} idle clients")
                    res = asyncio.run(hold_idle_clients(proxy, n, self.password))
                    row = idle_summary(label, mode, n, res)
                    log(f"[{mode}] {label}: {row['logged_in']} clients in {row['login_s']} s, RSS "
                        f"{row['rss_before_mb']} -> {row['rss_after_mb']} MB = {row['rss_bytes_per_client']} B "
                        "per client")
                    rows.append(row)
                finally:
                    proxy.stop()
        return rows

    def header(self, info: dict, started: dt.datetime, load0: list[float]) -> str:
        a = self.args
        modes = ", ".join(f"{m} (pool {self.pool_sizes.get(m, '-')})" for m in a.mode_list)
        what = f"{a.idle} idle clients" if a.idle else f"{a.duration} s per run, scale {a.scale}"
        tls = "on (pgbench sslmode=require)" if a.tls else "off"
        bouncer = info["pgbouncer_version"] or "no PgBouncer"
        if info["pgbouncer_binary"]:
            bouncer += f" ({info['pgbouncer_binary']})"
        lines = [(f"pgmp bench {started:%Y-%m-%d %H:%M:%S}: {what}; pool modes {modes}; "
                  f"pgmp workers {','.join(map(str, a.worker_list))}; client TLS {tls}"),
                 (f"machine: {info['nproc']} CPUs ({info['nproc_available']} usable here, {info['cpu_model']}), "
                  f"{info['mem_total_mb']} MB; load average before {load0}, after {loadavg()}"),
                 (f"{info['postgres_version']}; {bouncer}; pgmp {info['pgmp_version']} ({info['pgmp_git']}, "
                  f"scanner {info['pgmp_scanner_impl']}), Python {info['python']}")]
        if self.pin:
            lines.append("pinning (taskset): " + "; ".join(self.pin.notes))
            lines += [f"  {line}" for line in self.pinned]
        else:
            lines.append("pinning: none (every process may run on any CPU; --pin to separate them)")
        return "\n".join(lines)

    def memory_lines(self) -> str:
        out = []
        for mode, per in self.memory.items():
            for name, rows in per.items():
                out.append(f"[{mode} mode] {name} after the runs: {memory_text(rows)}")
        return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bindir = find_pg_bindir(args.pg_bin)
    pgbench = str(bindir / "pgbench") if (bindir / "pgbench").exists() else shutil.which("pgbench")
    need_bouncer = "pgbouncer" in args.target_list
    pgbouncer_bin = args.pgbouncer or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not pgbench:
        sys.exit("bench: pgbench not found")
    if need_bouncer and not os.access(pgbouncer_bin, os.X_OK):
        sys.exit(f"bench: no PgBouncer binary at {pgbouncer_bin} (install pgbouncer, build one with "
                 "scripts/build-pgbouncer, or pass --pgbouncer PATH)")
    if not need_bouncer:
        pgbouncer_bin = None
    if is_root():
        try:
            pwd.getpwnam(PG_SUPERUSER)
        except KeyError:
            sys.exit(f"bench: running as root needs the OS user {PG_SUPERUSER!r} for initdb/postgres/pgbouncer")

    # 500 clients, or --idle N, through a proxy: make sure nobody runs out of file descriptors
    # (the proxies inherit the limit; it applies to all alike)
    nofile = raise_nofile(max(65536, args.idle + 4096))   # 20000 here: enough for 10000 idle clients
    if args.idle and nofile[0] < args.idle + 1024:
        sys.exit(f"bench: --idle {args.idle} needs RLIMIT_NOFILE of at least {args.idle + 1024}; it is {nofile[0]} "
                 "and cannot be raised here (ulimit -n)")

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored (cmd &)
    tmp = Path(tempfile.mkdtemp(prefix="pgmp-bench-"))
    os.chmod(tmp, 0o755)
    chown_pg(tmp)
    bench: Bench | None = None
    exit_code = 0
    interrupted = False
    started = dt.datetime.now()
    load0 = loadavg()
    try:
        bench = Bench(args, tmp, bindir, pgbench, pgbouncer_bin)
        bench.setup_cluster(fill=not args.idle)
        info = machine_info(bench.pg, pgbouncer_bin, pgbench)
        idle_rows: list[dict] = []
        if args.idle:
            for mode in args.mode_list:
                idle_rows += bench.run_idle(mode, args.idle)
            table_text = render_idle(idle_rows)
        else:
            bench.runner = Runner(args, bench.pg, pgbench, bench.logs, bench.password, bench.pin)
            for mode in args.mode_list:
                bench.run_mode(mode)
            table_text = "\n\n\n".join(Report(bench.results, m, args.scenario_list, bench.targets_by_mode[m]).render()
                                       for m in args.mode_list)
        info["loadavg_before"], info["loadavg_after"] = load0, loadavg()
        header = bench.header(info, started, load0)
        mem = bench.memory_lines()
        print()
        print(header)
        print()
        print(table_text)
        if mem:
            print()
            print(mem)

        json_path = Path(args.json) if args.json else REPO / "bench-results" / f"bench-{started:%Y%m%d-%H%M%S}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "settings": {"duration_s": args.duration, "pool_modes": args.mode_list, "pool_sizes": bench.pool_sizes,
                         "max_client_conn": max(MAX_CLIENT_CONN, 2 * args.idle + 100) if args.idle else MAX_CLIENT_CONN,
                         "pgmp_workers": args.worker_list, "scale": args.scale, "idle_clients": args.idle or None,
                         "auth": "scram-sha-256 over TCP 127.0.0.1, sslmode=" + ("require" if args.tls else "disable"),
                         "client_tls": bool(args.tls),
                         "pg_max_connections": bench.pg.max_connections,
                         "scenarios": {s.name: " ".join(s.args) for s in args.scenario_list} if not args.idle else {},
                         "targets": bench.targets_by_mode,
                         "pin": ({"load_cpus": bench.pin.load, "proxy_cpus": bench.pin.proxy,
                                  "notes": bench.pin.notes, "pinned": bench.pinned} if bench.pin else None)},
            "machine": info,
            "results": bench.results,
            "idle": idle_rows or None,
            "memory_after_runs": bench.memory,
            "header": header,
            "table": table_text,
        }
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults written to {json_path}")
        if any(r.get("errors") and not r.get("expected_failure") for r in bench.results):
            exit_code = 1
        if any(r["logged_in"] < r["clients_asked"] or r["still_open"] < r["logged_in"] for r in idle_rows):
            exit_code = 1
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted = True
        log(f"interrupted ({str(exc) or 'SIGINT'}); cleaning up")
        exit_code = 130
    except Exception as exc:   # noqa: BLE001 - report, then clean up
        log(f"error: {type(exc).__name__}: {exc}")
        exit_code = 2
    finally:
        # cleanup must finish: a second Ctrl-C must not leave servers behind (every wait has a deadline)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if bench is not None:
            runner = bench.runner
            if runner is not None and runner.current is not None and runner.current.poll() is None:
                stop_pid(runner.current.pid, "pgbench", signal.SIGTERM, timeout=5)
            for proxy in bench.proxies:
                proxy.stop()
            bench.pg.stop()
        if args.keep_tmp:
            log(f"kept {tmp} (logs and configs)")
        else:
            if exit_code == 2:
                log("rerun with --keep-tmp to keep the logs and configs of the temp dir")
            shutil.rmtree(tmp, ignore_errors=True)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if interrupted:
            log("stopped everything; no results written")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
