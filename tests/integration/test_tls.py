"""TLS through a real pgmp: client side (SSLRequest, direct TLS, modes, certificates, hba), server side
(a private TLS-enabled PostgreSQL and Python stand-ins), and the injection rules of CVE-2021-23214/23222.

Certificates come from trustme, made once per test session: a CA, a certificate for
"localhost" and 127.0.0.1 that pgmp shows its clients, client certificates whose CN
is a user name.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import ssl
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import trustme

from pgmp.protocol import messages
from tests.integration.rawpg import RawPG, gssenc_request, ssl_request, startup_packet
from tests.support import run, wait_for
from tests.support.cluster import SUPERUSER, Cluster, start_cluster, stop_cluster
from tests.support.shared import current_run_dir


# ---- certificates ------------------------------------------------------------------

@dataclass
class Certs:
    dir: Path
    ca: Path                  # the CA that signs everything below
    cert: Path                # pgmp's certificate for its clients: localhost, 127.0.0.1
    key: Path
    client: dict[str, tuple[Path, Path]]      # user -> (certificate, key) with CN = user
    other_ca: Path            # a CA that signed nothing pgmp shows


def _write(ca: trustme.CA, leaf, base: Path, name: str) -> tuple[Path, Path]:
    cert, key = base / f"{name}.crt", base / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    base = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(base / "ca.crt"))
    other.cert_pem.write_to_path(str(base / "other-ca.crt"))
    cert, key = _write(ca, ca.issue_cert("localhost", "127.0.0.1"), base, "pgmp")
    client = {user: _write(ca, ca.issue_cert(f"{user}@example.org", common_name=user), base, f"client-{user}")
              for user in ("scram_user", "md5_user")}
    return Certs(base, base / "ca.crt", cert, key, client, base / "other-ca.crt")


def tls_config(certs: Certs, mode: str = "prefer", **extra) -> dict:
    return {"client_tls_mode": mode, "client_tls_cert_file": str(certs.cert),
            "client_tls_key_file": str(certs.key), **extra}


def hba_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"hba-{uuid.uuid4().hex[:8]}.conf"
    path.write_text(text)
    return str(path)


# ---- raw TLS clients ----------------------------------------------------------------

def tls_socket(host: str, port: int, direct: bool = False, alpn: list[str] | None = None,
               cafile: Path | None = None, cert: tuple[Path, Path] | None = None) -> ssl.SSLSocket:
    """A TLS connection to pgmp: SSLRequest first, or direct TLS (PostgreSQL 17) when ``direct``."""
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else ssl._create_unverified_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    sock = socket.create_connection((host, port), timeout=10)
    if not direct:
        sock.sendall(ssl_request())
        assert sock.recv(1) == b"S"
    return ctx.wrap_socket(sock, server_hostname="localhost" if cafile else None)


def raw_tls(proxy, **kw) -> RawPG:
    return RawPG(tls_socket(proxy.host, proxy.port, **kw))


def expect_refusal(conn: RawPG, startup: bytes) -> dict[str, str]:
    conn.send(startup)
    fields = conn.expect_error()
    assert conn.wait_closed()
    return fields


def startup(user: str = "scram_user", database: str = "appdb") -> bytes:
    return startup_packet({"user": user, "database": database})


def psql(dsn: str, sql: str, **env) -> str:
    return run(["psql", "-X", "-A", "-t", "-c", sql, dsn], timeout=30, env=env).stdout.strip()


# ---- client side: modes --------------------------------------------------------------

def test_psql_sslmode_require(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs, "require"))
    out = psql(proxy.dsn(sslmode="require"), "select current_user")
    assert out == "scram_user"
    info = run(["psql", "-X", "-c", r"\conninfo", proxy.dsn(sslmode="require")], timeout=30).stdout
    assert "SSL connection (protocol: TLSv1.3" in info


def test_psql_and_psycopg_verify_full(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs))
    params = dict(host="localhost", hostaddr="127.0.0.1", sslmode="verify-full", sslrootcert=str(certs.ca))
    assert psql(proxy.dsn(**params), "select 6 * 7") == "42"
    with psycopg.connect(proxy.dsn(**params)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
        # a large result crosses many TLS records and reads
        rows = conn.execute("select repeat('x', 1000) from generate_series(1, 2000)").fetchall()
        assert len(rows) == 2000 and rows[-1][0] == "x" * 1000
        big = "y" * 3_000_000
        assert conn.execute("select length(%s)", (big,)).fetchone() == (3_000_000,)
    # a CA that did not sign pgmp's certificate: libpq refuses pgmp
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(proxy.dsn(**{**params, "sslrootcert": str(certs.other_ca)}))


def test_require_refuses_plaintext_with_28000(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs, "require"))
    with RawPG.connect(proxy.host, proxy.port) as conn:
        fields = expect_refusal(conn, startup())
    assert fields["C"] == "28000"
    assert "TLS is required" in fields["M"]
    with pytest.raises(psycopg.OperationalError, match="TLS is required"):
        psycopg.connect(proxy.dsn(sslmode="disable"))
    # unix socket clients are exempt (libpq never uses TLS there)
    with psycopg.connect(proxy.dsn(host=proxy.unix_socket_dir)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_disable_answers_n_and_plaintext_works(pgmp):
    proxy = pgmp.start()
    with RawPG.connect(proxy.host, proxy.port) as conn:
        conn.send(ssl_request())
        assert conn.read_exact(1) == b"N"
        conn.login()
        assert conn.scalar("select 1") == "1"
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn(sslmode="require"))


def test_gssencrequest_gets_n_then_tls(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs))
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(gssenc_request())
    assert sock.recv(1) == b"N"
    sock.sendall(ssl_request())
    assert sock.recv(1) == b"S"
    conn = RawPG(ssl._create_unverified_context().wrap_socket(sock))
    conn.login()
    assert conn.scalar("select current_user") == "scram_user"
    conn.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_large_requests_and_answers_over_tls_keep_every_byte(pgmp, certs, mode):
    """Megabytes each way through the client's TLS: more than the socket takes at once, so pgmp
    sends TLS records in parts and queues the rest (Endpoint._send_raw); nothing is lost or reordered."""
    proxy = pgmp.start(config={**tls_config(certs, "require"), "pool_mode": mode})
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        big = "".join(f"{i:08d}" for i in range(500_000))           # 4 MB, every part different
        assert conn.execute("select md5(%s)", (big,)).fetchone() == (hashlib.md5(big.encode()).hexdigest(),)
        rows = conn.execute("select i, repeat(md5(i::text), 1000) from generate_series(1, 300) i").fetchall()
        assert [r[0] for r in rows] == list(range(1, 301))
        assert all(r[1] == hashlib.md5(str(r[0]).encode()).hexdigest() * 1000 for r in rows)
        assert conn.execute("select 'after'").fetchone() == ("after",)


def test_over_limit_refusal_comes_after_tls(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs, "require", max_client_conn=1))

    def first_client():                  # once pgmp has seen the readiness probe leave
        try:
            return psycopg.connect(proxy.dsn(sslmode="require"))
        except psycopg.OperationalError:
            return None
    with wait_for(first_client, timeout=5):
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            psycopg.connect(proxy.dsn(sslmode="require"))
        with raw_tls(proxy) as conn:
            assert expect_refusal(conn, startup())["C"] == "53300"


def test_cancel_over_tls(pgmp, certs):
    """libpq 17+ sends its CancelRequest inside TLS too (SSLRequest, handshake, then the request)."""
    proxy = pgmp.start(config=tls_config(certs, "require"))
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        timer.join()
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)
    proxy.wait_log("cancel: user=scram_user")


# ---- client side: certificates and hba -----------------------------------------------

def test_verify_full_with_client_certificate_and_cert_rule(pgmp, certs, tmp_path):
    hba = hba_file(tmp_path, "hostssl all all 127.0.0.1/32 cert\n")
    proxy = pgmp.start(config=tls_config(certs, "verify-full", client_tls_ca_file=str(certs.ca), hba_file=hba))
    cert, key = certs.client["scram_user"]
    params = dict(host="localhost", hostaddr="127.0.0.1", sslmode="verify-full", sslrootcert=str(certs.ca),
                  sslcert=str(cert), sslkey=str(key), password="not used by the cert method")
    assert psql(proxy.dsn(**params), "select current_user") == "scram_user"
    with psycopg.connect(proxy.dsn(**params)) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    # the certificate of another user: its CN is not the user name
    other = certs.client["md5_user"]
    with pytest.raises(psycopg.OperationalError, match='certificate authentication failed for user "scram_user"'):
        psycopg.connect(proxy.dsn(**{**params, "sslcert": str(other[0]), "sslkey": str(other[1])}))
    # no certificate at all: verify-full refuses before any rule is looked at
    no_cert = {k: v for k, v in params.items() if k not in ("sslcert", "sslkey")}
    with pytest.raises(psycopg.OperationalError, match="requires a valid client certificate"):
        psycopg.connect(proxy.dsn(**no_cert, sslcertmode="disable"))
    with raw_tls(proxy) as conn:
        assert expect_refusal(conn, startup())["C"] == "28000"
    assert "no verified client certificate" in proxy.log()


def test_cert_rule_without_certificate_is_28000(pgmp, certs, tmp_path):
    hba = hba_file(tmp_path, "hostssl all all 127.0.0.1/32 cert\n")
    proxy = pgmp.start(config=tls_config(certs, "prefer", client_tls_ca_file=str(certs.ca), hba_file=hba))
    with raw_tls(proxy) as conn:
        fields = expect_refusal(conn, startup())
    assert fields["C"] == "28000"
    assert fields["M"] == "connection requires a valid client certificate"
    with raw_tls(proxy, cert=certs.client["scram_user"]) as conn:
        conn.login(password_text=None)
        assert conn.scalar("select current_user") == "scram_user"


def test_hostssl_rule_refuses_plain_tcp(pgmp, certs, tmp_path):
    hba = hba_file(tmp_path, "hostssl all all 127.0.0.1/32 scram-sha-256\n")
    proxy = pgmp.start(config=tls_config(certs, "prefer", hba_file=hba))
    with RawPG.connect(proxy.host, proxy.port) as conn:
        fields = expect_refusal(conn, startup())
    assert fields["C"] == "28000"
    assert fields["M"] == ('no pg_hba.conf entry for host "127.0.0.1", user "scram_user", '
                           'database "appdb", no encryption')
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_hostnossl_and_reject_name_the_encryption(pgmp, certs, tmp_path):
    hba = hba_file(tmp_path, "hostnossl all all 127.0.0.1/32 scram-sha-256\n"
                             "hostssl all all 127.0.0.1/32 reject\n")
    proxy = pgmp.start(config=tls_config(certs, "prefer", hba_file=hba))
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with raw_tls(proxy) as conn:
        fields = expect_refusal(conn, startup())
    assert fields["C"] == "28000"
    assert fields["M"].endswith("SSL encryption")


# ---- client side: SCRAM channel binding ------------------------------------------------

@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_scram_channel_binding(pgmp, tmp_path, key_type):
    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    cert, key = _write(ca, ca.issue_cert("localhost", "127.0.0.1", key_type=getattr(trustme.KeyType, key_type)),
                       tmp_path, "pgmp")
    proxy = pgmp.start(config={"client_tls_mode": "prefer", "client_tls_cert_file": str(cert),
                               "client_tls_key_file": str(key)})
    # libpq checks the tls-server-end-point hash of the certificate it received
    with psycopg.connect(proxy.dsn(sslmode="require", channel_binding="require")) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    # no TLS, no SCRAM-SHA-256-PLUS on offer
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(proxy.dsn(sslmode="disable", channel_binding="require"))


def test_scram_downgrade_is_refused(pgmp, certs):
    """A client that says "y" (it could bind, but thinks pgmp cannot) while PLUS was on offer."""
    proxy = pgmp.start(config=tls_config(certs))
    with raw_tls(proxy) as conn:
        conn.send(startup())
        code, data = messages.parse_auth_request(conn.read_message().payload)
        assert code == messages.AUTH_SASL
        assert messages.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        conn.send(messages.sasl_initial_response("SCRAM-SHA-256", b"y,,n=,r=abcdefgh"))
        fields = conn.expect_error()
    assert fields["C"] == "08P01"
    assert fields["M"] == "SCRAM channel binding negotiation error"
    with RawPG.connect(proxy.host, proxy.port) as conn:     # plaintext: only SCRAM-SHA-256
        conn.send(startup())
        code, data = messages.parse_auth_request(conn.read_message().payload)
        assert messages.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256"]


# ---- client side: injection (CVE-2021-23214) -----------------------------------------

@pytest.mark.parametrize("request_kind", ["ssl", "gssenc"])
@pytest.mark.parametrize("mode", ["prefer", "disable"])
def test_request_with_pipelined_startup_is_08p01_without_server_contact(pgmp, pg, certs, request_kind, mode):
    app = f"pgmp-cve-{uuid.uuid4().hex[:12]}"
    proxy = pgmp.start(config=tls_config(certs, mode) if mode != "disable" else None,
                       databases={"appdb": {"application_name": app}})
    request = ssl_request() if request_kind == "ssl" else gssenc_request()
    with RawPG.connect(proxy.host, proxy.port) as conn:
        conn.send(request + startup())           # one write
        first = conn.read_exact(1)
        assert first == b"E", "pgmp answered the request instead of refusing the injected bytes"
        conn.buf[:0] = first
        fields = conn.expect_error()
        assert conn.wait_closed()
    assert fields["C"] == "08P01"
    assert fields["M"].startswith("received unencrypted data after")

    def server_connections():
        return int(pg.psql(f"select count(*) from pg_stat_activity where application_name = '{app}'"))
    assert server_connections() == 0
    # the check means something: a proper login does reach the server with that name
    with psycopg.connect(proxy.dsn(sslmode="prefer" if mode != "disable" else "disable")) as conn:
        conn.execute("select 1")
        assert server_connections() == 1


def test_bytes_after_request_in_a_later_write_are_not_plaintext(pgmp, certs):
    """Cleartext sent after 'S' is handshake input: the handshake fails, nothing reaches a server."""
    proxy = pgmp.start(config=tls_config(certs))
    with RawPG.connect(proxy.host, proxy.port) as conn:
        conn.send(ssl_request())
        assert conn.read_exact(1) == b"S"
        conn.send(startup())
        assert conn.wait_closed()
    proxy.wait_log("TLS handshake failed")


# ---- client side: direct TLS (PostgreSQL 17) -------------------------------------------

def test_direct_tls_with_alpn(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs))
    sock = tls_socket(proxy.host, proxy.port, direct=True, alpn=["postgresql"], cafile=certs.ca)
    assert sock.selected_alpn_protocol() == "postgresql"
    with RawPG(sock) as conn:
        conn.login()
        assert conn.scalar("select current_user") == "scram_user"


def test_direct_tls_without_alpn_is_refused(pgmp, certs):
    proxy = pgmp.start(config=tls_config(certs))
    with RawPG(tls_socket(proxy.host, proxy.port, direct=True, cafile=certs.ca)) as conn:
        fields = expect_refusal(conn, startup())
    assert fields["C"] == "08P01"
    assert "without ALPN" in fields["M"]
    # ALPN offered, but not PostgreSQL's: pgmp does not agree on it, and refuses the same way
    with RawPG(tls_socket(proxy.host, proxy.port, direct=True, alpn=["http/1.1"])) as conn:
        fields = expect_refusal(conn, startup())
    assert "without ALPN" in fields["M"]


def test_direct_tls_with_libpq(pgmp, certs):
    if psycopg.pq.version() < 170000:
        pytest.skip("libpq before 17 has no sslnegotiation=direct")
    proxy = pgmp.start(config=tls_config(certs))
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslnegotiation="direct", sslrootcert=str(certs.ca),
                                   host="localhost", hostaddr="127.0.0.1")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_direct_tls_when_tls_is_off_closes(pgmp):
    proxy = pgmp.start()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_socket(proxy.host, proxy.port, direct=True, alpn=["postgresql"])


# ---- client side: reload -------------------------------------------------------------------

def test_certificate_reload_applies_to_new_connections(pgmp, certs, tmp_path):
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(certs.cert, live_cert)
    shutil.copy(certs.key, live_key)
    proxy = pgmp.start(config=tls_config(certs, client_tls_cert_file=str(live_cert),
                                         client_tls_key_file=str(live_key)))

    def dsn(ca):
        return proxy.dsn(host="localhost", hostaddr="127.0.0.1", sslmode="verify-full", sslrootcert=str(ca))
    old = psycopg.connect(dsn(certs.ca))
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(tmp_path / "new-ca.crt"))
    leaf = new_ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(live_key))
    leaf.cert_chain_pems[0].write_to_path(str(live_cert))
    proxy.signal(signal.SIGHUP)

    def new_cert_served():
        try:
            psycopg.connect(dsn(tmp_path / "new-ca.crt")).close()
            return True
        except psycopg.OperationalError:
            return False
    wait_for(new_cert_served, timeout=10, message=lambda: proxy.log())
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn(certs.ca))
    # the connection made before the reload keeps working
    assert old.execute("select 1").fetchone() == (1,)
    old.close()


# ---- server side: stand-ins ------------------------------------------------------------------

class StandIn:
    """A one-thread TCP server that plays a PostgreSQL server for each connection with ``handler(sock)``."""

    def __init__(self, handler):
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                sock.settimeout(10)
                try:
                    self.handler(sock)
                except Exception as exc:          # reported by the test, not lost in the thread
                    self.errors.append(exc)

    def close(self):
        self.listener.close()
        self.thread.join(5)


def read_packet(sock) -> bytes:
    head = _recv_exact(sock, 4)
    (length,) = struct.unpack("!I", head)
    return head + _recv_exact(sock, length - 4)


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("pgmp closed the connection")
        data += chunk
    return data


def fake_login_and_query(sock) -> None:
    """Enough of PostgreSQL for one login (trust) and simple queries answered with one row "1"."""
    packet = read_packet(sock)
    assert struct.unpack_from("!i", packet, 4)[0] == messages.PROTOCOL_3_0, packet
    out = [messages.auth_ok()]
    for name, value in (("server_version", "17.0"), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
                        ("TimeZone", "UTC"), ("integer_datetimes", "on"), ("standard_conforming_strings", "on")):
        out.append(messages.parameter_status(name, value))
    out += [messages.backend_key_data(4242, 1), messages.ready_for_query(b"I")]
    sock.sendall(b"".join(out))
    while True:
        head = sock.recv(5)
        if len(head) < 5 or head[:1] == b"X":
            return
        (length,) = struct.unpack_from("!I", head, 1)
        body = _recv_exact(sock, length - 4) if length > 4 else b""
        if head[:1] != b"Q":
            continue
        desc = messages.frame(b"T", struct.pack("!h", 1) + b"x\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0))
        row = messages.frame(b"D", struct.pack("!hi", 1, 1) + b"1")
        done = messages.frame(b"C", b"SELECT 1\0")
        sock.sendall(desc + row + done + messages.ready_for_query(b"I"))
        assert body


def tls_stand_in(cert: trustme.LeafCert, sslrequest_answer: bytes = b"S"):
    """A stand-in that answers SSLRequest with 'S', does the handshake with ``cert``, then logs in."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)

    def handler(sock):
        assert read_packet(sock) == ssl_request()
        sock.sendall(sslrequest_answer)
        with ctx.wrap_socket(sock, server_side=True) as tls_sock:
            fake_login_and_query(tls_sock)
    return StandIn(handler)


