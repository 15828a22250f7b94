"""Transaction and statement pooling through a real pgmp in front of a real PostgreSQL.

Every test runs on its own role and database (made once per module and xdist
worker), so that the server connections PostgreSQL shows for that role are
exactly the ones pgmp opened. Every wait has a deadline.
"""
from __future__ import annotations

import asyncio
import os
import re
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg.pq import TransactionStatus

from pgmp.protocol.messages import frame
from tests.integration import rawpg
from tests.integration.test_lifecycle import client_bytes_queued
from tests.support import PASSWORDS, holds, run, wait_for

# ---- the module's role and database ------------------------------------------------------


@dataclass
class PoolDB:
    user: str
    password: str
    name: str


@pytest.fixture(scope="module")
def pooldb(pg):
    """A role and a database of its own, with a table t(x int, who text) and two schemas."""
    suffix = uuid.uuid4().hex[:10]
    db = PoolDB(f"pool_{suffix}", f"pw_{suffix}", f"pooldb_{suffix}")
    pg.psql(f"CREATE ROLE {db.user} LOGIN PASSWORD '{db.password}';\n"
            f"CREATE DATABASE {db.name} OWNER {db.user};\n")
    pg.psql("CREATE SCHEMA schema_a; CREATE SCHEMA schema_c;", user=db.user, db=db.name)
    yield db
    pg.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE);\nDROP ROLE IF EXISTS {db.user};\n")


@pytest.fixture(scope="module")
def bench(pg, pooldb):
    """The pgbench tables (scale 1) in the module's database, made directly on PostgreSQL."""
    run([Path(pg.bin_dir) / "pgbench", "-i", "-q", "-s", "1"], env=direct_env(pg, pooldb), timeout=120)
    return pooldb


@pytest.fixture
def table(pg, pooldb):
    """A fresh table (x int, who text) in the module's database; its name."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE TABLE {name} (x int, who text)", user=pooldb.user, db=pooldb.name)
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}", user=pooldb.user, db=pooldb.name)


@pytest.fixture(scope="module")
def other_role(pg, pooldb):
    """A NOLOGIN role granted to the module's role (so that it may SET ROLE to it)."""
    name = f"{pooldb.user}_as"
    pg.psql(f"CREATE ROLE {name} NOLOGIN;\nGRANT {name} TO {pooldb.user};\n")
    yield name
    pg.psql(f"DROP ROLE IF EXISTS {name};\n")


def direct_env(pg, db: PoolDB) -> dict[str, str]:
    return {"PGHOST": pg.host, "PGPORT": str(pg.port), "PGUSER": db.user, "PGPASSWORD": db.password,
            "PGDATABASE": db.name, "PGCONNECT_TIMEOUT": "10"}


def start(pgmp, db: PoolDB, size: int, mode: str = "transaction", **config):
    """A pgmp pooling the module's database: one worker, ``size`` servers, ``mode`` pooling."""
    return pgmp.start(config={"pool_mode": mode, "default_pool_size": size, **config},
                      databases={db.name: {}}, users={**PASSWORDS, db.user: db.password})


def dsn(proxy, db: PoolDB, **params) -> str:
    return proxy.dsn(user=db.user, password=db.password, dbname=db.name, **params)


def server_count(pg, db: PoolDB) -> int:
    """Server connections PostgreSQL has for the module's role (pgmp's, in these tests)."""
    return int(pg.psql(f"select count(*) from pg_stat_activity where usename = '{db.user}'"))


def no_servers_left(pg, db: PoolDB) -> None:
    """Backends of an earlier test's pgmp may take a moment to exit."""
    wait_for(lambda: server_count(pg, db) == 0, timeout=10,
             message="backends of the module's role are still there from an earlier test")


def direct(pg, db: PoolDB, **kw) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(user=db.user, password=db.password, dbname=db.name), autocommit=True, **kw)


