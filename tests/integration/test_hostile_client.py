"""Hostile clients: attacks on pgmp's CPU and memory before and after authentication.

Every test checks what the attacker gets (the SQLSTATE PostgreSQL would
send, the connection closed) and that a bystander session on the same worker
(workers = 1) goes on working.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time

import psycopg
import pytest

from pgmp.auth.authfile import make_scram_secret
from tests.integration import rawpg
from tests.integration.rawpg import RawPG, startup_packet
from tests.support import PASSWORDS, wait_for

DB = "appdb"


def refused(proxy, user: str, password: str) -> dict:
    with RawPG.connect(proxy.host, proxy.port, timeout=30) as conn:
        conn.send(startup_packet({"user": user, "database": DB}))
        with pytest.raises(rawpg.ServerError) as info:
            conn.authenticate(user, password)
        assert conn.wait_closed(5)
        return info.value.fields


class Bystander:
    """A session that runs SELECT 1 in a loop and records its slowest answer."""

    def __init__(self, proxy):
        self.conn = psycopg.connect(proxy.dsn(), autocommit=True)
        self.slowest = 0.0
        self.count = 0
        self.errors: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                assert self.conn.execute("select 1").fetchone() == (1,)
            except Exception as exc:          # reported by stop()
                self.errors.append(exc)
                return
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.count += 1

    def __enter__(self):
        self._thread.start()
        wait_for(lambda: self.count > 5, timeout=10, message="the bystander never got going")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        self.conn.close()
        assert not self.errors, self.errors


# ---- CPU before authentication -------------------------------------------------------------

def test_an_iteration_count_over_the_cap_is_refused_at_start(pgmp):
    users = {**PASSWORDS, "heavy": make_scram_secret("pw", os.urandom(16), 100_001)}
    config = pgmp.write_config(users=users)
    result = pgmp.cli("config", "check", "-c", config.path)
    assert result.returncode != 0
    assert 'user "heavy"' in result.stderr and "100001 iterations" in result.stderr, result.stderr
    assert "auth_max_iterations (100000)" in result.stderr, result.stderr
    # raising the cap lets it in
    config = pgmp.write_config(users=users, config={"auth_max_iterations": 200_000})
    assert pgmp.cli("config", "check", "-c", config.path).returncode == 0


def test_a_burst_of_costly_logins_does_not_stall_the_worker(pgmp):
    """Cleartext password logins against a SCRAM secret cost one PBKDF2 each: they run off the loop."""
    iterations = 100_000
    # pgmp logs in to PostgreSQL with the password the client sent: a real role's
    secret = make_scram_secret(PASSWORDS["scram_user"], os.urandom(16), iterations)
    proxy = pgmp.start(users={**PASSWORDS, "scram_user": secret}, auth_type="password")
    started = time.monotonic()
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", iterations)
    cost = time.monotonic() - started                  # one derivation on this machine
    burst = 24
    with Bystander(proxy) as bystander:
        failures: list = []
        def attack():
            failures.append(refused(proxy, "scram_user", "wrong")["C"])
        threads = [threading.Thread(target=attack) for _ in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert failures == ["28P01"] * burst
    # in the loop the burst would stall the bystander for about burst * cost
    assert bystander.slowest < burst * cost / 4, (bystander.slowest, cost)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
