"""pgmp is transparent: what a client sees through it is what a direct PostgreSQL connection shows.

One job: reproduce, as failing tests, the places where a client can tell pgmp is in between
(backend keys, a server left dirty by a client that went away mid-message, session state that
leaks to or is lost between clients sharing a server, protocol errors, two-phase commit with
prepared statements). Every test asserts what PostgreSQL itself would do. Tests run on the
module's own role and database (tests.integration.test_pooling's ``pooldb``), pools are small
so that the next client certainly gets the same server, waits have deadlines and pgmp's
query_wait_timeout is short, so a wedged pool fails in seconds instead of hanging.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from pgmp.protocol.messages import frame
from tests.integration import rawpg, test_pooling
from tests.integration.test_pooling import PoolDB, Threads, direct, dsn, no_servers_left, raw_login, types_of
from tests.support import PASSWORDS, wait_for

pooldb = test_pooling.pooldb    # the fixtures, made for this module: its own role and database
table = test_pooling.table

MODES = ["session", "transaction"]
WAIT = 5          # pgmp's query_wait_timeout in these tests, seconds
DEADLINE = 8      # how long a client gets for what a direct connection does at once


def start(pgmp, db: PoolDB, size: int, mode: str = "transaction", users=None, **config):
    """A pgmp pooling the module's database (``size`` servers, ``mode``), query_wait_timeout=5."""
    return pgmp.start(config={"pool_mode": mode, "default_pool_size": size, "query_wait_timeout": WAIT, **config},
                      databases={db.name: {}}, users={**PASSWORDS, db.user: db.password, **(users or {})})


def within(timeout: float, what: str, fn, abort=None):
    """fn() in a thread; its result, or a failure naming ``what`` if it is not done in ``timeout``
    (then ``abort()`` is called, to unblock the thread)."""
    box = {}
    threads = Threads()
    threads.start(what, lambda: box.setdefault("result", fn()))
    try:
        threads.join(timeout)
    finally:
        if abort is not None and threads.threads[0].is_alive():
            abort()
            threads.threads[0].join(DEADLINE)
    return box["result"]


def hang_up(conn: psycopg.Connection) -> None:
    """Shut the connection's socket down under a thread blocked on it: pgmp sees the client leave."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def select_one(proxy, db: PoolDB):
    """A fresh psycopg client's SELECT 1 through pgmp, within the deadline."""
    with psycopg.connect(dsn(proxy, db), autocommit=True) as conn:
        return within(DEADLINE, "SELECT 1 after the raw client left",
                      lambda: conn.execute("SELECT 1").fetchone()[0], abort=lambda: hang_up(conn))


def role_backends(pg, db: PoolDB, where: str = "true") -> int:
    return int(pg.psql(f"select count(*) from pg_stat_activity where usename = '{db.user}' and {where}"))


@dataclass
class Roles:
    other: str         # granted to the module role: SET ROLE target
    su: str            # a superuser that may SET SESSION AUTHORIZATION
    su_password: str


@pytest.fixture(scope="module")
def roles(pg, pooldb):
    r = Roles(f"{pooldb.user}_other", f"{pooldb.user}_su", f"su_{uuid.uuid4().hex[:10]}")
    pg.psql(f"CREATE ROLE {r.other} NOLOGIN;\nGRANT {r.other} TO {pooldb.user};\n"
            f"CREATE ROLE {r.su} LOGIN SUPERUSER PASSWORD '{r.su_password}';\n")
    yield r
    pg.psql(f"DROP ROLE IF EXISTS {r.other};\nDROP ROLE IF EXISTS {r.su};\n")


# ---- session mode: the backend key is the server's --------------------------------------------

