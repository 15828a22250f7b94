"""The C relay (csrc/pgmp_relay.c, pgmp.crelay) against the Python relay it replaces.

The main property: for any stream of frames, split at any offsets, with the
destination reading slowly (backpressure), a pair relayed by C delivers the
same bytes as the Python relay and leaves the Link in the same state. The rest
checks the rules the loop relies on: both ends must be armed for each other, a
blocked destination and a pair already relayed in the batch go to Python.
"""
import fcntl
import select
import socket
import struct
import termios
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgmp.client import READY_FLAGS, ClientConnection
from pgmp.link import Link
from pgmp.loop import Endpoint, Loop
from pgmp.protocol import scanner
from pgmp.relay import FORWARD, REPLACE, relay
from pgmp.server import NORMAL_FLAGS

try:
    from pgmp import crelay
    CScanner = scanner.load("c")
except ImportError:                                  # pragma: no cover - the C helper is part of the build
    crelay = None

pytestmark = pytest.mark.skipif(crelay is None, reason="the C helper (pgmp._scan) is not built")
PyScanner = scanner.load("python")


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


class Side(Endpoint):
    """One end of a relayed pair, with the glue ClientConnection/ServerConnection have for the Link."""
    __slots__ = ("scanner", "flags", "whole", "link", "side", "peer", "replacement", "relayed_in_c", "ended")

    def __init__(self, loop, sock, flags, link, side, scanner_cls):
        super().__init__(loop, sock)
        self.scanner = scanner_cls(flags, 1 << 30)
        self.flags = flags
        self.whole = bytes(1 if i == 90 else 0 for i in range(256))    # a split ReadyForQuery is assembled
        self.link = link
        self.side = side
        self.peer = None
        self.replacement = b""
        self.relayed_in_c = 0
        self.ended = None

    def on_data(self, view, n):
        out = []
        relay(self, view, n, out)
        self.peer.send_views(out)
        if self.peer.congested:
            self.peer.hold_until_drained(self)

    def on_frame(self, kind, view, off, ln):
        if self.side == 0:
            self.link.client_frame(kind)
        elif kind == 90:
            self.link.server_ready(1, view[off + 5])
        return FORWARD

    def framing_error(self, code, view, off):
        raise AssertionError(f"framing error {code} at {off}")

    def relayed(self, n, sent, good, count, kind, sync, peer_fd):
        self.relayed_in_c += sent
        return super().relayed(n, sent, good, count, kind, sync, peer_fd)

    def relay_counted(self, count, kind, sync):
        if self.side == 0:
            for _ in range(count):
                self.link.client_frame(kind)
            if sync:
                self.link.unsynced = sync == 1
        else:
            self.link.server_ready(count, kind)

    def pair_quiet(self) -> bool:
        """Nothing held back on either side (what ClientConnection.relay_check asks first)."""
        p = self.peer
        return self.leftover is None and not self.skip and p.leftover is None and not p.skip

    def relay_check(self):
        if self.loop.crelay is None:
            return
        p = self.peer
        if self.pair_quiet():
            self.relay_arm(p, self.scanner, p.scanner, self.side)
        else:
            self.unrelay()

    def on_eof(self, reason):
        self.ended = reason
        self.close_socket()


def link_state(link: Link):
    return (link.outstanding, link.status, link.unsynced, [b[0] for b in link.batches])


def run_pair(use_c: bool, side: int, chunks: list[bytes], read_size: int, bufsize: int = 4096):
    """Feed ``chunks`` into the ``side`` end of a relayed pair; what came out the far end, and the Link."""
    link = Link(clock=time.monotonic)
    return run_sides(use_c, side, chunks, read_size, Side, (READY_FLAGS, NORMAL_FLAGS), link, link_state,
                     bufsize=bufsize, small_buffers=True)


def run_sides(use_c, side, chunks, read_size, side_cls, flags, link, state, bufsize=4096, small_buffers=False,
              recheck=False, rewrites=False):
    """The pair of ``side_cls`` ends (flags: the client's, the server's) on one Link, fed at the
    ``side`` end: (bytes out, state(link), bytes C relayed)."""
    loop = Loop(buffer_size=bufsize, relay=use_c)
    cls = CScanner if use_c else PyScanner
    a_out, a_in = socket.socketpair()          # the test writes a_out; endpoint A reads a_in
    b_in, b_out = socket.socketpair()          # endpoint B writes b_in; the test reads b_out
    for s in (a_out, b_out):
        s.setblocking(False)
    if small_buffers:
        b_in.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b_out.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a = side_cls(loop, a_in, flags[side], link, side, cls)
    b = side_cls(loop, b_in, flags[1 - side], link, 1 - side, cls)
    a.peer, b.peer = b, a
    a.relay_check()
    try:
        drained = None
        if rewrites:
            unread = lambda sock: struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
            drained = lambda: (unread(a_in) == 0 and not b.outq) or a.closed or b.closed
        got = pump(loop, a_out, b_out, chunks, read_size, a.relay_check if recheck else None, drained)
        assert a.ended is None and b.ended is None
        return got, state(link), a.relayed_in_c
    finally:
        for ep in (a, b):
            ep.close_socket()
        for s in (a_out, b_out):
            s.close()
        loop.close()


def pump(loop, a_out, b_out, chunks: list[bytes], read_size: int, after_batch=None, drained=None) -> bytes:
    """Write ``chunks`` into a_out as fast as the pair takes them, run the loop, read b_out:
    every byte that came out (``after_batch``: called after each loop round). As many bytes come
    out as went in, unless ``drained`` is given (the pair rewrites what it relays): then until
    every chunk is written and ``drained()`` holds (the pair has read them and sent all) for a
    round in which nothing more came out."""
    total = sum(len(c) for c in chunks)
    pending = list(chunks)
    got = bytearray()
    deadline = time.monotonic() + 20
    quiet = 0
    while len(got) < total if drained is None else quiet < 3:
        assert time.monotonic() < deadline, f"relayed {len(got)} of {total} bytes"
        before = len(got)
        if pending:
            try:
                k = a_out.send(pending[0])
                if k < len(pending[0]):
                    pending[0] = pending[0][k:]
                else:
                    pending.pop(0)
            except BlockingIOError:
                pass
        loop.run_once(0.002)
        if after_batch is not None:
            after_batch()
        try:
            got += b_out.recv(read_size)
        except BlockingIOError:
            pass
        if drained is not None:
            quiet = quiet + 1 if not pending and len(got) == before and drained() else 0
    return bytes(got)


CLIENT_KINDS = b"QQQPBESSDHCdF"
SERVER_KINDS = b"TDDCZZZEINn1t2"


