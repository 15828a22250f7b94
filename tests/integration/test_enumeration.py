"""User enumeration: an unknown user must look like a real one from outside.

Whatever a client can observe before it proves a password (the method asked
for, the SCRAM salt and iteration count, how it changes across workers and
restarts, whether a lookup is repeated, which error comes first) is the same
for a user that does not exist as for one that does.
"""
from __future__ import annotations

import base64
import os


from pgmp.auth.authfile import make_scram_secret
from pgmp.protocol import messages
from tests.integration import rawpg
from tests.integration.rawpg import RawPG, startup_packet
from tests.support import PASSWORDS

DB = "appdb"


def challenge(proxy, user: str, database: str = DB) -> tuple:
    """What pgmp asks ``user`` before any proof: ("md5",) / ("password",) / ("scram", salt, iterations)."""
    with RawPG.connect(proxy.host, proxy.port) as conn:
        conn.send(startup_packet({"user": user, "database": database}))
        msg = conn.read_message()
        assert msg.type == b"R", msg
        code, data = messages.parse_auth_request(msg.payload)
        if code == messages.AUTH_MD5:
            return ("md5",)
        if code == messages.AUTH_CLEARTEXT:
            return ("password",)
        assert code == messages.AUTH_SASL, code
        conn.send(messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=clientnonce0123456789"))
        msg = conn.read_message()
        code, data = messages.parse_auth_request(msg.payload)
        assert code == messages.AUTH_SASL_CONTINUE, (code, data)
        attrs = dict(part.split(b"=", 1) for part in data.split(b","))
        return ("scram", base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))


def scram_users(iterations: int = 4096) -> dict[str, str]:
    """The test users with SCRAM secrets in auth_file (as pg_authid stores them)."""
    return {user: make_scram_secret(password, os.urandom(16), iterations) for user, password in PASSWORDS.items()}


def test_unknown_users_salt_is_the_same_in_every_worker_and_after_a_restart(pgmp):
    users = scram_users()
    proxy = pgmp.start(users=users, workers=2)
    salts = {challenge(proxy, "nobody_at_all") for _ in range(16)}
    assert len(salts) == 1, salts
    assert challenge(proxy, "someone_else") != next(iter(salts))      # per user, not one for everybody
    proxy.stop()
    again = pgmp.start(users=users, workers=2)
    assert {challenge(again, "nobody_at_all") for _ in range(4)} == salts


def test_mock_secret_file_keeps_salts_when_auth_file_changes(pgmp, tmp_path):
    secret_file = tmp_path / "mock.secret"
    secret_file.write_bytes(bytes(range(32)))
    secret_file.chmod(0o600)
    config = {"auth_mock_secret_file": str(secret_file)}
    first = challenge(pgmp.start(users=scram_users(), config=config), "nobody_at_all")
    more = {**scram_users(), "new_user": make_scram_secret("new-pass", os.urandom(16))}
    assert challenge(pgmp.start(users=more, config=config), "nobody_at_all") == first
    secret_file.write_bytes(bytes(range(1, 33)))
    assert challenge(pgmp.start(users=more, config=config), "nobody_at_all") != first


def test_unknown_user_is_asked_for_what_real_users_are(pgmp):
    # md5 method, SCRAM secrets: real users run SCRAM (as in PostgreSQL), so must unknown ones
    proxy = pgmp.start(users=scram_users(), auth_type="md5")
    real = challenge(proxy, "scram_user")
    unknown = challenge(proxy, "nobody_at_all")
    assert real[0] == unknown[0] == "scram"
    assert real[2] == unknown[2] == 4096
    # md5 secrets: real users get md5, and so do unknown ones
    md5 = pgmp.start(users={"md5_user": "md5" + "0" * 32}, auth_type="md5")
    assert challenge(md5, "md5_user") == challenge(md5, "nobody_at_all") == ("md5",)


def test_unknown_user_gets_the_iteration_count_real_users_have(pgmp):
    proxy = pgmp.start(users=scram_users(iterations=8192))
    assert challenge(proxy, "scram_user")[2] == 8192
    assert challenge(proxy, "nobody_at_all")[2] == 8192


def login_fields(proxy, user: str, password: str, database: str) -> dict:
    return rawpg.refused_login(proxy.host, proxy.port, user, password, database)


def test_unknown_database_is_told_only_after_authentication(pg, pgmp):
    """With auth_user, a database pgmp does not know must not answer 3D000 before any password."""
    auth_user = "pgmp_enum_auth"
    pg.psql(f"DROP ROLE IF EXISTS {auth_user}; CREATE ROLE {auth_user} LOGIN SUPERUSER PASSWORD 'aq'")
    try:
        users = {**PASSWORDS, auth_user: "aq"}
        proxy = pgmp.start(users=users, config={"auth_user": auth_user})
        # a user only PostgreSQL knows, and a user nobody knows: both fail like a wrong password
        for who in ("md5_user_not_in_file", "nobody_at_all"):
            fields = login_fields(proxy, who, "x", "no_such_db")
            assert fields["C"] == "28P01", fields
        proxy.wait_log(r'login failed: user=nobody_at_all db=no_such_db .*database "no_such_db" is not configured')
        # an auth_file user with the right password learns that the database does not exist
        fields = login_fields(proxy, "scram_user", PASSWORDS["scram_user"], "no_such_db")
        assert fields["C"] == "3D000", fields
        assert login_fields(proxy, "scram_user", "wrong", "no_such_db")["C"] == "28P01"
        # with auth_dbname, a PostgreSQL-only user is looked up there, proves its password, then gets 3D000
        pg.psql("DROP ROLE IF EXISTS enum_pg_only; CREATE ROLE enum_pg_only LOGIN PASSWORD 'pg-only'")
        looked_up = pgmp.start(users=users, config={"auth_user": auth_user, "auth_dbname": DB})
        assert login_fields(looked_up, "enum_pg_only", "pg-only", "no_such_db")["C"] == "3D000"
        assert login_fields(looked_up, "enum_pg_only", "wrong", "no_such_db")["C"] == "28P01"
    finally:
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{auth_user}'")
        pg.psql(f"DROP ROLE IF EXISTS {auth_user}; DROP ROLE IF EXISTS enum_pg_only")
