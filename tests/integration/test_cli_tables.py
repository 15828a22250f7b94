"""`pgmp status`, `pgmp stats` and `pgmp top` as tables, against a real pgmp with real traffic.

The tables must say what `--json` says; `top` must show the transactions of a database
that is busy while it runs; on a terminal (a pty here) it redraws, fits the window,
quits on q or Ctrl-C and gives the terminal back as it found it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import psycopg
import pytest

from pgmp.tables import human_bytes, human_count
from tests.support import wait_for
from tests.support.proxy import pgmp_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TEXT = {"database", "user", "mode", "process", "state", "config"}       # left-aligned columns


def cell(line: str, header: str, title: str) -> str:
    """The cell of ``line`` under the column titled ``title`` (columns are two spaces apart)."""
    m = re.search(rf"(?<!\S){re.escape(title)}(?!\S)", header)
    assert m, f"no column {title!r} in {header!r}"
    if title in TEXT:
        return line[m.start():].split("  ")[0].strip()
    return line[:m.end()].rstrip().split("  ")[-1].strip()


def table(text: str, first_title: str) -> tuple[str, list[str]]:
    """The header starting with ``first_title`` and the lines under it up to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_title])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line)
    return lines[start], rows


def connect(proxy, dbname: str = "appdb") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=dbname), autocommit=True)


def json_of(pgmp, proxy, command: str) -> dict:
    return json.loads(pgmp.cli(command, "--json", "-c", str(proxy.config_path), check=True).stdout)


def pool_totals(report: dict, database: str) -> dict:
    from pgmp import stats
    return stats.merge([p for w in report["workers"] for p in w["pools"] if p["database"] == database])


@contextlib.contextmanager
def traffic(proxy, dbname: str = "appdb", seconds: float = 60.0):
    """Transactions on ``dbname`` from a thread until the block ends (at most ``seconds``)."""
    stop, errors = threading.Event(), []

    def run():
        deadline = time.monotonic() + seconds
        try:
            with connect(proxy, dbname) as conn:
                while not stop.is_set() and time.monotonic() < deadline:
                    with conn.transaction():
                        conn.execute("select 1")
                        conn.execute("select 2")
                    stop.wait(0.002)          # pace it: two cores are shared with pgmp and the other tests
        except (psycopg.Error, OSError) as exc:   # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"traffic-{dbname}", daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive(), "the traffic thread did not stop"
    assert not errors, errors


@pytest.fixture
def busy(pgmp):
    """pgmp with two workers in transaction mode, some traffic on appdb and one query on otherdb."""
    proxy = pgmp.start(workers=2, config={"pool_mode": "transaction"})
    with connect(proxy, "otherdb") as conn:
        conn.execute("select 1")
    with connect(proxy) as conn:
        for i in range(30):
            conn.execute("select repeat('x', %s)", (100 * i,))
    return proxy


# ---------------------------------------------------------------- status

def test_status_table_agrees_with_json(pgmp, busy):
    data = json_of(pgmp, busy, "status")
    r = pgmp.cli("status", "-c", str(busy.config_path))
    assert r.returncode == 0, r.stderr
    assert not ANSI.search(r.stdout), r.stdout
    block, _, rest = r.stdout.partition("\n\n")
    pairs = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in block.splitlines())
    assert pairs["state"] == "running" and pairs["pid"] == str(busy.pid) == str(data["pid"])
    assert pairs["version"] == data["version"] and pairs["generation"] == str(data["generation"])
    assert pairs["config"] == str(busy.config_path) and pairs["workers"] == "2 ready"
    header, rows = table(rest, "slot")
    assert header.split() == ["slot", "pid", "gen", "state", "clients", "servers", "rss", "cpu%", "uptime"]
    by_pid = {int(cell(row, header, "pid")): row for row in rows}
    assert set(by_pid) == {w["pid"] for w in data["workers"]}
    for w in data["workers"]:
        row = by_pid[w["pid"]]
        assert cell(row, header, "slot") == str(w["slot"]) and cell(row, header, "state") == "ready"
        assert re.fullmatch(r"\d+\.\d (kB|MB|GB)", cell(row, header, "rss")), row
        assert re.fullmatch(r"\d+\.\d", cell(row, header, "cpu%")), row


# ---------------------------------------------------------------- stats

def test_stats_table_agrees_with_json(pgmp, busy):
    idle = connect(busy)                       # a logged-in client that holds no server (transaction mode)
    try:
        idle.execute("select 1")
        report = json_of(pgmp, busy, "stats")
        r = pgmp.cli("stats", "-c", str(busy.config_path))
    finally:
        idle.close()
    assert r.returncode == 0, r.stderr
    assert not ANSI.search(r.stdout), r.stdout
    header, rows = table(r.stdout, "database")
    assert [row.split()[0] for row in rows] == ["appdb", "otherdb", "TOTAL"]
    for row in rows[:2]:
        database = row.split()[0]
        want = pool_totals(report, database)
        assert cell(row, header, "user") == "scram_user" and cell(row, header, "mode") == "transaction"
        assert want["xact_count"] > 0
        for title, key in (("xacts", "xact_count"), ("queries", "query_count")):
            assert cell(row, header, title) == human_count(want[key]), (title, row, want)
        for title, key in (("recv", "bytes_in"), ("sent", "bytes_out")):
            assert cell(row, header, title) == human_bytes(want[key]), (title, row, want)
        for title in ("cl_active", "cl_waiting", "cl_idle", "sv_active", "sv_idle"):
            assert cell(row, header, title) == str(want[title]), (title, row, want)
    appdb = pool_totals(report, "appdb")
    assert appdb["query_count"] >= 31 and appdb["cl_idle"] == 1, appdb
    assert float(cell(rows[0], header, "sent").split()[0]) > 0

    pheader, procs = table(r.stdout, "process")
    assert procs[0].split()[:2] == ["master", str(busy.pid)]
    workers = {w["pid"]: w for w in report["workers"]}
    for row in procs[1:]:
        w = workers[int(cell(row, pheader, "pid"))]
        assert row.startswith(f"worker {w['slot']} ")
        assert cell(row, pheader, "clients") == str(w["clients"])
        assert cell(row, pheader, "xacts") == human_count(sum(p["xact_count"] for p in w["pools"]))
    assert len(procs) == 3