def split(draw, data: bytes) -> tuple[bytes, list[bytes]]:
    """``data`` and the chunks it arrives in: up to 8 cuts at drawn offsets."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))))
    chunks, prev = [], 0
    for c in cuts + [len(data)]:
        if c > prev:
            chunks.append(data[prev:c])
            prev = c
    return data, chunks


@st.composite
def streams(draw, side):
    kinds = CLIENT_KINDS if side == 0 else SERVER_KINDS
    frames = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(kinds))
        if kind == ord("Z"):
            frames.append(frame(b"Z", draw(st.sampled_from([b"I", b"T", b"E"]))))
            continue
        # small types (PostgreSQL's 10000-byte cap, which both relays enforce) stay small
        big = kind not in b"CDEHSXcf" and draw(st.integers(0, 9)) == 0
        size = draw(st.integers(5000, 20000)) if big else draw(st.integers(0, 200))
        frames.append(frame(bytes([kind]), b"v" * size))
    return split(draw, b"".join(frames))


@pytest.mark.parametrize("side", [0, 1], ids=["client", "server"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_relay_agrees_with_the_python_relay(side, data):
    stream, chunks = data.draw(streams(side))
    read_size = data.draw(st.sampled_from([1 << 16, 4096, 700]))
    py_bytes, py_link, _ = run_pair(False, side, chunks, read_size)
    c_bytes, c_link, _ = run_pair(True, side, chunks, read_size)
    assert py_bytes == stream
    assert c_bytes == stream
    assert c_link == py_link


def test_plain_traffic_is_relayed_in_c_and_counted():
    """A run of requests goes through C; the Link counts each of them as the Python relay would."""
    reqs = [frame(b"Q", b"select 1\0")] * 50
    stream = b"".join(reqs)
    py_bytes, py_link, _ = run_pair(False, 0, reqs, 1 << 16)
    c_bytes, c_link, in_c = run_pair(True, 0, reqs, 1 << 16)
    assert c_bytes == py_bytes == stream
    assert c_link == py_link and c_link[0] == 50
    assert in_c > len(stream) // 2                      # most of it never reached Python's relay


@pytest.mark.parametrize("tail", [b"", b"PBE", b"PBES", b"SPB", b"F", b"FQ"])
def test_a_batch_in_one_read_leaves_the_link_as_python_does(tail):
    """Requests, then the ends of extended-protocol batches with and without their Sync, in one read."""
    bodies = {b"P": b"\0select 1\0\0\0", b"B": b"\0\0\0\0\0\0\0\0", b"E": b"\0\0\0\0\0", b"S": b"",
              b"F": b"\0\0\0\1\0\0\0\0\0\0", b"Q": b"select 1\0"}
    stream = frame(b"Q", b"select 1\0") * 3 + b"".join(frame(bytes([k]), bodies[bytes([k])]) for k in tail)
    py = run_pair(False, 0, [stream], 1 << 16)
    c = run_pair(True, 0, [stream], 1 << 16)
    assert c[0] == py[0] == stream
    assert c[1] == py[1]
    assert c[2] > 0


def test_every_split_offset_of_a_mixed_batch():
    stream = (frame(b"P", b"\0select $1\0\0\0") + frame(b"B", b"\0\0\0\0\0\0\0\0") + frame(b"E", b"\0\0\0\0\0")
              + frame(b"S") + frame(b"Q", b"select 2\0") + frame(b"D", b"P\0") + frame(b"H"))
    for cut in range(1, len(stream)):
        chunks = [stream[:cut], stream[cut:]]
        py = run_pair(False, 0, chunks, 1 << 16)
        c = run_pair(True, 0, chunks, 1 << 16)
        assert c[0] == py[0] == stream, cut
        assert c[1] == py[1], cut


def test_a_large_stream_under_backpressure():
    rows = [frame(b"D", bytes([i % 251]) * 3000) for i in range(400)] + [frame(b"C", b"SELECT 400\0"),
                                                                         frame(b"Z", b"I")]
    stream = b"".join(rows)
    chunks = [stream[i:i + 10000] for i in range(0, len(stream), 10000)]
    py = run_pair(False, 1, chunks, 1500)
    c = run_pair(True, 1, chunks, 1500)
    assert c[0] == py[0] == stream
    assert c[1] == py[1] and c[1][1] == ord("I")


# -- the table and the poll rules ------------------------------------------------------------------

def relay_setup():
    buf = bytearray(4096 + crelay.REWRITE_ROOM)
    r = crelay.CRelay(buf, 4096 + crelay.REWRITE_ROOM)
    ep = select.epoll()
    a_out, a_in = socket.socketpair()
    b_in, b_out = socket.socketpair()
    for s in (a_in, b_in):
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
    return buf, r, ep, (a_out, a_in, b_in, b_out)


def records(flat):
    return [flat[i:i + crelay.REC] for i in range(0, len(flat), crelay.REC)]


def test_only_a_pair_armed_both_ways_is_relayed():
    buf, r, ep, (a_out, a_in, b_in, b_out) = relay_setup()
    sc_client, sc_server = CScanner(READY_FLAGS), CScanner(NORMAL_FLAGS)
    q = frame(b"Q", b"select 1\0")
    r.arm(a_in.fileno(), b_in.fileno(), sc_client, 0)      # one way only
    a_out.send(q)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 0 and a_in.recv(100) == q             # left to Python, unread
    r.arm(b_in.fileno(), a_in.fileno(), sc_server, 1)
    a_out.send(q)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 1 and rec[3:9] == [len(q), len(q), len(q), 1, ord("Q"), 0] and rec[9] == b_in.fileno()
    assert b_out.recv(100) == q
    r.blocked(b_in.fileno(), True)                          # Python has bytes queued for b: C keeps out
    a_out.send(q)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 0 and a_in.recv(100) == q
    r.blocked(b_in.fileno(), False)
    r.disarm(b_in.fileno())
    assert not r.armed(b_in.fileno()) and r.armed(a_in.fileno())
    a_out.send(q)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 0
    for s in (a_out, a_in, b_in, b_out):
        s.close()
    ep.close()


def test_a_pair_is_relayed_once_per_batch_and_stops_at_a_frame_python_must_see():
    buf, r, ep, (a_out, a_in, b_in, b_out) = relay_setup()
    sc_client, sc_server = CScanner(READY_FLAGS), CScanner(NORMAL_FLAGS)
    r.arm(a_in.fileno(), b_in.fileno(), sc_client, 0)
    r.arm(b_in.fileno(), a_in.fileno(), sc_server, 1)
    q = frame(b"Q", b"select 1\0")
    z = frame(b"Z", b"I")
    a_out.send(q)
    b_out.send(z)                                           # both ends readable in one batch
    recs = records(r.poll(ep.fileno(), 1))
    assert sorted(rec[2] for rec in recs) == [0, 1]         # the second is Python's, unread
    first = next(rec for rec in recs if rec[2] == 1)
    other = a_in if first[0] == b_in.fileno() else b_in
    assert other.recv(100) in (q, z)
    err = frame(b"E", b"SERROR\0\0")
    b_out.send(z + err + z)                                 # an ErrorResponse is for Python
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 1 and rec[4] == rec[5] == len(z) and rec[3] == len(z + err + z)
    assert rec[6:9] == [1, ord("I"), 0]
    assert bytes(buf[rec[5]:rec[3]]) == err + z             # left in the buffer for on_data
    assert a_out.recv(100) == z
    for s in (a_out, a_in, b_in, b_out):
        s.close()
    ep.close()


@pytest.mark.parametrize("stream, expect", [
    (frame(b"Q", b"a\0") + frame(b"S"), (len(frame(b"Q", b"a\0")), 1, ord("Q"), 0)),   # one kind per record
    (frame(b"P", b"\0x\0\0\0") + frame(b"S") + frame(b"B", b"\0\0\0\0\0\0\0\0"),
     (None, 1, ord("S"), 1)),                                                          # Bind after the Sync
    (frame(b"X"), (0, 0, -1, 0)),                                                       # Terminate: Python's
    (frame(b"Q", b"a\0")[:6], (0, 0, -1, 0)),                                           # partial
    (b"Q\0\0\0\x02", (0, 0, -1, 0)),                                                    # bad length
])
def test_walk(stream, expect):
    good, count, kind, sync = crelay.walk(stream, READY_FLAGS, 1 << 30, 0)
    want_good = len(stream) if expect[0] is None else expect[0]
    assert (good, count, kind, sync) == (want_good, *expect[1:])


def test_walk_server_side_counts_only_well_formed_ready_for_query():
    z = frame(b"Z", b"T")
    assert crelay.walk(z + z + frame(b"D", b"x"), NORMAL_FLAGS, 1 << 30, 1) == (2 * len(z) + 6, 2, ord("T"), 0)
    bad = frame(b"Z", b"TT")
    assert crelay.walk(z + bad, NORMAL_FLAGS, 1 << 30, 1) == (len(z), 1, ord("T"), 0)


class Reader(Endpoint):
    """A socket Python reads itself (not armed): what it got."""
    __slots__ = ("got",)

    def __init__(self, loop, sock):
        super().__init__(loop, sock)
        self.got = bytearray()

    def on_data(self, view, n):
        self.got += view[:n]

    def on_eof(self, reason):
        self.close_socket()


def test_bytes_left_for_python_survive_the_batch_s_earlier_python_reads():
    """One batch: first an event Python handles (it reads into the loop's scratch buffer), then a
    relayed record that leaves a frame for Python: that frame must reach the peer as it was sent."""
    loop = Loop(buffer_size=4096, relay=True)
    a_out, a_in = socket.socketpair()
    b_in, b_out = socket.socketpair()
    o_out, o_in = socket.socketpair()
    for s in (a_out, b_out, o_out):
        s.setblocking(False)
    link = Link(clock=time.monotonic)
    a = Side(loop, a_in, READY_FLAGS, link, 0, CScanner)
    b = Side(loop, b_in, NORMAL_FLAGS, link, 1, CScanner)
    a.peer, b.peer = b, a
    other = Reader(loop, o_in)
    a.relay_check()
    try:
        other_bytes = b"x" * 64
        stream = frame(b"Q", b"select 1\0") + frame(b"c")        # CopyDone: Python must see it
        o_out.send(other_bytes)
        a_out.send(stream)
        got = bytearray()
        deadline = time.monotonic() + 5
        while (len(got) < len(stream) or len(other.got) < len(other_bytes)) and time.monotonic() < deadline:
            loop.run_once(0.01)
            try:
                got += b_out.recv(4096)
            except BlockingIOError:
                pass
        assert bytes(got) == stream and bytes(other.got) == other_bytes
        assert a.relayed_in_c > 0 and link_state(link)[0] == 1
    finally:
        for ep in (a, b, other):
            ep.close_socket()
        for s in (a_out, b_out, o_out):
            s.close()
        loop.close()


# -- transaction mode: the C prefilter and the pooled walk ------------------------------------

_WORDS = [b"set", b"reset", b"discard", b"listen", b"unlisten", b"prepare", b"declare", b"create", b"begin",
          b"start", b"commit", b"end", b"rollback", b"abort", b"savepoint", b"release", b"load", b"temp",
          b"temporary", b"do", b"call", b"advisory_lock", b"set_config",
          # near misses: longer runs of word characters, or a word inside one
          b"settle", b"_set", b"set1", b"reset_x", b"dox", b"ends", b"xadvisory_lockx", b"pg_set_configs",
          b"select", b"from", b"pgbench_accounts", b"aid", b"1", b"\xc3\xa9", b"t\xc3\xa9mp"]
_SEPARATORS = [b" ", b"\n", b"(", b")", b",", b";", b"'", b'"', b"$1", b".", b"\xff", b"\t", b"-", b"="]


@st.composite
def sql_texts(draw):
    parts = draw(st.lists(st.one_of(st.sampled_from(_WORDS), st.sampled_from(_SEPARATORS),
                                    st.binary(max_size=4)), max_size=12))
    text = b"".join(parts)
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return bytes(c ^ 32 if flip and 97 <= (c | 32) <= 122 else c for c, flip in zip(text, flips))


@settings(max_examples=400, deadline=None)
@given(text=sql_texts())
def test_c_prefilter_agrees_with_sql_trigger(text):
    from pgmp.protocol.sql import _TRIGGER
    assert crelay.sql_trigger(text) == bool(_TRIGGER.search(text.lower())), text


def _pooled_flags():
    from pgmp.client import POOLED_FLAGS as client_flags
    from pgmp.server import POOLED_FLAGS as server_flags
    return client_flags, server_flags


@pytest.mark.parametrize("body, passes", [
    (b"select 1\0", True),
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 7;\0", True),
    (b"set search_path = x\0", False),          # a session command: Python reads it
    (b"select 1; COMMIT\0", False),
    (b"select pg_advisory_lock(1)\0", False),
    (b"select 1\0junk\0", False),               # not one string: Python's check refuses it
    (b"select 1", False),                       # no NUL
    (b"", False),
])
def test_pooled_walk_passes_only_plain_queries(body, passes):
    client_flags, _ = _pooled_flags()
    q = frame(b"Q", body)
    got = crelay.walk(q + q, client_flags, 1 << 30, 0, pooled=True)
    assert got == ((2 * len(q), 2, ord("Q"), 0) if passes else (0, 0, -1, 0))
    # session mode's walk counts any Query: the pooled rules are the slot's, not the table's
    if body.endswith(b"\0") and b"\0" not in body[:-1]:
        assert crelay.walk(q, READY_FLAGS, 1 << 30, 0)[1] == 1


def test_pooled_walk_leaves_extended_protocol_to_python():
    client_flags, _ = _pooled_flags()
    q = frame(b"Q", b"select 1\0")
    for other in (frame(b"P", b"\0select 1\0\0\0"), frame(b"S"), frame(b"B", b"\0\0\0\0\0\0\0\0"), frame(b"X")):
        assert crelay.walk(q + other, client_flags, 1 << 30, 0, pooled=True) == (len(q), 1, ord("Q"), 0)


def test_pooled_walk_server_side():
    from pgmp.server import RELAY_LIMITS
    _, server_flags = _pooled_flags()
    limits = crelay.Limits(RELAY_LIMITS)
    t = frame(b"T", b"\0\1abalance\0" + bytes(18))
    d = frame(b"D", b"\0\1\0\0\0\0011")
    c = frame(b"C", b"SELECT 1\0")
    z = frame(b"Z", b"I")

    def walk(data, lim=limits):
        return crelay.walk(data, server_flags, 1 << 30, 1, True, lim)

    answer = t + d + c + z
    assert walk(answer) == (len(answer), 1, ord("I"), 0)
    assert walk(answer * 3) == (3 * len(answer), 3, ord("I"), 0)
    # an unnamed batch's answer: ParseComplete, BindComplete, RowDescription/NoData, ..., ReadyForQuery
    ext = frame(b"1") + frame(b"2") + t + d + c + frame(b"Z", b"T")
    assert walk(ext + answer) == (len(ext + answer), 2, ord("I"), 0)
    described = frame(b"1") + frame(b"t", b"\0\1\0\0\0\x17") + frame(b"n") + frame(b"Z", b"I")
    assert walk(described) == (len(described), 1, ord("I"), 0)
    suspended = frame(b"2") + d + frame(b"s") + frame(b"Z", b"T")
    assert walk(suspended) == (len(suspended), 1, ord("T"), 0)
    for tag in (b"SET\0", b"RESET\0", b"DISCARD ALL\0", b"DEALLOCATE ALL\0", b"LISTEN\0", b"PREPARE\0", b"LOAD\0"):
        # a session command's answer is Python's from its first reported frame: only a leading
        # DataRow passes (Python's Pipeline pops what a reported frame answers when it sees it)
        assert walk(t + d + frame(b"C", tag) + z)[0] == 0
        assert walk(answer + d + frame(b"C", tag) + z)[:2] == (len(answer + d), 1)
    for other in (frame(b"E", b"SERROR\0\0"), frame(b"S", b"a\0b\0"), frame(b"G", b"\0\0\0"),
                  frame(b"3"), frame(b"Z", b"II")):
        assert walk(d + c + other + z) == (len(d), 0, -1, 0)
        assert walk(answer + c + other + z) == (len(answer), 1, ord("I"), 0)
    # an answer not whole in the read: its leading unreported frames only
    assert walk(answer + d + d + t + d) == (len(answer + d + d), 1, ord("I"), 0)
    assert walk(answer + frame(b"1") + frame(b"2")) == (len(answer), 1, ord("I"), 0)
    assert walk(answer + d + z[:3])[0] == len(answer + d)
    long_c = frame(b"C", b"x" * (RELAY_LIMITS[ord("C")] - 4) + b"\0")     # one byte over its type's limit
    assert walk(long_c + z)[0] == 0
    assert walk(long_c + z, None)[1] == 1


# -- transaction mode: the C relay against the Python relay, with the pooled Link and Pipeline ----

class PooledSide(Side):
    """A pooled end: frames go to the Link as ClientConnection/ServerConnection give them in
    transaction mode; the C relay is armed with the pooled rules while Link.c_relay_ok()."""
    __slots__ = ("limits_ref", "binds")

    def __init__(self, loop, sock, flags, link, side, scanner_cls):
        super().__init__(loop, sock, flags, link, side, scanner_cls)
        self.limits_ref = None                         # keeps the C limits table alive while armed
        self.whole = bytes([1]) * 256                  # every reported frame is seen whole
        self.binds = None                              # the client's crelay.Binds
        if loop.crelay is not None:                    # as pgmp.worker does
            link.pipeline.cache.on_evict = loop.crelay.retire

    def on_frame(self, kind, view, off, ln):
        if self.side == 0:
            r = self.link.client_frame(kind, bytes(view[off + 5:off + ln]))
        else:
            r = self.link.server_frame(kind, view[off:off + ln])
        if r is None:
            return FORWARD
        self.replacement = r
        return REPLACE

    def relay_counted(self, count, kind, sync):
        link = self.link
        if self.side == 0:                             # as ClientConnection and ServerConnection do
            if self.binds is None:
                link.queries_relayed(count, kind)
            else:
                self.binds.relayed(link, count, kind)
            return
        link.ready_relayed(count, kind)
        client = self.peer
        if client.binds is not None and client.relay_peer is self:
            client.binds.answered(self.loop.crelay, client.fd, link)

    def relay_check(self):
        from pgmp.server import RELAY_LIMITS
        if self.loop.crelay is None:
            return
        p = self.peer
        if self.pair_quiet() and self.link.c_relay_ok():
            limits = crelay.Limits(RELAY_LIMITS)
            self.limits_ref = p.limits_ref = limits
            client, server = (self, p) if self.side == 0 else (p, self)
            armed = client.relay_peer is not server
            client.relay_arm(server, client.scanner, server.scanner, 0, True, None, limits)
            if client.relay_peer is server and (client.binds is not None or self.link.pipeline.bound):
                ClientConnection.relay_binds(client, armed)      # (a PooledSide has what it uses)
        else:
            self.unrelay()


def pooled_link(outstanding: int) -> Link:
    from pgmp.link import ServerSession
    from pgmp.prepared import Pipeline, StatementCache
    from pgmp.stats import PoolStats
    link = Link(clock=time.monotonic)
    link.logged_in(time.monotonic, PoolStats(), Pipeline(StatementCache()))
    link.attach(ServerSession(100))
    for _ in range(outstanding):
        link.client_frame(ord("Q"), b"select 1\0")
    return link


def pooled_state(link: Link):
    return (link_state(link), [tuple(b[:1]) + (b[1] is None, tuple(b[1] or ()), b[2]) for b in link.batches],
            list(link.pipeline.expect), link.pinned, link.stats.query_count, link.stats.xact_count)


_QUERIES = [b"select 1\0", b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;\0", b"set x = 1\0",
            b"begin\0", b"commit\0", b"\0", b"select pg_advisory_lock(1)\0", b"END;\0", b"rollback work\0",
            b" START TRANSACTION ;\0", b"begin isolation level serializable\0", b"BEGIN;;\0", b"abort\0",
            b"UPDATE t SET x = x + 1 WHERE y = 2;\0", b"update t set x = 1; set y = 2\0", b"insert into temp values (1)\0"]
# (a Query that is not one string ends the session in Python: test_pooled_walk_passes_only_plain_queries)
_TAGS = [b"SELECT 1\0", b"SET\0", b"BEGIN\0", b"COMMIT\0", b"DISCARD ALL\0", b"UPDATE 1\0"]


@st.composite
def pooled_streams(draw, side):
    frames = []
    for _ in range(draw(st.integers(1, 20))):
        if side == 0:
            frames.append(frame(b"Q", draw(st.sampled_from(_QUERIES))))
            continue
        kind = draw(st.sampled_from(b"TDDCCINZZ"))
        if kind == ord("Z"):
            frames.append(frame(b"Z", draw(st.sampled_from([b"I", b"T", b"E"]))))
        elif kind == ord("C"):
            frames.append(frame(b"C", draw(st.sampled_from(_TAGS))))
        else:
            frames.append(frame(bytes([kind]), b"v" * draw(st.integers(0, 300))))
    return split(draw, b"".join(frames))


def run_pooled_pair(use_c: bool, side: int, chunks: list[bytes], read_size: int, outstanding: int):
    from pgmp.client import POOLED_FLAGS as client_flags
    from pgmp.server import POOLED_FLAGS as server_flags
    return run_sides(use_c, side, chunks, read_size, PooledSide, (client_flags, server_flags),
                     pooled_link(outstanding), pooled_state, recheck=True)


@pytest.mark.parametrize("side", [0, 1], ids=["client", "server"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_relay_agrees_with_the_python_relay_in_transaction_mode(side, data):
    stream, chunks = data.draw(pooled_streams(side))
    read_size = data.draw(st.sampled_from([1 << 16, 700]))
    outstanding = 0 if side == 0 else 30                    # the server answers Queries in flight
    py_bytes, py_state, _ = run_pooled_pair(False, side, chunks, read_size, outstanding)
    c_bytes, c_state, _ = run_pooled_pair(True, side, chunks, read_size, outstanding)
    assert py_bytes == stream and c_bytes == stream
    assert c_state == py_state


def test_plain_queries_and_their_answers_are_relayed_in_c_in_transaction_mode():
    q = frame(b"Q", b"select 1\0")
    _, state, in_c = run_pooled_pair(True, 0, [q * 5], 1 << 16, 0)
    assert in_c == 5 * len(q) and state[0][0] == 5
    answer = frame(b"T", b"\0\0") + frame(b"D", b"\0\0") + frame(b"C", b"SELECT 1\0") + frame(b"Z", b"I")
    _, state, in_c = run_pooled_pair(True, 1, [answer * 3], 1 << 16, 3)
    assert in_c == 3 * len(answer) and state[0][0] == 0 and state[2] == []


# -- transaction mode: unnamed extended batches --------------------------------------------------

def parse(text: bytes = b"select 1", types: int = 0, name: bytes = b"") -> bytes:
    return frame(b"P", name + b"\0" + text + b"\0" + struct.pack("!H", types) + b"\0\0\0\x17" * types)


def bind(params=(b"42",), formats=(), result_formats=(), portal=b"", name=b"") -> bytes:
    body = portal + b"\0" + name + b"\0" + struct.pack("!H", len(formats))
    body += b"".join(struct.pack("!h", f) for f in formats) + struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return frame(b"B", body + struct.pack("!H", len(result_formats))
                 + b"".join(struct.pack("!h", f) for f in result_formats))


def describe(what: bytes = b"P", name: bytes = b"") -> bytes:
    return frame(b"D", what + name + b"\0")


def execute(portal: bytes = b"", rows: int = 0) -> bytes:
    return frame(b"E", portal + b"\0" + struct.pack("!I", rows))


SYNC, FLUSH = frame(b"S"), frame(b"H")
_PGBENCH = parse(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", 1) + bind() + describe() + execute() + SYNC


@pytest.mark.parametrize("batch, shape", [
    (_PGBENCH, 1 | 2 | 4 | 16),
    (parse() + bind(()) + execute() + SYNC, 1 | 2 | 16),
    (parse() + describe(b"S") + SYNC, 1 | 8),
    (parse() + SYNC, 1),
    (parse() + bind(()) + SYNC, 1 | 2),
    (parse() + describe(b"S") + bind(()) + describe() + execute(rows=10) + SYNC, 1 | 2 | 4 | 8 | 16),
    (parse(b"UPDATE t SET x = $1 WHERE y = 2", 1) + bind() + execute() + SYNC, 1 | 2 | 16),
    (parse(b"begin") + bind(()) + execute() + SYNC, 1 | 2 | 16 | 64),            # a transaction command
    (parse(b"END;") + bind(()) + execute() + SYNC, 1 | 2 | 16 | 128),
    (parse(b"rollback") + bind(()) + SYNC, 1 | 2 | 192),
    (parse(b" Start Transaction") + SYNC, 1 | 64),
    (parse() + FLUSH + bind((None, b"", b"x" * 300), formats=(1,)) + FLUSH + execute() + SYNC, 1 | 2 | 16),
    (parse() + bind((b"1", b"2"), formats=(0, 1), result_formats=(1, 0, 7)) + execute() + SYNC, 1 | 2 | 16),
])
def test_pooled_walk_passes_whole_unnamed_batches(batch, shape):
    client_flags, _ = _pooled_flags()
    kind = 256 + shape
    assert crelay.walk(batch, client_flags, 1 << 30, 0, pooled=True) == (len(batch), 1, kind, 0)
    assert crelay.walk(batch * 3, client_flags, 1 << 30, 0, pooled=True) == (3 * len(batch), 3, kind, 0)
    q = frame(b"Q", b"select 1\0")
    # one kind of request per record; a batch not whole in the read is Python's from its start
    assert crelay.walk(batch + q, client_flags, 1 << 30, 0, pooled=True) == (len(batch), 1, kind, 0)
    assert crelay.walk(q + batch, client_flags, 1 << 30, 0, pooled=True) == (len(q), 1, ord("Q"), 0)
    for cut in range(1, len(batch)):
        assert crelay.walk(batch + batch[:cut], client_flags, 1 << 30, 0, pooled=True) == (len(batch), 1, kind, 0)


@pytest.mark.parametrize("batch", [
    parse(name=b"s1") + bind(name=b"s1") + execute() + SYNC,              # named statements: Python renames
    parse() + bind(name=b"s1") + execute() + SYNC,
    parse() + bind(portal=b"c1") + execute(b"c1") + SYNC,                 # a named portal
    parse(b"set search_path = x") + bind(()) + execute() + SYNC,          # a session command
    parse(b"select pg_advisory_lock(1)") + bind(()) + execute() + SYNC,
    parse() + bind(()) + execute(),                                       # no Sync in the read
    bind(()) + execute() + SYNC,                                          # the statement of an earlier batch
    parse() + execute() + SYNC,                                           # Execute without its Bind
    parse() + bind(()) + describe(b"S") + execute() + SYNC,               # out of order
    parse() + bind(()) + execute() + execute() + SYNC,                    # twice
    parse() + parse() + SYNC,
    parse() + describe(b"P") + SYNC,
    parse() + describe(b"S", b"s1") + SYNC,
    parse() + frame(b"C", b"S\0") + SYNC,                                # a Close
    parse() + frame(b"Q", b"select 1\0") + SYNC,
    parse() + frame(b"F", b"\0\0\0\1\0\0\0\0\0\0") + SYNC,
    parse() + frame(b"X"),
    parse() + frame(b"S", b"x"),                                          # malformed, as frontend.check_message finds them
    frame(b"P", b"\0select 1\0\0\1") + SYNC,
    frame(b"P", b"\0select 1\0\0\0x") + SYNC,
    frame(b"P", b"\0select 1") + SYNC,
    parse() + frame(b"B", b"\0\0\0\2\0\0\0\0\0\1\0\0\0\0\0\0") + SYNC,          # 2 formats, 1 parameter
    parse() + frame(b"B", b"\0\0\0\0\0\1\xff\xff\xff\xfe\0\0") + SYNC,               # a length below -1
    parse() + frame(b"B", b"\0\0\0\0\0\1\0\0\0\5ab\0\0") + SYNC,                     # runs past the end
    parse() + bind() + frame(b"E", b"\0\0\0\0\0x") + SYNC,
    parse() + bind((b"1",), formats=(2,)) + execute() + SYNC,             # a format code the server refuses
    parse() + frame(b"D", b"P") + SYNC,
    parse() + frame(b"D", b"X\0") + SYNC,
])
def test_pooled_walk_leaves_other_batches_to_python(batch):
    client_flags, _ = _pooled_flags()
    assert crelay.walk(batch, client_flags, 1 << 30, 0, pooled=True) == (0, 0, -1, 0)
    q = frame(b"Q", b"select 1\0")
    assert crelay.walk(q + batch, client_flags, 1 << 30, 0, pooled=True) == (len(q), 1, ord("Q"), 0)


def extended_link(frames: bytes) -> Link:
    """A pooled Link that has seen the client's ``frames`` (whole) through the Python path."""
    link = pooled_link(0)
    pos = 0
    while pos < len(frames):
        end = pos + 1 + struct.unpack_from("!I", frames, pos + 1)[0]
        link.client_frame(frames[pos], frames[pos + 5:end])
        pos = end
    return link


def run_extended_server(use_c: bool, client_frames: bytes, chunks: list[bytes], read_size: int):
    return run_sides(use_c, 1, chunks, read_size, PooledSide, _pooled_flags(), extended_link(client_frames),
                     pooled_state, recheck=True)


def test_a_batch_passed_in_c_leaves_the_link_as_python_does():
    """pgbench -M extended's transaction, whole, then its answer: both in C, the Link and the
    Pipeline as the Python relay leaves them."""
    py_state, c_state = [run_pooled_pair(use_c, 0, [_PGBENCH * 4], 1 << 16, 0) for use_c in (False, True)]
    assert py_state[2] == 0 and c_state[2] == 4 * len(_PGBENCH)
    assert c_state[1] == py_state[1] and c_state[1][0][0] == 4 and len(c_state[1][2]) == 20
    t = frame(b"T", b"\0\1abalance\0" + bytes(18))
    answer = frame(b"1") + frame(b"2") + t + frame(b"D", b"\0\1\0\0\0\0011") + frame(b"C", b"SELECT 1\0") \
        + frame(b"Z", b"I")
    py_state, c_state = [run_extended_server(use_c, _PGBENCH * 3, [answer * 3], 1 << 16) for use_c in (False, True)]
    assert py_state[2] == 0 and c_state[2] == 3 * len(answer)
    assert c_state[1] == py_state[1] and c_state[1][0][0] == 0 and c_state[1][2] == []


_BATCH_TEXTS = [b"select 1", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", b"set x = 1", b"begin",
                b"UPDATE t SET x = $1 WHERE y = 2", b"select pg_advisory_lock(1)", b"", b"discard all"]
# The messages of a batch, in order: P (Parse), s (Describe statement), B, p (Describe portal), E.
_SHAPES = ["P", "PB", "PBE", "PBpE", "PsBpE", "Ps", "PsB", "BE", "BpE", "E", ""]


def with_sync(draw, out: list[bytes], shape: str) -> tuple[bytes, str]:
    """A batch's unit: its Sync after it, mostly (then "S" ends the shape), or not yet."""
    if draw(st.integers(0, 11)) != 0:
        return b"".join(out) + SYNC, shape + "S"
    return b"".join(out), shape


@st.composite
def extended_units(draw, max_units=12):
    """A client's requests: simple Queries and extended batches (some C passes, some not, a few
    with their Sync in a later unit), as (frames, what the server answers: "Q" or the shape)."""
    units = []
    for _ in range(draw(st.integers(1, max_units))):
        if draw(st.integers(0, 3)) == 0:
            units.append((frame(b"Q", draw(st.sampled_from(_QUERIES))), "Q"))
            continue
        shape = draw(st.sampled_from(_SHAPES))
        text = draw(st.sampled_from(_BATCH_TEXTS))
        out = []
        for m in shape:
            if m == "P":
                out.append(parse(text, draw(st.integers(0, 2))))
            elif m == "s":
                out.append(describe(b"S"))
            elif m == "B":
                params = draw(st.lists(st.sampled_from([b"1", b"", None, b"x" * 200]), max_size=3))
                out.append(bind(params, formats=draw(st.sampled_from([(), (0,), (1,)]))))
            elif m == "p":
                out.append(describe(b"P"))
            else:
                out.append(execute(rows=draw(st.sampled_from([0, 0, 5]))))
            if draw(st.integers(0, 9)) == 0:
                out.append(FLUSH)
        units.append(with_sync(draw, out, shape))
    return units


@st.composite
def extended_answers(draw, units):
    """What PostgreSQL answers to ``units``: each message in turn, an ErrorResponse at times (then
    nothing more up to the Sync), ReadyForQuery at each Query and Sync."""
    out = []
    rows = lambda: [frame(b"D", b"\0\1\0\0\0\1" + b"7") for _ in range(draw(st.integers(0, 3)))]
    error = frame(b"E", b"SERROR\0C42000\0Mx\0\0")
    failed = False
    for _frames, shape in units:
        if shape == "Q":
            kind = draw(st.sampled_from(["rows", "C", "I", "E"]))
            if kind == "rows":
                out += [frame(b"T", b"\0\1a\0" + bytes(18))] + rows() + [frame(b"C", draw(st.sampled_from(_TAGS)))]
            elif kind == "C":
                out.append(frame(b"C", draw(st.sampled_from(_TAGS))))
            else:
                out.append(error if kind == "E" else frame(b"I"))
            if draw(st.integers(0, 9)) == 0:
                out.append(frame(b"N", b"SNOTICE\0Mn\0\0"))
            out.append(frame(b"Z", draw(st.sampled_from([b"I", b"T", b"E"]))))
            continue
        for m in shape:
            if failed and m != "S":
                continue                              # the server skips to the Sync
            if m != "S" and draw(st.integers(0, 14)) == 0:
                out.append(error)
                failed = True
                continue
            if m == "P":
                out.append(frame(b"1"))
            elif m == "s":
                out.append(frame(b"t", b"\0\1\0\0\0\x17"))
                out.append(draw(st.sampled_from([frame(b"T", b"\0\1a\0" + bytes(18)), frame(b"n")])))
            elif m == "B":
                out.append(frame(b"2"))
            elif m == "p":
                out.append(draw(st.sampled_from([frame(b"T", b"\0\1a\0" + bytes(18)), frame(b"n")])))
            elif m == "E":
                out += rows()
                out.append(draw(st.sampled_from([frame(b"C", draw(st.sampled_from(_TAGS))), frame(b"I"),
                                                 frame(b"s")])))
            else:
                out.append(frame(b"Z", draw(st.sampled_from([b"I", b"T", b"E"]))))
                failed = False
    return b"".join(out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_relay_agrees_with_the_python_relay_on_extended_batches_client_side(data):
    units = data.draw(extended_units())
    stream, chunks = split(data.draw, b"".join(f for f, _ in units))
    read_size = data.draw(st.sampled_from([1 << 16, 700]))
    py_bytes, py_state, _ = run_pooled_pair(False, 0, chunks, read_size, 0)
    c_bytes, c_state, _ = run_pooled_pair(True, 0, chunks, read_size, 0)
    assert py_bytes == stream and c_bytes == stream
    assert c_state == py_state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_relay_agrees_with_the_python_relay_on_extended_batches_server_side(data):
    units = [u for u in data.draw(extended_units()) if u[1] == "Q" or u[1].endswith("S")]
    client = b"".join(f for f, _ in units)
    stream, chunks = split(data.draw, data.draw(extended_answers(units)))
    read_size = data.draw(st.sampled_from([1 << 16, 700]))
    py_bytes, py_state, _ = run_extended_server(False, client, chunks, read_size)
    c_bytes, c_state, _ = run_extended_server(True, client, chunks, read_size)
    assert py_bytes == stream and c_bytes == stream
    assert c_state == py_state


# ---- held servers (pgmp.pool.Pool.hold) ------------------------------------------------------

def test_a_held_server_s_events_are_python_s_and_its_client_s_first_bytes_unhold_it():
    from pgmp.client import POOLED_FLAGS as client_flags
    from pgmp.server import POOLED_FLAGS as server_flags
    buf, r, ep, (a_out, a_in, b_in, b_out) = relay_setup()
    client, server = a_in.fileno(), b_in.fileno()
    scanners = CScanner(client_flags), CScanner(server_flags)    # (their flags must outlive the arming)
    r.arm(client, server, scanners[0], 0, True)
    r.arm(server, client, scanners[1], 1, True)
    q, z = frame(b"Q", b"select 1\0"), frame(b"Z", b"I")
    r.hold(server, True)
    assert r.held(server) and not r.held(client)
    b_out.send(z)                                           # data from a held server: Python's, unread
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[0] == server and rec[2] == 0 and r.held(server)
    assert b_in.recv(100) == z
    a_out.send(q)                                           # its client's Query: relayed, the mark gone
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[0] == client and rec[2] == 1 and rec[4:8] == [len(q), len(q), 1, ord("Q")]
    assert b_out.recv(100) == q and not r.held(server)
    b_out.send(z)                                           # its answer: relayed as ever
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[0] == server and rec[2] == 1 and a_out.recv(100) == z
    r.hold(server, True)
    a_out.send(frame(b"Q", b"set x = 1\0"))                 # read by C for Python: not free either
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 1 and rec[5] == 0 and not r.held(server)
    r.hold(server, True)
    r.disarm(server)                                        # disarming ends the mark
    assert not r.held(server)
    for s in (a_out, a_in, b_in, b_out):
        s.close()
    ep.close()


def test_a_client_s_bytes_are_not_relayed_to_a_held_server_that_has_input_pending():
    """The server's FATAL (or EOF) and its client's next Query in one batch, the client's first:
    the Query must not go to the dead server; Python gets the event and replaces the server."""
    from pgmp.client import POOLED_FLAGS as client_flags
    from pgmp.server import POOLED_FLAGS as server_flags
    buf, r, ep, (a_out, a_in, b_in, b_out) = relay_setup()
    client, server = a_in.fileno(), b_in.fileno()
    scanners = CScanner(client_flags), CScanner(server_flags)    # (their flags must outlive the arming)
    r.arm(client, server, scanners[0], 0, True)
    r.arm(server, client, scanners[1], 1, True)
    r.hold(server, True)
    fatal = frame(b"E", b"SFATAL\0C57P01\0Mterminating connection\0\0")
    b_out.send(fatal)
    q = frame(b"Q", b"select 1\0")
    a_out.send(q)
    recs = records(r.poll(ep.fileno(), 1))
    assert sorted(rec[0] for rec in recs) == sorted([client, server])
    assert all(rec[2] == 0 for rec in recs)                 # both Python's, nothing read or sent
    assert a_in.recv(100) == q and b_in.recv(100) == fatal
    b_out.close()                                           # EOF alone: the same
    a_out.send(q)
    recs = records(r.poll(ep.fileno(), 1))
    assert all(rec[2] == 0 for rec in recs) and a_in.recv(100) == q
    for s in (a_out, a_in, b_in):
        s.close()
    ep.close()


# ---- bare transaction commands (pgmp_sql_control) ----------------------------------------------

@pytest.mark.parametrize("text, kind", [
    (b"BEGIN", "b"), (b"begin;", "b"), (b" Begin Work ; \n", "b"), (b"begin transaction", "b"),
    (b"START TRANSACTION;", "b"), (b"COMMIT", "c"), (b"end", "c"), (b"END WORK;", "c"),
    (b"commit transaction", "c"), (b"ROLLBACK", "r"), (b"abort;", "r"), (b"rollback work", "r"),
    (b"start", None), (b"begin isolation level serializable", None), (b"commit and chain", None),
    (b"begin; select 1", None), (b"begin;;", None), (b"begin -- x", None), (b"begin /* x */", None),
    (b"end if", None), (b"rollback to savepoint a", None), (b"begin\xc2\xa0", None), (b"", None),
    (b"transaction", None), (b"begin work work", None),
])
def test_bare_transaction_commands(text, kind):
    got = crelay.sql_control(text)
    assert got == (ord(kind) if kind else 0), text
    if kind:
        from pgmp.link import _CONTROL_EFFECTS
        from pgmp.protocol.sql import session_effects
        assert session_effects(text) == _CONTROL_EFFECTS[got]


_CONTROL_WORDS = ["begin", "start", "commit", "end", "rollback", "abort", "work", "transaction", "and",
                  "chain", "isolation", "savepoint", "select", "1", ";", ";;", "--", "/*", "*/", "\xc2\xa0"]


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(_CONTROL_WORDS), min_size=1, max_size=4),
       gaps=st.lists(st.sampled_from(["", " ", "\n", "\t  "]), min_size=5, max_size=5),
       upper=st.lists(st.booleans(), min_size=4, max_size=4))