def test_backend_pid_is_the_servers_pid_in_session_mode(pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=2, mode="session")
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_pg_terminate_backend_of_backend_pid_ends_the_session(pg, pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=2, mode="session")
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a, direct(pg, pooldb) as killer:
        assert a.execute("SELECT 1").fetchone() == (1,)
        assert killer.execute("SELECT pg_terminate_backend(%s)", (a.info.backend_pid,)).fetchone() == (True,)

        def a_is_gone() -> bool:
            try:
                a.execute("SELECT 1")
            except psycopg.OperationalError:
                return True
            return False
        wait_for(a_is_gone, timeout=DEADLINE, message="the terminated session still answers queries")


@pytest.mark.parametrize("mode", MODES)
def test_a_terminated_backend_gives_its_client_one_fatal_error_as_directly(pg, pgmp, pooldb, mode):
    """pg_terminate_backend: PostgreSQL sends FATAL 57P01 and closes. The client must see that one
    error and then the end of the connection, not pgmp's own second error on top (psycopg_pool's
    check: "received 2 results from command 'BEGIN'")."""
    proxy = start(pgmp, pooldb, size=1, mode=mode)
    with raw_login(proxy.host, proxy.port, pooldb) as raw, direct(pg, pooldb) as killer:
        raw.send(rawpg.query("BEGIN"))                      # holds the server in both modes
        raw.read_until(b"Z")
        pid = int(raw.scalar("SELECT pg_backend_pid()"))
        assert killer.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        errors_seen = []
        try:
            while True:
                msg = raw.read_message(timeout=DEADLINE)
                if msg.type == b"E":
                    errors_seen.append(msg.fields)
        except rawpg.Closed:
            pass
        assert [f["C"] for f in errors_seen] == ["57P01"], errors_seen


