"""auth_query: users that exist only in PostgreSQL log in through pgmp.

Every test makes its own roles (and schemas) with unique names in the shared
cluster and drops them afterwards: other xdist workers use the same cluster.
pgmp runs with log_level = "debug" where a test counts lookups: each one logs
'auth_query for user "<name>"'.
"""
from __future__ import annotations

import itertools
import os
import re
import threading
import time

import psycopg
import pytest

from tests.integration import rawpg
from tests.integration.rawpg import RawPG, startup_packet
from tests.support import PASSWORDS, free_port, wait_for

DB = "appdb"
AUTH_PASSWORD = "auth-user-pass"
_seq = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_seq)}_{int(time.time() * 1000) % 100000}"


class Roles:
    """Roles and schemas made for one test; all dropped at teardown (their sessions ended first)."""

    def __init__(self, pg):
        self.pg = pg
        self.roles: list[str] = []
        self.schemas: list[tuple[str, str]] = []

    def create(self, prefix: str, password: str | None = "pw", extra: str = "LOGIN") -> str:
        name = unique(prefix)
        pw = f" PASSWORD '{password}'" if password is not None else ""
        self.pg.psql(f"CREATE ROLE {name} {extra}{pw}")
        self.roles.append(name)
        return name

    def schema(self, prefix: str, db: str = DB) -> str:
        name = unique(prefix)
        self.pg.psql(f"CREATE SCHEMA {name}", db=db)
        self.schemas.append((db, name))
        return name

    def drop(self) -> None:
        for db, name in self.schemas:
            self.pg.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE", db=db)
        for name in self.roles:
            self.pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
        for name in self.roles:
            self.pg.psql(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def roles(pg):
    made = Roles(pg)
    yield made
    made.drop()


@pytest.fixture
def auth_setup(roles, pgmp):
    """start(**config) -> pgmp with a superuser auth_user (in auth_file) and auth_query on."""
    auth_user = roles.create("pgmp_auth", AUTH_PASSWORD, "LOGIN SUPERUSER")

    def start(users=None, databases=None, **config):
        config = {"auth_user": auth_user, **config}
        return pgmp.start(config=config, databases=databases,
                          users={**PASSWORDS, auth_user: AUTH_PASSWORD, **(users or {})})

    start.auth_user = auth_user
    return start


def lookups(proxy, user: str) -> int:
    return len(re.findall(rf'auth_query for user "{re.escape(user)}"', proxy.log()))


def login_error(proxy, user: str, password: str, **params) -> dict:
    """A raw login that must fail: the ErrorResponse fields; pgmp then closes."""
    return rawpg.refused_login(proxy.host, proxy.port, user, password, DB, **params)


def connect(proxy, user: str, password: str, **params) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user, password=password, **params), autocommit=True)


# ---- logging in ------------------------------------------------------------------------

def test_user_only_in_postgresql_logs_in_with_scram(pg, roles, auth_setup):
    user = roles.create("aq_user", "only-in-pg")
    proxy = auth_setup()
    log_start = len(pg.log())
    with connect(proxy, user, "only-in-pg") as conn:
        # pgmp never knew the password: its server login used the ClientKey from the client's SCRAM proof
        assert conn.execute("select current_user, 1 + 1").fetchone() == (user, 2)
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    server_log = pg.log()[log_start:]
    assert re.search(rf'connection authenticated: identity="{user}" method=scram-sha-256', server_log), server_log
    assert re.search(rf"\[{pid}\] {user}@{DB} LOG:  connection authorized: user={user} database={DB}", server_log)
    # the auth_user's lookup connection: only user, database and application_name=pgmp-auth
    assert re.search(rf"connection authorized: user={auth_setup.auth_user} database={DB} "
                     r"application_name=pgmp-auth\s*$", server_log, re.M), server_log
    proxy.wait_log(rf"login: user={user} db={DB}")
    # again, from the cache, and the pool's server is reused
    with connect(proxy, user, "only-in-pg") as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


