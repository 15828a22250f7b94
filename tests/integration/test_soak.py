"""Soak: many clients share one transaction-mode pgmp for a while and none sees another's state.

One job: run N clients at once (psycopg 3 threads and asyncpg tasks, each with its own identity
``i``) through a transaction-mode pgmp with a small pool, each looping over a random mix of session
SETs and later checks of them, prepared statements returning ``i``, an error inside a pipeline, a
small COPY of rows tagged ``c<i>``, reconnects, abandoned transactions and raw clients that hang up
mid-message; then assert that no client ever saw another's setting, role or result, that nothing
failed unexpectedly, that the pool is not wedged, no server leaked and pgmp neither died nor logged
an internal error. Waits have deadlines; the only sleeps are the clients' random think-times.
PGMP_SOAK_SEED=<seed> replays a run's choices (its timing cannot be replayed).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
from collections import Counter, deque

import asyncpg
import psutil
import psycopg
import pytest
from psycopg import errors as pgerrors

from tests.integration import rawpg, test_pooling
from tests.integration.test_pooling import Threads, direct, dsn, no_servers_left, server_count, start
from tests.integration.test_transparency import hang_up, select_one
from tests.support import wait_for

pooldb = test_pooling.pooldb    # the fixtures, made for this module: its own role and database
table = test_pooling.table

POOL_SIZE = 8
ASYNCPG_EVERY = 4               # every 4th client is an asyncpg client, the others psycopg threads
CHECK_SQL = ("SELECT current_setting('application_name'), current_setting('statement_timeout'), "
             "current_setting('myapp.who', true), current_user, session_user")
SETTINGS = {                    # what client i sets; clients are numbered from 1, so 1000+i never reads "1s"
    "application_name": lambda i: f"c{i}",
    "statement_timeout": lambda i: f"{1000 + i}ms",
    "myapp.who": lambda i: f"c{i}",
}


def owner(name: str, value: str | None) -> int | None:
    """The client whose value of ``name`` this is, or None for a value no client sets."""
    if name == "statement_timeout":
        m = re.fullmatch(r"(\d+)ms", value or "")
        return int(m[1]) - 1000 if m and 1000 < int(m[1]) < 2000 else None
    m = re.fullmatch(r"c(\d+)", value or "")
    return int(m[1]) if m else None


other_role = test_pooling.other_role


class Soak:
    """One run: where clients connect, until when, and what they saw (shared by all clients)."""

    def __init__(self, proxy, db, table: str, role: str, seconds: float, seed: int):
        self.proxy, self.db, self.table, self.role, self.seed = proxy, db, table, role, seed
        self.deadline = time.monotonic() + seconds
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.ops: Counter[str] = Counter()
        self.lock = threading.Lock()

    def violation(self, me: Me, text: str) -> None:
        with self.lock:
            self.violations.append(f"c{me.i}: {text} (after {', '.join(me.history)})")

    def error(self, me: Me, op: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"c{me.i} {op}: {type(exc).__name__}: {exc} (after {', '.join(me.history)})")

    def done(self, op: str) -> None:
        with self.lock:
            self.ops[op] += 1

    def summary(self) -> str:
        return (f"seed {self.seed}; operations {dict(sorted(self.ops.items()))}; "
                f"{len(self.violations)} violations, {len(self.errors)} unexpected errors")


class Me:
    """One client's identity and what it expects its session to hold."""

    def __init__(self, soak: Soak, i: int):
        self.soak, self.i = soak, i
        self.rng = random.Random(f"{soak.seed}-{i}")
        self.rows = 0                       # committed COPY rows tagged c<i>
        self.history: deque[str] = deque(maxlen=8)     # the last operations, for failure messages
        self.fresh()

    def fresh(self) -> None:
        """A new connection: nothing set yet."""
        self.expected: dict[str, str] = {}
        self.as_role = False
        self.prepared: dict[str, object] = {}   # asyncpg PreparedStatement objects of this connection

    def note(self, detail: str) -> None:            # what the current operation chose
        self.history[-1] += f"[{detail}]"

    def choose_set(self) -> tuple[str, str, str | None]:
        """(key, SQL, the value it sets or None for RESET ROLE)."""
        name = self.rng.choice([*SETTINGS, "role"])
        if name == "role":
            return ("role", f"SET ROLE {self.soak.role}", "on") if self.rng.random() < 0.6 \
                else ("role", "RESET ROLE", None)
        value = SETTINGS[name](self.i)
        return name, f"SET {name} = '{value}'", value

    def record_set(self, name: str, value: str | None) -> None:
        if name == "role":
            self.as_role = value is not None
        else:
            self.expected[name] = value

    def verify(self, row, how: str) -> None:
        """row: CHECK_SQL's columns. Every setting is this client's own value, or no client's."""
        for name, seen in zip(SETTINGS, row[:3]):
            want, whose = self.expected.get(name), owner(name, seen)
            if seen != want and (want is not None or whose is not None):
                whose_text = f" (client c{whose}'s value)" if whose not in (None, self.i) else ""
                self.soak.violation(self, f"{how}: {name} is {seen!r}{whose_text}, expected {want!r}")
        user = self.soak.role if self.as_role else self.soak.db.user
        if tuple(row[3:5]) != (user, self.soak.db.user):
            self.soak.violation(self, f"{how}: current_user, session_user = {tuple(row[3:5])}, "
                                        f"expected ({user!r}, {self.soak.db.user!r})")

    def expect(self, what: str, got, want) -> None:
        if got != want:
            self.soak.violation(self, f"{what}: got {got!r}, expected {want!r}")

    def statements(self) -> list[tuple[str, object]]:
        """A few distinct statements with parameter i (psycopg placeholders) and their results."""
        i = self.i
        return [("SELECT %s::int", i), ("SELECT %s::int * 2", 2 * i), ("SELECT %s::int::text || '-c'", f"{i}-c"),
                (f"SELECT %s::int + {i}", 2 * i), ("SELECT %s::int, 'x'::text", i)]