def test_c_passes_a_transaction_command_only_where_its_effects_are_the_bare_ones(words, gaps, upper):
    """Where C calls a Query a bare BEGIN, COMMIT or ROLLBACK, sql.py finds exactly that effect in it."""
    from pgmp.link import _CONTROL_EFFECTS
    from pgmp.protocol.sql import session_effects
    parts = [w.upper() if u else w for w, u in zip(words, upper)]
    text = (gaps[0] + "".join(p + g for p, g in zip(parts, gaps[1:]))).encode("utf-8", "surrogateescape")
    kind = crelay.sql_control(text)
    if kind:
        assert session_effects(text) == _CONTROL_EFFECTS[kind], text


def test_pooled_walk_counts_a_bare_transaction_command_as_its_own_kind():
    client_flags, _ = _pooled_flags()
    begin, q = frame(b"Q", b"BEGIN;\0"), frame(b"Q", b"select 1\0")
    assert crelay.walk(begin, client_flags, 1 << 30, 0, pooled=True) == (len(begin), 1, ord("b"), 0)
    assert crelay.walk(begin + q, client_flags, 1 << 30, 0, pooled=True) == (len(begin), 1, ord("b"), 0)
    assert crelay.walk(q + begin, client_flags, 1 << 30, 0, pooled=True) == (len(q), 1, ord("Q"), 0)
    commit = frame(b"Q", b"commit\0")
    assert crelay.walk(commit + commit, client_flags, 1 << 30, 0, pooled=True) == (2 * len(commit), 2, ord("c"), 0)