def test_stats_json_is_unchanged_in_shape(pgmp, busy):
    report = json_of(pgmp, busy, "stats")
    assert {"master", "workers", "missing"} <= set(report)          # keys are only ever added
    pool = next(p for w in report["workers"] for p in w["pools"])
    # the keys programs read before the tables came, plus the two the tables added
    assert {"database", "user", "mode", "xact_count", "query_count", "cl_active", "sv_idle"} <= set(pool)
    assert pool["maxwait_us"] == 0 and pool["sv_used"] == 0


# ---------------------------------------------------------------- top

def frames_of(text: str) -> list[str]:
    return [f for f in re.split(r"\n\n(?=pgmp )", text.strip()) if f]


def test_top_shows_the_busy_database_first(pgmp, busy):
    before = pool_totals(json_of(pgmp, busy, "stats"), "appdb")["xact_count"]
    with traffic(busy):
        wait_for(lambda: pool_totals(json_of(pgmp, busy, "stats"), "appdb")["xact_count"] > before + 20,
                 timeout=20, message="traffic through pgmp")
        started = time.monotonic()
        r = pgmp.cli("top", "--iterations", "3", "--interval", "0.5", "-c", str(busy.config_path))
        took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert not ANSI.search(r.stdout), r.stdout
    frames = frames_of(r.stdout)
    assert len(frames) == 3, r.stdout
    assert took >= 1.5, took                   # three intervals of 0.5 s
    for frame in frames:
        assert frame.startswith(f"pgmp {json_of(pgmp, busy, 'status')['version']}  pid {busy.pid}  up ")
        header, rows = table(frame, "database")
        assert [row.split()[0] for row in rows] == ["appdb", "otherdb"], frame       # sorted by tps
        assert float(cell(rows[0], header, "tps")) > 0, frame
        assert cell(rows[1], header, "tps") == "0", frame
        assert cell(rows[0], header, "cl_waiting") == "0"
        wheader, workers = table(frame, "worker")
        assert len(workers) == 2 and sum(float(cell(w, wheader, "tps")) for w in workers) > 0, frame


def test_top_once(pgmp, busy):
    r = pgmp.cli("top", "--once", "--interval", "0.2", "-c", str(busy.config_path))
    assert r.returncode == 0, r.stderr
    assert len(frames_of(r.stdout)) == 1, r.stdout


def test_top_when_pgmp_is_not_running(pgmp):
    cfg = pgmp.write_config()
    r = pgmp.cli("top", "--once", "-c", str(cfg.path))
    assert r.returncode == 1, r
    assert "pgmp is not running" in r.stderr and not r.stdout


# ---------------------------------------------------------------- top on a terminal

class Pty:
    """A pseudo-terminal of a given size with `pgmp top` on it; the test holds the master side."""

    def __init__(self, args: list[str], columns: int, lines: int):
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.attrs = termios.tcgetattr(self.slave)
        env = {k: v for k, v in pgmp_env().items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env["TERM"] = "xterm"
        self.proc = subprocess.Popen([sys.executable, "-m", "pgmp", *args], stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, env=env, start_new_session=True)
        self.out = b""

    def read_until(self, pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} on the terminal within {timeout}s:\n{self.text()}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:                 # EIO: the child closed its side
                    break
        return self.text()

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize("how", ["q", "ctrl-c", "kill"])
def test_top_on_a_terminal_redraws_fits_and_restores_it(pgmp, busy, how):
    term = Pty(["top", "--interval", "0.3", "-c", str(busy.config_path)], columns=64, lines=16)
    try:
        with traffic(busy):
            # three frames, each drawn from the top left corner over the one before
            screen = term.read_until(r"(\x1b\[Hpgmp [\s\S]*){3}")
        assert termios.tcgetattr(term.slave)[3] & (termios.ICANON | termios.ECHO) == 0    # cbreak while it runs
        frame = "pgmp " + screen.split("\x1b[Hpgmp ")[-2]                                   # a whole one
        lines = [ANSI.sub("", line) for line in frame.replace("\r", "").split("\n")]
        assert len(lines) <= 16 and max(len(line) for line in lines) <= 64, lines
        assert "\x1b[1mdatabase" in frame                                                 # the header in bold
        assert any(line.startswith("appdb") for line in lines), lines
        if how == "q":
            os.write(term.master, b"q")
        else:
            term.proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
        assert term.proc.wait(10) == 0
        term.read_until(r"\x1b\[\?25h")                                                   # the cursor is back
        assert termios.tcgetattr(term.slave)[3] == term.attrs[3]                          # echo, line mode back
        assert "Traceback" not in term.text()
    finally:
        term.close()

