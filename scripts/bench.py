#!/usr/bin/env python3
"""Benchmark pgmp against PgBouncer and PostgreSQL itself, with pgbench, in one run.

Everything runs on this machine over loopback, in a private temp dir:

1. a throwaway PostgreSQL cluster (fsync off, scram-sha-256 over TCP), role and
   database ``bench`` filled by ``pgbench -i -s <scale>``;
2. PgBouncer and pgmp with the same pool settings (pool_mode, default_pool_size 20,
   max_client_conn 1000, scram-sha-256 with the same plaintext userlist, logging
   left at each one's defaults, into a file);
3. pgbench scenarios, each run against every target in turn (direct, pgbouncer,
   pgmp) so that drift (page cache, autovacuum, thermal) hits all targets alike;
4. a table of tps / average latency / p99 latency / failures, pgmp's tps ratios,
   CPU seconds per 1000 transactions of each proxy, and a JSON file with all of it
   plus the machine description.

``--pool-mode transaction`` adds runs with 500 clients on the pool of 20 for each of
``-M simple``, ``-M extended`` and ``-M prepared``. PgBouncer before 1.21 cannot run
``-M prepared`` in transaction mode (``prepared statement "P_0" already exists``): such a
run is reported as failed (an expected failure, which does not make the exit status 1).

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
import dataclasses
import datetime as dt
import glob
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
USER = "bench"
DBNAME = "bench"
PG_SUPERUSER = "postgres"   # the OS user that runs initdb/postgres/pgbouncer when we are root
POOL_SIZE = 20
MAX_CLIENT_CONN = 1000
PG_MAX_CONNECTIONS = 300
# Ports come from below the kernel's ephemeral range (32768-60999), so the many
# outgoing connections of the -C scenario cannot take one, and never from the
# well-known ports a system postgres or the Debian pgbouncer service may hold.
PORT_RANGE = (20000, 32000)
RESERVED_PORTS = {5432, 5433, 6432, 6433}
TARGETS = ("direct", "pgbouncer", "pgmp")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- scenarios

@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    args: tuple[str, ...]
    clients: int
    doc: str
    transaction_only: bool = False   # needs a pool smaller than the client count: transaction mode only
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
             "select-only, simple protocol, 500 clients on a pool of 20 (transaction mode only)",
             transaction_only=True),
    Scenario("select-extended-c500", ("-S", "-M", "extended", "-c", "500", "-j", "2"), 500,
             "select-only, extended protocol, 500 clients on a pool of 20 (transaction mode only)",
             transaction_only=True),
    Scenario("select-prepared-c500", ("-S", "-M", "prepared", "-c", "500", "-j", "2"), 500,
             "select-only, named prepared statements, 500 clients on a pool of 20 (transaction mode only)",
             transaction_only=True),
)
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}
SCENARIO_ALIASES = {"select-c500": "select-simple-c500"}     # its name before the -M variants came


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


def proc_tree_cpu(pid: int | None) -> float | None:
    """CPU seconds (user+system) of a process, its live descendants and the children they reaped.

    A child reaped while we read the tree would be counted nowhere (gone from the
    list, not yet in the parent's children times when we read those): read the
    root's children times before and after, and read the tree again if they moved.
    """
    if pid is None:
        return None

    def reaped(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.children_user + t.children_system

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
                total += t.user + t.system + t.children_user + t.children_system
            if reaped(root) == before:
                break
        return total
    except psutil.Error:
        return None


def proc_tree_mem(pid: int | None) -> dict | None:
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return None
    rss = uss = 0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            uss += full.uss
        except psutil.Error:
            continue
    return {"processes": len(procs), "rss_bytes": rss, "uss_bytes": uss,
            "rss_mb": round(rss / 2 ** 20, 1), "uss_mb": round(uss / 2 ** 20, 1)}


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


# --------------------------------------------------------------------------- the servers

class Postgres:
    def __init__(self, tmp: Path, bindir: Path, port: int, tls: TlsFiles | None = None):
        self.tmp, self.bindir, self.port, self.tls = tmp, bindir, port, tls
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
            "max_connections": str(PG_MAX_CONNECTIONS),
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
        run([self.bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
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


class Proxy:
    """A pooler we start, watch and stop by pid: PgBouncer or pgmp."""

    name = "proxy"

    def __init__(self, tmp: Path, port: int, pg_port: int, password: str, pool_mode: str,
                 tls: TlsFiles | None = None):
        self.tmp, self.port, self.pg_port, self.tls = tmp, port, pg_port, tls
        self.password, self.pool_mode = password, pool_mode
        self.dir = tmp / self.name
        self.dir.mkdir()
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.dir / "stderr.log"
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict:
        return {}

    @property
    def logfile(self) -> Path:
        raise NotImplementedError

    def start(self) -> None:
        self.starts += 1
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=self.dir, start_new_session=True, **self.popen_kwargs())
        try:
            wait_until(lambda: port_accepts(self.port), 30, f"{self.name} on port {self.port}",
                       alive=self.alive)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {self.stderr_path}\n{tail(self.stderr_path)}\n"
                               f"--- {self.logfile}\n{tail(self.logfile)}") from None

    def stop(self) -> None:
        if self.alive():
            stop_pid(self.proc.pid, self.name, signal.SIGTERM, timeout=15)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def diagnostics(self) -> str:
        return (f"{self.name} exited with {self.proc.returncode if self.proc else '?'}; last log lines:\n"
                f"{tail(self.stderr_path, 8)}\n{tail(self.logfile, 8)}").strip()


class PgBouncer(Proxy):
    name = "pgbouncer"

    def __init__(self, *a, binary: str, **kw):
        self.binary = binary
        super().__init__(*a, **kw)
        chown_pg(self.dir)
        self.ini = self.dir / "pgbouncer.ini"
        self.userlist = self.dir / "userlist.txt"
        self.pidfile = self.dir / "pgbouncer.pid"
        self.userlist.write_text(f'"{USER}" "{self.password}"\n')
        os.chmod(self.userlist, 0o600)
        # Everything not set here is PgBouncer's default: log_connections and
        # log_disconnections on, TCP_NODELAY on client and server sockets (always), pkt_buf 4096.
        self.ini.write_text(f"""\
; pgmp scripts/bench.py
[databases]
{DBNAME} = host={HOST} port={self.pg_port} dbname={DBNAME}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir = {self.tmp}
auth_type = scram-sha-256
auth_file = {self.userlist}
pool_mode = {self.pool_mode}
default_pool_size = {POOL_SIZE}
max_client_conn = {MAX_CLIENT_CONN}
logfile = {self.logfile}
pidfile = {self.pidfile}
""")
        if self.tls is not None:
            with open(self.ini, "a") as f:
                f.write(f"client_tls_sslmode = require\n"
                        f"client_tls_cert_file = {self.tls.cert}\n"
                        f"client_tls_key_file = {self.tls.key}\n")
        chown_pg(self.ini, self.userlist)

    def version(self) -> tuple[int, ...]:
        out = cmd_version([self.binary, "--version"])
        m = re.search(r"(\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    @property
    def logfile(self) -> Path:
        return self.dir / "pgbouncer.log"

    def command(self) -> list[str]:
        # foreground (so the pid is ours); -q: log only to logfile, not also to stderr
        return [self.binary, "-q", str(self.ini)]

    def popen_kwargs(self) -> dict:
        return as_pg_user()


class Pgmp(Proxy):
    name = "pgmp"

    def __init__(self, *a, workers: int, **kw):
        self.workers = workers
        super().__init__(*a, **kw)
        self.toml = self.dir / "pgmp.toml"
        (self.dir / "userlist.txt").write_text(f'"{USER}" "{self.password}"\n')
        os.chmod(self.dir / "userlist.txt", 0o600)
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
pool_mode = "{self.pool_mode}"
default_pool_size = {POOL_SIZE}
max_client_conn = {MAX_CLIENT_CONN}
workers = {self.workers}
logfile = "pgmp.log"
pidfile = "pgmp.pid"

[databases.{DBNAME}]
host = "{HOST}"
port = {self.pg_port}
dbname = "{DBNAME}"
""")
        if self.tls is not None:
            text = self.toml.read_text().replace(
                "[databases.", f'client_tls_mode = "require"\nclient_tls_cert_file = "{self.tls.cert}"\n'
                               f'client_tls_key_file = "{self.tls.key}"\n\n[databases.', 1)
            self.toml.write_text(text)

    @property
    def logfile(self) -> Path:
        return self.dir / "pgmp.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pgmp", "start", "-c", str(self.toml)]


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


