"""HAProxy in front of pgmp nodes for tests: write its config, start it in the foreground, ask its state, stop it.

HAProxy balances in TCP mode and checks each node by HTTP against pgmp's own
``GET /health`` on the node's metrics port (``option httpchk``, ``check port``),
so a node that stops or drains leaves the rotation as soon as its /health says
503 or stops answering. The config is written in the test's directory, HAProxy
runs with ``-db`` (foreground, one process) and is stopped by its pid. Its
runtime API (a unix socket) tells the test how HAProxy sees each node.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGTERM

from .cluster import PASSWORDS, conninfo
from .proxy import REPO_ROOT, _die_with_parent
from .waiting import RUN_DIR_ENV, free_port, port_accepts, wait_for, wait_started

HAPROXY_ENV = "PGMP_HAPROXY"       # set by scripts/setup-env: the tests then fail rather than skip without it
READY_TIMEOUT = 10.0
# the retries field of an `option tcplog` line ("actconn/feconn/beconn/srv_conn/retries"), "+N" when redispatched
TCPLOG_RETRIED = re.compile(r" \d+/\d+/\d+/\d+/\+\d+ \d+/\d+$", re.M)


def find_haproxy() -> str | None:
    """The haproxy binary: $PGMP_HAPROXY, else haproxy on PATH or in /usr/sbin; None if there is none.

    A $PGMP_HAPROXY that is not an executable is an error, not a reason to skip.
    """
    named = os.environ.get(HAPROXY_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise RuntimeError(f"{HAPROXY_ENV}={named} is not an executable (run scripts/setup-env)")
        return named
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


@dataclass(frozen=True)
class Node:
    """One pgmp behind HAProxy: its name in the backend, its listen address and its metrics port."""

    name: str
    host: str
    port: int
    metrics_port: int


@dataclass(frozen=True)
class Checks:
    """How HAProxy checks the nodes: every ``inter``, down after ``fall`` failures, up after ``rise`` successes."""

    inter_ms: int = 200
    fall: int = 2
    rise: int = 1
    timeout_ms: int = 500

    @property
    def down_within(self) -> float:
        """Seconds from a node's failure until HAProxy must have marked it down (one check period of slack)."""
        return (self.fall + 1) * self.inter_ms / 1000 + self.timeout_ms / 1000


def render_config(nodes: Sequence[Node], listen_port: int, stats_socket: str, balance: str = "roundrobin",
                  checks: Checks = Checks(), redispatch: bool = True, listen_host: str = "127.0.0.1") -> str:
    """An haproxy.cfg that balances TCP connections over ``nodes`` (checked by GET /health on their metrics port).

    ``redispatch``: a connection a node refuses (it is stopping or dead and not yet marked
    down) is tried again on another node instead of failing.
    """
    servers = "\n".join(
        f"    server {n.name} {n.host}:{n.port} check port {n.metrics_port}" for n in nodes)
    retry = "    retries 2\n    option redispatch 1\n" if redispatch else "    retries 0\n"
    return f"""\
# written by the pgmp test harness (tests/support/haproxy.py)
global
    maxconn 2000
    log stdout format raw local0 info
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 1s
    timeout client 2m
    timeout server 2m
    timeout check {checks.timeout_ms}ms
{retry}
frontend postgres
    bind {listen_host}:{listen_port}
    default_backend pgmp

backend pgmp
    balance {balance}
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host pgmp
    http-check expect status 200
    default-server inter {checks.inter_ms}ms fall {checks.fall} rise {checks.rise}
{servers}
"""


MAN_PAGE = REPO_ROOT / "man" / "pgmp-ha.7"
EXAMPLE_MARK = r'.\" tests/unit/test_manpages.py checks'
EXAMPLE_SERVER = re.compile(r"^(\s*)server pgmp(\d) 10\.0\.0\.1\d:6432 check port 9127$", re.M)


def documented_config() -> str:
    """The haproxy.cfg example of pgmp-ha(7), as an operator copies it from the rendered page."""
    text = MAN_PAGE.read_text()
    start = text.index(".nf\n", text.index(EXAMPLE_MARK)) + len(".nf\n")
    roff = text[start:text.index(".fi\n", start)]
    return roff.replace("\\-", "-").replace("\\(dq", '"').replace("\\&", "")