def test_expired_password_is_refused_like_a_wrong_one(roles, auth_setup):
    user = roles.create("aq_expired", "old-pass", "LOGIN VALID UNTIL '2000-01-01'")
    proxy = auth_setup()
    fields = login_error(proxy, user, "old-pass")
    assert fields["S"] == "FATAL" and fields["C"] == "28P01", fields
    assert fields["M"] == f'password authentication failed for user "{user}"', fields
    proxy.wait_log(rf"login failed: user={user} db={DB} .*password expired")


def test_unknown_user_and_wrong_password_fail_alike(roles, auth_setup):
    user = roles.create("aq_known", "right-pass")
    nobody = unique("aq_nobody")
    nologin = roles.create("aq_nologin", "some-pass", "NOLOGIN")
    proxy = auth_setup()
    answers = {}
    for who, password in ((user, "wrong-pass"), (nobody, "whatever"), (nologin, "some-pass")):
        fields = login_error(proxy, who, password)
        assert fields["S"] == "FATAL" and fields["C"] == "28P01", fields
        assert fields["M"] == f'password authentication failed for user "{who}"', fields
        answers[who] = sorted(fields)
    assert answers[user] == answers[nobody] == answers[nologin]
    log = proxy.log()
    assert re.search(rf"login failed: user={user} .*password does not match", log), log
    assert re.search(rf"login failed: user={nobody} .*no such user", log), log
    assert re.search(rf"login failed: user={nologin} .*no such user", log), log    # rolcanlogin is false
    # the right password still works
    with connect(proxy, user, "right-pass") as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


def test_a_user_in_auth_file_is_not_looked_up(auth_setup):
    proxy = auth_setup(log_level="debug")
    with connect(proxy, "scram_user", PASSWORDS["scram_user"]) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "auth_query for user" not in proxy.log()


def test_non_superuser_auth_user_with_a_security_definer_function(pg, roles, pgmp):
    """The set-up the docs recommend: auth_user may only call a function that reads pg_authid."""
    auth_user = roles.create("pgmp_lookup", AUTH_PASSWORD)
    user = roles.create("aq_fn_user", "fn-pass")
    schema = roles.schema("pgmp_fn")
    pg.psql(f"""
        CREATE FUNCTION {schema}.lookup(u text) RETURNS TABLE (usename name, passwd text)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
          SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
          FROM pg_catalog.pg_authid WHERE rolname = u AND rolcanlogin $$;
        REVOKE ALL ON FUNCTION {schema}.lookup(text) FROM PUBLIC;
        GRANT USAGE ON SCHEMA {schema} TO {auth_user};
        GRANT EXECUTE ON FUNCTION {schema}.lookup(text) TO {auth_user};
    """, db=DB)
    proxy = pgmp.start(config={"auth_user": auth_user, "auth_query": f"SELECT * FROM {schema}.lookup($1)"},
                       users={**PASSWORDS, auth_user: AUTH_PASSWORD})
    with connect(proxy, user, "fn-pass") as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    assert login_error(proxy, user, "not-it")["C"] == "28P01"


# ---- no client parameter on the lookup connection (CVE-2025-12819) ----------------------

