"""The C relay's quiet pairs (pgmp_quiet, crelay.Quiet): plain round trips relayed with no record,
their bookkeeping kept in C, and the first read that is not plain ends it with a record Python
must take in after what C kept. Real sockets (socketpairs) and the real C relay, no Python loop:
the Python side (ClientConnection.quiet_start/quiet_end, Link.rounds_relayed) is tested against
the plain path in tests/unit/test_link.py and through a real pgmp in
tests/integration/test_quiet.py."""
import select
import socket
import struct
import time

import pytest

from pgmp.client import POOLED_FLAGS as CLIENT_POOLED, READY_FLAGS
from pgmp.protocol import scanner
from pgmp.server import NORMAL_FLAGS, POOLED_FLAGS as SERVER_POOLED
from pgmp.stats import BUCKETS_US

try:
    from pgmp import crelay
    CScanner = scanner.load("c")
except ImportError:                                  # pragma: no cover - the C helper is part of the build
    crelay = None

pytestmark = pytest.mark.skipif(crelay is None, reason="the C helper (pgmp._scan) is not built")

QUIET_END, RELAYED = 2, 1


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def query(text: bytes) -> bytes:
    return frame(b"Q", text + b"\0")


def ready(status: bytes) -> bytes:
    return frame(b"Z", status)


ANSWER = frame(b"T", b"\0\0") + frame(b"D", b"\0\0") + frame(b"C", b"SELECT 1\0")