# ---- psycopg clients: one thread each --------------------------------------------------------------

def pg_connect(me: Me) -> psycopg.Connection:
    me.fresh()
    threshold = 0 if me.i % 2 else 5           # odd clients prepare every statement, even ones the 5th use
    return psycopg.connect(dsn(me.soak.proxy, me.soak.db), autocommit=True, prepare_threshold=threshold)


def pg_set(me: Me, conn):
    name, sql, value = me.choose_set()
    how = me.rng.choice(["autocommit", "commit", "rollback"])
    me.note(f"{sql} ({how})")
    if how == "autocommit":
        conn.execute(sql)
    else:
        with conn.transaction(force_rollback=how == "rollback"):
            conn.execute(sql)
    if how != "rollback":
        me.record_set(name, value)
    return conn


def pg_check(me: Me, conn):
    with conn.transaction() if me.rng.random() < 0.5 else contextlib.nullcontext():
        row = conn.execute(CHECK_SQL).fetchone()
    me.verify(row, "current_setting")
    if "statement_timeout" in me.expected:
        me.expect("SHOW statement_timeout", conn.execute("SHOW statement_timeout").fetchone()[0],
                  me.expected["statement_timeout"])
    return conn


def pg_prepared(me: Me, conn):
    for sql, want in me.rng.sample(me.statements(), 3):
        me.expect(f"prepared {sql!r}", conn.execute(sql, (me.i,), prepare=True).fetchone()[0], want)
    return conn


def pg_pipeline(me: Me, conn):
    # Not prepared after the error: psycopg 3.3.9 records a statement whose Parse the server skipped
    # in the aborted pipeline as prepared (26000 "prepared statement _pg3_N does not exist" later,
    # also straight to PostgreSQL); pgmp is not involved.
    try:
        with conn.pipeline():
            first = conn.execute("SELECT %s::int", (me.i,), prepare=True)
            conn.execute("SELECT 1/0", prepare=False)
            conn.execute("SELECT %s::int", (me.i,), prepare=False)
    except pgerrors.DivisionByZero:
        me.expect("the statement before the error in the pipeline", first.fetchone(), (me.i,))
    else:
        me.soak.violation(me, "SELECT 1/0 in a pipeline raised no DivisionByZero")
    me.expect("the query after the failed pipeline", conn.execute("SELECT %s::text", (f"c{me.i}",)).fetchone(),
              (f"c{me.i}",))
    return conn


def pg_copy(me: Me, conn):
    n = me.rng.randint(1, 5)
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = 0")     # the COPY waits for the client's data
        with conn.cursor().copy(f"COPY {me.soak.table} (x, who) FROM STDIN") as copy:
            for k in range(n):
                copy.write_row((k, f"c{me.i}"))
    me.rows += n
    count = conn.execute(f"SELECT count(*) FROM {me.soak.table} WHERE who = %s", (f"c{me.i}",)).fetchone()[0]
    me.expect("count of its own COPY rows", count, me.rows)
    return conn


def pg_reconnect(me: Me, conn):
    conn.close()
    return pg_connect(me)


def pg_abandon(me: Me, conn):
    """Insert a row in a transaction, then hang up abruptly: the row must never count."""
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO {me.soak.table} (x, who) VALUES (-1, %s)", (f"c{me.i}",))
    hang_up(conn)
    conn.close()
    return pg_connect(me)


