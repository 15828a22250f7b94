"""The data path through a real pgmp in front of a real PostgreSQL, driven by real clients.

psql, pgbench, psycopg 3 and asyncpg go through pgmp (session mode, one
worker unless a test needs more); rawpg sends what drivers cannot (a
FunctionCall, a socket dropped mid-COPY). Every wait has a deadline.
"""
from __future__ import annotations

import asyncio
import io
import re
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import psutil
import psycopg
import pytest
from psycopg import errors as pgerrors

from tests.integration import rawpg
from tests.support import PASSWORDS, run, wait_for

MB = 1024 * 1024
BIG = 100 * MB
# How much a worker's RSS may grow while 100 MB go through it.
RSS_GROWTH_LIMIT = 60 * MB


# ---- helpers ---------------------------------------------------------------------------

def psql(pg, *args: str, dsn: str, input: str | None = None, timeout: float = 30.0) -> str:
    """psql -X -A -t with ON_ERROR_STOP against ``dsn``; its stdout."""
    cmd = [Path(pg.bin_dir) / "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args, dsn]
    return run(cmd, input=input, timeout=timeout).stdout


def table_name(prefix: str = "t") -> str:
    """A table name no other test (or xdist worker) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def worker_procs(proxy) -> list[psutil.Process]:
    procs = wait_for(lambda: psutil.Process(proxy.pid).children(), timeout=10,
                     message="pgmp has no worker processes")
    return procs


def workers_rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs)


class RssWatch:
    """Samples the RSS of pgmp's workers in a thread; ``growth`` is peak minus the baseline at entry."""

    def __init__(self, proxy, interval: float = 0.01):
        self.procs = worker_procs(proxy)
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, workers_rss(self.procs))
            self._stop.wait(self.interval)

    def __enter__(self):
        self.baseline = self.peak = workers_rss(self.procs)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, workers_rss(self.procs))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def direct(pg, **kw) -> psycopg.Connection:
    """A psycopg connection straight to PostgreSQL (autocommit), bypassing pgmp."""
    return psycopg.connect(pg.dsn(), autocommit=True, **kw)