def test_client_options_never_reach_the_lookup_connection(pg, roles, auth_setup):
    """A client's search_path would make an unqualified auth_query read the client's table."""
    user = roles.create("aq_victim", "real-pass")
    evil = roles.schema("evil")
    attacker_secret = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_user'")  # scram_pass
    pg.psql(f"""
        CREATE TABLE {evil}.pg_authid (rolname name, rolpassword text);
        INSERT INTO {evil}.pg_authid VALUES ('{user}', '{attacker_secret}');
        GRANT USAGE ON SCHEMA {evil} TO PUBLIC;
        GRANT SELECT ON {evil}.pg_authid TO PUBLIC;
    """, db=DB)
    # deliberately unqualified, so only the connection's own search_path protects it
    proxy = auth_setup(auth_query="SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1",
                       log_level="debug")
    options = f"-c search_path={evil},pg_catalog"
    fields = login_error(proxy, user, PASSWORDS["scram_user"], options=options)
    assert fields["C"] == "28P01", fields
    assert lookups(proxy, user) == 1
    # the real password works, and the client's own session does get its search_path
    with connect(proxy, user, "real-pass", options=options) as conn:
        assert conn.execute("show search_path").fetchone()[0].replace(" ", "") == f"{evil},pg_catalog"
    # the lookup session (application_name pgmp-auth) runs with the server's default search_path
    with psycopg.connect(pg.dsn(user=auth_setup.auth_user, password=AUTH_PASSWORD), autocommit=True) as admin:
        rows = admin.execute("select pid from pg_stat_activity where application_name = 'pgmp-auth' "
                             "and usename = %s", (auth_setup.auth_user,)).fetchall()
    assert len(rows) == 1, rows


def test_user_name_is_a_bound_parameter(roles, auth_setup):
    proxy = auth_setup(log_level="debug")
    nasty = "x' OR rolname = 'scram_user"
    fields = login_error(proxy, nasty, PASSWORDS["scram_user"])
    assert fields["C"] == "28P01", fields
    assert re.search(r"login failed: .*no such user", proxy.log())


# ---- the cache -------------------------------------------------------------------------

@pytest.mark.parametrize("ttl, expected", [(60, 1), (0, 3)])
def test_cache_ttl(roles, auth_setup, ttl, expected):
    user = roles.create("aq_cached", "cache-pass")
    proxy = auth_setup(log_level="debug", auth_cache_ttl=ttl)
    for _ in range(3):
        with connect(proxy, user, "cache-pass") as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
    assert lookups(proxy, user) == expected


def test_cache_expires_and_sees_a_new_password(pg, roles, auth_setup):
    user = roles.create("aq_changed", "first-pass")
    proxy = auth_setup(log_level="debug", auth_cache_ttl="500ms")
    connect(proxy, user, "first-pass").close()
    pg.psql(f"ALTER ROLE {user} PASSWORD 'second-pass'")

    def logs_in():
        # while the old secret is cached, the new password fails without a lookup
        try:
            with connect(proxy, user, "second-pass") as conn:
                return conn.execute("select current_user").fetchone() == (user,)
        except psycopg.OperationalError:
            return False
    wait_for(logs_in, timeout=5, interval=0.1, message="the new password never worked: cache not expired")
    assert lookups(proxy, user) == 2


def test_reload_empties_the_cache(roles, auth_setup, pgmp):
    user = roles.create("aq_reload", "reload-pass")
    proxy = auth_setup(log_level="debug")
    connect(proxy, user, "reload-pass").close()
    assert pgmp.cli("reload", "-c", proxy.config_path).returncode == 0
    # the idle lookup connection is closed, and the next login asks again
    proxy.wait_log(rf"server connection closed: db={DB} user={auth_setup.auth_user} .*configuration reloaded")
    with connect(proxy, user, "reload-pass") as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    assert lookups(proxy, user) == 2


def test_unknown_user_is_cached_like_a_real_one(pg, roles, auth_setup):
    name = unique("aq_later")
    # "no such user" is kept for auth_cache_ttl, as a real user's secret is (unit-tested): 1 s here
    proxy = auth_setup(log_level="debug", auth_cache_ttl=1)
    for _ in range(2):
        assert login_error(proxy, name, "later-pass")["C"] == "28P01"
    assert lookups(proxy, name) == 1            # the negative answer was cached
    pg.psql(f"CREATE ROLE {name} LOGIN PASSWORD 'later-pass'")
    roles.roles.append(name)
    # then the new role can log in
    def logs_in():
        try:
            with connect(proxy, name, "later-pass") as conn:
                return conn.execute("select current_user").fetchone() == (name,)
        except psycopg.OperationalError:
            return False
    wait_for(logs_in, timeout=5, interval=0.1, message="the negative answer outlived auth_cache_ttl")
    assert lookups(proxy, name) == 2