_DML_PARTS = ["update", "UPDATE", "insert", "Delete", "t", "set", "SET", "x", "=", "1", "temp", "create", "do",
              "begin", "listen", "'", "'a;b'", '"', "$$", "--", "/*", "*/", "\n", ";", "; set y = 2",
              "pg_advisory_lock(1)", "set_config('a', 'b', false)", "(", ")", "\xc2\xa0", "e'\\''", "returning"]


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(_DML_PARTS), min_size=1, max_size=10),
       gaps=st.lists(st.sampled_from(["", " ", "\n"]), min_size=11, max_size=11))
def test_c_passes_an_insert_update_or_delete_only_where_sql_py_finds_no_effect(parts, gaps):
    from pgmp.protocol.sql import session_effects
    text = (gaps[0] + "".join(p + g for p, g in zip(parts, gaps[1:]))).encode("utf-8", "surrogateescape")
    if crelay.sql_dml(text):
        assert session_effects(text) == (), text


@pytest.mark.parametrize("text, dml", [
    (b"UPDATE pgbench_accounts SET abalance = abalance + -42 WHERE aid = 7;", True),
    (b"  insert into t values (1) ; ", True), (b"delete from t where x in (select 1)", True),
    (b"update t set x = 1; set y = 2", False), (b"update t set x = pg_advisory_lock(1)", False),
    (b"update t set x = set_config('a', 'b', false)", False), (b"/* c */ update t set x = 1", False),
    (b"update_log set x = 1", False), (b"updates", False), (b"set x = 1", False), (b"", False),
    (b"with a as (update t set x = 1 returning x) select * from a", False),
])
def test_insert_update_delete(text, dml):
    assert crelay.sql_dml(text) is dml, text


