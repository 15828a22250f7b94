"""pgmp.tls (contexts from the config), TLS inside the loop's Endpoint over socketpairs, SCRAM-SHA-256-PLUS.

No pgmp process: these drive the pieces directly.
"""
from __future__ import annotations

import base64
import dataclasses
import socket
import ssl
import struct
import threading
import time

import pytest
import trustme
from scramp import ScramClient

from pgmp import config as configmod
from pgmp import tls
from pgmp.auth.authfile import parse_secret, scram_keys
from pgmp.auth.client import ClientAuthenticator
from pgmp.errors import AuthenticationFailed, ClientProtocolError
from pgmp.loop import Endpoint, Loop
from pgmp.protocol import messages


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_files(ca, tmp_path_factory):
    base = tmp_path_factory.mktemp("tls-unit")
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(base / "c.crt"))
    leaf.private_key_pem.write_to_path(str(base / "c.key"))
    ca.cert_pem.write_to_path(str(base / "ca.crt"))
    (base / "junk.pem").write_text("not a certificate\n")
    return base


def make_config(**settings):
    cfg = configmod.loads('[pgmp]\nauth_type = "trust"\n')
    return dataclasses.replace(cfg, **settings)


# ---- contexts ---------------------------------------------------------------------------

def test_disable_gives_no_context():
    cfg = make_config()
    assert tls.for_clients(cfg) is None
    assert tls.for_servers(cfg) is None