@pytest.fixture
def stand_ins():
    made: list[StandIn] = []
    yield made
    for s in made:
        s.close()
    for s in made:
        assert not [e for e in s.errors if not isinstance(e, (ConnectionError, ssl.SSLError, OSError))], s.errors


def test_server_s_followed_by_cleartext_is_refused(pgmp, stand_ins):
    """CVE-2021-23222: a 'S' with bytes after it; the client hears why, the worker keeps serving."""
    def handler(sock):
        read_packet(sock)
        sock.sendall(b"S" + messages.auth_ok() + messages.ready_for_query(b"I"))
        sock.recv(100)
    bad = StandIn(handler)
    stand_ins.append(bad)
    proxy = pgmp.start(config={"server_tls_mode": "prefer"}, auth_type="trust",
                       databases={"bad": {"host": "127.0.0.1", "port": bad.port, "dbname": "bad"},
                                  "appdb": {"host": "127.0.0.1"}})
    with pytest.raises(psycopg.OperationalError, match="CVE-2021-23222") as info:
        psycopg.connect(proxy.dsn(dbname="bad"))
    assert "unencrypted data after its answer to SSLRequest" in str(info.value)
    assert "CVE-2021-23222" in proxy.log()
    # the shared cluster has no TLS: prefer goes on in cleartext, in the same worker
    with psycopg.connect(proxy.dsn(dbname="appdb")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_server_tls_to_stand_in(pgmp, stand_ins):
    ca = trustme.CA()
    server = tls_stand_in(ca.issue_cert("127.0.0.1"))
    stand_ins.append(server)
    ca_file = Path(pgmp.workdir) / "standin-ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = pgmp.start(config={"server_tls_mode": "verify-full", "server_tls_ca_file": str(ca_file)},
                       auth_type="trust", databases={"fake": {"host": "127.0.0.1", "port": server.port}})
    with psycopg.connect(proxy.dsn(dbname="fake")) as conn:
        assert conn.execute("select 1").fetchone() == ("1",)