# -- transaction mode: Binds of named statements (the client's binds table) ----------------------

def binds_table(*pairs, enabled=True):
    b = crelay.Binds()
    assert b.fill([(name, sname, name + b"\0\0\0", ()) for name, sname in pairs], 0, None)
    b.enable(enabled)
    return b


def named(name=b"P0_1", params=(b"42",), portal_describe=True, run=True, sync=True) -> bytes:
    return (bind(params, name=name) + (describe() if portal_describe else b"") + (execute() if run else b"")
            + (SYNC if sync else b""))


def named_kind(entry: int, shape: int = 2 | 4 | 16) -> int:
    return 256 + 32 + shape + (entry << 9)


@pytest.mark.parametrize("client_name, sname", [(b"P0_1", b"pgmp_22"), (b"a", b"pgmp_1234567"),
                                                 (b"a_long_client_statement_name", b"pgmp_3"), (b"s1", b"pgmp_1")])
@pytest.mark.parametrize("portal_describe, run", [(True, True), (False, True), (False, False)])
def test_pooled_walk_rewrites_binds_of_statements_in_the_binds_table(client_name, sname, portal_describe, run):
    client_flags, _ = _pooled_flags()
    table = binds_table((b"other", b"pgmp_9"), (client_name, sname))
    batch = named(client_name, portal_describe=portal_describe, run=run)
    sent = named(sname, portal_describe=portal_describe, run=run)
    kind = named_kind(1, 2 | (4 if portal_describe else 0) | (16 if run else 0))
    walk = lambda buf: crelay.walk(buf, client_flags, 1 << 30, 0, True, None, table)
    assert walk(batch) == (len(sent), 1, kind, sent)
    assert walk(batch * 3) == (3 * len(sent), 3, kind, sent * 3)
    # a batch not whole in the read is Python's from its start, unchanged
    for cut in range(1, len(batch)):
        assert walk(batch + batch[:cut]) == (len(sent), 1, kind, sent + batch[:cut])
        assert walk(batch[:cut]) == (0, 0, -1, batch[:cut])
    # one kind of request per record: another statement, a Query, an unnamed batch
    other = named(b"other")
    q = frame(b"Q", b"select 1\0")
    assert walk(batch + other) == (len(sent), 1, kind, sent + other)
    assert walk(other + batch) == (len(named(b"pgmp_9")), 1, named_kind(0), named(b"pgmp_9") + batch)
    assert walk(q + batch) == (len(q), 1, ord("Q"), q + batch)
    assert walk(batch + q) == (len(sent), 1, kind, sent + q)
    assert walk(batch + _PGBENCH) == (len(sent), 1, kind, sent + _PGBENCH)