class Threads:
    """Run functions in threads; join them with a deadline; collect their exceptions."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.errors: list[tuple[str, BaseException]] = []
        self.lock = threading.Lock()

    def start(self, name: str, fn, *args) -> None:
        def target():
            try:
                fn(*args)
            except BaseException as exc:       # noqa: BLE001 - reported by join()
                with self.lock:
                    self.errors.append((name, exc))
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"threads still running after {timeout:g}s: {alive}; errors so far: {self.errors}"
        assert not self.errors, self.errors


# ---- raw extended-protocol messages -----------------------------------------------------------

def parse_msg(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", len(types))
    return frame(b"P", body + b"".join(struct.pack("!I", t) for t in types))


def bind_msg(stmt: str, params: tuple[str, ...] = (), portal: str = "") -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!hh", 0, len(params))
    for p in params:
        body += struct.pack("!i", len(p.encode())) + p.encode()
    return frame(b"B", body + struct.pack("!h", 0))


def describe_msg(what: str, name: str = "") -> bytes:
    return frame(b"D", what.encode() + name.encode() + b"\0")


def close_msg(what: str, name: str) -> bytes:
    return frame(b"C", what.encode() + name.encode() + b"\0")


def execute_msg(portal: str = "") -> bytes:
    return frame(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


SYNC = frame(b"S")


def types_of(msgs: list[rawpg.Message]) -> str:
    return "".join(m.type.decode() for m in msgs)


def rows_of(msgs: list[rawpg.Message]) -> list[list[str | None]]:
    return [rawpg.data_row(m.payload) for m in msgs if m.type == b"D"]


def errors_of(msgs: list[rawpg.Message]) -> list[str]:
    return [f"{m.fields.get('C')} {m.fields.get('M')}" for m in msgs if m.type == b"E"]


def raw_login(host: str, port: int, db: PoolDB) -> rawpg.RawPG:
    conn = rawpg.RawPG.connect(host, port)
    conn.login(user=db.user, password_text=db.password, database=db.name)
    return conn


def exchange(conn: rawpg.RawPG, *msgs: bytes) -> list[rawpg.Message]:
    """Send the messages in one write; the answers up to the ReadyForQuery of the last Sync."""
    conn.send(b"".join(msgs))
    syncs = sum(1 for m in msgs if m[:1] in (b"S", b"Q"))
    out: list[rawpg.Message] = []
    for _ in range(syncs):
        out += conn.read_until(b"Z")
    return out


# ---- pgbench -------------------------------------------------------------------------------------

def pgbench(pg, proxy, db: PoolDB, *args: str, max_servers: int, timeout: float = 60.0) -> str:
    """Run pgbench through pgmp, sampling the role's server connections meanwhile; its stdout.

    Asserts no failed transaction and at most ``max_servers`` server connections at every sample.
    """
    env = {**direct_env(pg, db), "PGHOST": proxy.host, "PGPORT": str(proxy.port)}
    proc = subprocess.Popen([str(Path(pg.bin_dir) / "pgbench"), *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            samples.append(server_count(pg, db))
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"pgbench exited with {proc.returncode}\n{out}\n{err}\n{proxy.log()[-3000:]}"
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is not None and int(failed[1]) == 0, out + err
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed is not None and int(processed[1]) > 0, out
    assert len(samples) >= 3, samples
    assert max(samples) <= max_servers, f"server connections sampled: {samples}"
    assert max(samples) > 0, samples
    return out


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only_16_clients_on_4_servers(pg, pgmp, bench, mode):
    no_servers_left(pg, bench)
    proxy = start(pgmp, bench, size=4)
    out = pgbench(pg, proxy, bench, "-S", "-M", mode, "-c", "16", "-j", "2", "-T", "3", max_servers=4)
    assert f"query mode: {mode}" in out


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_tpcb_16_clients_on_4_servers(pg, pgmp, bench, mode):
    no_servers_left(pg, bench)
    proxy = start(pgmp, bench, size=4)
    pgbench(pg, proxy, bench, "-M", mode, "-c", "16", "-j", "2", "-T", "3", max_servers=4)


def test_pgbench_tpcb_prepared_with_a_pool_as_large_as_the_clients(pg, pgmp, bench):
    # -M prepared with the multi-statement TPC-B script needs pool >= clients of one pgbench
    # thread (pgbench prepares with a blocking call; see pgmp(1)): not tested with fewer servers.
    no_servers_left(pg, bench)
    proxy = start(pgmp, bench, size=4)
    pgbench(pg, proxy, bench, "-M", "prepared", "-c", "4", "-j", "2", "-T", "3", max_servers=4)


# ---- prepared statements with real drivers -----------------------------------------------------

def test_psycopg_prepared_on_every_execute_across_transactions_on_one_server(pg, pgmp, pooldb):
    """prepare_threshold=0: every statement is a named Parse; 4 clients interleave on 1 server that
    keeps only 3 statements, so statements are evicted and prepared again all the time."""
    proxy = start(pgmp, pooldb, size=1, max_prepared_statements=3)

    def client(n: int) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True, prepare_threshold=0) as conn:
            for i in range(15):
                with conn.transaction():
                    assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
                    assert conn.execute("select %s::int * %s::int", (n, i)).fetchone() == (n * i,)
                assert conn.execute(f"select {n} + %s::int", (i,)).fetchone() == (n + i,)   # one per client
                assert conn.execute("select %s::text || 'x'", (str(i),)).fetchone() == (f"{i}x",)

    threads = Threads()
    for n in range(4):
        threads.start(f"client{n}", client, n)
    threads.join(60)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        names = [r[0] for r in conn.execute("select name from pg_prepared_statements")]
    assert names and all(n.startswith("pgmp_") for n in names), names
    assert len(names) <= 3, names
    assert server_count(pg, pooldb) <= 1


def test_psycopg_pipeline_with_prepared_statements_and_evictions(pg, pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=1, max_prepared_statements=2)

    def client(n: int) -> None:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True, prepare_threshold=0) as conn:
            for round_ in range(3):
                with conn.pipeline():
                    curs = [conn.execute(f"select %s::int + {k}", (i,)) for i in range(20) for k in range(3)]
                assert [c.fetchone()[0] for c in curs] == [i + k for i in range(20) for k in range(3)]

    threads = Threads()
    for n in range(3):
        threads.start(f"client{n}", client, n)
    threads.join(60)


@pytest.mark.parametrize("size", [1, 2])
def test_asyncpg_statement_cache_across_transactions(pg, pgmp, pooldb, size):
    proxy = start(pgmp, pooldb, size=size)

    async def client(n: int) -> None:
        conn = await asyncpg.connect(**proxy.asyncpg_kwargs(user=pooldb.user, password=pooldb.password,
                                                           dbname=pooldb.name), timeout=10)
        try:
            for i in range(15):
                async with conn.transaction():
                    assert await conn.fetchval("select $1::int + 1", i) == i + 1
                    rows = await conn.fetch("select g, $1::text from generate_series(1, $2::int) g", f"c{n}", 3)
                    assert [tuple(r) for r in rows] == [(g, f"c{n}") for g in (1, 2, 3)]
                assert await conn.fetchval(f"select {n} * $1::int", i) == n * i
                await asyncio.sleep(0)
        finally:
            await conn.close()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(4))), timeout=60)

    asyncio.run(main())
    assert server_count(pg, pooldb) <= size


def test_jdbc_style_unnamed_then_named_statement_two_clients_one_server(pgmp, pooldb):
    """Unnamed Parse/Bind/Execute, then a named S_1 for the same text, as PgJDBC does after
    prepareThreshold uses; a second client uses the name S_1 for another statement."""
    proxy = start(pgmp, pooldb, size=1)
    a = raw_login(proxy.host, proxy.port, pooldb)
    b = raw_login(proxy.host, proxy.port, pooldb)
    with a, b:
        sql_a, sql_b = "select $1::int + 100", "select $1::text || '-b'"
        got = exchange(a, parse_msg("", sql_a, (23,)), bind_msg("", ("1",)), describe_msg("P"), execute_msg(), SYNC)
        assert types_of(got) == "12TDCZ" and rows_of(got) == [["101"]]
        got = exchange(b, parse_msg("S_1", sql_b, (25,)), bind_msg("S_1", ("x",)), describe_msg("P"),
                       execute_msg(), SYNC)
        assert types_of(got) == "12TDCZ" and rows_of(got) == [["x-b"]]
        got = exchange(a, parse_msg("S_1", sql_a, (23,)), bind_msg("S_1", ("2",)), describe_msg("P"),
                       execute_msg(), SYNC)
        assert types_of(got) == "12TDCZ" and rows_of(got) == [["102"]]
        for i in range(5):
            got = exchange(a, bind_msg("S_1", (str(i),)), describe_msg("P"), execute_msg(), SYNC)
            assert types_of(got) == "2TDCZ" and rows_of(got) == [[str(100 + i)]]
            got = exchange(b, bind_msg("S_1", (f"v{i}",)), execute_msg(), SYNC)
            assert types_of(got) == "2DCZ" and rows_of(got) == [[f"v{i}-b"]]
        got = exchange(a, describe_msg("S", "S_1"), SYNC)
        assert types_of(got) == "tTZ"
        got = exchange(a, close_msg("S", "S_1"), SYNC)
        assert types_of(got) == "3Z"
        got = exchange(a, bind_msg("S_1", ("1",)), execute_msg(), SYNC)
        assert types_of(got) == "EZ" and got[0].fields["C"] == "26000"
        got = exchange(b, bind_msg("S_1", ("still",)), execute_msg(), SYNC)
        assert rows_of(got) == [["still-b"]]
        # the unnamed statement again, with a pipelined second batch
        got = exchange(a, parse_msg("", sql_b, (25,)), bind_msg("", ("u",)), execute_msg(), SYNC,
                       parse_msg("S_2", sql_a, (23,)), bind_msg("S_2", ("5",)), execute_msg(), SYNC)
        assert types_of(got) == "12DCZ12DCZ" and rows_of(got) == [["u-b"], ["105"]]


def test_two_clients_one_statement_name_with_deallocate_and_discard_between_binds(pgmp, pooldb):
    """Two clients bind their own S_1 (different texts) in turn on one server, as pgbench -M
    prepared does (Bind, Describe, Execute, Sync: the C relay rewrites such a Bind), while each in
    turn drops its statements with DEALLOCATE ALL or DISCARD ALL: the one that dropped them gets
    26000 until it prepares again, the other goes on as if nothing happened."""
    proxy = start(pgmp, pooldb, size=1)
    a = raw_login(proxy.host, proxy.port, pooldb)
    b = raw_login(proxy.host, proxy.port, pooldb)
    sql = {"a": "select $1::int + 100", "b": "select $1::text || '-b'"}
    types = {"a": (23,), "b": (25,)}
    with a, b:
        conns = {"a": a, "b": b}
        for who, conn in conns.items():
            assert types_of(exchange(conn, parse_msg("S_1", sql[who], types[who]), SYNC)) == "1Z"
        for i in range(30):
            for who, conn in conns.items():
                got = exchange(conn, bind_msg("S_1", (str(i),)), describe_msg("P"), execute_msg(), SYNC)
                want = str(100 + i) if who == "a" else f"{i}-b"
                assert types_of(got) == "2TDCZ" and rows_of(got) == [[want]], (who, i, got)
            if i % 10 == 4:
                dropper = conns["a" if i % 20 == 4 else "b"]
                command = "DEALLOCATE ALL" if i < 20 else "DISCARD ALL"
                assert types_of(exchange(dropper, frame(b"Q", command.encode() + b"\0"))) == "CZ"
                got = exchange(dropper, bind_msg("S_1", ("1",)), describe_msg("P"), execute_msg(), SYNC)
                assert types_of(got) == "EZ" and got[0].fields["C"] == "26000", got
                who = "a" if dropper is a else "b"
                assert types_of(exchange(dropper, parse_msg("S_1", sql[who], types[who]), SYNC)) == "1Z"


# ---- how pgmp answers compared with PostgreSQL itself (see tests/unit/test_prepared.py) ----------

def both_ways(pg, proxy, db, script) -> tuple[list, list]:
    """Run ``script(conn)`` on a connection through pgmp and on one straight to PostgreSQL."""
    results = []
    for host, port in ((proxy.host, proxy.port), (pg.host, pg.port)):
        with raw_login(host, port, db) as conn:
            results.append(script(conn))
    return results[0], results[1]


def test_evicting_close_discarded_after_an_error_is_not_taken_as_done(pg, pgmp, pooldb):
    """BUG (pgmp.prepared._skip_to_sync): max_prepared_statements=1; an error, then a Parse that
    evicts pgmp_1: the server discards the Close, pgmp believes pgmp_1 gone and later sends
    Parse pgmp_1 again: 42P05 "prepared statement pgmp_1 already exists"."""
    proxy = start(pgmp, pooldb, size=1, max_prepared_statements=1)

    def script(conn):
        out = [exchange(conn, parse_msg("a", "select 'a'"), SYNC)]
        out.append(exchange(conn, parse_msg("", "select 1/0"), bind_msg(""), execute_msg(),
                            parse_msg("b", "select 'b'"), SYNC))
        out.append(exchange(conn, parse_msg("c", "select 'a'"), bind_msg("c"), execute_msg(), SYNC))
        return [(types_of(m), rows_of(m), [e[:5] for e in errors_of(m)]) for m in out]

    via, straight = both_ways(pg, proxy, pooldb, script)
    assert straight[2] == ("12DCZ", [["a"]], [])
    assert via == straight


def test_close_and_parse_discarded_after_an_error_keep_the_old_statement(pg, pgmp, pooldb):
    """BUG (pgmp.prepared.Pipeline.client_frame): Close S_1 and Parse S_1 that PostgreSQL discards
    after an error still rebind S_1 in pgmp: the next Bind S_1 runs the new text."""
    proxy = start(pgmp, pooldb, size=1)

    def script(conn):
        exchange(conn, parse_msg("S_1", "select 'one'"), SYNC)
        exchange(conn, bind_msg("nope"), execute_msg(), close_msg("S", "S_1"), parse_msg("S_1", "select 'two'"),
                 SYNC)
        return rows_of(exchange(conn, bind_msg("S_1"), execute_msg(), SYNC))

    via, straight = both_ways(pg, proxy, pooldb, script)
    assert straight == [["one"]]
    assert via == straight


def test_discard_all_then_a_pipelined_parse(pg, pgmp, pooldb):
    """BUG (pgmp.prepared.Pipeline.server_frame, DISCARD ALL): the CommandComplete of DISCARD ALL
    clears the statement a Parse pipelined behind it just made: pgmp forgets S_1."""
    proxy = start(pgmp, pooldb, size=1)

    def script(conn):
        exchange(conn, rawpg.query("DISCARD ALL"), parse_msg("S_1", "select 'one'"), SYNC)
        got = exchange(conn, bind_msg("S_1"), execute_msg(), SYNC)
        return types_of(got), rows_of(got), errors_of(got)

    via, straight = both_ways(pg, proxy, pooldb, script)
    assert straight == ("2DCZ", [["one"]], [])
    assert via == straight


# ---- COPY through the extended protocol --------------------------------------------------------

def test_copy_in_by_execute_with_a_pipelined_sync_releases_the_server(pgmp, pooldb, table):
    """libpq sends Sync right after Execute of COPY FROM STDIN; the server ignores it in COPY IN.
    The server must still be released at the ReadyForQuery after CopyDone (pool of 1)."""
    proxy = start(pgmp, pooldb, size=1)
    with raw_login(proxy.host, proxy.port, pooldb) as conn:
        conn.send(parse_msg("", f"copy {table} from stdin") + bind_msg("") + execute_msg() + SYNC)
        got = conn.read_until(b"G")
        assert types_of(got) == "12G"
        conn.send(frame(b"d", b"1\tcopied\n") + frame(b"c") + SYNC)
        got = conn.read_until(b"Z")
        assert types_of(got) == "CZ" and got[-1].payload == b"I"
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as other:
            cur = other.execute(f"select count(*) from {table}")
            assert cur.fetchone() == (1,)
        assert conn.scalar("select 'still usable'") == "still usable"



MB = 1024 * 1024


class RssPeak:
    """Peak RSS of pgmp's worker processes while the block runs, sampled in a thread; ``growth`` over the start."""

    def __init__(self, proxy):
        self.procs = wait_for(lambda: psutil.Process(proxy.pid).children(), timeout=10,
                              message="pgmp has no worker processes")
        self.stop = threading.Event()
        self.baseline = self.peak = 0
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.procs)

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.stop.wait(0.01)

    def __enter__(self):
        self.baseline = self.peak = self.rss()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def test_large_bind_is_streamed_not_assembled(pgmp, pooldb):
    """BUG: a 16 MB parameter in one Bind. In transaction mode pgmp assembles a Bind whole (to read
    the statement name) by concatenating each 64 kB read to what it has (pgmp.loop.Endpoint,
    ``lo = lo + chunk``): quadratic copying, the worker's CPU burnt for every client it serves, and
    the RSS grows by twice the message. A Query of the same size is streamed; so is the Bind in
    session mode. ARCHITECTURE.md: "A frame larger than the buffer is streamed through, never
    assembled whole"."""
    proxy = start(pgmp, pooldb, size=1)
    size = 16 * MB
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        assert conn.execute("select length(%b)", (b"warm up",)).fetchone() == (7,)
        started = time.monotonic()
        assert conn.execute(f"select length('{'q' * size}')").fetchone() == (size,)
        query_took = time.monotonic() - started
        with RssPeak(proxy) as rss:
            started = time.monotonic()
            assert conn.execute("select length(%b)", (b"\x01" * size,)).fetchone() == (size,)
            bind_took = time.monotonic() - started
    assert bind_took < 3 * query_took + 1, (
        f"a 16 MB Bind took {bind_took:.1f}s, a 16 MB Query {query_took:.1f}s through pgmp in transaction mode")
    assert rss.growth < 8 * MB, f"pgmp worker RSS grew by {rss.growth / MB:.1f} MB for a 16 MB Bind"