def test_notify_carries_the_notifiers_backend_pid(pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=2, mode="session")
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        a.execute("LISTEN transparency_chan")
        b.execute("NOTIFY transparency_chan, 'hi'")
        got = list(a.notifies(timeout=DEADLINE, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("transparency_chan", "hi")]
        assert got[0].pid == b.info.backend_pid, (got[0].pid, b.info.backend_pid)


# ---- a client that leaves mid-message or mid-request must not wedge or dirty the server --------

@pytest.mark.parametrize("mode", MODES)
def test_client_gone_inside_a_copydata_frame_leaves_a_working_pool(pgmp, pooldb, mode):
    """SELECT 1 then the head of a CopyData announcing 1,000,004 bytes, with only 16 of them:
    the server that got the head waits for the rest of the frame forever."""
    proxy = start(pgmp, pooldb, size=1, mode=mode)
    with raw_login(proxy.host, proxy.port, pooldb) as raw:
        raw.send(rawpg.query("SELECT 1") + rawpg.header(b"d", 1_000_004) + b"x" * 16)
        assert types_of(raw.read_until(b"Z")) == "TDCZ"
    assert select_one(proxy, pooldb) == 1
    assert select_one(proxy, pooldb) == 1


@pytest.mark.parametrize("mode, reset", [("session", None), ("session", ""), ("transaction", None)],
                         ids=["session", "session-no-reset-query", "transaction"])
def test_client_gone_after_execute_without_sync_leaves_no_open_transaction(pg, pgmp, pooldb, mode, reset):
    """Parse/Bind/Execute/Flush and no Sync: the server is inside the implicit transaction of the
    extended protocol; the next client must not run in it. (In session mode the default DISCARD ALL
    fails there, "cannot be executed within a pipeline", and so closes the server: hence a case
    without server_reset_query.)"""
    no_servers_left(pg, pooldb)
    proxy = start(pgmp, pooldb, size=1, mode=mode, server_reset_query=reset)
    with raw_login(proxy.host, proxy.port, pooldb) as raw:
        raw.send(rawpg.parse("SELECT 1") + rawpg.bind() + rawpg.execute() + rawpg.flush())
        assert types_of(raw.read_until(b"C")) == "12DC"

    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as conn:
        row = within(DEADLINE, "the client after the one that left without Sync",
                     lambda: conn.execute("SELECT 1, now() = statement_timestamp()").fetchone(),
                     abort=lambda: hang_up(conn))
        status = conn.info.transaction_status
    assert row == (1, True), "the next client ran inside the transaction the raw client left open"
    assert status == TransactionStatus.IDLE
    wait_for(lambda: role_backends(pg, pooldb, "state like 'idle in transaction%'") == 0, timeout=DEADLINE,
             message="a server of the role is still idle in transaction")
    assert select_one(proxy, pooldb) == 1


@pytest.mark.parametrize("mode", MODES)
def test_client_gone_inside_copy_in_leaves_a_working_pool_and_no_row(pg, pgmp, pooldb, table, mode):
    proxy = start(pgmp, pooldb, size=1, mode=mode)
    with raw_login(proxy.host, proxy.port, pooldb) as raw:
        raw.send(rawpg.query(f"COPY {table} FROM STDIN"))
        assert types_of(raw.read_until(b"G")) == "G"
        raw.send(rawpg.copy_data(b"1\tleft mid-copy\n"))
    assert select_one(proxy, pooldb) == 1
    assert select_one(proxy, pooldb) == 1
    with direct(pg, pooldb) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


# ---- transaction mode: session state follows its client, and only its client -----------------

SETTINGS = [
    # (name to read, how A sets it, A's value, how B sets it, B's value)
    ("default_transaction_read_only", "SET default_transaction_read_only TO on", "on",
     "SET default_transaction_read_only TO off", "off"),
    ("statement_timeout", "SET statement_timeout = '1234ms'", "1234ms", "SET statement_timeout = '4321ms'", "4321ms"),
    ("myapp.x", "SET myapp.x = 'v'", "v", "SET myapp.x = 'u'", "u"),
    ("myapp.y", "SELECT set_config('myapp.y', 'w', false)", "w", "SELECT set_config('myapp.y', 'z', false)", "z"),
]


@pytest.mark.parametrize("name, set_a, value_a, set_b, value_b", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_session_setting_follows_its_client_in_transaction_mode(pg, pgmp, pooldb, name, set_a, value_a,
                                                                set_b, value_b):
    """Pool of 1: B runs on A's server between A's statements. A keeps its value, B never sees it."""
    with direct(pg, pooldb) as d:
        default = d.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0]
    proxy = start(pgmp, pooldb, size=1)

    def show(conn):
        return conn.execute(f"SHOW {name}").fetchone()[0]
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        a.execute(set_a)
        assert show(a) == value_a
        for i in range(3):
            with b.transaction():
                assert b.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        assert show(a) == value_a, f"A lost its {name} after B used the server"
        seen = b.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0]
        assert seen == default or (default is None and seen == ""), f"A's {name} leaked to B: {seen!r}"
        b.execute(set_b)
        for i in range(3):
            with b.transaction():
                assert show(b) == value_b
            assert show(a) == value_a, f"A lost its {name} after B set its own"


def test_set_role_stays_with_its_client(pgmp, pooldb, roles):
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a, \
            psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        a.execute(f"SET ROLE {roles.other}")
        assert a.execute("SELECT current_user").fetchone() == (roles.other,)
        assert b.execute("SELECT current_user, session_user").fetchone() == (pooldb.user, pooldb.user), \
            "A's SET ROLE leaked to B"
        assert a.execute("SELECT current_user").fetchone() == (roles.other,), "A lost its SET ROLE"


def test_set_session_authorization_stays_with_its_client(pgmp, pooldb, roles):
    """As a superuser (the module role is not one): the pool is the superuser's."""
    proxy = start(pgmp, pooldb, size=1, users={roles.su: roles.su_password})

    def connect():
        return psycopg.connect(proxy.dsn(user=roles.su, password=roles.su_password, dbname=pooldb.name),
                               autocommit=True)
    with connect() as a, connect() as b:
        a.execute(f"SET SESSION AUTHORIZATION {pooldb.user}")
        assert a.execute("SELECT current_user, session_user").fetchone() == (pooldb.user, pooldb.user)
        assert b.execute("SELECT current_user, session_user").fetchone() == (roles.su, roles.su), \
            "A's SET SESSION AUTHORIZATION leaked to B"
        assert a.execute("SELECT current_user, session_user").fetchone() == (pooldb.user, pooldb.user), \
            "A lost its SET SESSION AUTHORIZATION"