@pytest.mark.parametrize("batch", [
    named(b"unknown"),                                                    # not in the table: Python's
    named(b""),                                                           # the unnamed statement, no Parse
    bind(name=b"P0_1", portal=b"c1") + execute(b"c1") + SYNC,             # a named portal
    parse() + bind(name=b"P0_1") + execute() + SYNC,                      # after an unnamed Parse
    parse(name=b"P0_1") + bind(name=b"P0_1") + execute() + SYNC,          # a named Parse: Python renames it
    describe(b"S", b"P0_1") + named(),                                    # Describe of the statement
    bind(name=b"P0_1") + describe(b"S", b"P0_1") + execute() + SYNC,
    named(sync=False),                                                    # no Sync in the read
    named() [:-5] + bind(name=b"P0_1") + SYNC,                            # twice
    bind(name=b"P0_1") + execute() + describe() + SYNC,                   # out of order
    bind(name=b"P0_1") + frame(b"C", b"SP0_1\0") + SYNC,                  # a Close
    frame(b"B", b"\0P0_1") + SYNC,                                        # malformed
    frame(b"B", b"\0P0_1\0\0\0\0\1\0\0\0\5ab\0\0") + SYNC,
    bind((b"1",), formats=(2,), name=b"P0_1") + execute() + SYNC,         # a format code the server refuses
])
def test_pooled_walk_leaves_other_named_batches_to_python(batch):
    client_flags, _ = _pooled_flags()
    table = binds_table((b"P0_1", b"pgmp_1"))
    assert crelay.walk(batch, client_flags, 1 << 30, 0, True, None, table) == (0, 0, -1, batch)


