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

import psutil
import psycopg
import pytest

from pgmp.auth.authfile import make_scram_secret
from tests.integration import rawpg
from tests.integration.rawpg import RawPG
from tests.integration.test_tls import certs, raw_tls, tls_config  # noqa: F401 (certs: a fixture)
from tests.support import PASSWORDS, wait_for

DB = "appdb"


def refused(proxy, user: str, password: str) -> dict:
    return rawpg.refused_login(proxy.host, proxy.port, user, password, DB, timeout=30)


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


# ---- memory after authentication (transaction mode keeps named statements) -------------------

MB = 1024 * 1024


def workers_rss(proxy) -> int:
    return sum(p.memory_info().rss for p in psutil.Process(proxy.pid).children())


def worker_cpu(proxy) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in psutil.Process(proxy.pid).children())


def expect_fatal(conn: RawPG, sqlstate: str, timeout: float = 10.0) -> dict:
    fields = conn.read_until(b"E", timeout)[-1].fields
    assert fields.get("S") == "FATAL" and fields.get("C") == sqlstate, fields
    assert conn.wait_closed(5)
    return fields


def run_named(conn: RawPG, name: str, sql: str) -> list:
    conn.send(rawpg.parse(sql, name) + rawpg.bind(statement=name) + rawpg.execute() + rawpg.sync())
    return conn.read_until(b"Z")


def test_named_parse_over_max_parse_size(pgmp):
    """A named Parse is assembled whole (its text keys the statement): only up to max_parse_size."""
    proxy = pgmp.start(config={"pool_mode": "transaction", "max_parse_size": "64kB"})
    with Bystander(proxy):
        with RawPG.connect(proxy.host, proxy.port) as conn:
            conn.login()
            # just under the limit: prepared and run
            sql = "select '" + "x" * (60 * 1024) + "' is not null"
            assert [m.type for m in run_named(conn, "big", sql)][-3:] == [b"D", b"C", b"Z"]
            before = workers_rss(proxy)
            # announces 200 MB and streams 16 MB of it: refused at the header, nothing assembled
            conn.send(rawpg.header(b"P", 200 * MB) + b"s2\0select '")
            try:
                for _ in range(64):
                    conn.send(b"x" * (256 * 1024))
            except OSError:
                pass                                   # pgmp closed while we were still sending
            fields = expect_fatal(conn, "54000")
            assert "max_parse_size" in fields["M"] + fields.get("H", ""), fields
            assert workers_rss(proxy) - before < 20 * MB


def test_one_clients_statements_are_bounded(pgmp):
    """Named statements a client keeps in transaction mode: max_prepared_size in all."""
    proxy = pgmp.start(config={"pool_mode": "transaction"})         # default 16 MB
    with Bystander(proxy):
        with RawPG.connect(proxy.host, proxy.port, timeout=30) as conn:
            conn.login()
            before = workers_rss(proxy)
            filler = "x" * (32 * 1024)
            refused = None
            for batch in range(160):                  # up to 4000 statements of 32 kB: 128 MB
                conn.send(b"".join(rawpg.parse(f"select {batch * 25 + i}, '{filler}'", f"s{batch}_{i}")
                                   for i in range(25)) + rawpg.sync())
                while True:
                    msg = conn.read_message()
                    if msg.type in b"EZ":
                        break
                if msg.type == b"E":
                    refused = msg.fields
                    break
            assert refused is not None, "4000 statements of 32 kB were all kept"
            assert refused["C"] == "53400" and "max_prepared_size" in refused["M"] + refused.get("H", ""), refused
            assert conn.wait_closed(5)
            assert workers_rss(proxy) - before < 48 * MB


@pytest.mark.parametrize("tls", [False, True])
def test_assembling_a_large_parse_costs_linear_time(pgmp, certs, tls):  # noqa: F811 (a fixture)
    """A large named Parse over TLS was assembled by copying it whole at every TLS read (quadratic)."""
    config = {"pool_mode": "transaction", "max_parse_size": "64MB", "max_prepared_size": "64MB",
              "max_message_size": "128MB",
              **(tls_config(certs) if tls else {})}
    proxy = pgmp.start(config=config)
    size = 48 * MB
    with (raw_tls(proxy) if tls else RawPG.connect(proxy.host, proxy.port)) as conn:
        conn.login()
        sql = "select length('" + "x" * size + "')"
        started = worker_cpu(proxy)
        msgs = run_named(conn, "huge", sql)
        spent = worker_cpu(proxy) - started
    assert [m for m in msgs if m.type == b"D"], msgs
    # linear: a few copies of 48 MB (well under a second); quadratic: about 18 GB of copying
    assert spent < 3.0, f"{spent:.2f}s of worker CPU to relay one {size // MB} MB Parse"