def test_concurrent_logins_share_one_lookup(roles, auth_setup):
    user = roles.create("aq_crowd", "crowd-pass")
    # a slow query, so that all 20 logins arrive while the lookup runs
    proxy = auth_setup(log_level="debug", auth_query=(
        "SELECT rolname, rolpassword FROM pg_catalog.pg_authid, pg_catalog.pg_sleep(0.5) WHERE rolname = $1"))
    results: list = []
    barrier = threading.Barrier(20)

    def one():
        barrier.wait()
        try:
            with connect(proxy, user, "crowd-pass") as conn:
                results.append(conn.execute("select current_user").fetchone()[0])
        except Exception as exc:           # reported below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [user] * 20
    assert lookups(proxy, user) == 1


def test_a_slow_lookup_does_not_block_other_clients(roles, auth_setup):
    user = roles.create("aq_slow", "slow-pass")
    proxy = auth_setup(log_level="debug", auth_query=(
        "SELECT rolname, rolpassword FROM pg_catalog.pg_authid, pg_catalog.pg_sleep(2) WHERE rolname = $1"))
    with RawPG.connect(proxy.host, proxy.port) as waiting:
        waiting.send(startup_packet({"user": user, "database": DB}))
        wait_for(lambda: lookups(proxy, user) == 1, timeout=5)
        started = time.monotonic()
        with connect(proxy, "scram_user", PASSWORDS["scram_user"]) as other:
            assert other.execute("select 'served'").fetchone() == ("served",)
        assert time.monotonic() - started < 1.0
        waiting.authenticate(user, "slow-pass")              # then the lookup answers
        assert waiting.scalar("select current_user") == user


def test_client_login_timeout_applies_during_the_lookup(pg, roles, auth_setup):
    user = roles.create("aq_stuck", "stuck-pass")
    proxy = auth_setup(client_login_timeout=1, auth_query=(
        "SELECT rolname, rolpassword FROM pg_catalog.pg_authid, pg_catalog.pg_sleep(1.8) WHERE rolname = $1"))
    with RawPG.connect(proxy.host, proxy.port) as conn:
        started = time.monotonic()
        conn.send(startup_packet({"user": user, "database": DB}))
        fields = conn.expect_error(timeout=5)
        assert fields["C"] == "08P01" and "client_login_timeout" in fields["M"], fields
        assert 0.8 < time.monotonic() - started < 1.7
        assert conn.wait_closed(5)
    # the lookup still completes and is cached: the next login does not wait for pg_sleep again
    wait_for(lambda: pg.psql("select count(*) from pg_stat_activity "
                             "where application_name = 'pgmp-auth' and state = 'active'") == "0",
             timeout=5, message="the auth_query lookup never finished")
    started = time.monotonic()
    with connect(proxy, user, "stuck-pass") as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    assert time.monotonic() - started < 1.0


# ---- when the lookup itself fails ---------------------------------------------------------

def test_auth_user_cannot_log_in(roles, auth_setup):
    user = roles.create("aq_orphan", "orphan-pass")
    proxy = auth_setup(users={auth_setup.auth_user: "not-its-password"})
    fields = login_error(proxy, user, "orphan-pass")
    assert fields["S"] == "FATAL" and fields["C"] == "08006", fields
    assert "authentication could not be completed" in fields["M"], fields
    proxy.wait_log(rf'auth_query: could not look up user "{user}" in database {DB}: cannot log in to the '
                   rf"server as auth_user '{auth_setup.auth_user}': password authentication failed")
    # the users of auth_file are not affected
    with connect(proxy, "scram_user", PASSWORDS["scram_user"]) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_server_down(roles, auth_setup):
    user = roles.create("aq_down", "down-pass")
    # a database section whose server does not listen
    proxy = auth_setup(databases={DB: {"port": free_port()}})
    fields = login_error(proxy, user, "down-pass")
    assert fields["C"] == "08006" and "authentication could not be completed" in fields["M"], fields
    proxy.wait_log(rf'auth_query: could not look up user "{user}" in database {DB}: .*could not connect')