def test_pooled_walk_binds_named_statements_only_from_an_enabled_table_and_within_its_room():
    client_flags, _ = _pooled_flags()
    walk = lambda buf, table: crelay.walk(buf, client_flags, 1 << 30, 0, True, None, table)
    batch = named()
    assert walk(batch, None)[:3] == (0, 0, -1)
    assert walk(batch, binds_table((b"P0_1", b"pgmp_1"), enabled=False)) == (0, 0, -1, batch)
    # at most 64 rewrites per read (PGMP_REWRITES_MAX), and only as far as the room goes
    sent = named(b"pgmp_1")
    assert walk(batch * 70, binds_table((b"P0_1", b"pgmp_1"))) == (64 * len(sent), 64, named_kind(0),
                                                                   sent * 64 + batch * 6)
    long_name = b"x" * 104                                     # 100 bytes longer: 40 fit in 4096
    sent = named(long_name)
    assert walk(batch * 50, binds_table((b"P0_1", long_name))) == (40 * len(sent), 40, named_kind(0),
                                                                   sent * 40 + batch * 10)


def test_a_query_the_relay_passes_disables_the_binds_table_and_a_new_epoch_stales_it():
    from pgmp.client import POOLED_FLAGS as client_flags
    from pgmp.server import POOLED_FLAGS as server_flags
    buf, r, ep, (a_out, a_in, b_in, b_out) = relay_setup()
    sc_client, sc_server = CScanner(client_flags), CScanner(server_flags)
    r.arm(a_in.fileno(), b_in.fileno(), sc_client, 0, True)
    r.arm(b_in.fileno(), a_in.fileno(), sc_server, 1, True)
    table = binds_table((b"P0_1", b"pgmp_1"))
    r.binds(a_in.fileno(), table)
    batch, sent = named(), named(b"pgmp_1")
    a_out.send(batch)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 1 and rec[3:8] == [len(sent), len(sent), len(sent), 1, named_kind(0)]
    assert b_out.recv(1000) == sent
    q = frame(b"Q", b"select 1\0")
    a_out.send(q)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[3:8] == [len(q), len(q), len(q), 1, ord("Q")] and b_out.recv(1000) == q
    assert not table.c_enabled()                               # the Query might have been a DISCARD ALL
    a_out.send(batch)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[2] == 1 and rec[3:8] == [len(batch), 0, 0, 0, -1]      # Python's, unchanged
    assert bytes(buf[:len(batch)]) == batch
    table.enable(True)
    r.retire()                                                 # a statement name left the cache
    a_out.send(batch)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[3:8] == [len(batch), 0, 0, 0, -1]
    table.fill(table.entries, r.epoch(), None)                 # made again in the new epoch
    table.enable(True)
    a_out.send(batch)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[3:8] == [len(sent), len(sent), len(sent), 1, named_kind(0)] and b_out.recv(1000) == sent
    r.disarm(a_in.fileno())                                    # disarming takes the table away
    r.arm(a_in.fileno(), b_in.fileno(), sc_client, 0, True)
    a_out.send(batch)
    (rec,) = records(r.poll(ep.fileno(), 1))
    assert rec[3:8] == [len(batch), 0, 0, 0, -1]
    for s in (a_out, a_in, b_in, b_out):
        s.close()
    ep.close()


# The client's prepared statements, as a Link has them before the test's stream: texts by name.
_PREPARED = {b"P0_1": b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", b"s2": b"select $1",
             b"tx": b"BEGIN", b"setter": b"set search_path = x", b"end": b"END;"}


def prepared_link(limit: int = 100, outstanding: int = 0, statements: dict | None = None) -> Link:
    """A pooled Link whose client prepared _PREPARED on its server and bound each once (Parse,
    Sync, Bind, Execute, Sync, and the server's answers, through the Python path: the binds table
    holds the statements a client bound lately), with ``outstanding`` Queries after."""
    from pgmp.link import ServerSession
    from pgmp.prepared import Pipeline, StatementCache
    from pgmp.stats import PoolStats
    link = Link(clock=time.monotonic)
    link.logged_in(time.monotonic, PoolStats(), Pipeline(StatementCache()))
    link.attach(ServerSession(limit))
    from pgmp.prepared import DROP_CLOSE, R_BIND, R_EXEC, R_SYNC
    answer = {R_SYNC: frame(b"Z", b"I"), DROP_CLOSE: frame(b"3"), R_BIND: frame(b"2"),
              R_EXEC: frame(b"C", b"SELECT 1\0")}
    for name, text in (statements or _PREPARED).items():
        for f in (parse(text, 1 if b"$1" in text else 0, name), SYNC, bind(name=name), execute(), SYNC):
            link.client_frame(f[0], f[5:])
        while link.pipeline.expect:                  # ParseComplete (pgmp's too), CloseComplete, ...
            f = answer.get(link.pipeline.expect[0][0], frame(b"1"))
            link.server_frame(f[0], f)
    assert link.pipeline.idle and link.c_relay_ok()
    for _ in range(outstanding):
        link.client_frame(ord("Q"), b"select 1\0")
    return link