# ---- session settings follow the client ---------------------------------------------------------

@pytest.mark.parametrize("name, value_a, value_b", [
    ("application_name", "a", "b"),
    ("TimeZone", "Asia/Tokyo", "America/New_York"),
    ("DateStyle", "German, DMY", "SQL, MDY"),
])
def test_set_by_each_client_follows_it_on_one_server(pg, pgmp, pooldb, name, value_a, value_b):
    """pgmp(1): parameters the server reports, "whether set at startup or with SET, follow the
    client to every server it gets"."""
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        default = b.execute(f"select current_setting('{name}')").fetchone()[0]
        a.execute(f"SET {name} = '{value_a}'")
        assert a.execute(f"select current_setting('{name}')").fetchone() == (value_a,)
        b.execute(f"SET {name} = '{value_b}'")
        c = psycopg.connect(dsn(proxy, pooldb), autocommit=True)
        with c:
            for _ in range(3):
                assert a.execute(f"select current_setting('{name}')").fetchone() == (value_a,)
                assert b.execute(f"select current_setting('{name}')").fetchone() == (value_b,)
                assert c.execute(f"select current_setting('{name}')").fetchone() == (default,)
                with a.transaction():
                    assert a.execute(f"select current_setting('{name}')").fetchone() == (value_a,)
        assert a.info.parameter_status(name) == value_a
        assert b.info.parameter_status(name) == value_b


