"""Transaction-mode isolation under attack: whatever one client does, the next client on the same
server sees a fresh session.

Hypothesis draws a sequence of session-changing statements (SET ROLE, set_config, search_path,
advisory locks, temporary tables, LISTEN, SQL PREPARE, WITH HOLD cursors, transactions and
savepoints, errors, DISCARD/RESET ALL...) sent by an attacker through the simple, extended or
named-prepared protocol; then a victim on the same single-server pool probes its session. It must
see exactly what it saw before the attacker came. More examples: PGMP_FUZZ_EXAMPLES=500.
"""
from __future__ import annotations

import os

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.pq import TransactionStatus

from tests.integration.test_pooling import dsn, other_role, pooldb, start  # noqa: F401 (fixtures)

EXAMPLES = int(os.environ.get("PGMP_FUZZ_EXAMPLES", "25"))

ATTACKS = [
    "SET ROLE {role}", "RESET ROLE", "SET SESSION AUTHORIZATION DEFAULT",
    "SET search_path = schema_a", "SET statement_timeout = '123s'", "SET application_name = 'attacker'",
    "SET DateStyle = 'SQL, DMY'", "SET TIME ZONE 'Asia/Tokyo'", "SET work_mem TO DEFAULT",
    "SELECT set_config('search_path', 'schema_c', false)", "SELECT set_config('work_mem', '7MB', false)",
    "SELECT set_config('work_mem', v, false) FROM (VALUES ('9MB')) AS t(v)",
    "SELECT set_config('statement_timeout', '5s', true)",
    "DO $$ BEGIN PERFORM set_config('work_mem', '11MB', false); END $$",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SELECT pg_advisory_lock(4242)", "SELECT pg_advisory_unlock_all()", "SELECT pg_try_advisory_lock(77)",
    "CREATE TEMP TABLE IF NOT EXISTS attacker_tmp (x int)", "LISTEN attacker_chan", "UNLISTEN *",
    "PREPARE attacker_stmt AS SELECT 1", "DEALLOCATE ALL",
    "DECLARE attacker_cur CURSOR WITH HOLD FOR SELECT 1",
    "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT sp", "ROLLBACK TO SAVEPOINT sp", "RELEASE SAVEPOINT sp",
    "SET LOCAL work_mem = '3MB'", "RESET ALL", "DISCARD ALL", "DISCARD TEMP", "SELECT 1/0",
    "SET search_path = schema_a; SELECT 1", "BEGIN; SET work_mem = '5MB'; COMMIT",
]

PROBE = """SELECT current_user, session_user, current_setting('search_path'),
  current_setting('statement_timeout'), current_setting('application_name'), current_setting('DateStyle'),
  current_setting('TimeZone'), current_setting('work_mem'), current_setting('default_transaction_read_only'),
  (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
  (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
  (SELECT count(*) FROM pg_listening_channels()),
  (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),
  (SELECT count(*) FROM pg_cursors WHERE is_holdable)"""

steps = st.lists(st.tuples(st.sampled_from(ATTACKS), st.sampled_from(["simple", "extended", "prepared"])),
                 min_size=1, max_size=12)


def send(conn: psycopg.Connection, sql: str, how: str) -> None:
    if how == "simple" or ";" in sql:
        conn.pgconn.exec_(sql.encode())            # one simple Query (several statements allowed)
        return
    try:
        conn.execute(sql, prepare=how == "prepared")
    except psycopg.Error:
        pass                                        # many attacks fail on purpose (1/0, COMMIT outside...)


def probe(proxy, db) -> tuple:
    with psycopg.connect(dsn(proxy, db, application_name="victim"), autocommit=True) as victim:
        return tuple(victim.execute(PROBE).fetchone())


@pytest.mark.parametrize("ending", ["stays", "leaves"])
def test_no_session_state_reaches_the_next_client(pgmp, pooldb, other_role, ending):  # noqa: F811
    # one server: the victim always gets the server the attacker just used; a pinned or
    # in-transaction attacker makes it wait, for query_wait_timeout at most
    proxy = start(pgmp, pooldb, 1, query_wait_timeout=2)
    baseline = probe(proxy, pooldb)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(steps)
    def attack(sequence):
        attacker = psycopg.connect(dsn(proxy, pooldb, application_name="attacker-client"), autocommit=True)
        try:
            for sql, how in sequence:
                if attacker.closed or attacker.broken:
                    break
                send(attacker, sql.format(role=other_role), how)
            if ending == "stays" and not attacker.closed and not attacker.broken:
                if attacker.info.transaction_status != TransactionStatus.IDLE:
                    attacker.pgconn.exec_(b"ROLLBACK")
                try:
                    seen = probe(proxy, pooldb)
                except psycopg.OperationalError:
                    seen = None                      # the attacker is pinned to the server: it leaves first
                if seen is not None:
                    assert seen == baseline, (sequence, seen)
                    return
        finally:
            attacker.close()
        assert probe(proxy, pooldb) == baseline, sequence

    attack()