class Pair:
    """A client socket and a server socket armed for each other in a CRelay, with a quiet state."""

    def __init__(self, pooled: bool):
        self.buf = bytearray(4096 + crelay.REWRITE_ROOM)
        self.r = crelay.CRelay(self.buf, len(self.buf))
        self.ep = select.epoll()
        self.client_out, self.client = socket.socketpair()   # the test is the client app
        self.server, self.server_out = socket.socketpair()   # ... and PostgreSQL
        for s in (self.client, self.server):
            s.setblocking(False)
            self.ep.register(s.fileno(), select.EPOLLIN)
        cflags, sflags = (CLIENT_POOLED, SERVER_POOLED) if pooled else (READY_FLAGS, NORMAL_FLAGS)
        limits = None
        if pooled:
            from pgmp.server import ServerConnection
            limits = ServerConnection.c_limits()
        # the scanners' flags tables must outlive the arming: kept here
        self.scanners = (CScanner(cflags), CScanner(sflags))
        self.r.arm(self.client.fileno(), self.server.fileno(), self.scanners[0], 0, pooled)
        self.r.arm(self.server.fileno(), self.client.fileno(), self.scanners[1], 1, pooled, limits)
        self.q = crelay.Quiet()
        self.pooled = pooled

    def start(self, status: int = 73, t: float = 0.0):
        if self.pooled:
            self.r.hold(self.server.fileno(), True)
        self.q.start(self.pooled, status, t, t, t)
        self.r.quiet(self.client.fileno(), self.q)

    def poll(self, timeout: float = 0.0) -> list[list[int]]:
        flat = self.r.poll(self.ep.fileno(), timeout)
        return [flat[i:i + crelay.REC] for i in range(0, len(flat), crelay.REC)]

    def from_client(self, data: bytes) -> list[list[int]]:
        self.client_out.send(data)
        recs = self.wait()
        return recs

    def from_server(self, data: bytes) -> list[list[int]]:
        self.server_out.send(data)
        return self.wait()

    def wait(self) -> list[list[int]]:
        """Poll until the event was taken (a record, or quiet: no record and nothing unread)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            recs = self.poll(0.01)
            if recs:
                return recs
            if not self.ep.poll(0):
                return []
        raise AssertionError("no event within 5 s")

    def received(self, sock, n: int) -> bytes:
        sock.settimeout(5)
        out = b""
        while len(out) < n:
            out += sock.recv(n - len(out))
        return out

    def close(self):
        for s in (self.client_out, self.client, self.server, self.server_out):
            s.close()
        self.ep.close()


@pytest.fixture
def session_pair():
    p = Pair(pooled=False)
    yield p
    p.close()


@pytest.fixture
def pooled_pair():
    p = Pair(pooled=True)
    yield p
    p.close()


def test_round_trips_of_a_quiet_pair_leave_no_record_and_are_kept_in_c(session_pair):
    p = session_pair
    p.start(status=73, t=1.0)
    q, c = p.q, p.q.c
    before = time.monotonic()
    assert p.from_client(query(b"select 1")) == []
    assert p.received(p.server_out, len(query(b"select 1"))) == query(b"select 1")
    assert c.on == 1 and c.outstanding == 1 and q.kinds() == [ord("Q")]
    assert c.rx_client == len(query(b"select 1"))
    assert before <= c.t_query <= time.monotonic() and c.t_xact == c.t_query   # idle before: both clocks
    answer = ANSWER + ready(b"I")
    assert p.from_server(answer) == []
    assert p.received(p.client_out, len(answer)) == answer
    assert (c.outstanding, c.status, c.readies, c.xacts) == (0, 73, 1, 1)
    assert c.rx_server == len(answer) and c.t_ready >= c.t_query
    assert sum(c.query_hist[0:len(BUCKETS_US) + 1]) == 1 and sum(c.xact_hist[0:len(BUCKETS_US) + 1]) == 1
    # two Queries in one read, answered in two reads, inside a transaction block: one round
    two = query(b"begin") + query(b"select 2")
    assert p.from_client(two) == [] and p.received(p.server_out, len(two)) == two
    assert c.outstanding == 2 and q.kinds() == [ord("Q"), ord("Q")]     # session mode: all are 'Q'
    t_query = c.t_query
    assert p.from_server(ready(b"T")) == []
    assert (c.outstanding, c.status, c.readies) == (1, 84, 2) and q.kinds() == [ord("Q")]
    assert p.from_server(ANSWER + ready(b"T")) == []
    assert (c.outstanding, c.status, c.readies, c.xacts) == (0, 84, 3, 1)
    assert c.t_query == t_query and sum(c.query_hist[0:16]) == 2
    p.received(p.client_out, len(ready(b"T") + ANSWER + ready(b"T")))
    # a Query in the open transaction: the transaction clock stays
    t_xact = c.t_xact
    assert p.from_client(query(b"commit")) == []
    assert c.t_xact == t_xact and c.t_query > t_query
    p.received(p.server_out, len(query(b"commit")))
    assert p.from_server(ready(b"I")) == []
    assert (c.readies, c.xacts, c.status) == (4, 2, 73)
    assert c.xact_us >= int((c.t_ready - t_xact) * 1e6) - 1


def test_the_first_read_that_is_not_plain_ends_it_with_its_record(session_pair):
    p = session_pair
    p.start()
    c = p.q.c
    assert p.from_client(query(b"select 1")) == []
    p.received(p.server_out, len(query(b"select 1")))
    err = frame(b"E", b"SERROR\0C42601\0Mx\0\0")
    (rec,) = p.from_server(err + ready(b"I"))          # an ErrorResponse is Python's
    assert rec[2] == QUIET_END and c.on == 0
    assert rec[5] == 0 and bytes(p.buf[0:rec[3]]) == err + ready(b"I")
    assert c.outstanding == 1 and c.readies == 0       # what C kept is up to the record
    # ended: the next reads have records as before
    (rec,) = p.from_client(query(b"select 2"))
    assert rec[2] == RELAYED and rec[6:9] == [1, ord("Q"), 0]


@pytest.mark.parametrize("data, side", [
    (ready(b"I"), "server"),                          # more ReadyForQuery than requests
    (query(b"select 1")[:7], "client"),               # a partial frame
    (frame(b"P", b"\0select 1\0\0\0") + frame(b"B", b"\0\0\0\0\0\0\0\0"), "client"),   # no Sync yet
    (frame(b"X"), "client"),                          # Terminate
])
def test_reads_that_are_not_plain_round_trips_end_it(session_pair, data, side):
    p = session_pair
    p.start()
    recs = p.from_client(data) if side == "client" else p.from_server(data)
    (rec,) = recs
    assert rec[2] == QUIET_END and p.q.c.on == 0


def test_a_new_quiet_epoch_ends_every_quiet_pair_at_its_next_read(session_pair):
    p = session_pair
    p.start()
    p.r.quiet_end_all()
    (rec,) = p.from_client(query(b"select 1"))
    assert rec[2] == QUIET_END and rec[6:8] == [1, ord("Q")]
    assert p.q.c.outstanding == 0                      # the read itself is the record's, not C's


def test_a_pooled_quiet_pair_holds_its_server_at_each_transaction_s_end(pooled_pair):
    p = pooled_pair
    srv = p.server.fileno()
    p.start()
    q, c = p.q, p.q.c
    assert p.r.held(srv)
    assert p.from_client(query(b"select 1")) == []
    assert not p.r.held(srv) and c.assigns == 1 and c.t_used == c.t_query
    assert p.from_server(ANSWER + ready(b"I")) == []
    assert p.r.held(srv) and c.t_used == c.t_ready      # held again, as Pool.hold does
    # a transaction block: BEGIN and COMMIT cross as 'b' and 'c', the server held only after it
    assert p.from_client(query(b"BEGIN")) == [] and q.kinds() == [ord("b")] and c.assigns == 2
    assert p.from_server(ready(b"T")) == [] and not p.r.held(srv)
    assert p.from_client(query(b"update t set x = 1")) == [] and c.assigns == 2   # not a reuse
    assert p.from_server(frame(b"C", b"UPDATE 1\0") + ready(b"T")) == [] and not p.r.held(srv)
    assert p.from_client(query(b"COMMIT")) == [] and q.kinds() == [ord("c")]
    assert p.from_server(ready(b"I")) == [] and p.r.held(srv)
    assert (c.readies, c.xacts, c.assigns) == (4, 2, 2)
    # a session command is Python's: it ends it, the server's mark cleared by the read
    (rec,) = p.from_client(query(b"set search_path = x"))
    assert rec[2] == QUIET_END and rec[5] == 0 and c.on == 0 and not p.r.held(srv)
    assert c.outstanding == 0 and c.status == 73      # what C kept: between transactions


def test_a_pooled_pair_s_answer_with_a_session_tag_ends_it(pooled_pair):
    p = pooled_pair
    p.start()
    assert p.from_client(query(b"select 1")) == []
    (rec,) = p.from_server(frame(b"C", b"SET\0") + ready(b"I"))
    assert rec[2] == QUIET_END and p.q.c.on == 0 and p.q.c.outstanding == 1
    assert not p.r.held(p.server.fileno())           # C did not hold it: the answer is Python's


def test_disarming_takes_the_quiet_state_away(session_pair):
    p = session_pair
    p.start()
    p.r.disarm(p.client.fileno())
    p.r.arm(p.client.fileno(), p.server.fileno(), p.scanners[0], 0)
    (rec,) = p.from_client(query(b"select 1"))
    assert rec[2] == RELAYED and p.q.c.outstanding == 0


def test_a_poll_of_quiet_reads_only_waits_for_more_within_its_timeout(session_pair):
    """All of a batch kept quiet: the poll waits on, so the next event (here Python's: the
    server's ErrorResponse) comes out of the same call."""
    p = session_pair
    p.start()
    import threading
    assert p.from_client(query(b"select 1")) == []
    err = frame(b"E", b"SERROR\0\0") + ready(b"I")
    sender = threading.Timer(0.2, p.server_out.send, (err,))
    sender.start()
    try:
        recs = p.poll(10)
    finally:
        sender.join()
    assert [r[2] for r in recs] == [QUIET_END] and recs[0][0] == p.server.fileno()
    assert p.q.c.outstanding == 1


# ---- the quiet path against the record path --------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pgmp.link import Link, ServerSession  # noqa: E402
from pgmp.prepared import Pipeline, StatementCache  # noqa: E402
from pgmp.stats import PoolStats  # noqa: E402
from tests.unit.test_crelay import named, prepared_link  # noqa: E402

# (client bytes, the answer's frames before its ReadyForQuery, how it moves the status)
_PLAIN = (query(b"select 1"), ANSWER, None)
_BEGIN = (query(b"BEGIN"), frame(b"C", b"BEGIN\0"), b"T")
_COMMIT = (query(b"COMMIT"), frame(b"C", b"COMMIT\0"), b"I")
_DML = (query(b"update t set x = 1"), frame(b"C", b"UPDATE 1\0"), None)
_BATCH = (frame(b"P", b"\0select 2\0\0\0") + frame(b"B", b"\0\0\0\0\0\0\0\0") + frame(b"D", b"P\0")
          + frame(b"E", b"\0\0\0\0\0") + frame(b"S"),
          frame(b"1") + frame(b"2") + frame(b"T", b"\0\0") + frame(b"D", b"\0\0") + frame(b"C", b"SELECT 1\0"),
          None)
_XBEGIN = (frame(b"P", b"\0BEGIN\0\0\0") + frame(b"B", b"\0\0\0\0\0\0\0\0") + frame(b"E", b"\0\0\0\0\0")
           + frame(b"S"), frame(b"1") + frame(b"2") + frame(b"C", b"BEGIN\0"), b"T")


# prepared statements without session effects: a quiet pair may bind them (crelay.Binds.plain)
_STATEMENTS = {b"P0_1": b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", b"s2": b"select $1"}


def _named(name: bytes) -> tuple:
    t = frame(b"T", b"\0\1abalance\0" + bytes(18))
    return (named(name), frame(b"2") + t + frame(b"D", b"\0\1\0\0\0\0011") + frame(b"C", b"SELECT 1\0"), None)


_NAMED = [_named(name) for name in _STATEMENTS]


def _link(pooled: bool, prepared: bool = False) -> Link:
    if prepared:
        return prepared_link(statements=_STATEMENTS)
    link = Link(clock=time.monotonic)
    if pooled:
        link.logged_in(time.monotonic, PoolStats(), Pipeline(StatementCache()))
    else:
        link.logged_in(time.monotonic, PoolStats())
    link.attach(ServerSession(100))
    return link


def _state(link: Link):
    st_ = link.stats
    lru = None
    if link.pipeline is not None:
        lru = (list(link.server.statements.names.items()), list(link.pipeline.cache.names.items()))
    return (lru, link.outstanding, link.status, link.unsynced, link.unnamed_text,
            [(b[0], b[1] is None, tuple(b[1] or ()), b[2]) for b in link.batches],
            list(link.pipeline.expect) if link.pipeline is not None else None,
            st_.query_count, st_.xact_count, sum(st_.query_hist), sum(st_.xact_hist))


def _apply(link: Link, rec, client_fd: int, binds, relay) -> None:
    """A record, as ClientConnection/ServerConnection.relay_counted apply it."""
    count, kind, sync = rec[6], rec[7], rec[8]
    if rec[0] == client_fd:
        if binds is not None:
            binds.relayed(link, count, kind)
        elif link.pooled:
            link.queries_relayed(count, kind)
        else:
            for _ in range(count):
                link.client_frame(kind)
            if sync:
                link.unsynced = sync == 1
    elif count:
        if link.pooled:
            link.ready_relayed(count, kind)
            if binds is not None:
                binds.answered(relay, client_fd, link)
        else:
            link.server_ready(count, kind)


@st.composite
def _sessions(draw, pooled: bool, prepared: bool = False):
    """Rounds of requests sent in one write, then answered in one or two reads; the status
    moves as PostgreSQL's would."""
    kinds = [_PLAIN, _BEGIN, _COMMIT, _DML, _BATCH] + ([_XBEGIN] if pooled else [])
    if prepared:
        kinds += _NAMED * 3
    rounds = []
    status = b"I"
    for _ in range(draw(st.integers(1, 12))):
        reqs = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3))
        if len({(r[0][:1] if r[0][:1] != b"B" else r[0], r[2]) for r in reqs}) > 1:
            reqs = reqs[:1]                  # one kind per record: a mixed write would be two
        answers = []
        for _c, body, moves in reqs:
            status = moves or status
            answers.append(body + ready(status))
        split = draw(st.integers(0, len(answers)))
        rounds.append((b"".join(r[0] for r in reqs), answers[:split], answers[split:]))
    unanswered = draw(st.booleans())
    return rounds, unanswered