def backend_active(pg, pid: int, like: str = "pg_sleep") -> bool:
    with direct(pg) as conn:
        row = conn.execute("select state, query from pg_stat_activity where pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "active" and like in row[1]


def backend_gone(pg, pid: int) -> bool:
    with direct(pg) as conn:
        return conn.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()[0] == 0


@pytest.fixture
def proxy(pgmp):
    """A pgmp with the default test config: session mode, one worker, scram-sha-256."""
    return pgmp.start()


# ---- psql ------------------------------------------------------------------------------

def test_psql_simple_and_multi_statement_query(pg, proxy):
    assert psql(pg, "-c", "select 1, current_user", dsn=proxy.dsn()).strip() == "1|scram_user"
    # One Query message with two statements: psql 15 prints every result.
    out = psql(pg, "-c", "select 1 as a; select 2 as b", dsn=proxy.dsn())
    assert out.split() == ["1", "2"]


def test_multi_statement_and_empty_query_frames(proxy):
    """Exactly the frames PostgreSQL sends: two result sets then one ReadyForQuery; EmptyQueryResponse."""
    with rawpg.RawPG.connect(proxy.host, proxy.port) as conn:
        conn.login()
        msgs = conn.query("select 1; select 2")
        assert [m.type for m in msgs] == [b"T", b"D", b"C", b"T", b"D", b"C", b"Z"]
        assert [rawpg.data_row(m.payload) for m in msgs if m.type == b"D"] == [["1"], ["2"]]
        assert [m.type for m in conn.query("")] == [b"I", b"Z"]
        assert [m.type for m in conn.query(";")] == [b"I", b"Z"]
        assert conn.scalar("select 'still here'") == "still here"


def test_psql_empty_query(pg, proxy):
    out = psql(pg, "-f", "-", dsn=proxy.dsn(), input=";\nselect 'after empty';\n")
    assert out.strip() == "after empty"


def test_psql_copy_in_and_out(pg, proxy, tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    rows = [f"{i},name {i},{'é' if i % 2 else 'x'}" for i in range(1000)]
    src.write_text("\n".join(rows) + "\n")
    script = (
        "create temp table t (id int, name text, c text);\n"
        f"\\copy t from '{src}' with (format csv)\n"
        "select count(*), sum(id) from t;\n"
        f"\\copy (select * from t order by id) to '{dst}' with (format csv)\n"
    )
    out = psql(pg, "-f", "-", dsn=proxy.dsn(), input=script)
    assert "1000|499500" in out
    assert dst.read_text().splitlines() == rows


def test_psql_over_unix_socket(pg, proxy):
    out = psql(pg, "-c", "select 'via unix', current_user",
               dsn=proxy.dsn(host=proxy.unix_socket_dir))
    assert out.strip() == "via unix|scram_user"
    assert Path(proxy.unix_socket_dir, f".s.PGSQL.{proxy.port}").is_socket()


# ---- pgbench ---------------------------------------------------------------------------

def test_pgbench_all_query_modes(pg, proxy):
    bench = Path(pg.bin_dir) / "pgbench"
    env = {"PGHOST": proxy.host, "PGPORT": str(proxy.port), "PGUSER": "scram_user",
           "PGPASSWORD": PASSWORDS["scram_user"], "PGDATABASE": "appdb", "PGCONNECT_TIMEOUT": "10"}
    run([bench, "-i", "-q", "-s", "1"], env=env, timeout=120)
    for mode in ("simple", "extended", "prepared"):
        result = run([bench, "-T", "3", "-c", "4", "-j", "2", "-M", mode], env=env, timeout=60)
        out = result.stdout
        assert f"query mode: {mode}" in out, out
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert failed is not None and int(failed[1]) == 0, out + result.stderr
        processed = re.search(r"number of transactions actually processed: (\d+)", out)
        assert processed is not None and int(processed[1]) > 0, out
        tps = re.search(r"tps = ([\d.]+)", out)
        assert tps is not None and float(tps[1]) > 0, out
        assert "error" not in result.stderr.lower(), result.stderr


# ---- psycopg 3 -------------------------------------------------------------------------

def test_psycopg_parameters_extended_protocol(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute("select %s::int + %s::int, %s::text, %s::bytea, %s::int",
                           (40, 2, "héllo", b"\x00\x01\xff", None)).fetchone()
        assert row == (42, "héllo", b"\x00\x01\xff", None)
        # binary results, and the same statement prepared server-side after a few runs
        cur = conn.cursor(binary=True)
        for i in range(8):
            assert cur.execute("select %s::int * 2", (i,), prepare=True).fetchone() == (i * 2,)


def test_psycopg_pipeline_many_executes_one_sync(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline() as pipe:
            curs = [conn.execute("select %s::int * 2, repeat('y', %s)", (i, i)) for i in range(300)]
            pipe.sync()
            more = [conn.execute("select %s::text", (f"v{i}",)) for i in range(50)]
        assert [c.fetchone() for c in curs] == [(i * 2, "y" * i) for i in range(300)]
        assert [c.fetchone()[0] for c in more] == [f"v{i}" for i in range(50)]
        assert conn.execute("select 'after pipeline'").fetchone() == ("after pipeline",)


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_psycopg_copy_in_and_out(proxy, fmt):
    rows = [(i, f"name\t{i}\n" if i % 7 == 0 else f"n{i}", bytes([i % 256]) * (i % 50)) for i in range(2000)]
    rows.append((None, None, None))
    option = " (format binary)" if fmt == "binary" else ""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("create temp table t (id int, name text, data bytea)")
        with cur.copy(f"copy t from stdin{option}") as copy:
            if fmt == "binary":
                copy.set_types(["int4", "text", "bytea"])
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == len(rows)
        assert cur.execute("select count(*), count(id), sum(length(data)) from t").fetchone() == (
            len(rows), len(rows) - 1, sum(len(r[2]) for r in rows[:-1]))
        with cur.copy(f"copy (select * from t order by id nulls last) to stdout{option}") as copy:
            copy.set_types(["int4", "text", "bytea"])
            back = [tuple(r) for r in copy.rows()]
        assert back == rows
        assert conn.execute("select 'after copy'").fetchone() == ("after copy",)


def test_large_row_is_streamed_not_buffered(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select repeat('w', 1000000)").fetchone()       # warm up: server and buffers in place
        with RssWatch(proxy) as rss:
            cur = conn.cursor(binary=True)
            (value,) = cur.execute("select convert_to(repeat('x', %s), 'UTF8')", (BIG,)).fetchone()
        assert len(value) == BIG and value[:3] == b"xxx" and value[-3:] == b"xxx"
        del value
        (text,) = conn.execute(f"select repeat('z', {BIG})").fetchone()
        assert len(text) == BIG
        del text
        assert conn.execute("select 'after big row'").fetchone() == ("after big row",)
    assert rss.growth < RSS_GROWTH_LIMIT, f"pgmp worker RSS grew by {rss.growth / MB:.1f} MB"


def test_large_copy_in_is_streamed_not_buffered(proxy):
    chunk = (b"x" * 1023 + b"\n") * 1024 * 4       # 4 MB of 1 kB lines per CopyData message
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("create temp table big (line text)")
        cur.execute("select 1")
        with RssWatch(proxy) as rss:
            with cur.copy("copy big from stdin") as copy:
                for _ in range(BIG // len(chunk)):
                    copy.write(chunk)
        assert cur.rowcount == BIG // 1024
        assert cur.execute("select count(*), sum(length(line)) from big").fetchone() == (BIG // 1024, BIG // 1024 * 1023)
    assert rss.growth < RSS_GROWTH_LIMIT, f"pgmp worker RSS grew by {rss.growth / MB:.1f} MB"


def test_large_query_message_is_streamed(proxy):
    """A single 20 MB Query message from the client (a frame far bigger than any buffer)."""
    literal = "q" * (20 * MB)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(f"select length('{literal}')").fetchone() == (20 * MB,)
        assert conn.execute("select 'after big query'").fetchone() == ("after big query",)


def test_slow_reader_gets_backpressure(proxy):
    """A client that reads a 100 MB result slowly: pgmp stops reading the server instead of
    queueing what the client has not taken yet. (Checked: with max_unsent = "1GB", that is
    without backpressure, the worker grows by about 85 MB here.)"""
    with rawpg.RawPG.connect(proxy.host, proxy.port) as conn:
        conn.login()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        assert conn.scalar("select 1") == "1"
        with RssWatch(proxy) as rss:
            conn.send(rawpg.query(f"select repeat('s', {BIG})"))
            received, tail = 0, b""
            conn.sock.settimeout(10)
            # everything up to the ReadyForQuery that ends the answer
            while not (received > BIG and tail.endswith(b"Z\x00\x00\x00\x05I")):
                chunk = conn.sock.recv(4096)   # a slow reader: small reads keep pgmp's side full
                assert chunk, "pgmp closed the connection"
                received += len(chunk)
                tail = (tail + chunk)[-64:]
        assert conn.scalar("select 'after slow read'") == "after slow read"
    assert rss.growth < RSS_GROWTH_LIMIT, f"pgmp worker RSS grew by {rss.growth / MB:.1f} MB"


def test_slow_server_during_copy_in_gets_backpressure(proxy):
    """The server stops reading for 2 s (a trigger sleeps on the first row) while the client
    pushes 100 MB of COPY data as fast as it can: pgmp must stop reading the client.
    (Checked: with max_unsent = "1GB" the worker grows by about 95 MB here.)"""
    chunk = (b"y" * 1023 + b"\n") * 1024 * 4
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("create temp table slow (line text)")
        cur.execute("create function pg_temp.slow_first() returns trigger language plpgsql as $$"
                    " begin if not exists (select 1 from slow) then perform pg_sleep(2); end if;"
                    " return new; end $$")
        cur.execute("create trigger slow_first before insert on slow for each row"
                    " execute function pg_temp.slow_first()")
        with RssWatch(proxy) as rss:
            with cur.copy("copy slow from stdin") as copy:
                for _ in range(BIG // len(chunk)):
                    copy.write(chunk)
        assert cur.rowcount == BIG // 1024
    assert rss.growth < RSS_GROWTH_LIMIT, f"pgmp worker RSS grew by {rss.growth / MB:.1f} MB"


def test_listen_notify_delivered_while_idle(pg, proxy):
    channel = table_name("ch")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"listen {channel}")
        with direct(pg) as other:
            other.execute("select pg_notify(%s, 'hello 1')", (channel,))
            other.execute("select pg_notify(%s, 'hello 2')", (channel,))
        got = list(conn.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [(channel, "hello 1"), (channel, "hello 2")]
        assert all(n.pid != conn.info.backend_pid for n in got)   # the notifier's server pid
        assert conn.execute("select 'after notify'").fetchone() == ("after notify",)


def test_notice_response_delivered(proxy):
    notices = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        # a Diagnostic is only readable inside the handler
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        conn.execute("do $$ begin raise notice 'hello %', 42; raise warning 'careful'; end $$")
        assert notices == [("NOTICE", "hello 42"),
                                                                    ("WARNING", "careful")]


def test_parameter_status_change_mid_session(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("set application_name = 'changed mid session'")
        assert conn.info.parameter_status("application_name") == "changed mid session"
        conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        conn.execute("select 1")
        assert conn.info.parameter_status("application_name") == "changed mid session"


def test_error_in_simple_query(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(pgerrors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(pgerrors.UndefinedTable):
            conn.execute("select 1; select * from no_such_table; select 3")
        assert conn.execute("select 'ok'").fetchone() == ("ok",)


def test_error_in_extended_query(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(pgerrors.DivisionByZero):
            conn.execute("select %s::int / 0", (1,))
        with pytest.raises(pgerrors.SyntaxError):
            conn.execute("selec %s", (1,))
        assert conn.execute("select %s::int", (7,)).fetchone() == (7,)


def test_error_inside_transaction_then_rollback(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("create temp table t (x int)")
        with pytest.raises(pgerrors.DivisionByZero):
            conn.execute("insert into t values (1/0)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.execute("rollback")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select to_regclass('pg_temp.t') is null").fetchone() == (True,)


def test_error_inside_pipeline(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("create temp table t (x int)")
        with pytest.raises(pgerrors.DivisionByZero):
            skipped = None                      # psycopg may raise as soon as the error has arrived
            with conn.pipeline():
                first = conn.execute("select 1")
                conn.execute("insert into t values (1)")
                conn.execute("select 1/0")
                skipped = conn.execute("insert into t values (3)")
        assert first.fetchone() == (1,)
        if skipped is not None:
            with pytest.raises(psycopg.Error):
                skipped.fetchone()              # the server skipped it: no result
        # everything up to the one Sync was one implicit transaction, rolled back by the error
        assert conn.execute("select count(*) from t").fetchone() == (0,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select %s::int", (4,)).fetchone() == (4,)
        with conn.pipeline():
            again = [conn.execute("select %s::int", (i,)) for i in range(5)]
        assert [c.fetchone()[0] for c in again] == list(range(5))


def test_error_inside_copy(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("create temp table t (x int)")
        with pytest.raises(pgerrors.InvalidTextRepresentation):
            with cur.copy("copy t from stdin") as copy:
                copy.write(b"1\n2\nnot a number\n")
                copy.write(b"4\n" * 10000)
        assert conn.execute("select count(*) from t").fetchone() == (0,)
        # the client aborting a COPY (CopyFail) is also an error the connection survives
        with pytest.raises(pgerrors.QueryCanceled):
            with cur.copy("copy t from stdin") as copy:
                copy.write(b"1\n")
                raise pgerrors.QueryCanceled("client gave up")   # psycopg sends CopyFail
        assert conn.execute("select 'after copy error'").fetchone() == ("after copy error",)


# ---- asyncpg ---------------------------------------------------------------------------

def test_asyncpg_prepared_copy_listen_transaction(pg, proxy):
    channel = table_name("ach")
    table = table_name("ac")

    async def main():
        conn = await asyncpg.connect(**proxy.asyncpg_kwargs(), timeout=10)
        try:
            stmt = await conn.prepare("select $1::int + $2::int, $3::text")
            assert [tuple(r) for r in await stmt.fetch(1, 2, "a")] == [(3, "a")]
            assert await stmt.fetchval(40, 2, "b") == 42
            # many distinct statements (asyncpg names and caches each one)
            for i in range(60):
                assert await conn.fetchval(f"select $1::int + {i}", i) == 2 * i
            # COPY IN from records, COPY OUT of a query
            await conn.execute(f"create temp table {table} (id int, name text)")
            records = [(i, f"r{i}") for i in range(5000)]
            await conn.copy_records_to_table(table, records=records)
            assert await conn.fetchval(f"select count(*) from {table}") == 5000
            out = io.BytesIO()
            await conn.copy_from_query(f"select id, name from {table} where id < $1 order by id", 3,
                                       output=out, format="csv")
            assert out.getvalue() == b"0,r0\n1,r1\n2,r2\n"
            # LISTEN/NOTIFY
            queue: asyncio.Queue = asyncio.Queue()
            await conn.add_listener(channel, lambda c, pid, ch, payload: queue.put_nowait((ch, payload)))
            other = await asyncpg.connect(host=pg.host, port=pg.port, user="scram_user",
                                          password=PASSWORDS["scram_user"], database="appdb")
            try:
                await other.execute(f"notify {channel}, 'from asyncpg'")
            finally:
                await other.close()
            assert await asyncio.wait_for(queue.get(), 10) == (channel, "from asyncpg")
            # a transaction that commits and one that rolls back
            async with conn.transaction():
                await conn.execute(f"insert into {table} values (-1, 'committed')")
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute(f"insert into {table} values (-2, 'rolled back')")
                    raise ZeroDivisionError
            assert await conn.fetchval(f"select string_agg(name, ',') from {table} where id < 0") == "committed"
            assert await conn.fetchval("show client_encoding") == "UTF8"
        finally:
            await conn.close(timeout=10)

    asyncio.run(main())


# ---- FunctionCall ----------------------------------------------------------------------

def test_function_call_message(proxy):
    with rawpg.RawPG.connect(proxy.host, proxy.port) as conn:
        conn.login()
        oid = int(conn.scalar("select oid from pg_proc where proname = 'int4pl'"))
        conn.send(rawpg.function_call(oid, [struct.pack("!i", 40), struct.pack("!i", 2)]))
        msgs = conn.read_until(b"Z")
        assert [m.type for m in msgs] == [b"V", b"Z"], msgs
        length, value = struct.unpack("!ii", msgs[0].payload)
        assert (length, value) == (4, 42)
        # a NULL argument to a strict function: a NULL result (length -1)
        conn.send(rawpg.function_call(oid, [None, struct.pack("!i", 2)]))
        msgs = conn.read_until(b"Z")
        assert msgs[0].type == b"V" and struct.unpack("!i", msgs[0].payload[:4]) == (-1,)
        assert conn.scalar("select 'after fastpath'") == "after fastpath"


# ---- cancel and keys -------------------------------------------------------------------

def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:       # noqa: BLE001 - handed to the test
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_cancel_request_cancels_the_query(pg, proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        thread, box = _run_in_thread(lambda: conn.execute("select pg_sleep(30)"))
        wait_for(lambda: backend_active(pg, server_pid), timeout=10, message="pg_sleep never started")
        started = time.monotonic()
        conn.cancel()
        thread.join(10)
        assert not thread.is_alive(), "query still running 10 s after the cancel"
        assert time.monotonic() - started < 5
        assert isinstance(box.get("error"), pgerrors.QueryCanceled), box
        assert box["error"].sqlstate == "57014"
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)


def test_cancel_request_with_wrong_key_is_ignored(pg, proxy):
    with rawpg.RawPG.connect(proxy.host, proxy.port) as conn:
        conn.login()
        server_pid = int(conn.scalar("select pg_backend_pid()"))
        key_pid, key_secret = conn.key
        conn.send(rawpg.query("select pg_sleep(30)"))
        wait_for(lambda: backend_active(pg, server_pid), timeout=10, message="pg_sleep never started")
        assert key_pid == server_pid            # session mode: the real pid, pgmp's own secret
        wrong = [(key_pid, key_secret ^ 1), (key_pid + 1, key_secret), (key_pid, 0)]
        for pid, secret in wrong:
            with rawpg.RawPG.connect(proxy.host, proxy.port) as canceller:
                canceller.send(rawpg.cancel_request(pid, secret))
                assert canceller.wait_closed(5), "pgmp kept a cancel connection open"
        # A cancel reaches the server within milliseconds; give a wrong one a generous second.
        with pytest.raises(TimeoutError):
            wait_for(lambda: not backend_active(pg, server_pid), timeout=1.0)
        # the right key still works
        started = time.monotonic()
        with rawpg.RawPG.connect(proxy.host, proxy.port) as canceller:
            canceller.send(rawpg.cancel_request(key_pid, key_secret))
            canceller.wait_closed(5)
        err = conn.expect_error(timeout=5)
        assert err["C"] == "57014", err
        assert time.monotonic() - started < 5
        conn.read_until(b"Z")
        assert conn.scalar("select 'after cancel'") == "after cancel"


def _worker_of(proxy, conn) -> int:
    """The pid of the pgmp worker holding ``conn``: the one whose socket is its server's client end."""
    port = conn.execute("select client_port from pg_stat_activity where pid = pg_backend_pid()").fetchone()[0]
    for child in psutil.Process(proxy.pid).children():
        if any(c.laddr and c.laddr.port == port for c in child.net_connections(kind="tcp")):
            return child.pid
    raise AssertionError(f"no pgmp worker has the server connection from port {port}")


def test_cancel_reaches_sessions_of_every_worker(pg, pgmp):
    """With two workers a CancelRequest often lands on the worker that does not own the
    session (SO_REUSEPORT spreads connections), which must forward it through the master."""
    proxy = pgmp.start(workers=2)
    by_slot: dict[int, psycopg.Connection] = {}
    extra = []
    try:
        for _ in range(40):
            conn = psycopg.connect(proxy.dsn(), autocommit=True)
            slot = _worker_of(proxy, conn)
            if slot in by_slot:
                extra.append(conn)
            else:
                by_slot[slot] = conn
            if len(by_slot) == 2:
                break
        assert len(by_slot) == 2, "all sessions landed on one worker"
        for _ in range(4):
            for slot, conn in by_slot.items():
                server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                thread, box = _run_in_thread(lambda conn=conn: conn.execute("select pg_sleep(30)"))
                wait_for(lambda: backend_active(pg, server_pid), timeout=10, message="pg_sleep never started")
                conn.cancel()
                thread.join(8)
                assert not thread.is_alive(), f"cancel of a worker {slot} session never arrived"
                assert isinstance(box.get("error"), pgerrors.QueryCanceled), box
    finally:
        for conn in [*by_slot.values(), *extra]:
            conn.close()


def test_backend_key_carries_the_server_pid_in_session_mode(pg, proxy):
    """Session mode is a direct connection: BackendKeyData names the real backend (its secret is
    pgmp's own, so cancels still go through pgmp: see the cancel tests)."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert conn.info.backend_pid == server_pid
    with rawpg.RawPG.connect(proxy.host, proxy.port) as raw:
        raw.login()
        assert raw.key is not None and raw.key[0] == int(raw.scalar("select pg_backend_pid()"))


# ---- login parameters and settings -----------------------------------------------------

REPORTED_AT_LOGIN = ("server_version", "client_encoding", "DateStyle", "TimeZone", "integer_datetimes",
                     "standard_conforming_strings")


def test_parameter_status_at_login(pg, proxy):
    with direct(pg) as d:
        expected = {name: d.info.parameter_status(name) for name in REPORTED_AT_LOGIN}
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        got = {name: conn.info.parameter_status(name) for name in REPORTED_AT_LOGIN}
    assert got == expected
    assert got["integer_datetimes"] == "on" and got["standard_conforming_strings"] == "on"


def test_client_encoding_requested_by_client_is_honoured(proxy):
    with psycopg.connect(proxy.dsn(client_encoding="LATIN1"), autocommit=True) as conn:
        assert conn.info.parameter_status("client_encoding") == "LATIN1"
        assert conn.execute("show client_encoding").fetchone() == ("LATIN1",)
        # 'é' travels as one LATIN1 byte; a server still in UTF8 would reject the query
        assert conn.execute("select 'é', length('é'), octet_length(convert_to('é', 'UTF8'))").fetchone() == ("é", 1, 2)


@pytest.mark.parametrize("alias", ["iso-8859-15", "koi8", "win", "iso8859-5", "unicode", "latin-1", "utf-8"])
def test_client_encoding_alias_reported_like_postgres(pg, proxy, alias):
    """PostgreSQL reports the canonical name of the encoding a client asked for by an alias."""
    with psycopg.connect(pg.dsn(client_encoding=alias), autocommit=True) as d:
        want = d.info.parameter_status("client_encoding")
    with psycopg.connect(proxy.dsn(client_encoding=alias), autocommit=True) as conn:
        at_login = conn.info.parameter_status("client_encoding")
        assert conn.execute("show client_encoding").fetchone() == (want,)
    assert at_login == want, f"pgmp reported client_encoding {at_login!r} at login, PostgreSQL {want!r}"


def test_client_encoding_differs_between_two_clients_of_one_server(pgmp):
    proxy = pgmp.start(config={"default_pool_size": 1})
    with psycopg.connect(proxy.dsn(client_encoding="LATIN1"), autocommit=True) as conn:
        assert conn.execute("show client_encoding").fetchone() == ("LATIN1",)
        first = conn.execute("select pg_backend_pid()").fetchone()[0]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == first
        assert conn.execute("show client_encoding").fetchone() == ("UTF8",)
        assert conn.execute("select 'ü'").fetchone() == ("ü",)


def test_startup_options_and_application_name_applied(pg, proxy):
    options = "-c search_path=foo,public -c statement_timeout=12345"
    with psycopg.connect(pg.dsn(options=options, application_name="x"), autocommit=True) as d:
        want = d.execute("select current_setting('search_path'), current_schemas(false)::text").fetchone()
    with psycopg.connect(proxy.dsn(options=options, application_name="x"), autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == "x"
        assert conn.execute("show application_name").fetchone() == ("x",)
        assert conn.execute("show statement_timeout").fetchone() == ("12345ms",)
        got = conn.execute("select current_setting('search_path'), current_schemas(false)::text").fetchone()
        assert got == want, f"search_path through pgmp {got!r}, directly {want!r}"


def test_startup_setting_values_with_quotes_and_backslashes(pg, proxy):
    name = "it's a \\ test"
    with psycopg.connect(proxy.dsn(application_name=name, options=r"-c lock_timeout=1234"), autocommit=True) as conn:
        assert conn.execute("show application_name").fetchone() == (name,)
        assert conn.execute("show lock_timeout").fetchone() == ("1234ms",)
        assert conn.info.parameter_status("application_name") == name


def test_invalid_startup_setting_never_lets_a_query_run_without_the_others(pg, proxy):
    """PostgreSQL refuses a login whose startup options contain an invalid value, so no query
    ever runs without the other settings the client asked for (here: read-only). pgmp may
    refuse at login or at the first query, but the query must not run."""
    table = table_name("ro")
    options = "-c default_transaction_read_only=on -c work_mem=bogus"
    with direct(pg) as d:
        d.execute(f"create table {table} (x int)")
        d.execute(f"grant all on {table} to scram_user")
        with pytest.raises(psycopg.OperationalError, match="work_mem"):
            psycopg.connect(pg.dsn(options=options))
        try:
            with pytest.raises(psycopg.Error, match="work_mem|bogus"):
                with psycopg.connect(proxy.dsn(options=options), autocommit=True) as conn:
                    conn.execute(f"insert into {table} values (1)")
            assert d.execute(f"select count(*) from {table}").fetchone() == (0,), (
                "the insert ran on a server without the client's default_transaction_read_only")
        finally:
            d.execute(f"drop table {table}")


# ---- authentication through pgmp -------------------------------------------------------

SERVER_METHOD = {"scram_user": "scram-sha-256", "md5_user": "md5", "plain_user": "password"}


def _secrets(pg, kind: str) -> dict[str, str]:
    from pgmp.auth.authfile import md5_secret
    if kind == "plain":
        return dict(PASSWORDS)
    if kind == "md5":
        return {u: md5_secret(p.encode(), u.encode()) for u, p in PASSWORDS.items()}
    return {u: pg.secrets[u] for u in PASSWORDS}       # as stored by PostgreSQL


def _expected(auth_type: str, secret: str, user: str) -> str:
    """"ok", "client" (pgmp refuses the client: 28P01) or "server" (pgmp cannot log in to the server)."""
    kind = ("scram" if secret.startswith("SCRAM-SHA-256$")
            else "md5" if re.fullmatch(r"md5[0-9a-f]{32}", secret) else "plain")
    if auth_type == "scram-sha-256" and kind == "md5":
        return "client"
    client_ran_scram = auth_type == "scram-sha-256" or (auth_type == "md5" and kind == "scram")
    server = SERVER_METHOD[user]
    if kind == "plain" or auth_type == "password":      # pgmp knows the cleartext password
        return "ok"
    if kind == "md5":
        return "ok" if server == "md5" else "server"
    return "ok" if server == "scram-sha-256" and client_ran_scram else "server"


@pytest.mark.parametrize("secrets_from", ["plain", "md5", "pg"])
@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5", "password", "trust"])
def test_auth_methods_and_secret_kinds(pg, pgmp, auth_type, secrets_from):
    secrets = _secrets(pg, secrets_from)
    proxy = pgmp.start(auth_type=auth_type, users=secrets)
    for user in PASSWORDS:
        expect = _expected(auth_type, secrets[user], user)
        if expect == "ok":
            with psycopg.connect(proxy.dsn(user), autocommit=True) as conn:
                assert conn.execute("select current_user, current_database()").fetchone() == (user, "appdb")
            continue
        with rawpg.RawPG.connect(proxy.host, proxy.port) as raw:
            with pytest.raises(rawpg.ServerError) as info:
                raw.login(user, PASSWORDS[user])
            fields = info.value.fields
            assert fields["S"] == "FATAL"
            if expect == "client":
                assert fields["C"] == "28P01", fields
                assert fields["M"] == f'password authentication failed for user "{user}"'
            else:
                assert fields["C"] in ("28000", "28P01", "08006"), fields
            assert raw.wait_closed(5)
    # wrong passwords are refused whatever the method, except trust
    if auth_type != "trust":
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(proxy.dsn("plain_user", password="wrong"))
    assert proxy.alive


def test_scram_secret_from_postgres_logs_into_the_server_without_plaintext(pg, pgmp):
    proxy = pgmp.start(users={"scram_user": pg.secrets["scram_user"]})
    users_file = proxy.config_path.with_suffix(".users").read_text()
    for text in (proxy.config.text, users_file):
        assert PASSWORDS["scram_user"] not in text
    assert "SCRAM-SHA-256$" in users_file
    pids = set()
    for _ in range(2):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute("select current_user").fetchone() == ("scram_user",)
            pids.add(conn.execute("select pg_backend_pid()").fetchone()[0])
    # a fresh server login after the pooled one is gone also works from the recovered key
    with direct(pg) as d:
        for pid in pids:
            d.execute("select pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: all(backend_gone(pg, pid) for pid in pids), timeout=10)
    def fresh_login():
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                return conn.execute("select current_user, pg_backend_pid()").fetchone()
        except psycopg.OperationalError:
            return None       # the first try may get the killed pooled server
    user, pid = wait_for(fresh_login, timeout=10)
    assert user == "scram_user" and pid not in pids


# ---- server reuse and dirty servers ----------------------------------------------------

def test_server_reused_across_sessions_after_discard_all(pgmp):
    proxy = pgmp.start(config={"default_pool_size": 1})
    startup = {"options": "-c statement_timeout=12345", "application_name": "first"}
    with psycopg.connect(proxy.dsn(**startup), autocommit=True) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()[0]
        conn.execute("create temp table leftover (x int)")
        conn.execute("set work_mem = '7MB'")
        conn.execute("prepare leftover_stmt as select 1")
        conn.execute("listen leftover_channel")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == first
        assert conn.execute("select to_regclass('pg_temp.leftover') is null").fetchone() == (True,)
        assert conn.execute("show work_mem").fetchone() == ("4MB",)
        assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
        assert conn.execute("select count(*) from pg_listening_channels()").fetchone() == (0,)
        # the first client's startup settings went with it
        assert conn.execute("show statement_timeout").fetchone() == ("0",)
        assert conn.execute("show application_name").fetchone() == ("",)
        assert conn.info.parameter_status("application_name") == ""
    # and a client asking for them again gets them again on the same server
    with psycopg.connect(proxy.dsn(**startup), autocommit=True) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == first
        assert conn.execute("show statement_timeout").fetchone() == ("12345ms",)
        assert conn.execute("show application_name").fetchone() == ("first",)


def _assert_next_client_clean(proxy, old_pid: int, must_differ: bool):
    started = time.monotonic()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pid, no_temp, no_xact, no_txid = conn.execute(
            "select pg_backend_pid(), to_regclass('pg_temp.dirty') is null, "
            "now() = statement_timestamp(), txid_current_if_assigned() is null").fetchone()
        assert conn.execute("select 'next'").fetchone() == ("next",)
    assert time.monotonic() - started < 4, "the next client waited for the old client's query"
    assert no_temp, "the next client sees the previous client's temp table"
    assert no_xact and no_txid, "the next client is inside the previous client's transaction"
    if must_differ:
        assert pid != old_pid, "a server left busy or in a transaction was reused"
    return pid


def _raw_session(proxy) -> tuple[rawpg.RawPG, int]:
    conn = rawpg.RawPG.connect(proxy.host, proxy.port)
    conn.login()
    return conn, int(conn.scalar("select pg_backend_pid()"))


def test_client_disconnects_mid_query(pg, pgmp):
    proxy = pgmp.start(config={"default_pool_size": 1})
    conn, old = _raw_session(proxy)
    conn.send(rawpg.query("create temp table dirty (x int); select pg_sleep(5)"))
    wait_for(lambda: backend_active(pg, old), timeout=10, message="pg_sleep never started")
    conn.close()
    _assert_next_client_clean(proxy, old, must_differ=True)


def test_client_disconnects_mid_copy(pg, pgmp):
    proxy = pgmp.start(config={"default_pool_size": 1})
    conn, old = _raw_session(proxy)
    conn.query("create temp table dirty (x int)")
    conn.send(rawpg.query("copy dirty from stdin"))
    assert [m.type for m in conn.read_until(b"G")] == [b"G"]
    conn.send(b"d" + struct.pack("!I", 4 + 4) + b"1\n2\n")
    conn.close()
    _assert_next_client_clean(proxy, old, must_differ=True)


def test_client_disconnects_inside_transaction(pg, pgmp):
    proxy = pgmp.start(config={"default_pool_size": 1})
    conn, old = _raw_session(proxy)
    msgs = conn.query("begin; create temp table dirty (x int); insert into dirty values (1)")
    assert msgs[-1].payload == b"T"
    conn.close()
    _assert_next_client_clean(proxy, old, must_differ=True)


def test_client_disconnects_abruptly_while_idle_server_is_reused(pg, pgmp):
    proxy = pgmp.start(config={"default_pool_size": 1})
    conn, old = _raw_session(proxy)
    conn.query("create temp table dirty (x int)")
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()                                     # RST, no Terminate
    assert _assert_next_client_clean(proxy, old, must_differ=False) == old


# ---- pipelined login, dead servers --------------------------------------------------------

@pytest.mark.parametrize("pool", ["cold", "warm"])
def test_query_pipelined_behind_the_startup_packet(pgmp, pool):
    """With trust, a client may send its first Query right behind the StartupMessage, before
    any answer (PostgreSQL reads it after ReadyForQuery): pgmp must keep it, not drop it."""
    proxy = pgmp.start(auth_type="trust")
    if pool == "warm":
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("select 1")
    with rawpg.RawPG.connect(proxy.host, proxy.port) as conn:
        conn.send(rawpg.startup_packet({"user": "scram_user", "database": "appdb"})
                  + rawpg.query("select 'pipelined'") + rawpg.query("select 'and again'"))
        conn.authenticate("scram_user", None)
        first = conn.read_until(b"Z")
        assert [rawpg.data_row(m.payload) for m in first if m.type == b"D"] == [["pipelined"]]
        second = conn.read_until(b"Z")
        assert [rawpg.data_row(m.payload) for m in second if m.type == b"D"] == [["and again"]]


def test_server_terminated_under_an_idle_client(pg, pgmp):
    """pg_terminate_backend on the server of an idle session: the client learns it at its next
    query (the server's own FATAL 57P01 or pgmp's 08006), and the next client gets a live server."""
    proxy = pgmp.start(config={"default_pool_size": 1})
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        with direct(pg) as d:
            assert d.execute("select pg_terminate_backend(%s)", (server_pid,)).fetchone() == (True,)
        wait_for(lambda: backend_gone(pg, server_pid), timeout=10)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert info.value.sqlstate in (None, "57P01", "08006"), info.value
    finally:
        conn.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as fresh:
        pid = fresh.execute("select pg_backend_pid()").fetchone()[0]
        assert pid != server_pid
        assert fresh.execute("select 'alive'").fetchone() == ("alive",)


# ---- the extended protocol as libpq speaks it ------------------------------------------

@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_extended_protocol_copy_in_as_libpq_sends_it(pg, pgmp, pool_mode):
    """PQexecParams("COPY ... FROM STDIN"): Parse/Bind/Describe/Execute/Sync, then CopyData,
    CopyDone and a second Sync. The server ignores the first Sync (it arrives in COPY IN mode)
    and answers only the second: one ReadyForQuery for two Syncs. The session is clean after
    it, so pgmp must reuse the server for the next client."""
    proxy = pgmp.start(config={"default_pool_size": 1, "pool_mode": pool_mode})
    conn, old = _raw_session(proxy)
    with conn:
        conn.query("create table ext_copy_" + pool_mode + " (x int)")
        conn.send(rawpg.parse(f"copy ext_copy_{pool_mode} from stdin") + rawpg.bind() + rawpg.describe_portal()
                  + rawpg.execute() + rawpg.sync())
        assert [m.type for m in conn.read_until(b"G")] == [b"1", b"2", b"n", b"G"]
        conn.send(rawpg.copy_data(b"1\n2\n3\n") + rawpg.copy_done() + rawpg.sync())
        msgs = conn.read_until(b"Z")
        assert [m.type for m in msgs] == [b"C", b"Z"] and msgs[-1].payload == b"I"
        assert conn.scalar(f"select sum(x) from ext_copy_{pool_mode}") == "6"
        conn.query(f"drop table ext_copy_{pool_mode}")
        conn.send(rawpg.terminate())
        assert conn.wait_closed(5)
    # a clean session (idle, no transaction): its server is reset and reused, not closed
    with psycopg.connect(proxy.dsn(), autocommit=True) as nxt:
        assert nxt.execute("select pg_backend_pid()").fetchone()[0] == old, (
            "the server of a clean session was closed instead of reused:\n" + proxy.log())


def test_extended_protocol_describe_and_flush_without_sync(proxy):
    """Parse/Describe/Flush gets answers before any Sync; the session goes on normally."""
    with rawpg.RawPG.connect(proxy.host, proxy.port) as conn:
        conn.login()
        conn.send(rawpg.parse("select $1::int * 2", name="s1") + rawpg.flush())
        assert conn.read_message().type == b"1"
        conn.send(rawpg.bind(("21",), statement="s1") + rawpg.execute() + rawpg.sync())
        msgs = conn.read_until(b"Z")
        assert [m.type for m in msgs] == [b"2", b"D", b"C", b"Z"]
        assert rawpg.data_row(msgs[1].payload) == ["42"]