def test_server_verify_full_wrong_host_name(pgmp, stand_ins):
    ca = trustme.CA()
    server = tls_stand_in(ca.issue_cert("db.example.org"))
    stand_ins.append(server)
    ca_file = Path(pgmp.workdir) / "standin-ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = pgmp.start(config={"server_tls_mode": "verify-full", "server_tls_ca_file": str(ca_file)},
                       auth_type="trust", databases={"fake": {"host": "127.0.0.1", "port": server.port}})
    with pytest.raises(psycopg.OperationalError, match='server certificate does not match host name "127.0.0.1"'):
        psycopg.connect(proxy.dsn(dbname="fake"))
    proxy.wait_log("server certificate does not match host name")


def test_server_verify_ca_unknown_ca(pgmp, stand_ins, certs):
    ca = trustme.CA()
    server = tls_stand_in(ca.issue_cert("127.0.0.1"))
    stand_ins.append(server)
    proxy = pgmp.start(config={"server_tls_mode": "verify-ca", "server_tls_ca_file": str(certs.ca)},
                       auth_type="trust", databases={"fake": {"host": "127.0.0.1", "port": server.port}})
    with pytest.raises(psycopg.OperationalError, match="server certificate of .* could not be verified"):
        psycopg.connect(proxy.dsn(dbname="fake"))


