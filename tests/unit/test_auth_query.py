"""auth_query without a server: the messages it sends, how it reads the answer, the cache and shared lookups."""
from __future__ import annotations

import struct

import pytest

from pgmp import config
from pgmp.auth import query as aq
from pgmp.auth.authfile import make_scram_secret
from pgmp.config import ConfigError, loads
from pgmp.protocol import messages

TRUST = '[pgmp]\nauth_type = "trust"\n'


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        kind = data[pos:pos + 1]
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((kind, data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return body


# ---- the messages ----------------------------------------------------------------------

def test_extended_query_binds_the_user_name():
    user = "x' OR '1'='1"
    data = messages.extended_query(config.AUTH_QUERY, [user.encode()])
    kinds = [k for k, _ in frames(data)]
    assert kinds == [b"P", b"B", b"E", b"S"]
    parse, bind = frames(data)[0][1], frames(data)[1][1]
    assert parse == b"\0" + config.AUTH_QUERY.encode() + b"\0" + b"\0\0"      # unnamed, no types given
    assert user.encode() not in parse
    # unnamed portal and statement, no format codes (text), one parameter, text results
    assert bind == b"\0\0" + b"\0\0" + b"\0\1" + struct.pack("!i", len(user)) + user.encode() + b"\0\0"


def test_extended_query_null_parameter():
    bind = frames(messages.extended_query("select $1", [None]))[1][1]
    assert bind == b"\0\0\0\0\0\1" + struct.pack("!i", -1) + b"\0\0"


def test_parse_data_row():
    assert messages.parse_data_row(data_row(b"alice", None, b"")) == [b"alice", None, b""]
    assert messages.parse_data_row(data_row()) == []
    for bad in (b"", b"\0", data_row(b"alice")[:-1], struct.pack("!hi", 1, 5) + b"abc"):
        with pytest.raises(ValueError):
            messages.parse_data_row(bad)


def test_default_query_is_schema_qualified_and_honours_valid_until():
    q = config.AUTH_QUERY
    assert "pg_catalog.pg_authid" in q and "pg_catalog.now()" in q
    assert "rolvaliduntil" in q and "rolcanlogin" in q and "$1" in q


# ---- reading the answer ----------------------------------------------------------------

def test_interpret():
    scram = make_scram_secret("pw", b"0123456789abcdef")
    found = aq.interpret("alice", [data_row(b"alice", scram.encode())])
    assert found.secret.kind == "scram" and found.reason is None
    assert aq.interpret("alice", [data_row(b"alice", b"md5" + b"0" * 32)]).secret.kind == "md5"
    none = aq.interpret("alice", [])
    assert none.secret is None and none.reason.startswith("no such user")
    expired = aq.interpret("alice", [data_row(b"alice", None)])
    assert expired.secret is None and expired.reason.startswith("password expired")
    broken = aq.interpret("alice", [data_row(b"alice", b"SCRAM-SHA-256$4096:zz")])
    assert broken.secret is None and "unusable secret" in broken.reason and "zz" not in broken.reason
    with pytest.raises(ValueError, match="two columns"):
        aq.interpret("alice", [data_row(b"alice")])
    # the first row counts
    two = aq.interpret("alice", [data_row(b"alice", b"first"), data_row(b"alice", b"second")])
    assert two.secret.value == "first"


def test_interpret_keeps_user_names_printable_in_the_log():
    assert "\n" not in aq.interpret("evil\nname", []).reason


def test_found_repr_hides_the_secret():
    found = aq.interpret("alice", [data_row(b"alice", b"hunter2")])
    assert "hunter2" not in repr(found)


# ---- the cache and the sharing of lookups ------------------------------------------------

class FakeLoop:
    def __init__(self):
        self.now = 100.0

    def clock(self):
        return self.now


class FakeWorker:
    def __init__(self, **settings):
        self.loop = FakeLoop()
        self.config = loads(TRUST + "auth_user = \"auth\"\n"
                            + "".join(f"{k} = {v}\n" for k, v in settings.items()))


class FakeClient:
    def __init__(self):
        self.closed = False
        self.found = None
        self.error = None

    def auth_query_done(self, found):
        self.found = found

    def fail(self, error):
        self.error = error
        self.closed = True


class FakePool:
    def __init__(self, service, db):
        self.service, self.source = service, db
        self.submitted = []
        self.retired = False

    def submit(self, user, key):
        self.submitted.append(user)

    def retire(self, reason):
        self.retired = True


DB = loads(TRUST + "[databases.appdb]\n").databases["appdb"]


@pytest.fixture
def service(monkeypatch):
    monkeypatch.setattr(aq, "LookupPool", FakePool)

    def make(**settings):
        return aq.AuthQuery(FakeWorker(**settings))
    return make


def test_logins_of_one_user_share_a_lookup(service):
    svc = service()
    clients = [FakeClient() for _ in range(20)]
    assert all(svc.lookup(c, DB, "alice") is None for c in clients)
    pool = svc.pools["appdb"]
    assert pool.submitted == ["alice"]                # one lookup for all twenty
    svc.answered(("appdb", "alice"), aq.Found(aq.parse_secret("pw"), None, 0.0), cache=True)
    assert all(c.found.secret.value == "pw" for c in clients)
    # cached: the next login gets the answer at once, no lookup
    assert svc.lookup(FakeClient(), DB, "alice").secret.value == "pw"
    assert pool.submitted == ["alice"]


def test_ttl(service):
    svc = service(auth_cache_ttl=10)
    svc.lookup(FakeClient(), DB, "alice")
    svc.answered(("appdb", "alice"), aq.Found(aq.parse_secret("pw"), None, 0.0), cache=True)
    svc.worker.loop.now += 9.9
    assert svc.lookup(FakeClient(), DB, "alice") is not None
    svc.worker.loop.now += 0.2
    assert svc.lookup(FakeClient(), DB, "alice") is None            # expired: asked again
    assert svc.pools["appdb"].submitted == ["alice", "alice"]


def test_no_usable_secret_is_kept_as_long_as_a_secret(service):
    """An answer about a user that does not exist lives as long as one about a real user: a lookup
    repeated sooner for one than for the other would tell them apart by its timing."""
    svc = service(auth_cache_ttl=600)
    for user, found in (("bob", aq.Found(None, "no such user", 0.0)),
                        ("alice", aq.Found(aq.parse_secret("pw"), None, 0.0))):
        svc.lookup(FakeClient(), DB, user)
        svc.answered(("appdb", user), found, cache=True)
    svc.worker.loop.now += 599.9
    assert svc.lookup(FakeClient(), DB, "bob").secret is None
    assert svc.lookup(FakeClient(), DB, "alice").secret is not None
    svc.worker.loop.now += 0.2
    assert svc.lookup(FakeClient(), DB, "bob") is None
    assert svc.lookup(FakeClient(), DB, "alice") is None


def test_ttl_zero_caches_nothing(service):
    svc = service(auth_cache_ttl=0)
    svc.lookup(FakeClient(), DB, "alice")
    svc.answered(("appdb", "alice"), aq.Found(aq.parse_secret("pw"), None, 0.0), cache=True)
    assert svc.cache == {}
    assert svc.lookup(FakeClient(), DB, "alice") is None


def test_a_failed_lookup_fails_every_waiting_client_and_is_not_cached(service):
    svc = service()
    clients = [FakeClient() for _ in range(3)]
    for c in clients:
        svc.lookup(c, DB, "carol")
    clients[1].closed = True                        # left meanwhile: not told
    svc.failed(("appdb", "carol"), "server down")
    assert clients[0].error.sqlstate == "08006" and "could not be completed" in clients[0].error.message
    assert clients[1].error is None and clients[2].error is not None
    assert svc.cache == {} and svc.waiters == {}


def test_reset_forgets_answers_and_retires_connections(service):
    svc = service()
    svc.lookup(FakeClient(), DB, "alice")
    svc.answered(("appdb", "alice"), aq.Found(aq.parse_secret("pw"), None, 0.0), cache=True)
    pool = svc.pools["appdb"]
    svc.reset("reload")
    assert svc.cache == {} and svc.pools == {} and pool.retired


def test_the_cache_is_bounded(service, monkeypatch):
    monkeypatch.setattr(aq, "MAX_CACHED", 5)
    svc = service()
    for i in range(8):
        svc.lookup(FakeClient(), DB, f"u{i}")
        svc.answered(("appdb", f"u{i}"), aq.Found(None, "no such user", 0.0), cache=True)
    assert len(svc.cache) == 5 and ("appdb", "u7") in svc.cache and ("appdb", "u0") not in svc.cache


# ---- the settings ------------------------------------------------------------------------

def test_auth_cache_ttl_setting():
    assert loads(TRUST).auth_cache_ttl == 60.0
    assert loads(TRUST + 'auth_cache_ttl = "500ms"\n').auth_cache_ttl == 0.5
    with pytest.raises(ConfigError, match="auth_cache_ttl"):
        loads(TRUST + "auth_cache_ttl = -1\n")
    setting = next(s for s in config.SCHEMA if s.name == "auth_cache_ttl")
    assert setting.reloadable
    assert "the same for users that do not exist" in setting.doc


def test_auth_user_needs_a_query():
    with pytest.raises(ConfigError, match="auth_query"):
        loads(TRUST + 'auth_user = "auth"\nauth_query = " "\n')