def test_lookup_query_error(roles, auth_setup):
    user = roles.create("aq_badq", "badq-pass")
    proxy = auth_setup(auth_query="SELECT rolname, rolpassword FROM pg_catalog.no_such_table WHERE rolname = $1")
    fields = login_error(proxy, user, "badq-pass")
    assert fields["C"] == "08006", fields
    proxy.wait_log(r"auth_query: could not look up .*the query failed: 42P01")


# ---- a database owner attacks auth_user (issue: auth_query runs where the client points it) ----

class OwnedDatabase:
    """A database owned by an unprivileged role that plants objects in it; dropped at teardown."""

    def __init__(self, pg, roles):
        self.pg = pg
        self.owner = roles.create("aq_dbowner", "owner-pass")
        self.name = unique("aq_owned")
        pg.psql(f"CREATE DATABASE {self.name} OWNER {self.owner}")
        # the owner's trap: every call records who ran it, then answers like the real thing
        self.psql(f"""
            CREATE SCHEMA trap;
            CREATE TABLE trap.ran (who name);
            GRANT USAGE ON SCHEMA trap TO PUBLIC;
            GRANT INSERT ON trap.ran TO PUBLIC;
            CREATE FUNCTION trap.eq(name, name) RETURNS boolean LANGUAGE plpgsql AS $$
              BEGIN INSERT INTO trap.ran VALUES (current_user); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
            CREATE FUNCTION trap.lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
              BEGIN INSERT INTO trap.ran VALUES (current_user); RETURN $1 OPERATOR(pg_catalog.<) $2; END $$;
            CREATE OPERATOR trap.= (LEFTARG = name, RIGHTARG = name, FUNCTION = trap.eq);
            CREATE OPERATOR trap.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = trap.lt);
            ALTER DATABASE {self.name} SET search_path = trap, pg_catalog;
        """)

    def psql(self, sql: str) -> str:
        return self.pg.psql(f"SET ROLE {self.owner};\n{sql}", db=self.name)

    def ran(self) -> list[str]:
        return self.pg.psql("SELECT who FROM trap.ran", db=self.name).split()

    def drop(self) -> None:
        self.pg.psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


@pytest.fixture
def owned_db(pg, roles):
    db = OwnedDatabase(pg, roles)
    yield db
    db.drop()


def owned_databases(pg, owned) -> dict:
    return {DB: {"host": pg.host, "port": pg.port, "dbname": DB},
            owned.name: {"host": pg.host, "port": pg.port, "dbname": owned.name}}


def login_error_in(proxy, database: str, user: str, password: str) -> dict:
    return rawpg.refused_login(proxy.host, proxy.port, user, password, database)


@pytest.mark.parametrize("query", ["default", "unqualified"])
def test_database_owner_cannot_run_code_as_auth_user(pg, roles, owned_db, auth_setup, query):
    """The owner's search_path puts its own = and < ahead of pg_catalog's: the lookup must not call them."""
    config = {} if query == "default" else {
        "auth_query": "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1"}
    # the trap works on a plain session of auth_user in that database: the test can fail
    with psycopg.connect(pg.dsn(user=auth_setup.auth_user, password=AUTH_PASSWORD, dbname=owned_db.name),
                         autocommit=True) as probe:
        probe.execute("SELECT 1 FROM pg_authid WHERE rolname = 'x'")
    assert owned_db.ran() and set(owned_db.ran()) == {auth_setup.auth_user}
    owned_db.pg.psql("TRUNCATE trap.ran", db=owned_db.name)

    proxy = auth_setup(databases=owned_databases(pg, owned_db), log_level="debug", **config)
    user = roles.create("aq_target", "target-pass")
    fields = login_error_in(proxy, owned_db.name, unique("aq_nobody"), "whatever")
    assert fields["C"] == "28P01", fields
    with connect(proxy, user, "target-pass", dbname=owned_db.name) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    assert lookups(proxy, user) == 1
    assert owned_db.ran() == [], "auth_query ran the database owner's operator as auth_user"


