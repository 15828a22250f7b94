"""Limits at the front door: max_client_conn under a connection storm, a slowloris client, oversized SASL messages.

Each test checks that pgmp refuses exactly what it should and keeps serving the
clients it admitted.
"""
from __future__ import annotations

import asyncio
import resource
import socket
import struct
import threading
import time

import psycopg
import pytest

from pgmp.protocol import messages
from tests.integration import rawpg
from tests.integration.rawpg import RawPG, startup_packet
from tests.support import PASSWORDS

USER, DB = "scram_user", "appdb"
STORM_CLIENTS = 2000
MAX_CLIENT_CONN = 1000
FDS_NEEDED = 4500           # the storm's sockets, pgmp's copies of them, and some to spare


@pytest.fixture
def many_fds():
    """Raise this process's open-file soft limit to the hard limit (pgmp started afterwards inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if limit < FDS_NEEDED:
        pytest.skip(f"RLIMIT_NOFILE hard limit is {hard}: {STORM_CLIENTS} clients and pgmp's side of them "
                    f"need about {FDS_NEEDED} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---- asyncio protocol helpers ------------------------------------------------------------

async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
    return kind, await reader.readexactly(length - 4)


class Storm:
    """``n`` clients that connect at once; each admitted one runs a query and stays connected until all
    ``n`` know whether they were admitted, so the slots it holds are not freed during the storm."""

    def __init__(self, host: str, port: int, n: int):
        self.host, self.port, self.n = host, port, n
        self.undecided = n
        self.all_decided: asyncio.Event | None = None

    def _decided(self) -> None:
        self.undecided -= 1
        if self.undecided == 0:
            self.all_decided.set()

    async def one(self) -> tuple:
        decided = False
        writer = None
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(startup_packet({"user": USER, "database": DB}))
            kind, payload = await read_message(reader)
            if kind == b"E":
                return ("refused", messages.parse_fields(payload))
            while kind != b"Z":                     # trust: AuthenticationOk, ParameterStatus…, BackendKeyData
                if kind == b"E":
                    return ("login error", messages.parse_fields(payload))
                kind, payload = await read_message(reader)
            self._decided()
            decided = True
            writer.write(messages.query("select 40 + 2"))
            rows = []
            while True:
                kind, payload = await read_message(reader)
                if kind == b"D":
                    rows.append(rawpg.data_row(payload))
                elif kind == b"E":
                    return ("query error", messages.parse_fields(payload))
                elif kind == b"Z":
                    break
            await self.all_decided.wait()
            return ("ok", rows)
        except (OSError, asyncio.IncompleteReadError) as exc:
            return ("connection error", repr(exc))
        finally:
            if not decided:
                self._decided()
            if writer is not None:
                writer.close()

    async def run(self, timeout: float = 120.0) -> list[tuple]:
        self.all_decided = asyncio.Event()
        return await asyncio.wait_for(asyncio.gather(*(self.one() for _ in range(self.n))), timeout)


class Prober(threading.Thread):
    """An admitted client that runs a query every 50 ms and records the slowest answer."""

    def __init__(self, conn: psycopg.Connection):
        super().__init__(daemon=True)
        self.conn = conn
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def run(self):
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                assert self.conn.execute("select 'still here'").fetchone() == ("still here",)
                self.latencies.append(time.monotonic() - started)
                self.stop.wait(0.05)
        except BaseException as exc:
            self.error = exc


def test_connection_storm_refuses_exactly_the_excess(pgmp, many_fds):
    proxy = pgmp.start(auth_type="trust", workers=1,
                       config={"max_client_conn": MAX_CLIENT_CONN, "pool_mode": "transaction",
                               "log_connections": False, "log_disconnections": False})
    # One admitted client first: it counts towards max_client_conn, and shows pgmp stays responsive.
    prober = Prober(psycopg.connect(proxy.dsn(), autocommit=True))
    prober.start()
    try:
        storm = Storm(proxy.host, proxy.port, STORM_CLIENTS - 1)
        started = time.monotonic()
        results = asyncio.run(storm.run())
        took = time.monotonic() - started
    finally:
        prober.stop.set()
        prober.join(10)
    assert prober.error is None, prober.error
    outcomes: dict[str, list] = {}
    for kind, detail in results:
        outcomes.setdefault(kind, []).append(detail)
    summary = {kind: len(v) for kind, v in outcomes.items()}
    assert set(outcomes) <= {"ok", "refused"}, (summary, {k: v[:3] for k, v in outcomes.items()})
    # exactly the excess is refused: 2000 clients in all (the prober is one), 1000 allowed
    assert summary.get("refused", 0) == STORM_CLIENTS - MAX_CLIENT_CONN, summary
    assert summary.get("ok", 0) == MAX_CLIENT_CONN - 1, summary
    for fields in outcomes["refused"]:
        assert fields.get("C") == "53300" and fields.get("S") == "FATAL", fields
        assert fields.get("M") == "sorry, too many clients already", fields
        assert "max_client_conn" in fields.get("D", ""), fields
    assert all(rows == [["42"]] for rows in outcomes["ok"])
    # the admitted client was answered promptly all along
    assert prober.latencies and max(prober.latencies) < 1.0, (max(prober.latencies), took)
    # and after the storm, slots are free again
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    prober.conn.close()


# ---- slowloris ---------------------------------------------------------------------------

def test_slowloris_is_dropped_at_client_login_timeout(pgmp):
    proxy = pgmp.start(config={"client_login_timeout": 1})
    packet = startup_packet({"user": USER, "database": DB})
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    served: list[float] = []
    started = time.monotonic()
    dropped_after = None
    received = b""
    try:
        sock.settimeout(0.5)
        for i in range(len(packet)):             # one byte every 0.5 s: 40 s for the whole packet
            try:
                sock.send(packet[i:i + 1])
            except OSError:
                dropped_after = time.monotonic() - started
                break
            if i == 1:                               # meanwhile, a normal client is served
                t0 = time.monotonic()
                with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                    assert conn.execute("select 'normal'").fetchone() == ("normal",)
                served.append(time.monotonic() - t0)
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                dropped_after = time.monotonic() - started
                break
            received += chunk
            if not chunk:
                dropped_after = time.monotonic() - started
                break
            if time.monotonic() - started > 10:
                break
    finally:
        sock.close()
    assert dropped_after is not None, "pgmp kept the slowloris client for 10 s"
    assert 0.9 < dropped_after < 3.5, dropped_after
    if received:                                     # the error, if it was read before the close
        assert received[:1] == b"E" and b"client_login_timeout" in received, received
    assert served and served[0] < 1.0, served


# ---- SASL message size ---------------------------------------------------------------------

class Bystander:
    """A session opened before the bad input, inside a transaction; it must not notice."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.conn = psycopg.connect(proxy.dsn())
        self.conn.execute("select 1")

    def still_works(self):
        assert self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert self.conn.execute("select 'bystander ok'").fetchone() == ("bystander ok",)
        self.conn.commit()
        self.conn.close()
        with psycopg.connect(self.proxy.dsn(), autocommit=True) as fresh:
            assert fresh.execute("select 1").fetchone() == (1,)


