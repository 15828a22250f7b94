"""Waiting on conditions with a deadline, free ports and subprocesses for the test suite."""
from __future__ import annotations

import fcntl
import os
import random
import socket
import subprocess
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

# Ports handed out by free_port() come from below the kernel's ephemeral range
# (32768-60999 on Linux), so an outgoing connection cannot take one between
# free_port() and the bind, and never from the well-known PostgreSQL ports, where
# a system postgres or the Debian pgbouncer service may listen.
PORT_RANGE = (20000, 32000)
RESERVED_PORTS = frozenset({5432, 5433, 6432, 6433})
# The run directory shared by every process of one test run (see shared.py).
RUN_DIR_ENV = "PGMP_TEST_RUN_DIR"


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Call `predicate` until it returns something truthy and return that value.

    Raises TimeoutError after `timeout` seconds; `message` (a string, or a
    callable called only then, e.g. to attach a log) says what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:g}s: {text or predicate!r}")
        time.sleep(interval)


def wait_started(ready: Callable[[], object], process: subprocess.Popen, timeout: float,
                 fail: Callable[[str], Exception]) -> None:
    """Wait until ``ready()`` for at most ``timeout`` seconds; raise ``fail(why)`` if ``process``
    exits first or the time runs out."""
    def check():
        if ready():
            return True
        if process.poll() is not None:
            raise fail(f"exited with {process.returncode} before it was ready")
        return False
    try:
        wait_for(check, timeout=timeout)
    except TimeoutError:
        raise fail(f"not ready after {timeout:g}s") from None


def sent(sock: socket.socket, timeout: float = 5.0) -> None:
    """Wait until what was written to ``sock`` has left it (its kernel send queue is empty), so
    that the next write reaches the peer as a separate segment: pacing by a condition."""
    import termios
    buf = bytearray(4)

    def empty() -> bool:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        return int.from_bytes(buf, "little") == 0
    wait_for(empty, timeout=timeout, interval=0.001)


def holds(check: Callable[[], object], seconds: float, interval: float = 0.1) -> None:
    """Call ``check`` again and again for ``seconds``: a condition that must stay true over a
    window, not one waited for. The window is the point, so it has no early exit. ``check``
    asserts, or returns a value that must be true (None counts as passing: an asserting check)."""
    deadline = time.monotonic() + seconds

    def sampled() -> bool:                     # wait_for's polling, until the window is over
        result = check()
        if result is not None and not result:
            raise AssertionError(f"no longer holds: {check!r} returned {result!r}")
        return time.monotonic() >= deadline
    wait_for(sampled, timeout=seconds + 60, interval=interval,
             message=f"{check!r} took over a minute to answer")


def kill_trees(pids) -> list[int]:
    """SIGKILL each pid and its descendants (those alive now); the pids signalled."""
    every: list[int] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            family = [pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        every += [p for p in family if p not in every]
    for pid in every:
        try:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return every


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: the signal is asynchronous, so without the wait
    a process in epoll_wait can still take an event that arrives just after the kill."""
    os.kill(pid, signal.SIGSTOP)
    proc = psutil.Process(pid)
    wait_for(lambda: proc.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP), timeout=timeout,
             message=f"process {pid} did not stop")


def process_alive(pid: int) -> bool:
    """True if pid runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _bindable(port: int) -> bool:
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((addr, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (97, 99):  # no IPv6 here
                continue
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 and ::1, not handed out before in this test run.

    Ports are recorded in the run directory (shared by all xdist workers) under
    a lock, so two workers never get the same port.
    """
    run_dir = os.environ.get(RUN_DIR_ENV)
    registry = Path(run_dir) / "ports" if run_dir and Path(run_dir).is_dir() else None
    if registry is None:
        return _pick_port(set())
    with open(registry, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        taken = {int(line) for line in f.read().split()}
        port = _pick_port(taken)
        f.write(f"{port}\n")
        return port


def _pick_port(taken: set[int]) -> int:
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        if port not in taken and port not in RESERVED_PORTS and _bindable(port):
            return port
    raise RuntimeError(f"no free TCP port found in {PORT_RANGE}")


def run(
    cmd: Sequence[str | os.PathLike],
    timeout: float = 60.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: str | os.PathLike | None = None,
    **kwargs,
) -> subprocess.CompletedProcess[str]:
    """Run a command (psql, pgbench, ...) to completion with a deadline; capture text output.

    `env` is added to the current environment. With check=True a non-zero exit
    raises CommandFailed carrying the command's stdout and stderr. On timeout
    the command is killed and subprocess.TimeoutExpired is raised.
    """
    full_env = {**os.environ, **env} if env else None
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
        env=full_env, input=input, cwd=cwd, **kwargs,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result)
    return result


class CommandFailed(subprocess.CalledProcessError):
    """A command run by run() exited non-zero; the message includes its output."""

    def __init__(self, result: subprocess.CompletedProcess[str]):
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)

    def __str__(self) -> str:
        return (f"{' '.join(map(str, self.cmd))} exited with {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}")