def show_search_path(conn) -> tuple:
    return conn.execute("select current_setting('search_path'), current_schemas(false)").fetchone()


@pytest.mark.parametrize("options", ["-c search_path=schema_a", "-c search_path=schema_c,public",
                                     r"-c search_path=schema_c,\ public"])
def test_startup_search_path_reapplied_on_each_transaction(pg, pgmp, pooldb, options):
    """Each transaction of a client with options=-c search_path=... sees the search_path PostgreSQL
    itself gives that startup option, while another client with its own search_path shares the server.

    BUG for list values: pgmp applies them with SET search_path = 'schema_c,public', a quoted
    literal, which PostgreSQL takes as ONE schema named "schema_c,public"."""
    proxy = start(pgmp, pooldb, size=1)
    with direct(pg, pooldb, options=options) as conn:
        expected = show_search_path(conn)
    assert "public" in expected[1] or expected[1] == ["schema_a"]
    a = psycopg.connect(dsn(proxy, pooldb, options=options), autocommit=True)
    other = psycopg.connect(dsn(proxy, pooldb, options="-c search_path=schema_c"), autocommit=True)
    with a, other:
        for _ in range(3):
            assert show_search_path(a) == expected
            with other.transaction():
                assert show_search_path(other) == ("schema_c", ["schema_c"])
            with a.transaction():
                assert show_search_path(a) == expected


