"""A hostile server (or a man in the middle) on pgmp's server link: each trick is refused, nothing secret leaks.

pgmp (one worker) points database sections at a scripted fake server
(tests/support/fakeserver.py); the fake server picks its trick by the database
name pgmp logs in to. A real client logs in through pgmp and gets the error;
the fake server records what pgmp sent (never a password it should not have
sent); a bystander session of the same worker, on the real PostgreSQL inside a
transaction, keeps working within its deadline; large messages are measured
by the worker's peak RSS while they stream.
"""
from __future__ import annotations

import base64
import struct
import threading
import time

import psutil
import pytest

from pgmp.auth.authfile import make_scram_secret, parse_secret
from pgmp.protocol.messages import (AUTH_CLEARTEXT, AUTH_MD5, AUTH_OK, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
                                    backend_key_data, error_response, frame, parameter_status,
                                    ready_for_query)
from tests.integration import rawpg
from tests.integration.rawpg import RawPG
from tests.support import PASSWORDS, sent, wait_for
from tests.support.fakeserver import (FakeServer, after_auth, auth, login_ok, one_row, sasl_begin, sasl_login,
                                      server_first)
from tests.support.proxy import PgmpFactory

MB = 1024 * 1024
USER, DB = "scram_user", "appdb"
KEYS_USER, KEYS_PASS = "keys_user", "keys_pass"      # auth_file holds a SCRAM secret: pgmp logs in with SCRAM keys
KEYS_SECRET = make_scram_secret(KEYS_PASS, b"keys-user-salt!!", 4096)
LOGINS = {USER: PASSWORDS[USER], KEYS_USER: KEYS_PASS, "md5_user": PASSWORDS["md5_user"],
          "plain_user": PASSWORDS["plain_user"]}
USERS = {**PASSWORDS, KEYS_USER: KEYS_SECRET}
CONFIG = {"server_login_retry": 0, "server_connect_timeout": 10}
MARKER = b"hostile"                                   # the client's query that the fake server answers badly

TRICKS: dict[str, tuple] = {}                         # database name on the fake server -> (script, section)


def trick(name: str, **section):
    """Register a fake-server script for the database ``name`` (its [databases] section gets ``section``)."""
    def register(script):
        TRICKS[name] = (script, section)
        return script
    return register


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake():
    with FakeServer(lambda conn: TRICKS[conn.startup["database"]][0](conn)) as server:
        yield server


@pytest.fixture(autouse=True)
def _script_errors(fake):
    yield
    errors, fake.errors[:] = list(fake.errors), []
    if errors:
        raise errors[0]


def fake_databases(fake) -> dict[str, dict]:
    return {name: {"host": "127.0.0.1", "port": fake.port, **section} for name, (_s, section) in TRICKS.items()}


@pytest.fixture(scope="module")
def proxy(pg, fake, tmp_path_factory):
    factory = PgmpFactory(tmp_path_factory.mktemp("hostile"), pg)
    databases = {DB: {}, "appdb_pooled": {"dbname": DB, "pool_mode": "transaction"}, **fake_databases(fake)}
    yield factory.start(config=CONFIG, databases=databases, users=USERS)
    factory.stop_all()


def sent_to(fake, database: str) -> list[tuple[bytes, bytes]]:
    """Every message pgmp sent on its connections to ``database`` of the fake server."""
    return [m for c in list(fake.connections) if c.startup.get("database") == database for m in c.received]


def passwords_sent(fake, database: str) -> list[bytes]:
    return [payload for kind, payload in sent_to(fake, database) if kind == b"p"]


def worker_pid(proxy) -> int:
    (child,) = wait_for(lambda: psutil.Process(proxy.pid).children(), timeout=10)
    return child.pid