def test_set_config_does_not_leak_to_the_next_client(pgmp, pooldb):
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a:
        assert a.execute("SELECT set_config('myapp.leak', 'secret', false)").fetchone() == ("secret",)
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
            seen = b.execute("SELECT current_setting('myapp.leak', true)").fetchone()[0]
    assert seen in (None, ""), f"another client's set_config leaked: {seen!r}"


TRY_LOCK = "SELECT CASE WHEN pg_try_advisory_lock(4242) THEN pg_advisory_unlock(4242) ELSE false END"


def test_session_advisory_lock_stays_with_its_client(pgmp, pooldb):
    """A holds a session-level advisory lock; on A's server B's try-lock would succeed (re-entrant)."""
    proxy = start(pgmp, pooldb, size=2)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as b:
        with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as a:
            a.execute("SELECT pg_advisory_lock(4242)")
            for i in range(5):
                with b.transaction():
                    assert b.execute(TRY_LOCK).fetchone() == (False,), f"B got A's lock (transaction {i})"
            assert a.execute("SELECT pg_advisory_unlock(4242)").fetchone() == (True,), "A lost its lock"
            a.execute("SELECT pg_advisory_lock(4242)")
        wait_for(lambda: b.execute(TRY_LOCK).fetchone() == (True,), timeout=DEADLINE,
                 message="A's advisory lock outlived A")


# ---- protocol errors as PostgreSQL reports them ---------------------------------------------------

@pytest.mark.parametrize("payload", [b"\0SELECT 1", b"S_1\0SELECT 1", b"S_1"],
                         ids=["text-unterminated", "named-text-unterminated", "name-unterminated"])
def test_parse_with_a_missing_nul_is_the_protocol_violation_postgres_reports(pgmp, pooldb, payload):
    """A well-framed Parse whose string has no NUL: PostgreSQL answers ERROR 08P01 "invalid string
    in message" and then ReadyForQuery; pgmp may instead close the connection, never answer XX000."""
    proxy = start(pgmp, pooldb, size=2)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True) as bystander:
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        with raw_login(proxy.host, proxy.port, pooldb) as raw:
            raw.send(frame(b"P", payload) + rawpg.sync())
            err = raw.expect_error()
            assert (err.get("C"), err.get("M")) == ("08P01", "invalid string in message"), err
            try:
                assert types_of(raw.read_until(b"Z")) == "Z"
            except rawpg.Closed:
                pass                                    # closed by pgmp: acceptable for a protocol violation
            else:
                assert raw.scalar("SELECT 'after'") == "after"
        for i in range(3):
            assert bystander.execute("SELECT %s::int", (i,)).fetchone() == (i,)


# ---- two-phase commit with psycopg's prepared statements ---------------------------------------

@pytest.fixture
def tpc_table(pg, pooldb, table):
    with direct(pg, pooldb) as d:
        if int(d.execute("SHOW max_prepared_transactions").fetchone()[0]) == 0:
            pytest.skip("the shared test cluster runs with max_prepared_transactions = 0 "
                        "(tests/support/cluster.py SERVER_SETTINGS does not set it): PREPARE TRANSACTION fails")
    yield table
    with direct(pg, pooldb) as d:           # a failed test must not leave the table locked
        for (gid,) in d.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()").fetchall():
            d.execute(f"ROLLBACK PREPARED '{gid}'")