def test_startup_search_path_does_not_leak_to_other_clients(pg, pgmp, pooldb):
    """A client that asked for no search_path gets the server's default, not the search_path another
    client set at startup on the same server."""
    proxy = start(pgmp, pooldb, size=1)
    with direct(pg, pooldb) as conn:
        default = conn.execute("select current_setting('search_path')").fetchone()[0]
    with psycopg.connect(dsn(proxy, pooldb, options="-c search_path=schema_a"), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        assert a.execute("select current_setting('search_path')").fetchone() == ("schema_a",)
        assert b.execute("select current_setting('search_path')").fetchone() == (default,)


def test_startup_search_path_restored_after_another_clients_set(pg, pgmp, pooldb):
    """pgmp(1): parameters the server does not report are "restored ... when set at startup"; another
    client's SET search_path on the same server must not stay in force for this client."""
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb, options="-c search_path=schema_a"), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        assert a.execute("select current_setting('search_path')").fetchone() == ("schema_a",)
        b.execute("SET search_path = schema_c")
        assert a.execute("select current_setting('search_path')").fetchone() == ("schema_a",)


@pytest.mark.parametrize("spelling", ["TimeZone", "timezone"])
def test_startup_timezone_restored_after_another_clients_set(pg, pgmp, pooldb, spelling):
    """PGOPTIONS='-c timezone=...' is as valid as '-c TimeZone=...' (GUC names ignore case)."""
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb, options=f"-c {spelling}=America/Sao_Paulo"), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        assert a.execute("select current_setting('TimeZone')").fetchone() == ("America/Sao_Paulo",)
        b.execute("SET TimeZone = 'Asia/Tokyo'")
        assert a.execute("select current_setting('TimeZone')").fetchone() == ("America/Sao_Paulo",)


# ---- transactions ----------------------------------------------------------------------------

def test_transaction_keeps_its_server_while_others_run(pg, pgmp, pooldb, table):
    proxy = start(pgmp, pooldb, size=2)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a:
        with a.transaction():
            a.execute(f"insert into {table} values (1, 'a')")
            pid = a.execute("select pg_backend_pid()").fetchone()[0]

            def other(n):
                with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
                    for _ in range(10):
                        with conn.transaction():
                            assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)
                            assert conn.execute("select pg_backend_pid()").fetchone()[0] != pid

            threads = Threads()
            for n in range(3):
                threads.start(f"other{n}", other, n)
            threads.join(30)
            assert a.execute(f"select count(*) from {table} where who = 'a'").fetchone() == (1,)
            assert a.execute("select pg_backend_pid()").fetchone() == (pid,)
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
            assert b.execute(f"select count(*) from {table}").fetchone() == (1,)
    assert server_count(pg, pooldb) <= 2


def backend_gone(pg, pid: int) -> bool:
    return pg.psql(f"select count(*) from pg_stat_activity where pid = {pid}") == "0"