def pg_raw(me: Me, conn):
    """A raw client that logs in, leaves mid-message and closes its socket."""
    soak, i = me.soak, me.i
    with rawpg.RawPG.connect(soak.proxy.host, soak.proxy.port, timeout=30) as raw:
        raw.login(user=soak.db.user, password_text=soak.db.password, database=soak.db.name)
        how = me.rng.choice(["copydata-head", "no-sync", "copy-in"])
        me.note(how)
        if how == "copydata-head":
            raw.send(rawpg.query(f"SELECT {i}") + rawpg.header(b"d", 1_000_004) + b"x" * 16)
            got = raw.read_until(b"Z")
        elif how == "no-sync":
            raw.send(rawpg.parse(f"SELECT {i}") + rawpg.bind() + rawpg.execute() + rawpg.flush())
            got = raw.read_until(b"C")
        else:
            raw.send(rawpg.query(f"COPY {soak.table} (x, who) FROM STDIN"))
            raw.read_until(b"G")
            raw.send(rawpg.copy_data(f"{i}\traw{i}\n".encode()))
            return conn
        me.expect(f"raw {how} result", [rawpg.data_row(m.payload) for m in got if m.type == b"D"], [[str(i)]])
    return conn


PSYCOPG_OPS = {pg_set: 3, pg_check: 3, pg_prepared: 3, pg_pipeline: 1, pg_copy: 1, pg_reconnect: 0.3,
               pg_abandon: 0.3, pg_raw: 0.3}


def psycopg_client(me: Me) -> None:
    soak, ops, weights = me.soak, list(PSYCOPG_OPS), list(PSYCOPG_OPS.values())
    conn = None
    try:
        conn = pg_connect(me)
        while time.monotonic() < soak.deadline:
            op = me.rng.choices(ops, weights)[0]
            me.history.append(op.__name__)
            try:
                conn = op(me, conn)
                soak.done(op.__name__)
            except Exception as exc:            # noqa: BLE001 - reported at the end
                soak.error(me, op.__name__, exc)
                conn.close()
                conn = pg_connect(me)
    except Exception as exc:                    # noqa: BLE001 - a (re)connect failed
        soak.error(me, "connect", exc)
    finally:
        if conn is not None:
            conn.close()


# ---- asyncpg clients: tasks of one event loop in one thread --------------------------------------------

async def ap_connect(me: Me):
    me.fresh()
    db = me.soak.db
    return await asyncpg.connect(**me.soak.proxy.asyncpg_kwargs(user=db.user, password=db.password, dbname=db.name),
                                 timeout=30, command_timeout=30)


async def ap_set(me: Me, conn):
    name, sql, value = me.choose_set()
    how = me.rng.choice(["autocommit", "commit", "rollback"])
    me.note(f"{sql} ({how})")
    if how == "autocommit":
        await conn.execute(sql)
    else:
        await (tx := conn.transaction()).start()
        await conn.execute(sql)
        await (tx.rollback() if how == "rollback" else tx.commit())
    if how != "rollback":
        me.record_set(name, value)
    return conn


async def ap_check(me: Me, conn):
    async with conn.transaction() if me.rng.random() < 0.5 else contextlib.nullcontext():
        row = await conn.fetchrow(CHECK_SQL)
    me.verify(tuple(row), "current_setting (asyncpg)")
    return conn


async def ap_prepared(me: Me, conn):
    for sql, want in me.rng.sample(me.statements(), 3):
        if me.rng.random() < 0.5:                              # the statement cache
            got = await conn.fetchval(sql.replace("%s", "$1"), me.i)
        else:                                                  # a named statement kept across transactions
            if sql not in me.prepared:
                me.prepared[sql] = await conn.prepare(sql.replace("%s", "$1"))
            got = await me.prepared[sql].fetchval(me.i)
        me.expect(f"asyncpg prepared {sql!r}", got, want)
    return conn


async def ap_error(me: Me, conn):
    try:
        await conn.execute(f"SELECT {me.i}; SELECT 1/0; SELECT 2")
    except asyncpg.DivisionByZeroError:
        pass
    else:
        me.soak.violation(me, "SELECT 1/0 raised no DivisionByZeroError")
    me.expect("the query after the error", await conn.fetchval("SELECT $1::int", me.i), me.i)
    return conn


async def ap_copy(me: Me, conn):
    n = me.rng.randint(1, 5)
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.copy_records_to_table(me.soak.table, records=[(k, f"c{me.i}") for k in range(n)],
                                         columns=["x", "who"])
    me.rows += n
    count = await conn.fetchval(f"SELECT count(*) FROM {me.soak.table} WHERE who = $1", f"c{me.i}")
    me.expect("count of its own COPY rows (asyncpg)", count, me.rows)
    return conn


async def ap_reconnect(me: Me, conn):
    await conn.close(timeout=10)
    return await ap_connect(me)