class Bystander:
    """A session of the same worker on the real PostgreSQL, opened before the trick, inside a transaction."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.worker = worker_pid(proxy)
        self.conn = RawPG.connect(proxy.host, proxy.port, timeout=5)
        self.conn.login(USER, PASSWORDS[USER], DB)
        self.conn.query("begin")
        self.conn.query("create temp table bystander (x int)")

    def still_works(self) -> None:
        """Every read has a 5 s deadline: a stalled or crashed worker fails here."""
        assert self.conn.scalar("insert into bystander values (1); select count(*) from bystander") == "1"
        assert self.conn.scalar("commit; select 'bystander ok'") == "bystander ok"
        self.conn.close()
        assert worker_pid(self.proxy) == self.worker, "the pgmp worker died or was replaced"


@pytest.fixture
def bystander(proxy):
    by = Bystander(proxy)
    yield by
    by.conn.close()


def login(proxy, database: str, user: str = USER) -> RawPG:
    conn = RawPG.connect(proxy.host, proxy.port, timeout=10)
    conn.login(user, LOGINS[user], database)
    return conn


def refused(proxy, database: str, sqlstate: str, *words: str, user: str = USER) -> dict:
    """The client's login to ``database`` ends with a FATAL ``sqlstate`` whose text has ``words``; pgmp closes."""
    with RawPG.connect(proxy.host, proxy.port, timeout=15) as conn:
        try:
            conn.login(user, LOGINS[user], database)
        except rawpg.ServerError as exc:
            fields = exc.fields
        else:
            raise AssertionError(f"pgmp logged {user} in to {database} on the fake server")
        assert conn.wait_closed(5), "pgmp did not close the client after the FATAL error"
    return expect(fields, sqlstate, *words)


def expect(fields: dict, sqlstate: str, *words: str) -> dict:
    assert fields.get("S") == "FATAL" and fields.get("C") == sqlstate, fields
    text = " ".join(fields.get(k, "") for k in "MDH")
    for word in words:
        assert word in text, f"{word!r} not in {fields}"
    return fields


def query_fails(conn: RawPG, sqlstate: str, *words: str, timeout: float = 15) -> dict:
    """The client's query (containing MARKER) gets a FATAL ``sqlstate``, then pgmp closes the client."""
    conn.send(rawpg.query(f"select '{MARKER.decode()}'"))
    msgs = conn.read_until(b"E", timeout)
    fields = expect(msgs[-1].fields, sqlstate, *words)
    assert conn.wait_closed(5)
    return fields


class PeakRSS:
    """The worker's peak RSS while the block runs, sampled every few milliseconds."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.003):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


# ---- a. no authentication at all -------------------------------------------------------------------

@trick("skip_auth")
def _skip_auth(conn):
    conn.send(after_auth())                         # ParameterStatus*, BackendKeyData, ReadyForQuery
    conn.serve()


@trick("skip_auth_ready_only")
def _skip_auth_ready_only(conn):
    conn.send(ready_for_query(b"I"))
    conn.serve()


@trick("params_before_auth")
def _params_before_auth(conn):
    conn.send(parameter_status("server_version", "17.0"), login_ok())
    conn.serve()


@pytest.mark.parametrize("database", ["skip_auth", "skip_auth_ready_only", "params_before_auth"])
def test_a_login_without_authentication_ok_is_refused(proxy, fake, bystander, database):
    refused(proxy, database, "08006", "skipped authentication")
    assert passwords_sent(fake, database) == []
    proxy.wait_log(rf"server connection closed: db={database} .*skipped authentication")
    bystander.still_works()


# ---- b. SCRAM that the server never finishes or proves -------------------------------------------------

@trick("ok_after_sasl_initial")
def _ok_after_sasl_initial(conn):
    if sasl_begin(conn) is not None:
        conn.send(login_ok())
        conn.serve()


def _after_client_final(conn, *answer: bytes):
    """SCRAM up to pgmp's client-final-message (with its proof), then ``answer`` and serve."""
    bare = sasl_begin(conn)
    if bare is not None:
        conn.send(auth(AUTH_SASL_CONTINUE, server_first(bare)))
        if conn.read() is not None:
            conn.send(*answer)
            conn.serve()


@trick("ok_before_sasl_final")
def _ok_before_sasl_final(conn):
    _after_client_final(conn, login_ok())


@trick("wrong_server_signature")
def _wrong_server_signature(conn):
    _after_client_final(conn, auth(AUTH_SASL_FINAL, b"v=" + base64.b64encode(bytes(32))), login_ok())


