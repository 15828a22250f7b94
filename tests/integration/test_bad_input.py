"""What pgmp does with malformed, hostile or unlucky input: the error a client gets, and no collateral damage.

Each test sends its bad input with rawpg (a raw protocol socket), checks the
ErrorResponse fields where the protocol allows one and that pgmp closed the
connection, then checks that a session opened earlier in the same worker
(a psycopg connection inside a transaction, the "bystander") still works
and that the worker process is the same one (nothing crashed or respawned).
"""
from __future__ import annotations

import struct
import time

import psutil
import psycopg
import pytest

from tests.integration import rawpg
from tests.integration.rawpg import RawPG, startup_packet, version_code
from tests.support import PASSWORDS, free_port, sent, wait_for

MB = 1024 * 1024
USER, DB = "scram_user", "appdb"


class Bystander:
    """A client of the same worker, opened before the bad input, idle inside a transaction."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.workers = _worker_pids(proxy)
        self.conn = psycopg.connect(proxy.dsn())          # not autocommit: the first execute opens a transaction
        self.conn.execute("create temp table bystander (x int)")
        self.conn.execute("insert into bystander values (1)")
        assert self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

    def still_works(self) -> None:
        conn = self.conn
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("insert into bystander values (2)")
        assert conn.execute("select sum(x) from bystander").fetchone() == (3,)
        conn.commit()
        assert conn.execute("select 'bystander ok'").fetchone() == ("bystander ok",)
        conn.close()
        assert _worker_pids(self.proxy) == self.workers, "a pgmp worker died or was replaced"
        # and a new client is served too
        with psycopg.connect(self.proxy.dsn(), autocommit=True) as fresh:
            assert fresh.execute("select 'new client ok'").fetchone() == ("new client ok",)


def _worker_pids(proxy) -> list[int]:
    return sorted(p.pid for p in wait_for(lambda: psutil.Process(proxy.pid).children(), timeout=10))


def _workers_rss(proxy) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in _worker_pids(proxy))


def raw(proxy) -> RawPG:
    return RawPG.connect(proxy.host, proxy.port)


def expect_fatal(conn: RawPG, sqlstate: str, message: str | None = None, timeout: float = 5.0) -> dict:
    """The next ErrorResponse is FATAL with ``sqlstate`` (and contains ``message``); then pgmp closes."""
    msgs = conn.read_until(b"E", timeout)
    fields = msgs[-1].fields
    assert fields.get("S") == "FATAL" and fields.get("V") in (None, "FATAL"), fields
    assert fields.get("C") == sqlstate, fields
    if message is not None:
        assert message in fields.get("M", ""), fields
    assert conn.wait_closed(timeout), "pgmp did not close the connection after a FATAL error"
    return fields


@pytest.fixture
def proxy(pgmp):
    return pgmp.start()


# ---- the startup packet ----------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 4, 7])
def test_startup_length_below_8(proxy, length):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(struct.pack("!I", length) + b"\0" * max(0, length - 4))
        expect_fatal(conn, "08P01", "invalid length of startup packet")
    by.still_works()


@pytest.mark.parametrize("length", [10001, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF])
def test_startup_length_above_10000_refused_without_the_body(proxy, length):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        started = time.monotonic()
        conn.send(struct.pack("!Ii", length, version_code(3, 0)))      # only the header, no body
        expect_fatal(conn, "08P01", "invalid length of startup packet")
        assert time.monotonic() - started < 3
    by.still_works()


def test_startup_packet_one_byte_at_a_time(proxy):
    by = Bystander(proxy)
    packet = startup_packet({"user": USER, "database": DB, "application_name": "slow starter"})
    with raw(proxy) as conn:
        for i in range(len(packet)):
            conn.send(packet[i:i + 1])
            sent(conn.sock)             # each byte leaves before the next: pgmp reads them one by one
        conn.authenticate(USER, PASSWORDS[USER])
        assert conn.params["application_name"] == "slow starter"
        assert conn.scalar("select current_setting('application_name')") == "slow starter"
    by.still_works()


@pytest.mark.parametrize("params", [{"database": DB}, {"user": "", "database": DB}],
                         ids=["no-user", "empty-user"])
def test_startup_without_user(proxy, params):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(startup_packet(params))
        expect_fatal(conn, "28000", "no PostgreSQL user name specified in startup packet")
    by.still_works()


@pytest.mark.parametrize("body", [
    b"user\0scram_user\0database\0appdb\0",       # no final NUL after the last pair
    b"user\0scram_user\0database\0appdb",         # the last value is not even terminated
    b"user\0scram_user\0database\0",              # a name without a value
], ids=["no-terminator", "unterminated-value", "name-without-value"])
def test_startup_without_terminating_nul(proxy, body):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(struct.pack("!Ii", 8 + len(body), version_code(3, 0)) + body)
        expect_fatal(conn, "08P01")
    by.still_works()


@pytest.mark.parametrize("major,minor", [(2, 0), (4, 0), (1, 0)])
def test_unsupported_protocol_version(proxy, major, minor):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(startup_packet({"user": USER, "database": DB}, version=version_code(major, minor)))
        fields = expect_fatal(conn, "0A000")
        assert f"{major}.{minor}" in fields["M"], fields
    by.still_works()


def test_protocol_3_1_with_unknown_option_negotiates(proxy):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(startup_packet({"user": USER, "database": DB, "_pq_.foo": "bar"},
                                 version=version_code(3, 1)))
        first = conn.read_message()
        assert first.type == b"v", first
        newest_minor, count = struct.unpack_from("!ii", first.payload)
        options = first.payload[8:].split(b"\0")[:count]
        assert (newest_minor, count, options) == (0, 1, [b"_pq_.foo"])
        conn.authenticate(USER, PASSWORDS[USER])
        assert conn.scalar("select 'negotiated'") == "negotiated"
    by.still_works()


def test_protocol_3_0_with_pq_option_also_lists_it(proxy):
    with raw(proxy) as conn:
        conn.send(startup_packet({"user": USER, "database": DB, "_pq_.bar": "1"}))
        first = conn.read_message()
        assert first.type == b"v", first
        assert struct.unpack_from("!ii", first.payload) == (0, 1)
        conn.authenticate(USER, PASSWORDS[USER])


# ---- authentication --------------------------------------------------------------------

@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5", "password"])
def test_wrong_password_and_unknown_user_fail_alike(pgmp, auth_type):
    proxy = pgmp.start(auth_type=auth_type)
    by = Bystander(proxy)
    answers = {}
    for user, password in ((USER, "wrong"), ("no_such_user", "whatever")):
        with raw(proxy) as conn:
            conn.send(startup_packet({"user": user, "database": DB}))
            with pytest.raises(rawpg.ServerError) as info:
                conn.authenticate(user, password)
            fields = info.value.fields
            assert fields["S"] == "FATAL" and fields["C"] == "28P01", fields
            assert fields["M"] == f'password authentication failed for user "{user}"', fields
            answers[user] = sorted(fields)
            assert conn.wait_closed(5)
    # the same fields, so a client cannot tell a missing user from a wrong password
    assert answers[USER] == answers["no_such_user"]
    by.still_works()


def test_password_message_before_startup(proxy):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(rawpg.password("scram_pass"))           # 'p' + length: read as a startup length
        expect_fatal(conn, "08P01", "invalid length of startup packet")
    by.still_works()


# ---- framing on an established session -------------------------------------------------

@pytest.mark.parametrize("length", [0, 1, 3])
def test_message_length_below_4(proxy, length):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.login()
        conn.send(b"Q" + struct.pack("!I", length) + b"select 1\0")
        expect_fatal(conn, "08P01")
    by.still_works()


def test_message_length_below_4_after_a_query(proxy):
    """The same, on a session whose server is already linked (the first query went through)."""
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.login()
        assert conn.scalar("select 1") == "1"
        conn.send(b"P" + struct.pack("!I", 2))
        expect_fatal(conn, "08P01")
    by.still_works()


def test_message_above_max_message_size(pgmp):
    proxy = pgmp.start(config={"max_message_size": "1MB"})
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.login()
        assert conn.scalar("select 1") == "1"
        before = _workers_rss(proxy)
        conn.send(rawpg.header(b"Q", 500 * MB))           # announces 500 MB, sends only the header
        fields = expect_fatal(conn, "08P01")
        assert "too long" in fields["M"] or "length" in fields["M"], fields
        assert _workers_rss(proxy) - before < 50 * MB
    # a message just under the limit still goes through
    with psycopg.connect(proxy.dsn(), autocommit=True) as ok:
        literal = "x" * (MB - 200)
        assert ok.execute(f"select length('{literal}')").fetchone() == (MB - 200,)
    by.still_works()


def test_message_above_max_message_size_before_any_server(pgmp):
    """The oversized header is the session's first message: no server linked yet (transaction mode:
    a session-mode client has its server from login)."""
    proxy = pgmp.start(config={"max_message_size": "1MB", "pool_mode": "transaction"})
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.login()
        before = _workers_rss(proxy)
        conn.send(rawpg.header(b"Q", 500 * MB) + b"x" * (2 * MB))
        expect_fatal(conn, "08P01")
        assert _workers_rss(proxy) - before < 50 * MB
    by.still_works()


@pytest.mark.parametrize("kind", [b"Z", b"p", b"\0", b"T"])
def test_invalid_message_type_from_client(proxy, kind):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.login()
        conn.send(kind + struct.pack("!I", 5) + b"I")
        expect_fatal(conn, "08P01")
    by.still_works()


# ---- databases and servers -------------------------------------------------------------

def test_unknown_database(proxy):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(startup_packet({"user": USER, "database": "no_such_db"}))
        with pytest.raises(rawpg.ServerError) as info:
            conn.authenticate(USER, PASSWORDS[USER])
        fields = info.value.fields
        assert fields["S"] == "FATAL" and fields["C"] == "3D000", fields
        assert 'database "no_such_db" does not exist' in fields["M"]
        assert conn.wait_closed(5)
    by.still_works()


def test_server_unreachable(pg, pgmp):
    dead_port = free_port()                    # nothing listens there
    proxy = pgmp.start(databases={DB: {}, "deaddb": {"port": dead_port, "dbname": DB}})
    by = Bystander(proxy)
    for _ in range(2):                         # and again: pgmp keeps answering, it does not hang
        with raw(proxy) as conn:
            conn.send(startup_packet({"user": USER, "database": "deaddb"}))
            started = time.monotonic()
            with pytest.raises(rawpg.ServerError) as info:
                conn.authenticate(USER, PASSWORDS[USER])
            fields = info.value.fields
            assert fields["S"] == "FATAL" and fields["C"] == "08006", fields
            assert "could not connect" in fields["M"], fields
            assert time.monotonic() - started < 5
            assert conn.wait_closed(5)
    by.still_works()


def test_server_login_fails_with_servers_own_error(pg, pgmp):
    proxy = pgmp.start(databases={DB: {}, "baddb": {"dbname": DB, "user": USER, "password": "wrong"}})
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(startup_packet({"user": USER, "database": "baddb"}))
        with pytest.raises(rawpg.ServerError) as info:
            conn.authenticate(USER, PASSWORDS[USER])
        fields = info.value.fields
        assert fields["S"] == "FATAL" and fields["C"] == "28P01", fields
        assert fields["M"] == f'password authentication failed for user "{USER}"', fields
        assert conn.wait_closed(5)
    by.still_works()


# ---- encryption requests ---------------------------------------------------------------

@pytest.mark.parametrize("requests", [[rawpg.ssl_request()], [rawpg.gssenc_request()],
                                      [rawpg.gssenc_request(), rawpg.ssl_request()]],
                         ids=["ssl", "gssenc", "gssenc-then-ssl"])
def test_encryption_request_gets_n_then_cleartext_login(proxy, requests):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        for request in requests:
            conn.send(request)
            assert conn.read_exact(1) == b"N"
        conn.login()
        assert conn.scalar("select 'cleartext'") == "cleartext"
    by.still_works()


@pytest.mark.parametrize("request_kind", ["ssl", "gssenc"])
def test_data_behind_an_encryption_request_is_refused(proxy, request_kind):
    """Bytes that arrive behind an SSLRequest before its answer was read are refused with
    08P01, as PostgreSQL does (CVE-2021-23214: they could be injected by a man in the middle).
    PostgreSQL answers 'N' first, then the error; pgmp may also skip the 'N'."""
    by = Bystander(proxy)
    request = rawpg.ssl_request() if request_kind == "ssl" else rawpg.gssenc_request()
    with raw(proxy) as conn:
        conn.send(request + startup_packet({"user": USER, "database": DB}))
        first = conn.read_exact(1)
        if first != b"N":
            conn.buf[:0] = first
        fields = expect_fatal(conn, "08P01", "received unencrypted data after")
        assert "request" in fields["M"], fields
    by.still_works()


def test_duplicate_ssl_request_is_refused(proxy):
    by = Bystander(proxy)
    with raw(proxy) as conn:
        conn.send(rawpg.ssl_request())
        assert conn.read_exact(1) == b"N"
        conn.send(rawpg.ssl_request())
        expect_fatal(conn, "08P01")
    by.still_works()


# ---- timeouts --------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["nothing", "startup-only"])
def test_client_login_timeout(pgmp, stage):
    proxy = pgmp.start(config={"client_login_timeout": 1})
    by = Bystander(proxy)
    with raw(proxy) as conn:
        started = time.monotonic()
        if stage == "startup-only":
            conn.send(startup_packet({"user": USER, "database": DB}))
            assert conn.read_message().type == b"R"      # the SCRAM request, never answered
        msgs = conn.read_until(b"E", timeout=5)
        fields = msgs[-1].fields
        assert fields["S"] == "FATAL" and fields.get("C") in ("08P01", "57014", "08006"), fields
        assert conn.wait_closed(5)
        elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 4, elapsed
    by.still_works()