@pytest.mark.parametrize("how", ["terminate", "drop"])
def test_client_leaving_inside_a_transaction_closes_its_server(pg, pgmp, pooldb, table, how):
    proxy = start(pgmp, pooldb, size=1)
    conn = raw_login(proxy.host, proxy.port, pooldb)
    assert types_of(conn.query("BEGIN")) == "CZ"
    assert types_of(conn.query(f"insert into {table} values (1, 'uncommitted')"))[-1] == "Z"
    pid = int(conn.scalar("select pg_backend_pid()"))
    if how == "terminate":
        conn.send(rawpg.terminate())
    conn.close()
    wait_for(lambda: backend_gone(pg, pid), timeout=10, message=f"server {pid} still there: reused dirty?")
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        assert b.execute(f"select count(*) from {table}").fetchone() == (0,)
        assert b.info.transaction_status == TransactionStatus.IDLE
        assert b.execute("select pg_backend_pid()").fetchone()[0] != pid
        assert b.execute("select now() = statement_timestamp()").fetchone() == (True,)


# ---- LISTEN pins the client -------------------------------------------------------------------------

def test_listen_pins_the_client_and_notifications_arrive_while_idle(pg, pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=2)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as listener:
        listener.execute("LISTEN pgmp_chan")

        def other(n):
            with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
                for i in range(20):
                    with conn.transaction():
                        assert conn.execute("select %s::int", (i,)).fetchone() == (i,)

        threads = Threads()
        for n in range(3):
            threads.start(f"other{n}", other, n)
        threads.join(30)
        assert server_count(pg, pooldb) <= 2
        with direct(pg, pooldb) as sender:
            sender.execute("NOTIFY pgmp_chan, 'hello'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("pgmp_chan", "hello")]
        assert listener.execute("select 'still here'").fetchone() == ("still here",)
        with direct(pg, pooldb) as sender:
            sender.execute("NOTIFY pgmp_chan, 'again'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.payload for n in got] == ["again"]



def test_a_pinned_server_is_reset_before_another_client_gets_it(pg, pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as listener:
        listener.execute("LISTEN pgmp_reset_chan")
        pid = listener.execute("select pg_backend_pid()").fetchone()[0]
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        row = b.execute("select pg_backend_pid(), array(select pg_listening_channels())").fetchone()
        assert row[1] == [], row
        assert row[0] == pid or backend_gone(pg, pid)


def test_sql_prepare_outside_a_transaction_pins_the_client(pg, pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=2)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a:
        a.execute("PREPARE doubled(int) AS select $1 * 2")

        def other(n):
            with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
                for i in range(10):
                    with conn.transaction():
                        assert conn.execute("select %s::int", (i,)).fetchone() == (i,)

        threads = Threads()
        for n in range(3):
            threads.start(f"other{n}", other, n)
        for i in range(10):
            assert a.execute(f"EXECUTE doubled({i})").fetchone() == (2 * i,)
        threads.join(30)
        assert a.execute("EXECUTE doubled(21)").fetchone() == (42,)


def test_failed_transaction_keeps_its_server_until_rollback(pg, pgmp, pooldb, table):
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a:
        a.execute("BEGIN")
        a.execute(f"insert into {table} values (1, 'a')")
        with pytest.raises(pgerrors.DivisionByZero):
            a.execute("select 1/0")
        assert a.info.transaction_status == TransactionStatus.INERROR
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            a.execute("select 1")
        a.execute("ROLLBACK")
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
            assert b.execute(f"select count(*) from {table}").fetchone() == (0,)
            assert b.info.transaction_status == TransactionStatus.IDLE

# ---- statement mode ------------------------------------------------------------------------------

def test_statement_mode_single_statements_work_and_begin_is_refused(pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=1, mode="statement")
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select %s::int", (2,)).fetchone() == (2,)
    with raw_login(proxy.host, proxy.port, pooldb) as conn:
        assert types_of(conn.query("select 1; select 2")) == "TDCTDCZ"
        conn.send(rawpg.query("BEGIN"))
        err = conn.expect_error()
        assert "transaction blocks not allowed in statement mode" in err["M"], err
        assert err["C"] == "0A000"
        assert conn.wait_closed()


# ---- queueing ------------------------------------------------------------------------------------

def test_ten_clients_twenty_transactions_each_on_one_server(pg, pgmp, pooldb, table):
    proxy = start(pgmp, pooldb, size=1)

    def client(n):
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            for i in range(20):
                with conn.transaction():
                    conn.execute(f"insert into {table} values (%s, %s)", (i, f"c{n}"))
                    assert conn.execute(f"select count(*) from {table} where who = %s",
                                        (f"c{n}",)).fetchone() == (i + 1,)

    threads = Threads()
    for n in range(10):
        threads.start(f"client{n}", client, n)
    threads.join(60)
    with direct(pg, pooldb) as conn:
        assert conn.execute(f"select count(*), count(distinct who) from {table}").fetchone() == (200, 10)
    assert server_count(pg, pooldb) <= 1


def test_query_wait_timeout_while_the_only_server_is_in_a_transaction(pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a:
        a.execute("BEGIN")
        a.execute("select 1")
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as info:
                b.execute("select 'never'")
            waited = time.monotonic() - started
        assert 0.8 <= waited < 5, waited
        assert info.value.sqlstate == "08P01", info.value
        assert "query_wait_timeout" in str(info.value)
        a.execute("COMMIT")
        assert a.info.transaction_status == TransactionStatus.IDLE
        assert a.execute("select 'after'").fetchone() == ("after",)


def worker_pools(pgmp, proxy) -> list[dict]:
    """The pools of pgmp's one worker (``pgmp stats --json``)."""
    (worker,) = proxy.stats()["workers"]
    return worker["pools"]


def pool_waiting(pgmp, proxy) -> int:
    return sum(p["cl_waiting"] for p in worker_pools(pgmp, proxy))


def test_a_queued_read_of_copy_data_and_a_query(pgmp, pooldb, table):
    """A queued client's bytes are CopyData (which the scanner counts without reporting; PostgreSQL
    ignores it outside COPY) and then a Query: one reported frame, but not at the start of the read,
    so the one-Query fast path must leave it to the generic relay (it took the Query's text from
    offset 0 and ended the session with 08P01)."""
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=60)
    with raw_login(proxy.host, proxy.port, pooldb) as a, raw_login(proxy.host, proxy.port, pooldb) as b:
        a.query("BEGIN")
        b.send(rawpg.copy_data(b"stray") + rawpg.query(f"INSERT INTO {table} VALUES (1, 'b')"))
        wait_for(lambda: pool_waiting(pgmp, proxy) == 1, timeout=5)
        a.query("COMMIT")
        answer = b.read_until(b"Z", timeout=10)
        assert [m.type for m in answer] == [b"C", b"Z"], answer
        b.send(rawpg.query(f"COPY {table} (x, who) FROM STDIN") + rawpg.copy_data(b"2\tcopied\n"))
        b.send(rawpg.copy_done())
        answer = b.read_until(b"Z", timeout=10)
        assert [m.type for m in answer] == [b"G", b"C", b"Z"], answer
        assert b.scalar(f"select string_agg(who, ',' order by x) from {table}") == "b,copied"


def test_queued_clients_time_out_each_at_its_own_deadline(pgmp, pooldb):
    """query_wait_timeout is timed per pool, not per wait (Pool.wait_expired): two clients queued a
    second apart each fail query_wait_timeout after their own start, and one linked meanwhile is served."""
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=2)
    with raw_login(proxy.host, proxy.port, pooldb) as a, raw_login(proxy.host, proxy.port, pooldb) as b, \
            raw_login(proxy.host, proxy.port, pooldb) as c:
        a.query("BEGIN")
        t0 = time.monotonic()
        b.send(rawpg.query("select 'b'"))
        wait_for(lambda: max(p["maxwait_us"] for p in worker_pools(pgmp, proxy)) >= 1_000_000, timeout=5,
                 message="b did not wait a second")
        t1 = time.monotonic()
        c.send(rawpg.query("select 'c'"))
        err_b = b.expect_error(timeout=10)
        tb = time.monotonic() - t0
        err_c = c.expect_error(timeout=10)
        tc = time.monotonic() - t1
        for err in (err_b, err_c):
            assert err["C"] == "08P01" and "query_wait_timeout" in err["M"], err
        assert 1.8 <= tb < 4.5, tb
        assert 1.8 <= tc < 4.5, tc                        # its own deadline, not b's (a second earlier)
        a.query("COMMIT")
        with raw_login(proxy.host, proxy.port, pooldb) as d:
            assert d.scalar("select 'd'") == "d"


def test_a_queued_client_that_sends_more_than_max_unsent_is_paused_and_loses_nothing(pgmp, pooldb):
    """What a queued client sends meanwhile is kept up to max_unsent (then pgmp stops reading it,
    and the rest waits in the kernel): 400 pipelined queries of 1 kB, all answered, in order."""
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=60, max_unsent=65536, buffer_size=16384)
    with raw_login(proxy.host, proxy.port, pooldb) as a, raw_login(proxy.host, proxy.port, pooldb) as b:
        a.query("BEGIN")
        b.send(rawpg.query("select 0"))
        wait_for(lambda: pool_waiting(pgmp, proxy) == 1, timeout=5)
        pad = "x" * 1000
        b.send(b"".join(rawpg.query(f"select {i}, '{pad}'") for i in range(1, 401)))
        # pgmp has stopped reading it: bytes wait in the kernel at pgmp's end, and stay there
        def queued() -> bool:
            return client_bytes_queued(proxy.port, b.sock.getsockname()[1])
        wait_for(queued, timeout=10, message="none of the queued client's 400 kB waits at pgmp's end")
        holds(queued, 0.5)                            # (it would read on past max_unsent otherwise)
        a.query("COMMIT")
        got = []
        for _ in range(401):
            got += [int(rawpg.data_row(m.payload)[0]) for m in b.read_until(b"Z", timeout=20) if m.type == b"D"]
        assert got == list(range(401))


def test_a_reload_times_queued_clients_by_the_new_query_wait_timeout(pgmp, pooldb):
    """Lowering query_wait_timeout applies to a client already queued, not only to later ones."""
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=120)
    with raw_login(proxy.host, proxy.port, pooldb) as a, raw_login(proxy.host, proxy.port, pooldb) as b:
        a.query("BEGIN")
        b.send(rawpg.query("select 'b'"))
        wait_for(lambda: pool_waiting(pgmp, proxy) == 1, timeout=5)
        proxy.rewrite_config(config={"query_wait_timeout": 1})
        started = time.monotonic()
        assert pgmp.cli("reload", "-c", proxy.config_path).returncode == 0
        err = b.expect_error(timeout=15)
        assert err["C"] == "08P01" and "query_wait_timeout" in err["M"], err
        assert time.monotonic() - started < 10
        a.query("COMMIT")


