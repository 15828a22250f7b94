"""The health check, sans-IO: a login and the role query fed to a Probe as bytes; which credentials a host gets."""
from __future__ import annotations

import struct

import pytest

from pgmp import config, health
from pgmp.auth.authfile import parse_secret
from pgmp.auth.server import ServerAuthenticator
from pgmp.console import command_complete, data_row, row_description
from pgmp.errors import PgmpError
from pgmp.health import ROLE_QUERY, Probe, targets
from pgmp.protocol import messages
from pgmp.server import ServerLogin

COLUMNS = [("pg_is_in_recovery", "s"), ("current_setting", "s"), ("lag", "s")]


def probe(password: str | None = None) -> Probe:
    auth = ServerAuthenticator("checker", password=password, database="appdb")
    return Probe(ServerLogin("checker", "appdb", auth, health.STARTUP_OPTIONS))


def login_reply(**params) -> bytes:
    out = [messages.auth_ok()]
    out += [messages.parameter_status(k, v) for k, v in params.items()]
    return b"".join(out) + messages.backend_key_data(77, 1234) + messages.ready_for_query(b"I")


def answer(*values) -> bytes:
    return (row_description(COLUMNS) + data_row(list(values), COLUMNS) + command_complete("SELECT 1")
            + messages.ready_for_query(b"I"))


def test_startup_carries_the_application_name_and_a_pinned_search_path():
    start = probe().start()
    assert b"user\0checker\0database\0appdb\0" in start
    assert b"application_name\0pgmp-health\0options\0-c search_path=pg_catalog,pg_temp\0" in start


def test_a_primary():
    p = probe()
    assert p.feed(login_reply(in_hot_standby="off")) == messages.query(ROLE_QUERY)
    assert p.result is None
    assert p.feed(answer("f", "off", None)) == b""
    r = p.result
    assert (r.up, r.in_recovery, r.read_only, r.lag, r.error) == (True, False, False, None, None)
    assert r.params["in_hot_standby"] == "off"


def test_a_standby_with_its_lag_fed_one_byte_at_a_time():
    p = probe()
    sent = b"".join(p.feed(bytes([b])) for b in login_reply() + answer("t", "on", "2.75"))
    assert sent == messages.query(ROLE_QUERY)
    assert (p.result.up, p.result.in_recovery, p.result.read_only, p.result.lag) == (True, True, True, 2.75)


def test_a_standby_that_replayed_everything_has_no_lag():
    p = probe()
    p.feed(login_reply() + answer("t", "on", "0"))
    assert p.result.lag == 0.0


def test_a_read_only_primary():
    p = probe()
    p.feed(login_reply() + answer("f", "on", None))
    assert (p.result.in_recovery, p.result.read_only) == (False, True)


def test_password_login():
    p = probe(password="pw")
    reply = p.feed(messages.auth_cleartext())
    assert reply == messages.password_message(b"pw\0")
    assert p.feed(login_reply()) == messages.query(ROLE_QUERY)


@pytest.mark.parametrize("sqlstate, up", [("28P01", True), ("3D000", True), ("57P03", False), ("53300", False)])
def test_a_login_error_says_whether_the_server_is_up(sqlstate, up):
    p = probe()
    p.feed(messages.error_response(sqlstate, "no", "FATAL"))
    assert p.result.up is up and p.result.error.sqlstate == sqlstate


def test_no_credential_for_the_server_is_pgmps_problem_not_the_hosts():
    p = probe()                                          # no password, and the server asks for one
    p.feed(messages.auth_cleartext())
    assert p.result.up is True and p.result.error.sqlstate == "28000"


def test_the_query_failing_is_a_failed_check():
    p = probe()
    p.feed(login_reply() + messages.error_response("42883", "function does not exist", "ERROR")
           + messages.ready_for_query(b"I"))
    assert p.result.up is False and "function does not exist" in p.result.error.message


def test_a_wrong_answer_is_a_failed_check():
    p = probe()
    cols = COLUMNS[:1]
    p.feed(login_reply() + row_description(cols) + data_row(["yes"], cols) + messages.ready_for_query(b"I"))
    assert p.result.up is False and "not (in recovery, read only, lag)" in p.result.error.message


def test_a_message_over_the_limit_is_refused_at_its_header():
    p = probe()
    with pytest.raises(PgmpError, match="health check"):
        p.feed(b"R" + struct.pack("!I", 100_000))


def test_nothing_after_the_answer_is_read():
    p = probe()
    p.feed(login_reply() + answer("f", "off", None) + b"garbage that is never parsed")
    assert p.result.up is True


# ---- which credentials each host gets ------------------------------------------------------

def cfg(pgmp: str = "", databases: str = "") -> config.Config:
    return config.loads('[pgmp]\nauth_type = "trust"\nhealth_check_period = 1\n' + pgmp + "\n" + databases)


DATABASES = """
[databases.appdb]
host = ["10.0.0.1", "10.0.0.2:5433"]
max_replica_lag = 5

[databases.appdb_ro]
host = ["10.0.0.1", "10.0.0.2:5433"]
dbname = "appdb"
user = "reader"
password = "rpw"
target_session_attrs = "standby"
max_replica_lag = 2

[databases.other]
host = "/var/run/postgresql"
user = "owner"
target_session_attrs = "primary"
"""


def test_each_host_is_checked_once_with_the_first_section_user():
    t = targets(cfg(databases=DATABASES), {"owner": parse_secret("opw")})
    assert set(t) == {("10.0.0.1", 5432), ("10.0.0.2", 5433), ("/var/run/postgresql", 5432)}
    first = t[("10.0.0.1", 5432)]
    assert (first.user, first.password, first.dbname, first.source) == ("reader", "rpw", "appdb",
                                                                        "user of [databases.appdb_ro]")
    assert first.max_lag == 2.0                        # the strictest of the databases listing it
    other = t[("/var/run/postgresql", 5432)]
    assert (other.user, other.password, other.secret.value, other.dbname) == ("owner", None, "opw", "other")


def test_health_check_user_wins_for_every_host():
    c = cfg('health_check_user = "monitor"\nhealth_check_dbname = "postgres"', DATABASES)
    t = targets(c, {"monitor": parse_secret("mpw")})
    assert {(x.user, x.secret.value, x.dbname) for x in t.values()} == {("monitor", "mpw", "postgres")}


def test_a_host_without_credentials_gets_a_connect_only_check():
    t = targets(cfg(databases='[databases.a]\nhost = ["db1", "db2"]\n'), {})
    assert t[("db1", 5432)].user is None


def test_a_database_with_nothing_to_choose_is_not_checked():
    t = targets(cfg(databases='[databases.a]\nhost = "db1"\n[databases.b]\nhost = "db2"\n'
                              'target_session_attrs = "read-write"\n'), {})
    assert set(t) == {("db2", 5432)}


def test_health_check_password_needs_a_user():
    with pytest.raises(config.ConfigError, match="health_check_password: is set but health_check_user is not"):
        cfg('health_check_password = "x"')