def documented_config_for(nodes: Sequence[Node], listen_port: int, stats_socket: str) -> str:
    """The documented example, pointed at test nodes and a test port, with a runtime API socket for the test."""
    text = documented_config()
    text = text.replace("bind :6432", f"bind 127.0.0.1:{listen_port}", 1)
    text = text.replace("global\n", f"global\n    stats socket {stats_socket} mode 600 level admin\n", 1)
    servers = iter(nodes)

    def server(m: re.Match) -> str:
        n = next(servers)
        return f"{m[1]}server {n.name} {n.host}:{n.port} check port {n.metrics_port}"
    text, count = EXAMPLE_SERVER.subn(server, text)
    assert count == len(nodes), f"the example of {MAN_PAGE.name} has {count} server lines, not {len(nodes)}"
    return text


class HAProxy:
    """One running ``haproxy -db -f FILE`` in front of pgmp nodes.

    The config is render_config()'s, or ``config(nodes, listen_port, stats_socket)``'s text when given.
    """

    def __init__(self, binary: str, workdir: Path, nodes: Sequence[Node], balance: str = "roundrobin",
                 checks: Checks = Checks(), redispatch: bool = True, name: str = "haproxy", config=None):
        self.nodes = list(nodes)
        self.checks = checks
        self.host, self.port = "127.0.0.1", free_port()
        # short, so that the socket path fits in sun_path (108 bytes)
        self.stats_socket = os.path.join(tempfile.mkdtemp(prefix="hap-", dir=os.environ.get(RUN_DIR_ENV)),
                                         "admin.sock")
        self.config_path = workdir / f"{name}.cfg"
        if config is not None:
            text = config(self.nodes, self.port, self.stats_socket)
        else:
            text = render_config(self.nodes, self.port, self.stats_socket, balance=balance, checks=checks,
                                 redispatch=redispatch)
        self.config_path.write_text(text)
        self.log_path = workdir / f"{name}.log"
        check = subprocess.run([binary, "-c", "-q", "-f", str(self.config_path)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses {self.config_path}:\n{check.stdout}{check.stderr}")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([binary, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, cwd=workdir, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        self.pid = self.process.pid

    def __repr__(self) -> str:
        return f"<haproxy pid={self.pid} {self.host}:{self.port}>"

    # connecting
    def dsn(self, user: str = "scram_user", dbname: str = "appdb", **params) -> str:
        """libpq conninfo to the pgmp nodes through HAProxy."""
        base = {"host": self.host, "port": self.port, "user": user, "password": PASSWORDS.get(user),
                "dbname": dbname, "connect_timeout": 10}
        return conninfo(**{**base, **params})

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until HAProxy accepts on its port and its runtime API answers; fail early if it exits."""
        wait_started(lambda: port_accepts(self.host, self.port, timeout=0.2) and os.path.exists(self.stats_socket),
                     self.process, timeout, lambda why: RuntimeError(f"haproxy {why}:\n{self.log()}"))

    # watching
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def redispatched(self) -> int:
        """Connections HAProxy logged as sent to another node after the first one refused them."""
        return len(TCPLOG_RETRIED.findall(self.log()))

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One runtime API command ("show stat", "disable server pgmp/a", ...) and its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stat(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: node name -> its row (status, scur, stot, chkfail, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == "pgmp" and r["svname"] not in ("BACKEND", "FRONTEND")}

    def status(self, node: str) -> str:
        """How HAProxy sees a node now: UP, DOWN, MAINT, "UP 1/2" (going down), "DOWN 1/2" (coming up), ..."""
        return self.stat()[node]["status"]

    def wait_status(self, node: str, status: str, timeout: float = 10.0) -> float:
        """Wait until HAProxy says ``status`` for ``node``; return the seconds waited."""
        started = time.monotonic()
        wait_for(lambda: self.status(node) == status, timeout=timeout, interval=0.01,
                 message=lambda: f"haproxy never said {status} for {node}: {self.stat().get(node)}\n{self.log()}")
        return time.monotonic() - started

    # stopping
    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (HAProxy's hard stop), SIGKILL after ``timeout``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.stats_socket)
        return self.process.returncode


class HAProxyFactory:
    """Starts HAProxy processes for one test and stops them all after it (by pid)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[HAProxy] = []
        self.binary = find_haproxy()

    def start(self, nodes: Sequence[Node], **kwargs) -> HAProxy:
        """Start HAProxy in front of ``nodes`` (see HAProxy for the arguments); return once it accepts."""
        if self.binary is None:
            raise RuntimeError("haproxy is not installed (run scripts/setup-env)")
        proxy = HAProxy(self.binary, self.workdir, nodes, name=f"haproxy{len(self.started)}", **kwargs)
        self.started.append(proxy)
        proxy.wait_ready()
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()