def test_a_queued_client_that_hangs_up_leaves_the_queue_at_once(pgmp, pooldb):
    """A client waiting for a server is still read: its EOF takes it out of the queue then, not when a
    server comes free (SHOW POOLS' cl_waiting falls while the only server is still in a transaction)."""
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=60)
    with raw_login(proxy.host, proxy.port, pooldb) as a:
        a.query("BEGIN")
        b = raw_login(proxy.host, proxy.port, pooldb)
        b.send(rawpg.query("select 'b'"))
        wait_for(lambda: pool_waiting(pgmp, proxy) == 1, timeout=5)
        b.close()
        wait_for(lambda: pool_waiting(pgmp, proxy) == 0, timeout=5,
                 message="the closed client stayed queued")
        a.query("COMMIT")
        assert a.scalar("select 'a'") == "a"


def test_what_a_queued_client_sends_meanwhile_follows_its_first_query(pgmp, pooldb):
    """A queued client that pipelines more requests while it waits has them all answered, in order,
    once a server is free (what it sends meanwhile joins what waits)."""
    proxy = start(pgmp, pooldb, size=1, query_wait_timeout=60)
    with raw_login(proxy.host, proxy.port, pooldb) as a, raw_login(proxy.host, proxy.port, pooldb) as b:
        a.query("BEGIN")
        b.send(rawpg.query("select 'first'"))
        wait_for(lambda: pool_waiting(pgmp, proxy) == 1, timeout=5)
        b.send(rawpg.query("select 'second'"))
        b.send(rawpg.parse("select $1::text") + rawpg.bind(("third",)) + rawpg.execute() + rawpg.sync())
        a.query("COMMIT")
        rows = []
        for _ in range(3):
            rows += [rawpg.data_row(m.payload)[0] for m in b.read_until(b"Z", timeout=10) if m.type == b"D"]
        assert rows == ["first", "second", "third"], rows