@pytest.mark.parametrize("database, words", [
    ("ok_after_sasl_initial", ("AuthenticationOk before completing SCRAM",)),
    ("ok_before_sasl_final", ("AuthenticationOk before completing SCRAM",)),
    ("wrong_server_signature", ("SCRAM signature", "is wrong")),
])
def test_b_scram_the_server_does_not_finish_is_refused(proxy, fake, bystander, database, words):
    refused(proxy, database, "08006", *words)
    bystander.still_works()


# ---- c. which authentication the server may ask for: server_require_auth -------------------------------

def _reply_then_login(conn):
    """Whatever pgmp answered (if anything), let it in."""
    if conn.read() is not None:
        conn.send(login_ok())
        conn.serve()


@trick("cleartext")
def _cleartext(conn):
    conn.send(auth(AUTH_CLEARTEXT))
    _reply_then_login(conn)


@trick("md5")
def _md5(conn):
    conn.send(auth(AUTH_MD5, b"salt"))
    _reply_then_login(conn)


@trick("trust")
def _trust(conn):
    conn.send(login_ok())
    conn.serve()


@trick("scram")
def _scram(conn):
    """A server that knows the user's secret: keys_user's, or scram_user's made from its password."""
    secret = parse_secret(KEYS_SECRET if conn.startup["user"] == KEYS_USER
                          else make_scram_secret(PASSWORDS[USER], b"fake-server-salt", 4096))
    if sasl_login(conn, secret):
        conn.serve()


def logs_in(proxy, database: str, user: str = USER) -> None:
    with login(proxy, database, user) as conn:
        assert conn.scalar("select 1") == "fake"


def test_c_scram_keys_refuse_a_server_that_trusts_pgmp_by_default(proxy, fake, bystander):
    """pgmp holds SCRAM keys for keys_user: a server that lets it in unasked could be anyone."""
    refused(proxy, "trust", "08006", "without asking for a password", "server_require_auth", "scram-sha-256",
            user=KEYS_USER)
    bystander.still_works()


@pytest.mark.parametrize("database, what", [("cleartext", "cleartext password"), ("md5", "md5")])
def test_c_scram_keys_answer_no_other_request(proxy, fake, database, what):
    """Nothing answers these with SCRAM keys: the error says what pgmp lacks (as before server_require_auth)."""
    before = len(passwords_sent(fake, database))
    refused(proxy, database, "28000", what, "only SCRAM keys", user=KEYS_USER)
    assert len(passwords_sent(fake, database)) == before, "pgmp answered the server's request"


def test_c_scram_keys_log_in_to_a_server_that_proves_it_knows_them(proxy):
    logs_in(proxy, "scram", KEYS_USER)


@pytest.mark.parametrize("database", ["cleartext", "md5", "trust", "scram"])
def test_c_a_password_allows_every_method_by_default(proxy, database):
    """A password (here auth_file's plaintext one) answers what the server asks, as libpq without require_auth."""
    logs_in(proxy, database)


def strict_sections(fake, pg) -> dict[str, dict]:
    """Database sections with their own server_require_auth (names: <setting>_<trick>)."""
    fake_at = {"host": "127.0.0.1", "port": fake.port}
    sections = {}
    for name, setting in (("scram", ["scram-sha-256"]), ("notpw", ["!password"]), ("none", ["scram-sha-256", "none"])):
        for t in ("cleartext", "md5", "trust", "scram"):
            sections[f"{name}_{t}"] = {**fake_at, "dbname": t, "server_require_auth": setting}
    sections["real_scram"] = {"host": pg.host, "port": pg.port, "dbname": DB, "server_require_auth": ["scram-sha-256"]}
    return sections


@pytest.fixture(scope="module")
def strict_proxy(pg, fake, tmp_path_factory):
    factory = PgmpFactory(tmp_path_factory.mktemp("strict"), pg)
    yield factory.start(config=CONFIG, databases={DB: {}, **strict_sections(fake, pg)}, users=USERS)
    factory.stop_all()