def test_two_phase_commit_with_prepared_statements(pg, pgmp, pooldb, tpc_table):
    proxy = start(pgmp, pooldb, size=2)
    gtrid = f"gtrid-{uuid.uuid4()}"

    def connect(**kw):
        return psycopg.connect(dsn(proxy, pooldb), prepare_threshold=0, **kw)

    def statements(conn, tag: str) -> None:
        for i in range(3):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
            assert conn.execute("SELECT %s::text || 'x'", (tag,)).fetchone() == (f"{tag}x",)
            assert conn.execute(f"SELECT count(*) >= 0 FROM {tpc_table} WHERE x = %s", (i,)).fetchone() == (True,)
            conn.commit()

    with connect() as a, connect(autocommit=True) as b:
        a.tpc_begin(a.xid(1, gtrid, "bq"))
        a.execute(f"INSERT INTO {tpc_table} VALUES (%s, %s)", (1, "a"))
        assert a.execute(f"SELECT count(*) FROM {tpc_table} WHERE who = %s", ("a",)).fetchone() == (1,)
        a.tpc_prepare()
        a.tpc_commit()
        statements(a, "a")
        statements(b, "b")
        c = connect()                              # prepared by one connection, committed by another
        try:
            c.tpc_begin(c.xid(2, gtrid, "bq"))
            c.execute(f"INSERT INTO {tpc_table} VALUES (%s, %s)", (2, "c"))
            c.tpc_prepare()
        finally:
            c.close()                              # not `with`: its exit would commit()
        assert [(x.format_id, x.bqual) for x in b.tpc_recover() if x.gtrid == gtrid] == [(2, "bq")]
        b.tpc_commit(b.xid(2, gtrid, "bq"))
        assert [x for x in b.tpc_recover() if x.gtrid == gtrid] == []
        statements(a, "a2")
        statements(b, "b2")
    with direct(pg, pooldb) as d:
        assert d.execute(f"SELECT x, who FROM {tpc_table} ORDER BY x").fetchall() == [(1, "a"), (2, "c")]


# ---- a prepared statement whose table changed ------------------------------------------------

def test_stale_prepared_plan_fails_once_then_works_again(pg, pgmp, pooldb, table):
    """ALTER TABLE under a prepared SELECT *: the server says "cached plan must not change result
    type" (0A000). A direct connection keeps failing until the client prepares again; through pgmp
    the error reaches the client once and the next execution prepares the statement afresh."""
    proxy = start(pgmp, pooldb, size=1)
    with psycopg.connect(dsn(proxy, pooldb), autocommit=True, prepare_threshold=0) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        sql = f"SELECT * FROM {table}"
        assert conn.execute(sql).fetchall() == [(1, "a")]
        assert conn.execute(sql).fetchall() == [(1, "a")]
        with direct(pg, pooldb) as d:
            d.execute(f"ALTER TABLE {table} ADD COLUMN y int DEFAULT 7")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan must not change result type"):
            conn.execute(sql).fetchall()
        assert conn.execute(sql).fetchall() == [(1, "a", 7)]
        assert conn.execute(sql).fetchall() == [(1, "a", 7)]


def test_asyncpg_reprepares_a_stale_statement_through_pgmp(pg, pgmp, pooldb, table):
    """asyncpg's own answer to 0A000 outside a transaction: prepare the statement again and retry.
    Through pgmp that retry must reach a fresh server-side statement, not the stale one."""
    import asyncio

    import asyncpg
    proxy = start(pgmp, pooldb, size=1)

    async def scenario():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=pooldb.user,
                                     password=pooldb.password, database=pooldb.name)
        try:
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            sql = f"SELECT * FROM {table}"
            assert [tuple(r) for r in await conn.fetch(sql)] == [(1, "a")]
            with direct(pg, pooldb) as d:
                d.execute(f"ALTER TABLE {table} ADD COLUMN y int DEFAULT 7")
            assert [tuple(r) for r in await conn.fetch(sql)] == [(1, "a", 7)]
            async with conn.transaction():
                with direct(pg, pooldb) as d:
                    d.execute(f"ALTER TABLE {table} ADD COLUMN z int DEFAULT 8")
                with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError):
                    await conn.fetch(sql)
            assert [tuple(r) for r in await conn.fetch(sql)] == [(1, "a", 7, 8)]
        finally:
            await conn.close()
    asyncio.run(scenario())