def test_auth_dbname_keeps_lookups_out_of_client_databases(pg, roles, owned_db, auth_setup):
    """With auth_dbname every lookup runs there: a function the owner planted under auth_query's name is never called."""
    schema = roles.schema("aq_fn")
    user = roles.create("aq_fn_target", "fn-target-pass")
    pg.psql(f"""
        CREATE FUNCTION {schema}.lookup(u text) RETURNS TABLE (usename name, passwd text)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
          SELECT rolname, rolpassword FROM pg_catalog.pg_authid WHERE rolname = u $$;
    """, db=DB)
    # the same function name in the owner's database, answering with a password the owner chose
    owned_db.psql(f"""
        CREATE SCHEMA {schema};
        GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
        CREATE FUNCTION {schema}.lookup(u text) RETURNS TABLE (usename name, passwd text)
        LANGUAGE plpgsql AS $$ BEGIN INSERT INTO trap.ran VALUES (current_user);
          RETURN QUERY SELECT u::name, 'owner-chosen'::text; END $$;
    """)
    proxy = auth_setup(databases=owned_databases(pg, owned_db), auth_dbname=DB,
                       auth_query=f"SELECT * FROM {schema}.lookup($1)", log_level="debug")
    log_start = len(pg.log())
    # the owner's password does not work; the real one does, in the owner's database too
    assert login_error_in(proxy, owned_db.name, user, "owner-chosen")["C"] == "28P01"
    with connect(proxy, user, "fn-target-pass", dbname=owned_db.name) as conn:
        assert conn.execute("select current_database()").fetchone() == (owned_db.name,)
    assert owned_db.ran() == []
    server_log = pg.log()[log_start:]
    assert re.search(rf"connection authorized: user={auth_setup.auth_user} database={DB} "
                     r"application_name=pgmp-auth", server_log), server_log
    assert not re.search(rf"user={auth_setup.auth_user} database={owned_db.name}", server_log), server_log


def test_wildcard_lookups_run_only_in_auth_dbname(pg, roles, auth_setup):
    """Through "*" a client names any database: lookups still go to auth_dbname, over one connection."""
    user = roles.create("aq_wild", "wild-pass")
    wildcard = {"*": {"host": pg.host, "port": pg.port}, DB: {"host": pg.host, "port": pg.port}}
    proxy = auth_setup(databases=wildcard, auth_dbname=DB, server_idle_timeout=1, log_level="debug")
    for database in ("otherdb", "postgres", DB, "otherdb"):
        with connect(proxy, user, "wild-pass", dbname=database, application_name="aq-wild") as conn:
            assert conn.execute("select current_database()").fetchone() == (database,)
        assert login_error_in(proxy, database, unique("aq_wild_nobody"), "x")["C"] == "28P01"
    sessions = lambda: pg.psql("select datname from pg_stat_activity where application_name = 'pgmp-auth' "
                               f"and usename = '{auth_setup.auth_user}'").split()
    assert sessions() == [DB]
    # idle for server_idle_timeout: the lookup connection (and its pool) go; the next lookup makes them again
    wait_for(lambda: sessions() == [], timeout=10, message="the idle lookup connection stayed open")
    assert login_error_in(proxy, "postgres", unique("aq_wild_later"), "x")["C"] == "28P01"
    assert sessions() == [DB]