def _sasl_started(proxy) -> RawPG:
    conn = RawPG.connect(proxy.host, proxy.port)
    conn.send(startup_packet({"user": USER, "database": DB}))
    msg = conn.read_message()
    assert msg.type == b"R" and messages.parse_auth_request(msg.payload)[0] == messages.AUTH_SASL
    return conn


def _expect_refused(conn: RawPG, codes=("08P01",)) -> dict:
    fields = conn.expect_error(timeout=5)
    assert fields.get("S") == "FATAL" and fields.get("C") in codes, fields
    assert conn.wait_closed(5)
    return fields


@pytest.mark.parametrize("size", [1025, 4000, 60000])
def test_sasl_initial_response_above_1024_bytes(pgmp, size):
    proxy = pgmp.start()
    by = Bystander(proxy)
    with _sasl_started(proxy) as conn:
        first = b"n,,n=,r=" + b"A" * size
        conn.send(messages.sasl_initial_response("SCRAM-SHA-256", first))
        fields = _expect_refused(conn)
        assert "length" in fields.get("M", "") + fields.get("D", ""), fields
    by.still_works()


def test_sasl_initial_response_of_exactly_1024_bytes_is_read(pgmp):
    """The limit is PostgreSQL's PG_MAX_SASL_MESSAGE_LENGTH on the whole payload: 1024 is allowed."""
    proxy = pgmp.start()
    with _sasl_started(proxy) as conn:
        head = b"SCRAM-SHA-256\0" + struct.pack("!i", 0)
        first = b"n,,n=,r=" + b"A" * (1024 - len(head) - len(b"n,,n=,r="))
        payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
        assert len(payload) == 1024
        conn.send(messages.password_message(payload))
        msg = conn.read_message()
        assert msg.type == b"R" and messages.parse_auth_request(msg.payload)[0] == messages.AUTH_SASL_CONTINUE


def test_sasl_final_message_above_1024_bytes(pgmp):
    proxy = pgmp.start()
    by = Bystander(proxy)
    with _sasl_started(proxy) as conn:
        conn.send(messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefgh"))
        msg = conn.read_message()
        assert messages.parse_auth_request(msg.payload)[0] == messages.AUTH_SASL_CONTINUE
        nonce = messages.parse_auth_request(msg.payload)[1].split(b",")[0][2:]
        final = b"c=biws,r=" + nonce + b",x=" + b"B" * 1500 + b",p=" + b"A" * 44
        conn.send(messages.password_message(final))
        _expect_refused(conn)
    by.still_works()


def test_huge_sasl_message_is_refused_from_its_header(pgmp):
    """A length of 100 MB: refused when the header arrives, nothing buffered."""
    proxy = pgmp.start()
    by = Bystander(proxy)
    with _sasl_started(proxy) as conn:
        conn.send(b"p" + struct.pack("!I", 100 * 1024 * 1024) + b"SCRAM-SHA-256\0")
        _expect_refused(conn)
    by.still_works()


def test_correct_login_still_works_after_oversized_ones(pgmp):
    proxy = pgmp.start()
    for _ in range(3):
        with _sasl_started(proxy) as conn:
            conn.send(messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=" + b"A" * 2000))
            _expect_refused(conn)
    with RawPG.connect(proxy.host, proxy.port) as conn:
        conn.login(USER, PASSWORDS[USER])
        assert conn.scalar("select current_user") == USER