def read_latencies(prefix: Path) -> tuple[list[int], int, dict[str, int]]:
    """Latency column (µs) of every pgbench -l log file of one run, the count of failed
    transactions, and the transactions completed per client id.

    PostgreSQL 15 log line: client_id transaction_no time script_no time_epoch time_us [...],
    time = transaction duration in µs, or "failed"/"skipped".
    """
    lat: list[int] = []
    bad = 0
    per_client: dict[str, int] = {}
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) < 3:
                    continue
                if parts[2].isdigit():
                    lat.append(int(parts[2]))
                    per_client[parts[0]] = per_client.get(parts[0], 0) + 1
                else:
                    bad += 1
        os.unlink(path)
    lat.sort()
    return lat, bad, per_client


@dataclasses.dataclass
class Target:
    name: str
    port: int
    proxy: Proxy | None = None


class Runner:
    def __init__(self, args, pg: Postgres, pgbench: str, logs: Path, password: str):
        self.args, self.pg, self.pgbench, self.logs, self.password = args, pg, pgbench, logs, password
        self.current: subprocess.Popen | None = None
        self.seq = 0

    def reset_tpcb(self) -> None:
        # what pgbench does before a run unless -n; done here directly (not through
        # the target) and identically before every target's run of the read-write script
        self.pg.psql("VACUUM pgbench_branches", "VACUUM pgbench_tellers", "TRUNCATE pgbench_history", db=DBNAME)

    def run(self, sc: Scenario, target: Target) -> dict:
        self.seq += 1
        res: dict = {"scenario": sc.name, "target": target.name, "clients": sc.clients,
                     "pgbench_args": list(sc.args), "duration_s": self.args.duration,
                     "tps": None, "latency_avg_ms": None, "p50_ms": None, "p99_ms": None,
                     "failed": None, "processed": None, "aborted_clients": 0, "errors": [], "notes": []}
        if target.name == "direct" and sc.clients > PG_MAX_CONNECTIONS - 10:
            res["skipped"] = f"{sc.clients} clients > PostgreSQL max_connections {PG_MAX_CONNECTIONS}"
            return res
        proxy = target.proxy
        if proxy is not None and not proxy.alive():
            note = f"{proxy.name} was not running before this run ({proxy.diagnostics()}); restarted it"
            log(note)
            res["notes"].append(note)
            try:
                proxy.start()
            except RuntimeError as exc:
                res["errors"].append(f"restart of {proxy.name} failed: {exc}")
                return res
        if sc.tpcb:
            try:
                self.reset_tpcb()
            except RuntimeError as exc:
                res["notes"].append(f"could not reset the pgbench tables before the run: {exc}")

        prefix = self.logs / f"run{self.seq:03d}-{sc.name}-{target.name}"
        cmd = [self.pgbench, "-h", HOST, "-p", str(target.port), "-U", USER, "-n",
               "-T", str(self.args.duration), "-l", "--log-prefix", str(prefix), *sc.args, DBNAME]
        env = dict(os.environ, PGPASSWORD=self.password, PGSSLMODE="require" if self.args.tls else "disable",
                   PGGSSENCMODE="disable",
                   PGAPPNAME="pgbench")
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGOPTIONS"):
            env.pop(k, None)
        res["command"] = " ".join(cmd)

        proxy_pid = proxy.pid if proxy else None
        cpu0 = {"proxy": proc_tree_cpu(proxy_pid), "postgres": proc_tree_cpu(self.pg.pid)}
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sys0 = psutil.cpu_times()
        t0 = time.monotonic()
        # generous: -T bounds the run, but a stuck proxy must not hang the benchmark
        timeout = self.args.duration * 2 + 60 + sc.clients * 0.1
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
        cpu1 = {"proxy": proc_tree_cpu(proxy_pid), "postgres": proc_tree_cpu(self.pg.pid)}

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

        lat, failed_lines, per_client = read_latencies(prefix)
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
        if lat:
            res["p50_ms"] = round(percentile(lat, 50) / 1000, 3)
            res["p99_ms"] = round(percentile(lat, 99) / 1000, 3)
        if res["failed"] is None and (rc != 0 or failed_lines):
            res["failed"] = failed_lines

        tx = res["processed"] or 0
        cpu = {}
        for k in ("proxy", "postgres"):
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
                                    if k in ("proxy", "postgres", "pgbench")}
        if proxy is not None and not proxy.alive():
            note = f"{proxy.name} died during this run: {proxy.diagnostics()}"
            log(note)
            res["errors"].append(note)
        if res["errors"] and isinstance(proxy, PgBouncer) and self.args.pool_mode == "transaction" \
                and "prepared" in sc.args and proxy.version() < (1, 21):
            version = ".".join(map(str, proxy.version()))
            res["expected_failure"] = (f"PgBouncer {version} has no protocol-level prepared statements in "
                                       "transaction mode (added in 1.21)")
        return res


