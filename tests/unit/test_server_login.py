"""pgmp as a server's client, sans-IO: what a login may contain, server_require_auth, and the size limits."""
from __future__ import annotations

import struct

import pytest

from pgmp import config, server
from pgmp.auth.authfile import make_scram_secret, parse_secret
from pgmp.auth.server import ServerAuthenticator, ServerAuthError, allowed_methods
from pgmp.errors import PgmpError
from pgmp.protocol import messages
from pgmp.relay import ASSEMBLE, WAIT
from pgmp.server import ServerConnection, ServerLogin

OK = (messages.AUTH_OK, b"")
CLEARTEXT = (messages.AUTH_CLEARTEXT, b"")
MD5 = (messages.AUTH_MD5, b"salt")
SASL = (messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
SCRAM_SECRET = parse_secret(make_scram_secret("pw", b"0123456789abcdef", 4096))


def refused(auth: ServerAuthenticator, request, sqlstate: str = "08006") -> ServerAuthError:
    with pytest.raises(ServerAuthError) as info:
        auth.feed(*request)
    assert info.value.sqlstate == sqlstate, info.value.message
    return info.value


# ---- server_require_auth -------------------------------------------------------------------

@pytest.mark.parametrize("setting, allowed", [
    ((), set()),
    (("scram-sha-256",), {"scram-sha-256"}),
    (("scram-sha-256", "none"), {"scram-sha-256", "none"}),
    (("!password",), {"md5", "scram-sha-256", "none"}),
    (("!password", "!md5"), {"scram-sha-256", "none"}),
])
def test_allowed_methods_follow_libpq(setting, allowed):
    assert allowed_methods(setting) == allowed


@pytest.mark.parametrize("credentials, allowed", [
    ({"password": "pw"}, {"password", "md5", "scram-sha-256", "none"}),
    ({"secret": parse_secret("plainpw")}, {"password", "md5", "scram-sha-256", "none"}),
    ({"secret": parse_secret("md5" + "0" * 32)}, {"password", "md5", "scram-sha-256", "none"}),
    ({}, {"password", "md5", "scram-sha-256", "none"}),
    ({"secret": SCRAM_SECRET}, {"scram-sha-256"}),
    ({"secret": SCRAM_SECRET, "scram_keys": (b"k" * 32, b"s" * 32)}, {"scram-sha-256"}),
    ({"secret": SCRAM_SECRET, "password": "pw"}, {"password", "md5", "scram-sha-256", "none"}),
])
def test_the_default_depends_on_what_pgmp_logs_in_with(credentials, allowed):
    assert ServerAuthenticator("app", **credentials).allowed == allowed


def test_scram_only_sends_nothing_for_cleartext_or_md5():
    for request, what in ((CLEARTEXT, "cleartext password"), (MD5, "md5 password")):
        auth = ServerAuthenticator("app", password="pw", database="appdb", require_auth=("scram-sha-256",))
        err = refused(auth, request)
        assert f'server asked for {what} authentication for user "app"' in err.message
        assert 'server_require_auth = ["scram-sha-256"] allows scram-sha-256' in err.message
        assert "pgmp sent nothing" in err.message
        assert "server_require_auth in [databases.appdb]" in err.hint
    auth = ServerAuthenticator("app", password="pw", require_auth=("scram-sha-256",))
    assert auth.feed(*SASL)[:1] == b"p"


def test_ok_without_a_request_needs_none():
    err = refused(ServerAuthenticator("app", password="pw", require_auth=("scram-sha-256",)), OK)
    assert "without asking for a password (trust)" in err.message and '"none"' in err.hint
    err = refused(ServerAuthenticator("app", secret=SCRAM_SECRET, scram_keys=(b"k" * 32, b"s" * 32)), OK)
    assert "server_require_auth is not set" in err.message
    assert ServerAuthenticator("app", password="pw").feed(*OK) == b""
    assert ServerAuthenticator("app", secret=SCRAM_SECRET, require_auth=("none",)).feed(*OK) == b""


def test_negation_allows_everything_else():
    auth = ServerAuthenticator("app", password="pw", require_auth=("!password",))
    refused(auth, CLEARTEXT)
    assert ServerAuthenticator("app", password="pw", require_auth=("!password",)).feed(*MD5)[:1] == b"p"
    assert ServerAuthenticator("app", password="pw", require_auth=("!password",)).feed(*OK) == b""


def test_a_missing_credential_is_said_first():
    """With only SCRAM keys nothing answers a cleartext request anyway: the error says what is missing."""
    auth = ServerAuthenticator("app", secret=SCRAM_SECRET, scram_keys=(b"k" * 32, b"s" * 32))
    err = refused(auth, CLEARTEXT, "28000")
    assert "only SCRAM keys" in err.message


def test_one_request_per_login():
    auth = ServerAuthenticator("app", password="pw")
    auth.feed(*CLEARTEXT)
    err = refused(auth, MD5)
    assert "md5 password authentication after cleartext password" in err.message


# ---- SCRAM iteration count -------------------------------------------------------------------

def server_first(auth: ServerAuthenticator, iterations: bytes) -> bytes:
    first = auth.feed(*SASL)
    bare = first[first.index(b"n,,") + 3:]
    nonce = bare.split(b"r=", 1)[1]
    return auth.feed(messages.AUTH_SASL_CONTINUE, b"r=" + nonce + b"x,s=c2FsdA==,i=" + iterations)


@pytest.mark.parametrize("iterations", [b"100001", b"10000000", b"9" * 2000])
def test_iterations_above_the_cap_are_refused(iterations):
    with pytest.raises(ServerAuthError) as info:
        server_first(ServerAuthenticator("app", password="pw"), iterations)
    assert "auth_max_iterations (100000)" in info.value.message


def test_iterations_up_to_the_cap_are_worked():
    assert server_first(ServerAuthenticator("app", password="pw", max_iterations=4096), b"4096")[:1] == b"p"
    with pytest.raises(ServerAuthError, match=r"auth_max_iterations \(4096\)"):
        server_first(ServerAuthenticator("app", password="pw", max_iterations=4096), b"4097")


def test_scram_keys_need_no_derivation_at_any_count():
    secret = parse_secret(make_scram_secret("pw", b"0123456789abcdef", 200_000))
    auth = ServerAuthenticator("app", secret=secret, scram_keys=(b"k" * 32, secret.server_key))
    first = auth.feed(*SASL)
    nonce = first[first.index(b"n,,") + 3:].split(b"r=", 1)[1]
    salt = b"MDEyMzQ1Njc4OWFiY2RlZg=="
    assert auth.feed(messages.AUTH_SASL_CONTINUE, b"r=" + nonce + b"x,s=" + salt + b",i=200000")[:1] == b"p"


# ---- the login's messages ----------------------------------------------------------------------

def login(**auth) -> ServerLogin:
    return ServerLogin("app", "appdb", ServerAuthenticator("app", password="pw", **auth))


def feed_all(lg: ServerLogin, *frames: tuple[bytes, bytes]) -> None:
    for kind, payload in frames:
        lg.feed(kind[0], payload)


def auth_ok():
    return b"R", struct.pack("!i", 0)


def expect_error(lg: ServerLogin, kind: bytes, payload: bytes, sqlstate: str, words: str) -> None:
    with pytest.raises(PgmpError) as info:
        lg.feed(kind[0], payload)
    assert info.value.sqlstate == sqlstate and words in info.value.message, info.value.message


def test_a_normal_login():
    lg = login()
    feed_all(lg, auth_ok(), (b"S", b"server_version\x0017\x00"), (b"K", struct.pack("!II", 7, 8)), (b"Z", b"I"))
    assert lg.done and lg.params == {"server_version": "17"} and (lg.backend_pid, lg.backend_secret) == (7, 8)


@pytest.mark.parametrize("kind, payload", [(b"Z", b"I"), (b"S", b"a\0b\0"), (b"K", bytes(8))])
def test_nothing_before_authentication_ok(kind, payload):
    expect_error(login(), kind, payload, "08006", "the server skipped authentication")


@pytest.mark.parametrize("frames, kind, payload, words", [
    ([], b"v", struct.pack("!ii", 0, 0), "NegotiateProtocolVersion"),
    ([], b"R", b"\0\0", "malformed authentication request"),
    ([], b"N", b"SNOTICE\0\0", "unexpected message type 'N'"),
    ([auth_ok()], b"R", struct.pack("!i", 3), "authentication request after AuthenticationOk"),
    ([auth_ok()], b"K", bytes(4), "malformed BackendKeyData"),
    ([auth_ok()], b"K", bytes(12), "malformed BackendKeyData"),
    ([auth_ok(), (b"K", bytes(8))], b"K", bytes(8), "BackendKeyData twice"),
    ([auth_ok()], b"Z", b"T", "ReadyForQuery of status b'T'"),
    ([auth_ok()], b"Z", b"", "ReadyForQuery of status b''"),
    ([auth_ok()], b"S", b"unterminated", "malformed ParameterStatus"),
    ([auth_ok()], b"S", b"x" * 257 + b"\0v\0", "name of 257 bytes"),
    ([auth_ok()], b"D", b"\0\0", "unexpected message type 'D' (DataRow)"),
])
def test_malformed_or_misplaced_login_messages(frames, kind, payload, words):
    lg = login()
    feed_all(lg, *frames)
    expect_error(lg, kind, payload, "08P01", words)


def test_parameter_status_names_are_capped_not_their_updates():
    lg = login()
    feed_all(lg, auth_ok(), *((b"S", f"p{i}\0v\0".encode()) for i in range(server.MAX_PARAMETERS)))
    feed_all(lg, *((b"S", f"p0\0{i}\0".encode()) for i in range(1000)))       # a known name, again and again
    expect_error(lg, b"S", b"one_more\0v\0", "08P01", f"more than {server.MAX_PARAMETERS} different settings")


# ---- the size of what pgmp assembles ----------------------------------------------------------

def connection(scanner) -> ServerConnection:
    srv = ServerConnection.__new__(ServerConnection)
    srv.scanner = scanner
    srv.client = None
    return srv


@pytest.mark.parametrize("scanner, kind, declared, ok", [
    (server._internal_scanner, b"R", 2000, True), (server._internal_scanner, b"R", 2001, False),
    (server._internal_scanner, b"S", 30000, True), (server._internal_scanner, b"S", 30001, False),
    (server._internal_scanner, b"E", 1 << 20, True), (server._internal_scanner, b"N", (1 << 20) + 1, False),
    (server._internal_scanner, b"D", 1 << 20, True), (server._internal_scanner, b"K", 30001, False),
    (server._pooled_scanner, b"T", 1 << 20, True), (server._pooled_scanner, b"T", (1 << 20) + 1, False),
    (server._pooled_scanner, b"t", 262_146, True), (server._pooled_scanner, b"C", 30001, False),
    (server._pooled_scanner, b"S", 30001, False), (server._normal_scanner, b"Z", 30001, False),
    (server._pooled_scanner, b"E", 30000, True), (server._normal_scanner, b"E", 30000, True),
])
def test_what_is_assembled_and_what_is_refused(scanner, kind, declared, ok):
    srv = connection(scanner)
    view = memoryview(kind + struct.pack("!I", declared) + bytes(100))
    if ok:
        assert srv.on_partial(kind[0], view, 0, len(view), declared + 1) is ASSEMBLE
    else:
        with pytest.raises(PgmpError) as info:
            srv.on_partial(kind[0], view, 0, len(view), declared + 1)
        assert info.value.sqlstate == "08P01" and f"message of {declared} bytes" in info.value.message


@pytest.mark.parametrize("scanner", [server._pooled_scanner, server._normal_scanner])
def test_a_long_error_waits_for_its_head_then_streams(scanner):
    srv = connection(scanner)
    view = memoryview(b"E" + struct.pack("!I", 50_000) + b"SERROR\0" + bytes(100))
    assert srv.on_partial(69, view, 0, len(view), 50_001) is WAIT


# ---- the setting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, problem", [
    ('["scram"]', "unknown method 'scram'"),
    ('["!md5", "md5"]', 'not both'),
    ('["gss"]', "does not log in to servers with gss"),
    ('["!password", "!md5", "!scram-sha-256", "!none"]', "refuses every method"),
    ('"md5,sha1"', "unknown method 'sha1'"),
])
def test_server_require_auth_is_validated(value, problem):
    with pytest.raises(config.ConfigError) as info:
        config.loads(f'[pgmp]\nauth_type = "trust"\n[databases.appdb]\nserver_require_auth = {value}\n')
    assert "[databases.appdb] server_require_auth" in str(info.value) and problem in str(info.value)


def test_server_require_auth_is_inherited():
    cfg = config.loads('[pgmp]\nauth_type = "trust"\nserver_require_auth = "scram-sha-256, none"\n'
                       '[databases.a]\n[databases.b]\nserver_require_auth = ["!password"]\n')
    assert cfg.server_require_auth == ("scram-sha-256", "none")
    assert cfg.databases["a"].server_require_auth == ("scram-sha-256", "none")
    assert cfg.databases["b"].server_require_auth == ("!password",)
    assert config.loads('[pgmp]\nauth_type = "trust"\n').server_require_auth == ()