@pytest.mark.parametrize("database, what", [
    ("scram_cleartext", "cleartext password"), ("scram_md5", "md5"), ("scram_trust", "without asking"),
    ("notpw_cleartext", "cleartext password")])
def test_c_server_require_auth_refuses_before_sending_anything(strict_proxy, fake, database, what):
    """scram_user has a password: the setting alone keeps it from the server."""
    trick_name = database.split("_", 1)[1]
    before = len(passwords_sent(fake, trick_name))
    fields = refused(strict_proxy, database, "08006", what, "server_require_auth")
    assert len(passwords_sent(fake, trick_name)) == before, "pgmp sent the password"
    assert f"[databases.{database}]" in fields.get("H", ""), fields


@pytest.mark.parametrize("database, user", [
    ("scram_scram", USER), ("notpw_md5", USER), ("notpw_trust", USER), ("notpw_scram", USER),
    ("none_trust", KEYS_USER), ("none_scram", KEYS_USER)])
def test_c_server_require_auth_lets_the_allowed_methods_in(strict_proxy, database, user):
    logs_in(strict_proxy, database, user)


@pytest.mark.parametrize("user, what", [("md5_user", "md5"), ("plain_user", "cleartext password")])
def test_c_server_require_auth_against_a_real_postgresql(strict_proxy, user, what):
    """The real server asks md5_user for md5 and plain_user for a cleartext password (its pg_hba.conf)."""
    refused(strict_proxy, "real_scram", "08006", what, "server_require_auth", user=user)
    with login(strict_proxy, "real_scram", USER) as conn:
        assert conn.scalar("select current_user") == USER


# ---- d. a SCRAM iteration count that would stall the worker -------------------------------------------

@trick("iterations_10m")
def _iterations_10m(conn):
    bare = sasl_begin(conn)
    if bare is not None:
        conn.send(auth(AUTH_SASL_CONTINUE, server_first(bare, iterations=10_000_000)))
        conn.wait_closed()


def test_d_iteration_count_above_the_cap_is_refused_at_once(proxy, bystander):
    started = time.monotonic()
    refused(proxy, "iterations_10m", "08006", "10000000", "100000", "auth_max_iterations")
    assert time.monotonic() - started < 2, "pgmp ran PBKDF2 with the server's iteration count"
    bystander.still_works()


# ---- e. large messages that pgmp would have to assemble -------------------------------------------------

def _login_then(conn, answer):
    conn.send(login_ok())
    if conn.serve_until(MARKER):
        answer(conn)
        conn.serve()


def streams(head: bytes, size: int, tail: bytes = b""):
    return lambda conn: conn.stream(head, size, tail)


trick("huge_parameter_status")(lambda c: _login_then(c, streams(b"Sapplication_name\0", 200 * MB)))
trick("huge_parameter_status_pooled", pool_mode="transaction")(
    lambda c: _login_then(c, streams(b"Sapplication_name\0", 200 * MB)))
trick("huge_row_description_pooled", pool_mode="transaction")(
    lambda c: _login_then(c, streams(b"T\x00\x01", 200 * MB)))
trick("huge_auth_request")(lambda c: c.stream(b"R\0\0\0\x0a", 200 * MB) and c.wait_closed())
trick("huge_notice_at_login")(lambda c: c.send(auth(AUTH_OK)) and c.stream(b"NSNOTICE\0M", 200 * MB))


@pytest.mark.parametrize("database, words", [
    ("huge_parameter_status", ("ParameterStatus", "209715200 bytes", "30000")),
    ("huge_parameter_status_pooled", ("ParameterStatus", "209715200 bytes", "30000")),
    ("huge_row_description_pooled", ("RowDescription", "209715200 bytes", "1048576")),
])
def test_e_huge_message_after_login_is_refused_with_bounded_memory(proxy, bystander, database, words):
    with login(proxy, database) as conn, PeakRSS(bystander.worker) as rss:
        query_fails(conn, "08P01", *words)
    assert rss.growth < 20 * MB, f"the worker grew by {rss.growth / MB:.0f} MB"
    proxy.wait_log(rf"server connection closed: db={database} user={USER} 127\.0\.0\.1:\d+ pid=4242 "
                   rf".*{words[0]} message of 209715200 bytes")
    bystander.still_works()