async def ap_abandon(me: Me, conn):
    await conn.transaction().start()
    await conn.execute(f"INSERT INTO {me.soak.table} (x, who) VALUES (-1, $1)", f"c{me.i}")
    conn.terminate()                            # drops the socket at once
    return await ap_connect(me)


ASYNCPG_OPS = {ap_set: 3, ap_check: 3, ap_prepared: 3, ap_error: 1, ap_copy: 1, ap_reconnect: 0.3, ap_abandon: 0.3}


async def asyncpg_client(me: Me) -> None:
    soak, ops, weights = me.soak, list(ASYNCPG_OPS), list(ASYNCPG_OPS.values())
    conn = None
    try:
        conn = await ap_connect(me)
        while time.monotonic() < soak.deadline:
            op = me.rng.choices(ops, weights)[0]
            me.history.append(op.__name__)
            try:
                conn = await op(me, conn)
                soak.done(op.__name__)
            except Exception as exc:            # noqa: BLE001 - reported at the end
                soak.error(me, op.__name__, exc)
                conn.terminate()
                conn = await ap_connect(me)
            await asyncio.sleep(me.rng.uniform(0, 0.005))
    except Exception as exc:                    # noqa: BLE001 - a (re)connect failed
        soak.error(me, "asyncpg connect", exc)
    finally:
        if conn is not None and not conn.is_closed():
            await conn.close(timeout=10)


def asyncpg_clients(mes: list[Me], timeout: float) -> None:
    async def main():
        await asyncio.wait_for(asyncio.gather(*(asyncpg_client(me) for me in mes)), timeout)
    asyncio.run(main())


# ---- the soak -------------------------------------------------------------------------------------------

def soak(pg, pgmp, pooldb, table, role, clients: int, seconds: float, pool_size: int = POOL_SIZE) -> None:
    no_servers_left(pg, pooldb)
    pg.psql(f"GRANT ALL ON {table} TO {role}", user=pooldb.user, db=pooldb.name)
    proxy = start(pgmp, pooldb, size=pool_size, max_client_conn=clients + 100, query_wait_timeout=30)
    workers = wait_for(lambda: psutil.Process(proxy.pid).children(), timeout=10, message="pgmp has no worker")
    seed = int(os.environ.get("PGMP_SOAK_SEED") or random.randrange(1 << 32))
    run = Soak(proxy, pooldb, table, role, seconds, seed)
    mes = [Me(run, i) for i in range(1, clients + 1)]

    threads = Threads()
    for me in mes:
        if me.i % ASYNCPG_EVERY:
            threads.start(f"psycopg-c{me.i}", psycopg_client, me)
    threads.start("asyncpg", asyncpg_clients, [me for me in mes if me.i % ASYNCPG_EVERY == 0], seconds + 60)
    threads.join(seconds + 90)

    assert not run.violations, f"clients saw what was not theirs ({run.summary()}):\n" + "\n".join(run.violations[:40])
    assert not run.errors, f"unexpected exceptions ({run.summary()}):\n" + "\n".join(run.errors[:40])
    assert all(run.ops[op.__name__] for op in [*PSYCOPG_OPS, *ASYNCPG_OPS]), f"an operation never ran: {run.summary()}"
    assert proxy.alive, f"pgmp exited with {proxy.poll()}:\n{proxy.log()[-3000:]}"
    assert psutil.Process(proxy.pid).children() == workers, "pgmp's worker was replaced: did it crash?"
    assert select_one(proxy, pooldb) == 1
    wait_for(lambda: server_count(pg, pooldb) <= pool_size, timeout=15,
             message=lambda: f"{server_count(pg, pooldb)} servers of the role remain, pool size {pool_size}")
    with direct(pg, pooldb) as conn:
        left = conn.execute(f"SELECT count(*) FROM {table} WHERE who LIKE 'raw%' OR x = -1").fetchone()[0]
    assert left == 0, f"{left} rows of abandoned COPYs or transactions were committed"
    log = proxy.log()
    assert "internal error" not in log.lower() and "Traceback" not in log, log[-5000:]
    print(run.summary())


def test_soak_40_clients_for_10_seconds(pg, pgmp, pooldb, table, other_role):
    soak(pg, pgmp, pooldb, table, other_role, clients=40, seconds=10)


def test_soak_with_a_server_for_nearly_every_client(pg, pgmp, pooldb, table, other_role):
    """Most servers stay held by their last client between transactions (Pool.hold); the clients that
    find none take a held one: holding, handing over and the clients' hang-ups all at once."""
    soak(pg, pgmp, pooldb, table, other_role, clients=12, seconds=8, pool_size=10)


@pytest.mark.slow
def test_soak_200_clients_for_60_seconds(pg, pgmp, pooldb, table, other_role):
    soak(pg, pgmp, pooldb, table, other_role, clients=200, seconds=60)
