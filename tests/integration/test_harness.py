"""The test harness itself: the shared cluster, its users and auth methods, waiting helpers."""
from __future__ import annotations

import re
import time
from pathlib import Path

import psycopg
import pytest

from tests.support import CommandFailed, free_port, run, wait_for
from tests.support.cluster import TEST_USERS, postmaster_pid


def test_cluster_runs(pg):
    assert pg.psql("select 1") == "1"
    assert int(pg.psql("show port")) == pg.port
    assert pg.psql("show max_connections") == "300"
    assert pg.psql("show password_encryption") == "scram-sha-256"
    assert postmaster_pid(Path(pg.datadir)) is not None
    dbs = pg.psql("select datname from pg_database order by 1").splitlines()
    assert {"appdb", "otherdb"} <= set(dbs)


@pytest.mark.parametrize("user", sorted(TEST_USERS))
def test_user_authenticates_with_its_method(pg, user):
    password, method = TEST_USERS[user]
    with psycopg.connect(pg.dsn(user)) as conn:
        row = conn.execute("select current_user, current_database(), inet_server_port()").fetchone()
        assert row == (user, "appdb", pg.port)
        conn.execute(f"create table harness_{user} (id int)")  # may write in public
        conn.execute(f"drop table harness_{user}")
    # The server log names the method it used for this login.
    wait_for(lambda: re.search(rf'identity="{user}" method={re.escape(method)} ', pg.log()),
             timeout=5, message=f"no {method} authentication of {user} in {pg.logfile}")


@pytest.mark.parametrize("user", sorted(TEST_USERS))
def test_wrong_password_is_rejected(pg, user):
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(pg.dsn(user, password="wrong"))


def test_secrets_are_stored_as_expected(pg):
    scram = re.compile(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+")
    assert scram.fullmatch(pg.secrets["scram_user"])
    assert scram.fullmatch(pg.secrets["plain_user"])
    assert re.fullmatch(r"md5[0-9a-f]{32}", pg.secrets["md5_user"])


def test_psql_raises_with_output_on_error(pg):
    with pytest.raises(CommandFailed, match="no_such_table"):
        pg.psql("select * from no_such_table")


def test_wait_for_returns_the_value():
    start = time.monotonic()
    assert wait_for(lambda: time.monotonic() - start > 0.05 and "done") == "done"


def test_wait_for_times_out_with_message():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="the thing never happened"):
        wait_for(lambda: False, timeout=0.2, message="the thing never happened")
    assert 0.2 <= time.monotonic() - start < 2


def test_free_port_is_unique_in_the_run():
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50
    assert not ports & {5432, 6432}


def test_run_reports_output_of_failing_command():
    with pytest.raises(CommandFailed, match="boom"):
        run(["sh", "-c", "echo boom >&2; exit 3"])



def test_psql_through_pgmp(pg, pgmp):
    proxy = pgmp.start()
    result = run(["psql", "-X", "-A", "-t", "-c", "select 1, current_user", proxy.dsn("scram_user")],
                 timeout=30)
    assert result.stdout.strip() == "1|scram_user"
    assert proxy.stop() == 0