@pytest.mark.parametrize("database, words", [
    ("huge_auth_request", ("authentication request", "209715200 bytes", "2000")),
    ("huge_notice_at_login", ("NoticeResponse", "209715200 bytes", "1048576")),
])
def test_e_huge_message_during_login_is_refused_with_bounded_memory(proxy, bystander, database, words):
    with PeakRSS(bystander.worker) as rss:
        refused(proxy, database, "08P01", *words)
    assert rss.growth < 20 * MB, f"the worker grew by {rss.growth / MB:.0f} MB"
    bystander.still_works()


ERROR_HEAD = b"ESERROR\0VERROR\0C22023\0M"
FUNCTION_HEAD = b"V" + struct.pack("!i", 50 * MB - 8)
trick("long_error")(lambda c: _login_then(c, lambda c: c.stream(ERROR_HEAD, 50 * MB, b"\0\0")
                                             and c.send(ready_for_query(b"I"))))
trick("long_error_pooled", pool_mode="transaction")(
    lambda c: _login_then(c, lambda c: c.stream(ERROR_HEAD, 50 * MB, b"\0\0") and c.send(ready_for_query(b"I"))))


@trick("long_function_result_pooled", pool_mode="transaction")
def _long_function_result(conn):
    conn.send(login_ok())
    while (msg := conn.read()) is not None:
        if msg[0] == b"F":
            conn.stream(FUNCTION_HEAD, 50 * MB) and conn.send(ready_for_query(b"I"))
        elif msg[0] == b"Q":
            conn.send(one_row())