def test_server_require_refuses_cleartext_server(pgmp):
    proxy = pgmp.start(config={"server_tls_mode": "require"})
    with pytest.raises(psycopg.OperationalError, match="does not support TLS"):
        psycopg.connect(proxy.dsn())


# ---- server side: a private PostgreSQL with TLS -----------------------------------------------

@dataclass
class TlsPostgres:
    cluster: Cluster
    server_ca: str            # the CA of the server's certificate (for 127.0.0.1 only)

    def log(self) -> str:
        return self.cluster.log()

    @property
    def port(self) -> int:
        return self.cluster.port


@pytest.fixture(scope="module")
def tls_pg(certs) -> TlsPostgres:
    """A private PostgreSQL with ssl = on (the shared cluster stays as it is), cert for 127.0.0.1.

    It also takes client certificates signed by the session's CA: md5_user logs in with one (cert).
    """
    base = current_run_dir() / f"pg-tls-{uuid.uuid4().hex[:8]}"
    cluster = start_cluster(base)
    try:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        server_cert, server_key = _write(ca, leaf, base, "server")
        ca.cert_pem.write_to_path(str(base / "server-ca.crt"))
        shutil.copy(certs.ca, base / "client-ca.crt")
        for path in (server_cert, server_key, base / "client-ca.crt"):
            shutil.chown(path, SUPERUSER, SUPERUSER)
        cluster.psql(f"""
            ALTER SYSTEM SET ssl = on;
            ALTER SYSTEM SET ssl_cert_file = '{server_cert}';
            ALTER SYSTEM SET ssl_key_file = '{server_key}';
            ALTER SYSTEM SET ssl_ca_file = '{base / "client-ca.crt"}';
            SELECT pg_reload_conf();
        """)
        wait_for(lambda: cluster.psql("show ssl") == "on", timeout=10)
        # pgmp's own identity: a client certificate for md5_user (CN) checked by PostgreSQL
        hba = Path(cluster.datadir) / "pg_hba.conf"
        hba.write_text("hostssl all md5_user 127.0.0.1/32 cert clientcert=verify-full\n" + hba.read_text())
        cluster.psql("SELECT pg_reload_conf()")
        yield TlsPostgres(cluster, str(base / "server-ca.crt"))
    finally:
        stop_cluster(base)