def prepared_state(link: Link):
    pl = link.pipeline
    from pgmp.link import session_effects
    text = link.unnamed_text                  # (C leaves a text with the same effects: see Link)
    return (pooled_state(link), list(link.server.statements.names.items()), list(pl.cache.names.items()),
            list(pl.statements.items()), pl.skipping, None if text is None else tuple(session_effects(text)))


def run_prepared_pair(use_c: bool, side: int, chunks: list[bytes], read_size: int, limit: int = 100,
                      client_frames: bytes = b""):
    link = prepared_link(limit)
    pos = 0
    while pos < len(client_frames):
        end = pos + 1 + struct.unpack_from("!I", client_frames, pos + 1)[0]
        link.client_frame(client_frames[pos], client_frames[pos + 5:end])
        pos = end
    return run_sides(use_c, side, chunks, read_size, PooledSide, _pooled_flags(), link, prepared_state,
                     rewrites=True)


def test_pgbench_prepared_transactions_cross_c_and_leave_the_link_as_python_does():
    """pgbench -M prepared's transaction (Bind of its statement, Describe, Execute, Sync), then
    its answer: both in C, rewritten to the server's name, and the Link, the Pipeline, the
    server's statements and the worker's cache as the Python relay leaves them."""
    batch = named()
    (py_bytes, py_state, py_c), (c_bytes, c_state, c_c) = [
        run_prepared_pair(use_c, 0, [batch * 4], 1 << 16) for use_c in (False, True)]
    assert py_bytes == c_bytes == named(b"pgmp_1") * 4
    assert py_c == 0 and c_c == len(py_bytes)
    assert c_state == py_state and len(c_state[0][2]) == 16
    t = frame(b"T", b"\0\1abalance\0" + bytes(18))
    answer = frame(b"2") + t + frame(b"D", b"\0\1\0\0\0\0011") + frame(b"C", b"SELECT 1\0") + frame(b"Z", b"I")
    (py_bytes, py_state, py_c), (c_bytes, c_state, c_c) = [
        run_prepared_pair(use_c, 1, [answer * 3], 1 << 16, client_frames=batch * 3) for use_c in (False, True)]
    assert py_c == 0 and c_c == 3 * len(answer)
    assert c_state == py_state and c_state[0][2] == []


_NAMES = list(_PREPARED) * 3 + [b"new1", b"new3", b"unknown"]


@st.composite
def named_units(draw, max_units=12):
    """A client's requests against prepared_link's statements: Binds of them (and of names it
    never prepared) in batches, Parses and Closes of names, Queries (DISCARD ALL and DEALLOCATE
    ALL among them), unnamed batches; as (frames, what the server answers: "Q" or the shape)."""
    units = []
    for _ in range(draw(st.integers(1, max_units))):
        pick = draw(st.integers(0, 19))               # mostly Binds (0 first: what hypothesis favours)
        if pick == 16:
            text = draw(st.sampled_from(_QUERIES + [b"discard all\0", b"DEALLOCATE ALL\0", b"deallocate s2\0"]))
            units.append((frame(b"Q", text), "Q"))
            continue
        if pick == 17:
            units.append(draw(extended_units(1))[0])
            continue
        name = draw(st.sampled_from(_NAMES))
        if pick == 18:
            out, shape = [frame(b"C", b"S" + name + b"\0")], "c"
        elif pick == 19:                             # a new name each time (a taken one ends the session)
            out, shape = [parse(b"select 2", 0, b"new%d" % len(units))], "P"
        else:
            shape = draw(st.sampled_from(["BpE", "BE", "B", "BpE"]))
            out = []
            for m in shape:
                if m == "B":
                    out.append(bind(draw(st.sampled_from([(b"1",), (b"x" * 300,), (None,)])), name=name))
                elif m == "p":
                    out.append(describe(b"P"))
                else:
                    out.append(execute())
        if draw(st.integers(0, 9)) == 0:
            out.append(FLUSH)
        units.append(with_sync(draw, out, shape))
    return units


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_relay_agrees_with_the_python_relay_on_named_statements_client_side(data):
    units = data.draw(named_units())
    if data.draw(st.booleans()):
        chunks = [f for f, _ in units]                      # one read each, as a client waiting on each
    else:
        _stream, chunks = split(data.draw, b"".join(f for f, _ in units))
    read_size = data.draw(st.sampled_from([1 << 16, 700]))
    limit = data.draw(st.sampled_from([100, 3]))             # 3: fewer than _PREPARED, some evicted
    py_bytes, py_state, _ = run_prepared_pair(False, 0, chunks, read_size, limit)
    c_bytes, c_state, _ = run_prepared_pair(True, 0, chunks, read_size, limit)
    assert c_bytes == py_bytes
    assert c_state == py_state


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_relay_agrees_with_the_python_relay_on_named_statements_server_side(data):
    units = [u for u in data.draw(named_units()) if u[1] == "Q" or (u[1].endswith("S") and u[1][0] in "BP")]
    client = b"".join(f for f, _ in units)
    stream, chunks = split(data.draw, data.draw(extended_answers(units)))
    read_size = data.draw(st.sampled_from([1 << 16, 700]))
    py_bytes, py_state, _ = run_prepared_pair(False, 1, chunks, read_size, client_frames=client)
    c_bytes, c_state, _ = run_prepared_pair(True, 1, chunks, read_size, client_frames=client)
    assert c_bytes == py_bytes
    assert c_state == py_state


@pytest.mark.parametrize("query", [b"select 1\0", b"DEALLOCATE ALL\0", b"discard all\0"])
def test_a_bind_behind_an_unanswered_query_is_prepared_again_as_python_does(query):
    """A Query ahead might drop the statement (DISCARD ALL, DEALLOCATE ALL): the first Bind behind
    it gets a Close and a Parse of pgmp's first, whether C passed the Query or Python did."""
    chunks = [frame(b"Q", query), named(), named()]
    (py_bytes, py_state, _), (c_bytes, c_state, in_c) = [
        run_prepared_pair(use_c, 0, chunks, 1 << 16) for use_c in (False, True)]
    assert c_bytes == py_bytes and c_state == py_state
    assert py_bytes.count(b"C\0\0\0\x0cSpgmp_1\0P") == 1          # prepared again once
    # (DEALLOCATE is no trigger word: C passes the Query, and its answer's tag goes to Python)
    assert in_c == (0 if query == b"discard all\0" else len(chunks[0]))


def test_a_binds_table_holds_at_most_its_limit_and_a_fuller_one_is_left_empty():
    from pgmp._scan import lib
    entries = [(b"s%d" % i, b"pgmp_%d" % i, b"", ()) for i in range(lib.PGMP_BINDS_MAX + 1)]
    b = crelay.Binds()
    assert b.fill(entries[:-1], 0, "tag") and len(b.entries) == lib.PGMP_BINDS_MAX
    assert not b.fill(entries, 0, "tag") and b.entries == []
    client_flags, _ = _pooled_flags()
    b.enable(True)
    assert crelay.walk(named(b"s1"), client_flags, 1 << 30, 0, True, None, b)[:3] == (0, 0, -1)


def test_the_binds_table_is_made_of_the_statements_bound_lately():
    """Link.bound_statements: what the client bound through Python last (Pipeline.bound, at most
    BOUND_MAX names), that its server has; not every statement it ever prepared."""
    from pgmp.prepared import BOUND_MAX, R_BIND, R_SYNC
    link = prepared_link()
    assert [e[0] for e in link.bound_statements()] == list(_PREPARED)
    for i in range(BOUND_MAX + 3):
        name = b"many%d" % i
        for f in (parse(b"select %d" % i, 0, name), bind((), name=name), SYNC):
            link.client_frame(f[0], f[5:])
        while link.pipeline.expect:
            f = {R_SYNC: frame(b"Z", b"I"), R_BIND: frame(b"2")}.get(link.pipeline.expect[0][0], frame(b"1"))
            link.server_frame(f[0], f)
    got = [e[0] for e in link.bound_statements()]
    assert got == [b"many%d" % i for i in range(3, BOUND_MAX + 3)]


def test_a_statement_evicted_from_the_cache_after_c_bound_it_is_put_back_under_its_name():
    from pgmp.prepared import StatementCache
    cache = StatementCache(max_entries=2)
    a = cache.name_for(b"select 1\0\0\0")
    cache.name_for(b"select 2\0\0\0")
    cache.name_for(b"select 3\0\0\0")                     # evicts select 1
    assert b"select 1\0\0\0" not in cache.names and cache.evictions == 1
    cache.touch(b"select 1\0\0\0", a)                      # C had bound it as a meanwhile
    assert cache.names[b"select 1\0\0\0"] == a and list(cache.names)[-1] == b"select 1\0\0\0"
    assert cache.name_for(b"select 1\0\0\0") == a