# --------------------------------------------------------------------------- report

def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec)


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


def render(results: list[dict], scenarios: list[Scenario], targets: list[str], tls: bool = False) -> str:
    out = []
    hdr = f"{'scenario':<20} {'target':<10} {'tps':>10} {'avg ms':>8} {'p99 ms':>8} {'failed':>7}  notes"
    out.append(hdr)
    out.append("-" * len(hdr))
    for sc in scenarios:
        for r in (r for r in results if r["scenario"] == sc.name):
            failed = r.get("failed")
            # a failed run's figures are those of whichever clients survived: not comparable, left out
            # of the table (the JSON keeps them)
            shown = r if not r.get("errors") else {}
            out.append(f"{sc.name:<20} {r['target']:<10} {fmt(shown.get('tps'), '.1f'):>10} "
                       f"{fmt(shown.get('latency_avg_ms'), '.3f'):>8} {fmt(shown.get('p99_ms'), '.3f'):>8} "
                       f"{fmt(failed, 'd'):>7}  {status_text(r)}")
    out.append("")
    out.append("connect: tps = new connections (scram logins) per second."
               if not tls else "connect: tps = new connections (TLS handshake + scram login) per second.")

    def tps(sc, t):
        for r in results:
            if r["scenario"] == sc and r["target"] == t and r.get("tps") and not r.get("errors"):
                return r["tps"]
        return None

    if "pgmp" in targets and len(targets) > 1:
        out.append("")
        h = f"{'scenario':<20} {'pgmp/pgbouncer':>15} {'pgmp/direct':>12}   (tps ratios)"
        out.append(h)
        out.append("-" * len(h))
        for sc in scenarios:
            m, b, d = tps(sc.name, "pgmp"), tps(sc.name, "pgbouncer"), tps(sc.name, "direct")
            rb = fmt(m / b, ".2f") if m and b else "-"
            rd = fmt(m / d, ".2f") if m and d else "-"
            out.append(f"{sc.name:<20} {rb:>15} {rd:>12}")

    out.append("")
    h = (f"{'scenario':<20} {'target':<10} {'tx':>9} {'proxy cpu s':>11} {'proxy s/1k tx':>13} "
         f"{'pg s/1k tx':>10} {'pgbench s/1k':>12}")
    out.append("CPU seconds per 1000 transactions (proxy process tree incl. children; PostgreSQL all backends;"
               " pgbench client)")
    out.append(h)
    out.append("-" * len(h))
    totals: dict[str, list[float]] = {}
    for sc in scenarios:
        for r in (r for r in results if r["scenario"] == sc.name):
            if r.get("skipped") or r.get("processed") is None:
                continue
            per = r.get("cpu_s_per_1000_tx", {})
            cpu = r.get("cpu_s", {})
            out.append(f"{sc.name:<20} {r['target']:<10} {r['processed']:>9} {fmt(cpu.get('proxy'), '.2f'):>11} "
                       f"{fmt(per.get('proxy'), '.4f'):>13} {fmt(per.get('postgres'), '.4f'):>10} "
                       f"{fmt(per.get('pgbench'), '.4f'):>12}")
            if cpu.get("proxy") is not None and r["processed"]:
                t = totals.setdefault(r["target"], [0.0, 0])
                t[0] += cpu["proxy"]
                t[1] += r["processed"]
    if totals:
        out.append("")
        for name, (s, n) in totals.items():
            out.append(f"{name}: {s:.2f} CPU s over {n} tx in all scenarios = {s / n * 1000:.4f} CPU s per 1000 tx")
    return "\n".join(out)