def _run(pooled: bool, rounds, unanswered: bool, quiet: bool, prepared: bool = False):
    p = Pair(pooled=pooled)
    link = _link(pooled, prepared)
    cfd = p.client.fileno()
    binds = None
    if prepared:                         # the client's binds table, as relay_binds makes it
        binds = crelay.Binds()
        binds.sync(p.r, cfd, link, True)
        assert binds.entries and binds.plain and binds.enabled
    try:
        if quiet:
            p.start(status=link.status, t=link.t_ready)
        for i, (sent, first, rest) in enumerate(rounds):
            last = i == len(rounds) - 1
            for rec in p.from_client(sent):
                _apply(link, rec, cfd, binds, p.r)
            # (named Binds leave rewritten: pgmp_<n> for the client's name)
            p.received(p.server_out, len(_rewritten(sent, binds)))
            if last and unanswered:
                break
            for part in (first, rest):
                data = b"".join(part)
                if data:
                    for rec in p.from_server(data):
                        _apply(link, rec, cfd, binds, p.r)
                    p.received(p.client_out, len(data))
        if quiet:
            assert p.q.c.on == 1, "a plain read ended the quiet state"
            p.q.take(link, binds)
            rx = (p.q.c.rx_client, p.q.c.rx_server)
        else:
            rx = None
        return _state(link) + ((binds.enabled, binds.c_enabled()) if binds is not None else ()), rx
    finally:
        p.close()


def _rewritten(sent: bytes, binds) -> bytes:
    if binds is None:
        return sent
    for name, sname, *_ in binds.entries:
        sent = sent.replace(b"\0" + name + b"\0", b"\0" + sname + b"\0")
    return sent


@pytest.mark.parametrize("pooled", [False, True], ids=["session", "transaction"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_quiet_pair_leaves_the_link_as_its_records_would(pooled, data):
    prepared = pooled and data.draw(st.booleans())
    rounds, unanswered = data.draw(_sessions(pooled, prepared))
    by_records, _ = _run(pooled, rounds, unanswered, False, prepared)
    quietly, rx = _run(pooled, rounds, unanswered, True, prepared)
    assert quietly == by_records
    sent = sum(len(r[0]) for r in rounds)
    answered = sum(len(b"".join(r[1] + r[2])) for r in (rounds[:-1] if unanswered else rounds))
    assert rx == (sent, answered)
