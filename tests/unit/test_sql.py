"""pgmp.protocol.sql: which statements of a query text change session state.

The SET tables give the value PostgreSQL's flatten_set_variable_args() would
hand to the GUC machinery; each was checked against a PostgreSQL 15 server
(running the SET, then set_config(name, value, false) in a fresh session, and
comparing current_setting()). These tests need no server.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgmp.protocol import sql
from pgmp.protocol.sql import Effect, session_effects


def S(name: str, value: str) -> Effect:
    return Effect("set", name, value)


def R(name: str) -> Effect:
    return Effect("reset", name)


def PIN(why: str) -> Effect:
    return Effect("pin", why)


def UNKNOWN(name: str = "") -> Effect:
    return Effect("unknown", name)


BEGIN, COMMIT, ROLLBACK, SAVEPOINT = Effect("begin"), Effect("commit"), Effect("rollback"), Effect("savepoint")


def effects(text: str) -> tuple[Effect, ...]:
    return session_effects(text.encode())


# ---- SET name {TO|=} value: (statement, GUC name, set_config value) ------------------------

SETS = [
    # the forms the brief spells out
    ("SET statement_timeout = 5000", "statement_timeout", "5000"),
    ("SET statement_timeout TO '5s'", "statement_timeout", "5s"),
    ("SET datestyle TO iso, mdy", "datestyle", "iso, mdy"),
    ("set application_name = 'x''y'", "application_name", "x'y"),
    ('SET search_path TO "My Schema", public', "search_path", '"My Schema", public'),
    ("SET search_path = 'a', 'b'", "search_path", "a, b"),
    # keywords and names are case-insensitive; unquoted words fold, quoted ones do not
    ("sEt StateMent_TimeOut tO 10", "statement_timeout", "10"),
    ("SET application_name = MyApp", "application_name", "myapp"),
    ('SET application_name = "MyApp"', "application_name", "MyApp"),
    ("SET application_name = 'MyApp'", "application_name", "MyApp"),
    ('SET "Application_Name" = x', "application_name", "x"),
    ('SET "MyApp"."Y" = 1', "myapp.y", "1"),
    ("SET myapp.setting_1 = 'v'", "myapp.setting_1", "v"),
    ("SET SESSION work_mem = '64MB'", "work_mem", "64MB"),
    ("SET session TO 'x'", "session", "x"),
    # booleans: ON/TRUE/FALSE are keywords, OFF and the rest plain words
    ("SET enable_seqscan = ON", "enable_seqscan", "on"),
    ("SET enable_seqscan = OFF", "enable_seqscan", "off"),
    ("SET enable_seqscan TO TRUE", "enable_seqscan", "true"),
    ("SET enable_seqscan TO False", "enable_seqscan", "false"),
    ("SET enable_seqscan TO yes", "enable_seqscan", "yes"),
    ("SET enable_seqscan TO 'On'", "enable_seqscan", "On"),
    ("SET application_name = none", "application_name", "none"),
    # numbers: an Integer prints with %d, a Float keeps its text
    ("SET application_name = 0007", "application_name", "7"),
    ("SET application_name = -5", "application_name", "-5"),
    ("SET application_name =-5", "application_name", "-5"),
    ("SET application_name = +5", "application_name", "5"),
    ("SET application_name = - 2147483648", "application_name", "-2147483648"),
    ("SET application_name = 99999999999", "application_name", "99999999999"),
    ("SET application_name = -1.50e3", "application_name", "-1.50e3"),
    ("SET application_name = 1.", "application_name", "1."),
    ("SET application_name = .5", "application_name", ".5"),
    ("SET application_name = 1.e5", "application_name", "1.e5"),
    ("SET extra_float_digits = -0", "extra_float_digits", "0"),
    # string constants
    ("SET myapp.x = ''", "myapp.x", ""),
    ("SET myapp.x = 'a;b -- c /* d */'", "myapp.x", "a;b -- c /* d */"),
    ("SET myapp.x = E'x\\x41\\101\\u00e9\\n'''", "myapp.x", "xAA\u00e9\n'"),
    ("SET myapp.x = e'\\'\\\\\\t\\q'", "myapp.x", "'\\\tq"),
    ("SET myapp.x = E'\\xC3\\xA9'", "myapp.x", "\u00e9"),
    ("SET myapp.x = $$it's; here$$", "myapp.x", "it's; here"),
    ("SET myapp.x = $tag$a$$b$tag$", "myapp.x", "a$$b"),
    ("SET myapp.x = 'caf\u00e9'", "myapp.x", "caf\u00e9"),
    ("SET myapp.x = 'a'\n'b'", "myapp.x", "ab"),
    ("SET myapp.x = 'a' -- comment\n  'b'\n'c'", "myapp.x", "abc"),
    ("SET myapp.x = E'a'\n'\\n'", "myapp.x", "a\n"),
    ("SET search_path = 'A', b, 1, -2.5", "search_path", '"A", b, 1, -2.5'),
    ("SET myapp.x = '/* not a comment */'", "myapp.x", "/* not a comment */"),
    ("SET /* c */ myapp.x /* nested /* c */ */ = -- c\n 'v'", "myapp.x", "v"),
    # identifiers are cut to 63 bytes, at a character boundary
    ("SET application_name = " + "a" * 70, "application_name", "a" * 63),
    ("SET myapp.x = \"" + "a" * 62 + "\u00e9\"", "myapp.x", "a" * 62),
    # GUC_LIST_QUOTE lists: each string argument goes through quote_identifier()
    ("SET search_path = '$user', public", "search_path", '"$user", public'),
    ("SET search_path = 'a$b', '', 'Ab', \"Cd\", E, \"select\", 'int', public", "search_path",
     '"a$b", "", "Ab", "Cd", e, "select", "int", public'),
    ("SET search_path = 'has\"quote'", "search_path", '"has""quote"'),
    ("SET search_path = pg_catalog, x_1", "search_path", "pg_catalog, x_1"),
    ("SET search_path = 'caf\u00e9'", "search_path", '"caf\u00e9"'),
    ("SET temp_tablespaces = 'Fast', pg_default", "temp_tablespaces", '"Fast", pg_default'),
    ("SET search_path = ''", "search_path", '""'),
    # special forms
    ("SET TIME ZONE 'Europe/Paris'", "timezone", "Europe/Paris"),
    ("SET TIME ZONE \"Europe/Paris\"", "timezone", "Europe/Paris"),
    ("set time zone UTC", "timezone", "utc"),
    ("SET TIME ZONE -7", "timezone", "-7"),
    ("SET TIME ZONE 5.5", "timezone", "5.5"),
    ("SET SESSION TIME ZONE 'UTC'", "timezone", "UTC"),
    ("SET timezone TO 'UTC'", "timezone", "UTC"),
    ("SET NAMES 'LATIN1'", "client_encoding", "LATIN1"),
    ("SET client_encoding = 'UTF8'", "client_encoding", "UTF8"),
    ("SET SCHEMA 'My'", "search_path", '"My"'),
    ("SET SCHEMA 'public'", "search_path", "public"),
    ("SET XML OPTION DOCUMENT", "xmloption", "DOCUMENT"),
    ("set xml option content", "xmloption", "CONTENT"),
    ("SET xmloption = document", "xmloption", "document"),
    ("SET ROLE alice", "role", "alice"),
    ("SET ROLE ALICE", "role", "alice"),
    ('SET ROLE "Alice"', "role", "Alice"),
    ("SET ROLE 'Alice'", "role", "Alice"),
    ("SET SESSION ROLE alice", "role", "alice"),
    ("SET role TO alice", "role", "alice"),
    ("SET SESSION AUTHORIZATION bob", "session_authorization", "bob"),
    ("SET SESSION AUTHORIZATION 'Bob'", "session_authorization", "Bob"),
    ('set session authorization "Bob"', "session_authorization", "Bob"),
]


@pytest.mark.parametrize("text,name,value", SETS)
def test_set_value(text, name, value):
    assert effects(text) == (S(name, value),)


# ---- everything else: (statement, effects) ------------------------------------------------

CASES = [
    # reset
    ("RESET statement_timeout", (R("statement_timeout"),)),
    ("reset MyApp.X", (R("myapp.x"),)),
    ("SET statement_timeout TO DEFAULT", (R("statement_timeout"),)),
    ("SET statement_timeout = default", (R("statement_timeout"),)),
    ("SET SESSION statement_timeout TO DEFAULT", (R("statement_timeout"),)),
    ("RESET TIME ZONE", (R("timezone"),)),
    ("SET TIME ZONE LOCAL", (R("timezone"),)),
    ("SET TIME ZONE DEFAULT", (R("timezone"),)),
    ("RESET ROLE", (R("role"),)),
    ("SET ROLE NONE", (R("role"),)),
    ("SET ROLE 'none'", (R("role"),)),
    ("RESET SESSION AUTHORIZATION", (R("session_authorization"),)),
    ("SET SESSION AUTHORIZATION DEFAULT", (R("session_authorization"),)),
    ("SET NAMES", (R("client_encoding"),)),
    ("SET NAMES DEFAULT", (R("client_encoding"),)),
    ("RESET ALL", (Effect("reset_all"),)),
    ("RESET TRANSACTION ISOLATION LEVEL", ()),
    ("RESET transaction_isolation", ()),
    # SET SESSION CHARACTERISTICS: several modes, commas optional
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
     (S("default_transaction_isolation", "serializable"),)),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
     (S("default_transaction_isolation", "repeatable read"), S("default_transaction_read_only", "on"))),
    ("set session characteristics as transaction read write not deferrable isolation level read committed",
     (S("default_transaction_read_only", "off"), S("default_transaction_deferrable", "off"),
      S("default_transaction_isolation", "read committed"))),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED, DEFERRABLE",
     (S("default_transaction_isolation", "read uncommitted"), S("default_transaction_deferrable", "on"))),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL CHAOS", (UNKNOWN("default_transaction_isolation"),)),
    # not session-level
    ("SET LOCAL statement_timeout = 5", ()),
    ("set local search_path to x", ()),
    ("SET LOCAL TIME ZONE 'UTC'", ()),
    ("SET LOCAL ROLE alice", ()),
    ("SET LOCAL SESSION AUTHORIZATION bob", ()),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", ()),
    ("SET TRANSACTION READ ONLY", ()),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", ()),
    ("SET CONSTRAINTS ALL DEFERRED", ()),
    ("SET transaction_isolation = 'serializable'", ()),
    ("SET transaction_read_only TO on", ()),
    # cannot follow with certainty
    ("SET statement_timeout FROM CURRENT", (UNKNOWN("statement_timeout"),)),
    ("SET TIME ZONE INTERVAL '+02:30' HOUR TO MINUTE", (UNKNOWN("timezone"),)),
    ("SET TIME ZONE INTERVAL(2) '1 hour'", (UNKNOWN("timezone"),)),
    ("SET myapp.x = U&'d\\0061t\\+000061'", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = B'101'", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = 5s", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = 1e", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = user", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = $1", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = 'a' 'b'", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = 'a',", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x =", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = 'a', DEFAULT", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = 'unterminated", (UNKNOWN("myapp.x"),)),
    ("SET myapp.x = E'\\uD800'", (UNKNOWN("myapp.x"),)),
    ("SET CATALOG 'db'", (UNKNOWN("catalog"),)),
    ("SET NAMES utf8", (UNKNOWN("client_encoding"),)),
    ("SET SCHEMA public", (UNKNOWN("search_path"),)),
    ("SET XML OPTION maybe", (UNKNOWN("xmloption"),)),
    ("SET ROLE 'a', 'b'", (UNKNOWN("role"),)),
    ("SET", (UNKNOWN(),)),
    ("RESET", (UNKNOWN(),)),
    ("RESET a b", (UNKNOWN("a"),)),
    # discard
    ("DISCARD ALL", (Effect("discard_all"),)),
    ("discard plans", (Effect("discard", "plans"),)),
    ("DISCARD SEQUENCES", (Effect("discard", "sequences"),)),
    ("DISCARD TEMP", (Effect("discard", "temp"),)),
    ("DISCARD TEMPORARY", (Effect("discard", "temp"),)),
    ("DISCARD EVERYTHING", (UNKNOWN(),)),
    # transaction control
    ("BEGIN", (BEGIN,)),
    ("begin work", (BEGIN,)),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY", (BEGIN,)),
    ("START TRANSACTION", (BEGIN,)),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", (BEGIN,)),
    ("COMMIT", (COMMIT,)),
    ("COMMIT WORK", (COMMIT,)),
    ("END", (COMMIT,)),
    ("END TRANSACTION", (COMMIT,)),
    ("COMMIT AND NO CHAIN", (COMMIT,)),
    ("COMMIT AND CHAIN", (COMMIT, BEGIN)),
    ("END AND CHAIN", (COMMIT, BEGIN)),
    ("ROLLBACK", (ROLLBACK,)),
    ("ABORT", (ROLLBACK,)),
    ("ROLLBACK TRANSACTION", (ROLLBACK,)),
    ("ROLLBACK AND CHAIN", (ROLLBACK, BEGIN)),
    ("ABORT WORK AND CHAIN", (ROLLBACK, BEGIN)),
    ("ROLLBACK AND NO CHAIN", (ROLLBACK,)),
    ("PREPARE TRANSACTION 'tx1'", (COMMIT,)),
    ("COMMIT PREPARED 'tx1'", ()),
    ("ROLLBACK PREPARED 'tx1'", ()),
    ("SAVEPOINT sp", (SAVEPOINT,)),
    ("RELEASE SAVEPOINT sp", (SAVEPOINT,)),
    ("RELEASE sp", (SAVEPOINT,)),
    ("ROLLBACK TO SAVEPOINT sp", (SAVEPOINT,)),
    ("ROLLBACK TO sp", (SAVEPOINT,)),
    ("ROLLBACK WORK TO SAVEPOINT sp", (SAVEPOINT,)),
    # pins
    ("LISTEN channel", (PIN("listen"),)),
    # code blocks: what they change is not in the text (found by the isolation fuzz test)
    ("DO $$ BEGIN PERFORM set_config('work_mem', '11MB', false); END $$", (PIN("do_block"),)),
    ("do language plpgsql 'begin null; end'", (PIN("do_block"),)),
    ("CALL my_procedure(1)", (PIN("call"),)),
    ('listen "Chan"', (PIN("listen"),)),
    ("UNLISTEN channel", ()),
    ("UNLISTEN *", ()),
    ("PREPARE q AS SELECT 1", (PIN("prepare"),)),
    ("PREPARE q (int, text) AS SELECT $1, $2", (PIN("prepare"),)),
    ("PREPARE transaction AS SELECT 1", (PIN("prepare"),)),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", (PIN("hold_cursor"),)),
    ("declare c binary insensitive no scroll cursor with hold for select 1", (PIN("hold_cursor"),)),
    ("DECLARE c CURSOR FOR SELECT 1", ()),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", ()),
    ("DECLARE c CURSOR FOR SELECT * FROM t WITH hold", ()),
    ("CREATE TEMP TABLE t (a int)", (PIN("temp"),)),
    ("CREATE TEMPORARY TABLE t AS SELECT 1", (PIN("temp"),)),
    ("create global temporary table t (a int)", (PIN("temp"),)),
    ("CREATE LOCAL TEMP TABLE t (a int)", (PIN("temp"),)),
    ("CREATE UNLOGGED TABLE t (a int)", ()),
    ("CREATE TEMP SEQUENCE s", (PIN("temp"),)),
    ("CREATE TEMP VIEW v AS SELECT 1", (PIN("temp"),)),
    ("CREATE OR REPLACE TEMPORARY RECURSIVE VIEW v (n) AS SELECT 1", (PIN("temp"),)),
    ("CREATE TABLE pg_temp.t (a int)", (PIN("temp"),)),
    ("CREATE FUNCTION pg_temp.f() RETURNS int AS 'select 1' LANGUAGE sql", (PIN("temp"),)),
    ("CREATE TABLE t (temp int)", ()),
    ("CREATE INDEX ON t (a)", ()),
    ("SELECT * INTO TEMP t FROM s", (PIN("temp"),)),
    ("SELECT * INTO LOCAL TEMPORARY TABLE t FROM s", (PIN("temp"),)),
    ("WITH x AS (SELECT 1) SELECT * INTO TEMP t FROM x", (PIN("temp"),)),
    ("WITH x AS (SELECT 1) INSERT INTO temp SELECT * FROM x", ()),
    ("SELECT temp FROM t", ()),
    ("LOAD 'auto_explain'", (PIN("load"),)),
    ("SELECT pg_advisory_lock(1)", (PIN("advisory_lock"),)),
    ("select pg_catalog.pg_advisory_lock(1)", (PIN("advisory_lock"),)),
    ("SELECT PG_TRY_ADVISORY_LOCK(1, 2)", (PIN("advisory_lock"),)),
    ("SELECT pg_advisory_lock_shared(1)", (PIN("advisory_lock"),)),
    ("SELECT pg_try_advisory_lock_shared (1)", (PIN("advisory_lock"),)),
    ("SELECT pg_advisory_lock(1), pg_try_advisory_lock(2)", (PIN("advisory_lock"),)),
    ('SELECT "pg_advisory_lock"(1)', (PIN("advisory_lock"),)),
    ("UPDATE t SET a = 1 WHERE pg_try_advisory_lock(id)", (PIN("advisory_lock"),)),
    ("SELECT pg_advisory_xact_lock(1)", ()),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", ()),
    ("SELECT pg_advisory_unlock(1)", ()),
    ("SELECT myschema.pg_advisory_lock(1)", ()),
    ("SELECT pg_advisory_lock", ()),
    # a lone call with literals is a SET by another name: followed, not pinned
    ("SELECT set_config('a.b', 'x', false)", (Effect("set", "a.b", "x"),)),
    ("SELECT set_config('A.B', 'x', 'off')", (Effect("set", "a.b", "x"),)),
    ("SELECT pg_catalog.set_config('a.b', 'x', FALSE)", (Effect("set", "a.b", "x"),)),
    ("SELECT set_config('transaction_read_only', 'on', false)", ()),
    ("SELECT set_config('a.b', 'x', false) FROM t", (PIN("set_config"),)),
    ("SELECT set_config('a.b', 'x', false), 1", (PIN("set_config"),)),
    ("SELECT set_config('a.b', 'x', $1)", (PIN("set_config"),)),
    ("SELECT set_config('a.b', f(1, 2), is_local)", (PIN("set_config"),)),
    ("SELECT set_config('a.b', 'x')", (PIN("set_config"),)),
    ("SELECT set_config('a.b', 'x', true)", ()),
    ("SELECT SET_CONFIG('a.b', 'x', TRUE)", ()),
    ("SELECT set_config('a.b', 'x', 'true')", ()),
    ("SELECT set_config('a.b', 'x', 't')", ()),
    ("SELECT set_config('a.b', 'x', 'on')", ()),
    ("SELECT set_config('a.b', coalesce($1, 'x'), true)", ()),
    ("SELECT set_config('a.b', 'x', true), set_config('c.d', 'y', false)", (PIN("set_config"),)),
    ("SELECT pg_advisory_lock(1), set_config('a.b', 'x', false)", (PIN("advisory_lock"), PIN("set_config"))),
    # trigger words where they change nothing
    ("UPDATE t SET x = 1", ()),
    ("INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2", ()),
    ("ALTER TABLE t ALTER COLUMN a SET DEFAULT 1", ()),
    ("ALTER ROLE alice SET search_path = x", ()),
    ("SELECT 'set x = 1'", ()),
    ("SELECT 'listen x; begin; create temp table t()'", ()),
    ("SELECT E'\\'; SET x = 1; --'", ()),
    ("SELECT $$; SET x = 1; $$", ()),
    ("SELECT $f$ $$; SET x = 1; $$ $f$", ()),
    ("SELECT 1 -- ; SET x = 1", ()),
    ("SELECT 1 /* ; SET x = 1 */", ()),
    ("SELECT 1 /* /* nested */ ; SET x = 1 */", ()),
    ('SELECT "; SET x = 1" FROM t', ()),
    ('SELECT 1 AS "pg_advisory_lock(1)"', ()),
    ("SELECT 'pg_advisory_lock(1)', 'set_config(''a'', ''b'', false)'", ()),
    ("SELECT CASE WHEN a THEN 1 END FROM t", ()),
    ("SELECT a$set FROM t", ()),
    ("SHOW search_path", ()),
    ("", ()),
    (";;", ()),
    ("  -- only a comment\n", ()),
    # several statements, in order; empty ones skipped
    ("BEGIN; SET LOCAL a.b = 1; SET c.d = 2; COMMIT",
     (BEGIN, S("c.d", "2"), COMMIT)),
    ("SET a.b = 1;;; SET a.b = 2; ; SELECT 1", (S("a.b", "1"), S("a.b", "2"))),
    ("SET a.b = 'x;y'; LISTEN c; RESET a.b", (S("a.b", "x;y"), PIN("listen"), R("a.b"))),
    ("SELECT pg_advisory_lock(1); SELECT pg_advisory_lock(2)",
     (PIN("advisory_lock"), PIN("advisory_lock"))),
    ("SET a.b = 1\n;\nSET a.b = 2", (S("a.b", "1"), S("a.b", "2"))),
    ("SET a.b = 1 -- ; SET a.b = 2\n; SET c.d = 3", (S("a.b", "1"), S("c.d", "3"))),
    # a SQL-standard routine body keeps its ';'s and its END
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END; COMMIT",
     (COMMIT,)),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END; SET a.b = 1",
     (S("a.b", "1"),)),
    # a CREATE RULE action list keeps its ';'s
    ("CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); INSERT INTO v VALUES (2)); BEGIN",
     (BEGIN,)),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_effects(text, expected):
    assert effects(text) == expected


@pytest.mark.parametrize("text", [b"SET a.b = 1\0", b"SET a.b = 1"])
def test_one_trailing_nul_is_stripped(text):
    assert session_effects(text) == (S("a.b", "1"),)


def test_accepts_memoryview_and_bytearray():
    assert session_effects(memoryview(b"SET a.b = 1\0")) == (S("a.b", "1"),)
    assert session_effects(bytearray(b"LISTEN x")) == (PIN("listen"),)


def test_invalid_utf8_round_trips_through_surrogateescape():
    (effect,) = session_effects(b"SET myapp.x = '\xff\xfe'")
    assert effect.value.encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_long_plain_select_takes_the_fast_path(monkeypatch):
    def boom(text):
        raise AssertionError("tokenised a statement with no trigger word")
    monkeypatch.setattr(sql, "_tokens", boom)
    query = b"SELECT " + b", ".join(b"col%d" % i for i in range(5000)) + b" FROM things WHERE id = $1\0"
    assert session_effects(query) == ()
    assert session_effects(b"INSERT INTO t (offset_, reset_at) VALUES (1, now())") == ()
    assert session_effects(b"SELECT pg_advisory_xact_lock(1)") == ()


@pytest.mark.parametrize("text,hit", [
    (b"SELECT settings, resets, upset, begins, endpoint FROM t", False),
    (b"SELECT pg_advisory_xact_lock(1), \"SetConfig\"", False),
    (b"select 1;SET x=1", True),
    (b"SELECT x FROM t /* Begin */", True),
    (b"SELECT PG_TRY_ADVISORY_LOCK(1)", True),
    (b"SELECT Set_Config('a', 'b', true)", True),
])
def test_trigger_words_are_whole_words_in_any_case(text, hit, monkeypatch):
    seen = []
    monkeypatch.setattr(sql, "_tokens", lambda t: seen.append(t) or [])
    session_effects(text)
    assert bool(seen) == hit


def test_effect_is_a_small_frozen_value():
    effect = Effect("set", "a", "b")
    assert (effect.kind, effect.name, effect.value) == ("set", "a", "b")
    assert Effect("begin") == Effect("begin", "", None)
    with pytest.raises(AttributeError):
        effect.kind = "reset"
    assert not hasattr(effect, "__dict__")


_SQLISH = st.lists(st.sampled_from([
    "SET", "RESET", "LOCAL", "SESSION", "TIME", "ZONE", "ROLE", "TO", "=", "DEFAULT", "a", "b.c", "'x'",
    "'", '"', "$$", "$t$", "E'\\'", "U&'", "--", "/*", "*/", "\n", ";", ",", "(", ")", "-", "1", "1.5e",
    "BEGIN", "END", "CASE", "CREATE", "FUNCTION", "TEMP", "TABLE", "INTO", "set_config", "pg_advisory_lock",
    "true", "COMMIT", "AND", "CHAIN", "DECLARE", "WITH", "HOLD", "FOR", "\0", "\xff", " ",
]), max_size=30).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_SQLISH.map(str.encode), st.binary(max_size=200)))
def test_never_raises(text):
    result = session_effects(text)
    assert isinstance(result, tuple) and all(isinstance(e, Effect) for e in result)


@pytest.mark.parametrize("tail", ["\r" * 64 + "h", "\n" * 64 + "x", " --" + "-" * 64 + "x", "\n" + "--\n" * 64],
                         ids=["CRs", "LFs", "dashes", "comment-lines"])
def test_string_continuation_takes_linear_time(tail):
    """What may follow a string constant is matched without backtracking (a client's Query must not
    stall the worker loop): found by the sql fuzz harness, SET x = E'a' then 33 CRs took over 10 s."""
    import subprocess
    import sys
    text = ("SET x = E'a'" + tail).encode()
    code = f"from pgmp.protocol.sql import session_effects; session_effects({text!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], timeout=10, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"session_effects({text[:20]!r}...) ran for more than 10 s")
    assert done.returncode == 0, done.stderr


def test_long_name_that_is_not_utf8_is_cut_bytewise():
    """Bytes that are not UTF-8 (a SQL_ASCII database) are one character each: a long name is cut
    to 63 of them, never to nothing (found by the sql fuzz harness: tests/fuzz/crashes/sql-ed92ddac573eccb7)."""
    assert session_effects(b"SET " + b"\x91" * 70 + b" = on") == (S("\udc91" * 63, "on"),)
    assert session_effects("SET x".encode() + "é".encode() * 40 + b" = on") == (S("x" + "é" * 31, "on"),)