# ---- cancels while servers are reused --------------------------------------------------------------

def test_fifty_cancels_hit_only_their_queries(pg, pgmp, pooldb):
    """5 victims x 10 rounds of pg_sleep(10), each cancelled once it runs, while 4 other clients run
    pg_sleep(0.2) in loops on a pool of 3: only the victims see 57014."""
    proxy = start(pgmp, pooldb, size=3)
    victims, rounds, others = 5, 10, 4
    done = threading.Event()
    other_counts = [0] * others

    def victim(v, conn, round_done):
        for r in range(rounds):
            try:
                conn.execute(f"select pg_sleep(10) /* victim {v} round {r} */")
            except pgerrors.QueryCanceled:
                pass
            else:
                raise AssertionError(f"victim {v} round {r}: not cancelled")
            finally:
                round_done[r].set()

    def canceller(v, conn, round_done):
        with direct(pg, pooldb) as watch:
            for r in range(rounds):
                marker = f"%victim {v} round {r} */"
                wait_for(lambda: watch.execute(
                    "select count(*) from pg_stat_activity where state = 'active' and query like %s",
                    (marker,)).fetchone()[0] == 1, timeout=20, message=f"victim {v} round {r} never ran")
                conn.cancel()
                assert round_done[r].wait(20), f"victim {v} round {r} still running after its cancel"

    def other(n):
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            while not done.is_set():
                assert conn.execute("select pg_sleep(0.2), %s::int", (n,)).fetchone() == ("", n)
                other_counts[n] += 1

    conns = [psycopg.connect(dsn(proxy, pooldb), autocommit=True) for _ in range(victims)]
    try:
        background = Threads()
        for n in range(others):
            background.start(f"other{n}", other, n)
        threads = Threads()
        for v, conn in enumerate(conns):
            round_done = [threading.Event() for _ in range(rounds)]
            threads.start(f"victim{v}", victim, v, conn, round_done)
            threads.start(f"canceller{v}", canceller, v, conn, round_done)
        try:
            threads.join(90)
        finally:
            done.set()
            background.join(30)
        assert all(count > 0 for count in other_counts), other_counts
        for conn in conns:
            assert conn.execute("select 'alive'").fetchone() == ("alive",)
    finally:
        for conn in conns:
            conn.close()


def test_cancels_racing_with_the_end_of_queries_never_hit_another_client(pg, pgmp, pooldb):
    """Cancel requests fired at 3 clients running tiny queries (a cancel often arrives after the
    query ended and its server went back to the pool) while 4 bystanders share the pool of 2:
    a racer may see 57014, a bystander never."""
    proxy = start(pgmp, pooldb, size=2)
    done = threading.Event()
    racers = [psycopg.connect(dsn(proxy, pooldb), autocommit=True) for _ in range(3)]
    counts = {"racer_ok": 0, "racer_cancelled": 0, "bystander_ok": 0}
    lock = threading.Lock()

    def racer(conn):
        while not done.is_set():
            try:
                conn.execute("select pg_sleep(0.002)")
                key = "racer_ok"
            except pgerrors.QueryCanceled:
                key = "racer_cancelled"
            with lock:
                counts[key] += 1

    def canceller():
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for conn in racers:
                conn.cancel()
            done.wait(0.003)
        done.set()

    def bystander(n):
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
            while not done.is_set():
                assert conn.execute("select pg_sleep(0.01), %s::int", (n,)).fetchone() == ("", n)
                with conn.transaction():
                    assert conn.execute("select %s::int", (n,)).fetchone() == (n,)
                with lock:
                    counts["bystander_ok"] += 1

    try:
        threads = Threads()
        for n in range(4):
            threads.start(f"bystander{n}", bystander, n)
        for i, conn in enumerate(racers):
            threads.start(f"racer{i}", racer, conn)
        threads.start("canceller", canceller)
        threads.join(30)
    finally:
        done.set()
        for conn in racers:
            conn.close()
    assert counts["racer_cancelled"] > 0 and counts["bystander_ok"] > 0, counts