def pg_databases(server: TlsPostgres) -> dict:
    return {"appdb": {"host": "127.0.0.1", "port": server.port}}


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
def test_server_tls_to_postgresql(pgmp, tls_pg, mode):
    proxy = pgmp.start(config={"server_tls_mode": mode, "server_tls_ca_file": tls_pg.server_ca},
                       databases=pg_databases(tls_pg))
    with psycopg.connect(proxy.dsn()) as conn:       # SCRAM to pgmp, SCRAM from pgmp to PostgreSQL
        row = conn.execute("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        assert row == (True, "TLSv1.3")
        total = conn.execute("select sum(length(repeat('z', 5000))) from generate_series(1, 500)").fetchone()
        assert total == (2_500_000,)


def test_server_tls_client_certificate(pgmp, tls_pg, certs):
    cert, key = certs.client["md5_user"]
    proxy = pgmp.start(config={"server_tls_mode": "verify-full", "server_tls_ca_file": tls_pg.server_ca,
                               "server_tls_cert_file": str(cert), "server_tls_key_file": str(key)},
                       databases=pg_databases(tls_pg))
    with psycopg.connect(proxy.dsn("md5_user")) as conn:
        assert conn.execute("select current_user").fetchone() == ("md5_user",)
    wait_for(lambda: re.search(r'identity="CN=md5_user[,"].* method=cert', tls_pg.log()), timeout=5,
             message=lambda: tls_pg.log()[-3000:])


def test_server_tls_without_client_certificate_fails_cleanly(pgmp, tls_pg):
    proxy = pgmp.start(config={"server_tls_mode": "require"}, databases=pg_databases(tls_pg))
    with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
        psycopg.connect(proxy.dsn("md5_user"))


def test_server_verify_full_against_postgresql_with_wrong_name(pgmp, tls_pg):
    """The cluster's certificate names 127.0.0.1 only: "localhost" does not match it."""
    if socket.getaddrinfo("localhost", tls_pg.port, type=socket.SOCK_STREAM)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost does not resolve to 127.0.0.1 first here (the cluster listens there only)")
    proxy = pgmp.start(config={"server_tls_mode": "verify-full", "server_tls_ca_file": tls_pg.server_ca},
                       databases={"appdb": {"host": "localhost", "port": tls_pg.port}})
    with pytest.raises(psycopg.OperationalError, match='does not match host name "localhost"'):
        psycopg.connect(proxy.dsn())


def test_tls_on_both_sides(pgmp, tls_pg, certs):
    proxy = pgmp.start(config={**tls_config(certs, "require"), "server_tls_mode": "verify-full",
                               "server_tls_ca_file": tls_pg.server_ca, "pool_mode": "transaction"},
                       databases=pg_databases(tls_pg))
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        for i in range(20):
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
        conn.execute("create temp table t (x text)")
        with conn.cursor().copy("copy t from stdin") as copy:
            for i in range(5000):
                copy.write_row((f"row {i} " + "w" * 100,))
        assert conn.execute("select count(*) from t").fetchone() == (5000,)