def drain_message(conn: RawPG, kind: bytes, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Read one message of type ``kind`` without keeping it: its length word, first and last 32 bytes."""
    head = conn.read_exact(5, timeout)
    assert head[:1] == kind, head
    (length,) = struct.unpack("!I", head[1:])
    left = length - 4
    first, last = b"", b""
    deadline = time.monotonic() + timeout
    while left:
        take = min(left, len(conn.buf))
        if not take:
            conn._fill(deadline)
            continue
        chunk = bytes(conn.buf[:take])
        first = first or chunk[:32]
        last = (last + chunk)[-32:]
        del conn.buf[:take]
        left -= take
    return length, first, last


@pytest.mark.parametrize("database, send, kind", [
    ("long_error", rawpg.query(f"select '{MARKER.decode()}'"), b"E"),
    ("long_error_pooled", rawpg.query(f"select '{MARKER.decode()}'"), b"E"),
    ("long_function_result_pooled", rawpg.function_call(1, [b"x"]), b"V"),
])
def test_e_long_error_and_function_result_are_relayed_not_assembled(proxy, bystander, database, send, kind):
    """Errors and function results may legitimately be long (libpq allows them): streamed to the client."""
    with login(proxy, database) as conn, PeakRSS(bystander.worker) as rss:
        conn.send(send)
        length, first, last = drain_message(conn, kind)
        assert length == 50 * MB
        head = (ERROR_HEAD if kind == b"E" else FUNCTION_HEAD)[1:]
        assert first == (head + b"x" * 32)[:32] and last.endswith(b"\0\0" if kind == b"E" else b"xx")
        assert conn.read_message().type == b"Z"
        assert conn.scalar("select 'after'") == "fake"
    assert rss.growth < 20 * MB, f"the worker grew by {rss.growth / MB:.0f} MB"
    bystander.still_works()


@trick("long_error_trickled")
def _long_error_trickled(conn):
    """The head of the long error comes in small pieces: pgmp waits for enough of it."""
    conn.send(login_ok())
    if conn.serve_until(MARKER):
        conn.send(b"E" + struct.pack("!I", 50 * MB))
        for i in range(0, 200, 20):
            conn.send((ERROR_HEAD[1:] + b"x" * 200)[i:i + 20])
            sent(conn.sock)                     # each piece leaves before the next
        conn.stream(b"E", 50 * MB, b"\0\0", skip_header=4 + 200) and conn.send(ready_for_query(b"I"))
        conn.serve()


def test_e_long_error_whose_head_comes_in_pieces(proxy, bystander):
    with login(proxy, "long_error_trickled") as conn:
        conn.send(rawpg.query(f"select '{MARKER.decode()}'"))
        length, first, last = drain_message(conn, b"E")
        assert (length, first, last[-2:]) == (50 * MB, (ERROR_HEAD[1:] + b"x" * 32)[:32], b"\0\0")
        assert conn.read_message().type == b"Z"
        assert conn.scalar("select 'after'") == "fake"
    bystander.still_works()


def _error_after_made_up_parse_complete(conn, size):
    """An extended-protocol server: a Bind fails with a long error (its Parse was answered before)."""
    conn.send(login_ok())
    failed = False
    while (msg := conn.read()) is not None:
        kind = msg[0]
        if kind == b"P":
            conn.send(frame(b"1"))
        elif kind == b"B":
            failed = True
            conn.stream(ERROR_HEAD, size, b"\0\0")
        elif kind == b"S":
            conn.send(ready_for_query(b"I"))
            failed = False
        elif kind == b"E" and not failed:
            conn.send(frame(b"C", b"SELECT 1\0"))
        elif kind == b"Q":
            conn.send(one_row())


trick("long_error_after_made_up_parse_complete", pool_mode="transaction")(
    lambda c: _error_after_made_up_parse_complete(c, 50 * MB))
trick("error_after_made_up_parse_complete", pool_mode="transaction")(
    lambda c: _error_after_made_up_parse_complete(c, 1000))


@pytest.mark.parametrize("database, size", [("long_error_after_made_up_parse_complete", 50 * MB),
                                            ("error_after_made_up_parse_complete", 1000)])
def test_e_long_error_after_a_made_up_response_keeps_the_order(proxy, fake, bystander, database, size):
    """A statement the server already has is "prepared" by pgmp alone (a ParseComplete of its own): that
    must reach the client before the ErrorResponse of the Bind that follows, even one that streams."""
    with login(proxy, database) as first:               # prepares the statement on the (only) server
        first.send(rawpg.parse("select 1", "s1") + rawpg.sync())
        assert [m.type for m in first.read_until(b"Z")] == [b"1", b"Z"]
    with login(proxy, database) as conn, PeakRSS(bystander.worker) as rss:
        conn.send(rawpg.parse("select 1", "s1") + rawpg.bind(statement="s1") + rawpg.execute() + rawpg.sync())
        assert conn.read_message().type == b"1"
        length, first_bytes, _last = drain_message(conn, b"E")
        assert (length, first_bytes) == (size, (ERROR_HEAD[1:] + b"x" * 32)[:32])
        assert conn.read_message().type == b"Z"
        assert conn.scalar("select 'after'") == "fake"
    assert rss.growth < 20 * MB, f"the worker grew by {rss.growth / MB:.0f} MB"
    assert [k for k, _ in sent_to(fake, database)].count(b"P") == 1
    bystander.still_works()


def test_e_wide_row_description_from_a_real_server_is_not_refused(proxy):
    """1664 columns (PostgreSQL's most) with 63-byte names: a RowDescription of about 136 kB, in transaction mode."""
    cols = ", ".join(f"{i} as c{i:04d}_{'x' * 57}" for i in range(1664))
    with RawPG.connect(proxy.host, proxy.port, timeout=10) as conn:
        conn.login(USER, PASSWORDS[USER], "appdb_pooled")
        msgs = conn.query(f"select {cols}")
        (desc,) = [m for m in msgs if m.type == b"T"]
        assert len(desc.payload) > 130_000 and struct.unpack_from("!h", desc.payload)[0] == 1664


# ---- f. ParameterStatus without end ---------------------------------------------------------------------

def many_params(n: int) -> bytes:
    return b"".join(parameter_status(f"guc_{i}", "v") for i in range(n))


trick("many_parameters_at_login")(
    lambda c: c.send(auth(AUTH_OK), many_params(100_000), after_auth()) and c.wait_closed())
trick("long_parameter_name")(
    lambda c: c.send(auth(AUTH_OK), parameter_status("x" * 300, "v"), after_auth()) and c.wait_closed())
trick("many_parameters_later")(lambda c: _login_then(c, lambda c: c.send(many_params(300), one_row())))


@pytest.mark.parametrize("database, words", [
    ("many_parameters_at_login", ("ParameterStatus", "256")),
    ("long_parameter_name", ("ParameterStatus", "name", "256")),
])
def test_f_parameter_status_is_bounded_at_login(proxy, bystander, database, words):
    refused(proxy, database, "08P01", *words)
    bystander.still_works()


def test_f_parameter_status_is_bounded_after_login(proxy, bystander):
    with login(proxy, "many_parameters_later") as conn:
        query_fails(conn, "08P01", "ParameterStatus", "256")
    bystander.still_works()


# ---- g. malformed or misplaced login messages -----------------------------------------------------------

def _key(payload: bytes) -> bytes:
    return frame(b"K", payload)


def _then_login(*frames: bytes):
    return lambda c: c.send(*frames) and c.serve()


PARAMS_ONLY = after_auth()[:-len(backend_key_data(4242, 77) + ready_for_query(b"I"))]
MALFORMED = {
    "short_backend_key": (_then_login(auth(AUTH_OK), PARAMS_ONLY, _key(b"\0\0\0\1"), ready_for_query(b"I")),
                          ("BackendKeyData",)),
    "long_backend_key": (_then_login(auth(AUTH_OK), PARAMS_ONLY, _key(bytes(12)), ready_for_query(b"I")),
                         ("BackendKeyData",)),
    "two_backend_keys": (_then_login(auth(AUTH_OK), PARAMS_ONLY, backend_key_data(1, 2), after_auth()),
                         ("BackendKeyData",)),
    "auth_after_ok": (_then_login(auth(AUTH_OK), auth(AUTH_CLEARTEXT), after_auth()),
                      ("authentication request", "after AuthenticationOk")),
    "negotiate_version": (_then_login(frame(b"v", struct.pack("!ii", 5, 0)), login_ok()),
                          ("NegotiateProtocolVersion",)),
    "negotiate_many_options": (_then_login(frame(b"v", struct.pack("!ii", 0, 1_000_000) + b"_pq_.x\0"), login_ok()),
                               ("NegotiateProtocolVersion",)),
    "ready_in_transaction": (_then_login(auth(AUTH_OK), after_auth()[:-6], ready_for_query(b"T")),
                             ("ReadyForQuery",)),
    "unterminated_parameter": (_then_login(auth(AUTH_OK), frame(b"S", b"server_version"), after_auth()),
                               ("ParameterStatus",)),
    "short_auth_request": (_then_login(frame(b"R", b"\0\0")), ("authentication request",)),
    "data_row_in_login": (_then_login(auth(AUTH_OK), frame(b"D", b"\0\0"), after_auth()), ("'D'",)),
    "error_then_ok": (_then_login(auth(AUTH_OK), PARAMS_ONLY, error_response("XX000", "boom", "ERROR"),
                                  after_auth()), ("boom",)),
}
for _name, (_script, _words) in MALFORMED.items():
    trick(_name)(_script)


@pytest.mark.parametrize("database", sorted(MALFORMED))
def test_g_malformed_login_messages_are_refused_cleanly(proxy, fake, bystander, database):
    sqlstate = "XX000" if database == "error_then_ok" else "08P01"
    start = len(proxy.log())
    refused(proxy, database, sqlstate, *MALFORMED[database][1])
    assert passwords_sent(fake, database) == []
    log = proxy.log()[start:]
    assert "Traceback" not in log and "internal error" not in log, log
    bystander.still_works()


def test_the_fake_server_and_pgmp_agree_on_a_normal_login(proxy, fake):
    """The fake server's ordinary login works, so each refusal above is the trick's doing."""
    logs_in(proxy, "trust")
    conns = [c for c in fake.connections if c.startup.get("database") == "trust" and c.startup["user"] == USER]
    assert conns[-1].startup == {"user": USER, "database": "trust"}