def test_client_context(server_files):
    ctx = tls.for_clients(make_config(client_tls_mode="require", client_tls_cert_file=str(server_files / "c.crt"),
                                      client_tls_key_file=str(server_files / "c.key"),
                                      client_tls_min_version="TLSv1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_NONE
    ctx = tls.for_clients(make_config(client_tls_mode="verify-full", client_tls_cert_file=str(server_files / "c.crt"),
                                      client_tls_key_file=str(server_files / "c.key"),
                                      client_tls_ca_file=str(server_files / "ca.crt")))
    # asked for, checked when sent; the refusal of a client without one is pgmp's ErrorResponse
    assert ctx.verify_mode == ssl.CERT_OPTIONAL


@pytest.mark.parametrize("mode, verify, hostname", [
    ("prefer", ssl.CERT_NONE, False), ("require", ssl.CERT_NONE, False),
    ("verify-ca", ssl.CERT_REQUIRED, False), ("verify-full", ssl.CERT_REQUIRED, True)])
def test_server_context_modes(server_files, mode, verify, hostname):
    ctx = tls.for_servers(make_config(server_tls_mode=mode, server_tls_ca_file=str(server_files / "ca.crt")))
    assert (ctx.verify_mode, ctx.check_hostname) == (verify, hostname)


@pytest.mark.parametrize("settings, words", [
    (dict(client_tls_cert_file="/nonexistent/c.crt"), ["client_tls_cert_file", "/nonexistent/c.crt", "no such file"]),
    (dict(client_tls_cert_file="{d}/junk.pem"), ["client_tls_cert_file", "junk.pem", "private key"]),
    (dict(client_tls_cert_file="{d}/c.crt", client_tls_key_file="{d}/c.key", client_tls_ca_file="{d}/junk.pem"),
     ["client_tls_ca_file", "junk.pem"]),
    (dict(client_tls_cert_file="{d}/c.crt", client_tls_key_file="{d}/c.key", client_tls_ciphers="NOPE-NOTHING"),
     ["client_tls_ciphers", "NOPE-NOTHING"]),
])
def test_unusable_files_name_the_setting(server_files, settings, words):
    settings = {k: v.format(d=server_files) for k, v in settings.items()}
    with pytest.raises(tls.TlsConfigError) as info:
        tls.for_clients(make_config(client_tls_mode="require", **settings))
    for word in words:
        assert word in str(info.value)


# ---- Endpoint with TLS ---------------------------------------------------------------------

class Collector(Endpoint):
    """Gathers the plaintext; can pause reading after its first chunk for a while."""
    __slots__ = ("chunks", "ready", "failed", "eof", "pause_for")

    def __init__(self, loop, sock, pause_for=0.0):
        super().__init__(loop, sock)
        self.chunks: list[bytes] = []
        self.ready = False
        self.failed = None
        self.eof = None
        self.pause_for = pause_for

    def on_data(self, view, n):
        self.chunks.append(bytes(view[:n]))
        if self.pause_for and len(self.chunks) == 1:
            self.pause_reading()
            self.loop.call_later(self.pause_for, self.resume_reading)

    def on_eof(self, reason):
        self.eof = reason
        self.close_socket()

    def on_tls_ready(self):
        self.ready = True

    def on_tls_failed(self, exc):
        self.failed = exc
        self.close_socket()

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


def run_until(loop, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.02)


def peer_context(ca, alpn=True):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(["postgresql"])
    return ctx


def server_context(ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def in_thread(fn):
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def test_plaintext_left_in_the_tls_layer_is_delivered_after_a_pause(ca):
    """One TLS record, a small loop buffer, a pause: the rest waits in the SSLObject, not in the socket."""
    loop = Loop(buffer_size=4096)
    ours, theirs = socket.socketpair()
    ep = Collector(loop, ours, pause_for=0.2)
    ep.start_tls(server_context(ca), server_side=True)
    payload = bytes(range(256)) * 40               # 10240 bytes: one record
    done = threading.Event()

    def peer():
        with peer_context(ca).wrap_socket(theirs, server_hostname="localhost") as s:
            s.sendall(payload)
            done.wait(10)                           # nothing more arrives on the socket
    t, result = in_thread(peer)
    try:
        run_until(loop, lambda: len(ep.received) >= len(payload) or ep.closed)
        assert ep.ready and ep.received == payload
        assert len(ep.chunks) >= 2 and len(ep.chunks[0]) == 4096
    finally:
        done.set()
        t.join(5)
        loop.close()
    assert "error" not in result, result


def test_large_sends_and_reads_both_ways(ca):
    loop = Loop(buffer_size=8192)
    loop.max_unsent = 8192
    ours, theirs = socket.socketpair()
    ep = Collector(loop, ours)
    ep.start_tls(server_context(ca), server_side=True)
    upstream = b"u" * 1_500_000
    downstream = bytes(range(251)) * 8000

    def peer():
        with peer_context(ca).wrap_socket(theirs, server_hostname="localhost") as s:
            s.sendall(upstream)
            got = bytearray()
            while len(got) < len(downstream):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            return bytes(got)
    t, result = in_thread(peer)
    try:
        run_until(loop, lambda: ep.ready)
        ep.send(downstream[:1000])
        ep.send_views([memoryview(downstream)[1000:5000], memoryview(downstream)[5000:]])
        run_until(loop, lambda: len(ep.received) >= len(upstream) and not ep.outq)
        t.join(10)
    finally:
        loop.close()
    assert ep.received == upstream
    assert result.get("value") == downstream, result.get("error")


def test_handshake_failure_is_reported(ca):
    loop = Loop()
    ours, theirs = socket.socketpair()
    ep = Collector(loop, ours)
    ep.start_tls(server_context(ca), server_side=True)

    def peer():
        with peer_context(trustme.CA()).wrap_socket(theirs, server_hostname="localhost"):
            pass
    t, result = in_thread(peer)
    try:
        run_until(loop, lambda: ep.closed)
    finally:
        t.join(5)
        loop.close()
    assert not ep.ready
    assert isinstance(ep.failed, ssl.SSLError)
    assert isinstance(result.get("error"), ssl.SSLCertVerificationError)


def test_tls_client_side_and_received_bytes(ca):
    """pgmp as the TLS client (hello sent at once) against pgmp as a TLS server fed the first bytes by hand."""
    loop = Loop()
    a, b = socket.socketpair()
    client = Collector(loop, a)
    server = Collector(loop, b)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    client.start_tls(ctx, server_side=False, server_hostname="localhost")
    # direct TLS: the server endpoint read the ClientHello before it knew it was TLS
    hello = b.recv(65536)
    assert hello[:1] == b"\x16"
    server.start_tls(server_context(ca), server_side=True, received=hello)
    try:
        run_until(loop, lambda: client.ready and server.ready)
        assert server.tls.obj.selected_alpn_protocol() is None       # the client offered none
        client.send(b"hello through TLS")
        run_until(loop, lambda: server.received == b"hello through TLS")
        server.close_socket()                       # sends close_notify
        run_until(loop, lambda: client.eof is not None)
        assert client.eof == "closed by peer"
    finally:
        loop.close()


def test_describe():
    assert tls.describe(ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)")) \
        == "EOF occurred in violation of protocol"


# ---- SCRAM-SHA-256-PLUS (channel binding) ---------------------------------------------------

BINDING = bytes(range(32))                    # stands for the hash of pgmp's certificate


def scram_secret(password: str):
    salt, iterations = b"0123456789abcdef", 4096
    _, stored, server = scram_keys(password.encode(), salt, iterations)
    salt64, stored64, server64 = (base64.b64encode(b).decode() for b in (salt, stored, server))
    return parse_secret(f"SCRAM-SHA-256${iterations}:{salt64}${stored64}:{server64}")


def payload(frame: bytes) -> tuple[int, bytes]:
    return messages.parse_auth_request(frame[5:])


def initial(mechanism: bytes, data: bytes) -> bytes:
    return mechanism + b"\0" + struct.pack("!i", len(data)) + data


def authenticator(binding=BINDING, password="pw"):
    return ClientAuthenticator("scram-sha-256", "alice", scram_secret(password), mock_seed=b"s" * 32,
                               channel_binding=binding)


def test_plus_is_offered_only_with_channel_binding():
    _, data = payload(authenticator().start())
    assert messages.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    _, data = payload(authenticator(binding=None).start())
    assert messages.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256"]
    auth = authenticator(binding=None)
    auth.start()
    with pytest.raises(ClientProtocolError, match="invalid SASL authentication mechanism"):
        auth.feed(initial(b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"))


@pytest.mark.parametrize("client_binding, ok", [(BINDING, True), (b"\xff" * 32, False)])
def test_plus_exchange_checks_the_binding(client_binding, ok):
    auth = authenticator()
    auth.start()
    c = ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "pw",
                    channel_binding=("tls-server-end-point", client_binding))
    code, server_first = payload(auth.feed(initial(b"SCRAM-SHA-256-PLUS", c.get_client_first().encode())))
    c.set_server_first(server_first.decode())
    final = c.get_client_final().encode()
    if not ok:
        with pytest.raises(ClientProtocolError, match="channel binding check failed") as info:
            auth.feed(final)
        assert info.value.sqlstate == "28000"
        return
    code, server_final = payload(auth.feed(final))
    c.set_server_final(server_final.decode())
    assert auth.done and auth.client_key is not None


def test_y_flag_while_plus_was_offered_is_a_downgrade():
    auth = authenticator()
    auth.start()
    with pytest.raises(ClientProtocolError, match="channel binding negotiation error") as info:
        auth.feed(initial(b"SCRAM-SHA-256", b"y,,n=,r=abcdef"))
    assert info.value.sqlstate == "08P01"
    # without TLS there was no PLUS to remove: "y" is fine
    auth = authenticator(binding=None)
    auth.start()
    code, _ = payload(auth.feed(initial(b"SCRAM-SHA-256", b"y,,n=,r=abcdef")))
    assert code == messages.AUTH_SASL_CONTINUE


@pytest.mark.parametrize("mechanism, first, match", [
    (b"SCRAM-SHA-256-PLUS", b"n,,n=,r=abc", "does not include channel binding data"),
    (b"SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", "includes channel binding data"),
    (b"SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=,r=abc", 'unsupported SCRAM channel-binding type "tls-unique"'),
    (b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,a=bob,n=,r=abc", "authorization identity"),
])
def test_plus_gs2_header_errors(mechanism, first, match):
    auth = authenticator()
    auth.start()
    with pytest.raises(ClientProtocolError) as info:
        auth.feed(initial(mechanism, first))
    assert match in f"{info.value.message} {info.value.detail}"


def test_plus_wrong_password_is_still_28p01():
    auth = authenticator()
    auth.start()
    c = ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "wrong", channel_binding=("tls-server-end-point", BINDING))
    _, server_first = payload(auth.feed(initial(b"SCRAM-SHA-256-PLUS", c.get_client_first().encode())))
    c.set_server_first(server_first.decode())
    with pytest.raises(AuthenticationFailed) as info:
        auth.feed(c.get_client_final().encode())
    assert info.value.sqlstate == "28P01"