def cmd_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def machine_info(args, pg: Postgres, pgbouncer_bin: str, pgbench: str) -> dict:
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
        "pgbouncer_version": cmd_version([pgbouncer_bin, "--version"]),
        "postgres_version": cmd_version([pg.bin("postgres"), "--version"]),
        "pgbench_version": cmd_version([pgbench, "--version"]),
        "pgmp_version": cmd_version([sys.executable, "-c", "import pgmp; print(pgmp.__version__)"]),
        "pgmp_scanner_impl": cmd_version([sys.executable, "-c",
                                          "import pgmp.protocol.scanner as s; print(s.IMPL)"]),
        "pgmp_git": git,
    }


# --------------------------------------------------------------------------- main

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


def parse_args(argv):
    names = ", ".join(s.name for s in SCENARIOS)
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="pgbench: direct PostgreSQL vs PgBouncer vs pgmp, over TCP with scram-sha-256, on a private cluster.",
        epilog="Scenarios: " + "; ".join(f"{s.name} = {s.doc}" for s in SCENARIOS))
    p.add_argument("--duration", "-T", type=int, default=10, help="seconds per pgbench run (default 10)")
    p.add_argument("--quick", action="store_true", help="3 s per run (overrides --duration)")
    p.add_argument("--scenarios", default="",
                   help=f"comma-separated subset of: {names} (default: all of the pool mode)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of direct,pgbouncer,pgmp")
    p.add_argument("--workers", type=int, default=1, help="pgmp's workers setting (default 1)")
    p.add_argument("--pool-mode", choices=("session", "transaction"), default="session",
                   help="pool_mode of BOTH PgBouncer and pgmp; transaction adds the 500-client runs "
                        "(default session)")
    p.add_argument("--tls", action="store_true",
                   help="TLS between pgbench and every target (PgBouncer, pgmp, PostgreSQL for direct): "
                        "certificates made in the temp dir, pgbench sslmode=require")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (default 10)")
    p.add_argument("--json", default=None,
                   help="where to write the results (default bench-results/bench-<timestamp>.json in the repo)")
    p.add_argument("--pg-bin", default=None, help="PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)")
    p.add_argument("--pgbouncer", default=None, help="pgbouncer binary (default: from PATH or /usr/sbin)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) for inspection")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 3
    if args.duration < 1:
        p.error("--duration must be at least 1")
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in args.target_list:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    if args.scenarios:
        chosen = []
        for n in (n.strip() for n in args.scenarios.split(",")):
            n = SCENARIO_ALIASES.get(n, n)
            if n and n not in SCENARIO_BY_NAME:
                p.error(f"unknown scenario {n!r}; choose from {names}")
            if n:
                chosen.append(SCENARIO_BY_NAME[n])
    else:
        chosen = [s for s in SCENARIOS if not s.transaction_only or args.pool_mode == "transaction"]
    for s in chosen:
        if s.transaction_only and args.pool_mode != "transaction":
            p.error(f"scenario {s.name} needs --pool-mode transaction ({s.clients} clients on a pool of "
                    f"{POOL_SIZE} would just queue in session mode)")
    args.scenario_list = chosen
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bindir = find_pg_bindir(args.pg_bin)
    pgbench = str(bindir / "pgbench") if (bindir / "pgbench").exists() else shutil.which("pgbench")
    pgbouncer_bin = args.pgbouncer or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    need_bouncer = "pgbouncer" in args.target_list
    if not pgbench:
        sys.exit("bench: pgbench not found")
    if need_bouncer and not os.path.exists(pgbouncer_bin):
        sys.exit("bench: pgbouncer not found (install pgbouncer or pass --pgbouncer)")
    if is_root():
        try:
            pwd.getpwnam(PG_SUPERUSER)
        except KeyError:
            sys.exit(f"bench: running as root needs the OS user {PG_SUPERUSER!r} for initdb/postgres/pgbouncer")

    # 500 clients through a proxy: make sure nobody runs out of file descriptors (applies to all alike)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored (cmd &)
    tmp = Path(tempfile.mkdtemp(prefix="pgmp-bench-"))
    os.chmod(tmp, 0o755)
    chown_pg(tmp)
    logs = tmp / "pgbench-logs"
    logs.mkdir()
    password = secrets.token_urlsafe(18)
    ports: set[int] = set()
    tls_files = make_certs(tmp / "tls") if args.tls else None
    pg = Postgres(tmp, bindir, free_port(ports), tls=tls_files)
    bouncer: PgBouncer | None = None
    pgmp: Pgmp | None = None
    runner: Runner | None = None
    results: list[dict] = []
    exit_code = 0
    interrupted = False
    started = dt.datetime.now()
    try:
        log(f"temp dir {tmp}; PostgreSQL {bindir} on port {pg.port}")
        pg.start()
        pg.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{password}'")
        pg.psql(f"CREATE DATABASE {DBNAME} OWNER {USER}")
        log(f"pgbench -i -s {args.scale}")
        run([pgbench, "-i", "-q", "-s", str(args.scale), "-h", HOST, "-p", str(pg.port), "-U", USER, DBNAME],
            env={"PGPASSWORD": password, "PGSSLMODE": "disable"}, timeout=900, cwd=str(logs))
        pg.psql("CHECKPOINT")

        targets: list[Target] = []
        for name in args.target_list:
            if name == "direct":
                targets.append(Target("direct", pg.port))
            elif name == "pgbouncer":
                bouncer = PgBouncer(tmp, free_port(ports), pg.port, password, args.pool_mode, binary=pgbouncer_bin,
                                    tls=tls_files)
                bouncer.start()
                log(f"pgbouncer pid {bouncer.pid} on port {bouncer.port} ({args.pool_mode} mode)")
                targets.append(Target("pgbouncer", bouncer.port, bouncer))
            elif name == "pgmp":
                pgmp = Pgmp(tmp, free_port(ports), pg.port, password, args.pool_mode, workers=args.workers,
                            tls=tls_files)
                pgmp.start()
                log(f"pgmp pid {pgmp.pid} on port {pgmp.port} ({args.pool_mode} mode, workers={args.workers})")
                targets.append(Target("pgmp", pgmp.port, pgmp))

        info = machine_info(args, pg, pgbouncer_bin, pgbench)
        runner = Runner(args, pg, pgbench, logs, password)
        total = len(args.scenario_list) * len(targets)
        log(f"{total} runs of {args.duration} s: {', '.join(s.name for s in args.scenario_list)} "
            f"x {', '.join(t.name for t in targets)}")
        for sc in args.scenario_list:
            for target in targets:
                r = runner.run(sc, target)
                results.append(r)
                log(f"[{len(results)}/{total}] {sc.name:<20} {target.name:<9} tps {fmt(r['tps'], '.1f')} "
                    f"avg {fmt(r['latency_avg_ms'], '.3f')} ms p99 {fmt(r['p99_ms'], '.3f')} ms "
                    f"{status_text(r)}")

        memory = {"pgmp": proc_tree_mem(pgmp.pid) if pgmp and pgmp.alive() else None,
                  "pgbouncer": proc_tree_mem(bouncer.pid) if bouncer and bouncer.alive() else None}
        table = render(results, args.scenario_list, [t.name for t in targets], tls=args.tls)
        mem_lines = []
        for name, m in memory.items():
            if m:
                mem_lines.append(f"{name}: RSS {m['rss_mb']} MB, USS {m['uss_mb']} MB ({m['processes']} processes)"
                                 " after the runs")
        header = (f"pgmp bench {started:%Y-%m-%d %H:%M:%S}: {args.duration} s per run, pool_mode {args.pool_mode}, "
                  f"pool size {POOL_SIZE}, pgmp workers {args.workers}, scale {args.scale}, "
                  f"client TLS {'on (pgbench sslmode=require)' if args.tls else 'off'}\n"
                  f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
                  f"{info['postgres_version']}, {info['pgbouncer_version']}, pgmp {info['pgmp_version']} "
                  f"({info['pgmp_git']}, scanner {info['pgmp_scanner_impl']})")
        print()
        print(header)
        print()
        print(table)
        if mem_lines:
            print()
            print("\n".join(mem_lines))

        json_path = Path(args.json) if args.json else REPO / "bench-results" / f"bench-{started:%Y%m%d-%H%M%S}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "settings": {"duration_s": args.duration, "pool_mode": args.pool_mode, "pool_size": POOL_SIZE,
                         "max_client_conn": MAX_CLIENT_CONN, "pgmp_workers": args.workers, "scale": args.scale,
                         "auth": "scram-sha-256 over TCP 127.0.0.1, sslmode=" + ("require" if args.tls else "disable"),
                         "client_tls": bool(args.tls),
                         "scenarios": {s.name: " ".join(s.args) for s in args.scenario_list},
                         "targets": [t.name for t in targets]},
            "machine": info,
            "results": results,
            "memory_after_runs": memory,
            "table": table,
        }
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults written to {json_path}")
        if any(r.get("errors") and not r.get("expected_failure") for r in results):
            exit_code = 1
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted = True
        log(f"interrupted ({str(exc) or 'SIGINT'}); cleaning up")
        exit_code = 130
    except Exception as exc:   # noqa: BLE001 - report, then clean up
        log(f"error: {exc}")
        exit_code = 2
    finally:
        # cleanup must finish: a second Ctrl-C must not leave servers behind (every wait has a deadline)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if runner is not None and runner.current is not None and runner.current.poll() is None:
            stop_pid(runner.current.pid, "pgbench", signal.SIGTERM, timeout=5)
        for proxy in (pgmp, bouncer):
            if proxy is not None:
                proxy.stop()
        pg.stop()
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
