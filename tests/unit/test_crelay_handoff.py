"""The C relay's hand-off (pgmp_relay.h: pgmp_queue, pgmp_relay_handoff), socket pairs and bytes.

At the ReadyForQuery 'I' that answers its client's last outstanding request, a server
Python allowed to be handed over goes to the first client of its pool's queue: C sends that
client's request, disarms the old client, arms the new one with the server and writes two
records. In every other case it does nothing of the kind and the records are as before.
"""
import select
import socket
import struct

import pytest

try:
    from pgmp import crelay
    from pgmp.protocol import scanner
    CScanner = scanner.load("c")
except ImportError:                                  # pragma: no cover - the C helper is part of the build
    crelay = None

pytestmark = pytest.mark.skipif(crelay is None, reason="the C helper (pgmp._scan) is not built")

HANDOFF, HANDED = 4, 5


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


Q1 = frame(b"Q", b"select 1\0")
Q2 = frame(b"Q", b"select 2\0")
ANSWER = (frame(b"T", b"\0\1x\0" + bytes(18)) + frame(b"D", b"\0\1\0\0\0\0011") + frame(b"C", b"SELECT 1\0")
          + frame(b"Z", b"I"))


def records(flat):
    return [flat[i:i + crelay.REC] for i in range(0, len(flat), crelay.REC)]


class Setup:
    """Client 1 armed with the server (pooled), client 2 not armed; the sockets' far ends."""

    def __init__(self):
        from pgmp.client import POOLED_FLAGS as client_flags
        from pgmp.server import POOLED_FLAGS as server_flags
        from pgmp.server import RELAY_LIMITS
        self.buf = bytearray(4096 + crelay.REWRITE_ROOM)
        self.r = crelay.CRelay(self.buf, len(self.buf))
        self.ep = select.epoll()
        self.socks = []
        self.c1_out, self.c1 = self._pair()
        self.c2_out, self.c2 = self._pair()
        self.s, self.s_out = self._pair()
        self.s, self.s_out = self.s_out, self.s         # (the server's socket is the registered one)
        for sock in (self.c1, self.c2, self.s):
            sock.setblocking(False)
            self.ep.register(sock.fileno(), select.EPOLLIN)
        self.client_sc, self.server_sc = CScanner(client_flags), CScanner(server_flags)
        self.limits = crelay.Limits(RELAY_LIMITS)
        self.queue = crelay.CQueue()
        self.r.arm(self.c1.fileno(), self.s.fileno(), self.client_sc, 0, True)
        self.r.arm(self.s.fileno(), self.c1.fileno(), self.server_sc, 1, True, self.limits)

    def _pair(self):
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    def grant(self, owed: int = 1, tag: int = 1, queue=True) -> None:
        self.r.handoff(self.s.fileno(), self.queue if queue else None, owed, tag)

    def poll(self) -> list:
        return records(self.r.poll(self.ep.fileno(), 100))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.ep.close()


@pytest.fixture
def pair():
    st = Setup()
    yield st
    st.close()


def test_the_first_queued_client_gets_the_server_at_its_client_s_transaction_end(pair):
    st = pair
    c1, c2, s = st.c1.fileno(), st.c2.fileno(), st.s.fileno()
    assert st.queue.push(c2, Q2, st.client_sc, 1) == 1 and len(st.queue) == 1
    st.grant(owed=1, tag=1)
    st.s_out.send(ANSWER)
    rec, rec2 = st.poll()
    assert rec == [s, select.EPOLLIN, HANDOFF, len(ANSWER), len(ANSWER), len(ANSWER), 1, ord("I"), 0, c1]
    assert rec2 == [c2, 0, HANDED, len(Q2), len(Q2), len(Q2), 1, ord("Q"), 0, s]
    assert st.c1_out.recv(1000) == ANSWER             # the old client got its answer
    assert st.s_out.recv(1000) == Q2                  # the server the new client's request
    assert not st.r.armed(c1) and st.r.armed(c2) and st.r.armed(s)
    assert len(st.queue) == 0 and not st.queue.remove(c2)    # handed: no longer in C's queue
    assert st.r.handoffs() == 1
    st.s_out.send(ANSWER)                             # the next answer goes to the new client
    (rec,) = st.poll()
    assert rec[2] == 1 and rec[9] == c2 and st.c2_out.recv(1000) == ANSWER
    st.c2_out.send(Q1)                                # and its next request to the server
    (rec,) = st.poll()
    assert rec[2] == 1 and rec[6:8] == [1, ord("Q")] and st.s_out.recv(1000) == Q1


def test_the_server_keeps_its_hand_off_and_follows_the_queue(pair):
    """After a hand-off C counts the new client's requests itself: at the end of its transaction
    the server goes on to the next one in the queue."""
    st = pair
    c3_out, c3 = st._pair()
    c3.setblocking(False)
    st.ep.register(c3.fileno(), select.EPOLLIN)
    st.queue.push(st.c2.fileno(), Q2, st.client_sc, 1)
    st.queue.push(c3.fileno(), Q1 + Q1, st.client_sc, 1)
    st.grant(owed=1, tag=1)
    st.s_out.send(ANSWER)
    assert [r[2] for r in st.poll()] == [HANDOFF, HANDED]
    assert st.s_out.recv(1000) == Q2
    st.s_out.send(ANSWER)
    rec, rec2 = st.poll()
    assert rec[2] == HANDOFF and rec[9] == st.c2.fileno()
    assert rec2[0] == c3.fileno() and rec2[6:8] == [2, ord("Q")]
    assert st.s_out.recv(1000) == Q1 + Q1 and st.c2_out.recv(1000) == ANSWER
    st.s_out.send(ANSWER)                             # one of its two requests answered: it keeps the server
    (rec,) = st.poll()
    assert rec[2] == 1 and rec[9] == c3.fileno()


@pytest.mark.parametrize("case", ["owed", "in transaction", "python first", "other tag", "no grant",
                                  "epoch", "blocked", "queued client's event", "not plain", "partial answer"])
def test_no_hand_off(pair, case):
    st = pair
    c2 = st.c2.fileno()
    answer = ANSWER
    if case == "python first":
        st.queue.push(st.c1_out.fileno(), None, None, 1)    # (any fd: a client only Python may serve)
    pushed = st.queue.push(c2, frame(b"Q", b"set x = 1\0") if case == "not plain" else Q2, st.client_sc,
                           2 if case == "other tag" else 1)
    assert pushed == (0 if case == "not plain" else 1)
    st.grant(owed=2 if case == "owed" else 1, queue=case != "no grant")
    if case == "in transaction":
        answer = answer[:-1] + b"T"
    if case == "epoch":
        st.r.handoff_end_all()
    if case == "blocked":
        st.r.blocked(st.s.fileno(), True)
    if case == "queued client's event":
        st.c2_out.send(b"X\0\0\0\4")
    if case == "partial answer":
        answer = answer[:-2]
    st.s_out.send(answer)
    recs = st.poll()
    assert HANDOFF not in [r[2] for r in recs] and HANDED not in [r[2] for r in recs]
    srec = next(r for r in recs if r[0] == st.s.fileno())
    assert srec[2] == 1                                 # (blocked: Python's bytes for the server go first)
    if srec[4]:
        assert st.c1_out.recv(1000) == answer[:srec[4]]
    assert st.r.armed(st.c1.fileno()) and not st.r.armed(c2)
    with pytest.raises(BlockingIOError):
        st.s_out.recv(1000, socket.MSG_DONTWAIT)      # nothing was sent to the server


def test_queue_remove_and_block(pair):
    st = pair
    c2 = st.c2.fileno()
    other = st.c1_out.fileno()
    assert st.queue.push(other, Q1, st.client_sc, 1) == 1
    assert st.queue.push(c2, Q2, st.client_sc, 1) == 1
    assert len(st.queue) == 2
    assert st.queue.remove(other) and not st.queue.remove(other) and len(st.queue) == 1
    st.queue.block(c2)                                 # its bytes changed: Python's now
    st.grant()
    st.s_out.send(ANSWER)
    (rec,) = st.poll()
    assert rec[2] == 1 and not st.r.armed(c2) and len(st.queue) == 1
    assert st.queue.remove(c2) and len(st.queue) == 0
    for n in range(200):                               # the ring grows and wraps
        assert st.queue.push(1000 + n, Q1, st.client_sc, 1) == 1
        if n % 3 == 0:
            assert st.queue.remove(1000 + n)
    assert len(st.queue) == 200 - 67
    st.queue.clear()
    assert len(st.queue) == 0


QUEUED, MEMBER = 6, 7


def handed_over(st) -> None:
    """One hand-off: client 2 gets the server, client 1 is left a member of the queue."""
    st.queue.push(st.c2.fileno(), Q2, st.client_sc, 1)
    st.grant(owed=1, tag=1)
    st.s_out.send(ANSWER)
    assert [r[2] for r in st.poll()] == [HANDOFF, HANDED]
    assert st.s_out.recv(1000) == Q2 and st.c1_out.recv(1000) == ANSWER


def test_the_old_client_s_next_request_queues_in_c(pair):
    st = pair
    c1 = st.c1.fileno()
    handed_over(st)
    st.c1_out.send(Q1 + Q1)                           # its next request: queued in C, bytes kept there
    (rec,) = st.poll()
    assert rec[:4] == [c1, select.EPOLLIN, QUEUED, len(Q1 + Q1)] and rec[4:8] == [2 * len(Q1), 2 * len(Q1), 2, ord("Q")]
    assert len(st.queue) == 1 and st.queue.data(c1) == Q1 + Q1 and not st.r.armed(c1)
    st.c1_out.send(Q1)                                # a member no more: this read is Python's, unread
    (rec,) = st.poll()
    assert rec[2] == 0 and st.c1.recv(100) == Q1
    st.s_out.send(ANSWER)                             # client 2's transaction ends: the server goes to client 1
    rec, rec2 = st.poll()
    assert rec[2] == HANDOFF and rec[9] == st.c2.fileno() and rec2[0] == c1 and rec2[6] == 2
    assert st.s_out.recv(1000) == Q1 + Q1 and st.queue.data(c1) is None
    assert st.r.take_rest(st.s.fileno()) == b""       # all of it went out


def test_a_member_s_other_reads_are_python_s(pair):
    st = pair
    c1 = st.c1.fileno()
    handed_over(st)
    other = frame(b"Q", b"set search_path = x\0")
    st.c1_out.send(other)                             # not a request C may pass: Python's bytes, in the buffer
    (rec,) = st.poll()
    assert rec[:4] == [c1, select.EPOLLIN, MEMBER, len(other)] and rec[4:6] == [0, 0] and rec[9] == -1
    assert bytes(st.buf[:len(other)]) == other and len(st.queue) == 0
    st.c1_out.send(Q1)                                # and a member no more
    (rec,) = st.poll()
    assert rec[2] == 0 and st.c1.recv(100) == Q1


@pytest.mark.parametrize("how", ["disarm", "arm"])
def test_disarming_or_arming_ends_membership(pair, how):
    st = pair
    c1 = st.c1.fileno()
    handed_over(st)
    if how == "disarm":
        st.r.disarm(c1)
    else:                                             # Python links it to a server itself
        st.r.arm(c1, st.c2_out.fileno(), st.client_sc, 0, True)
        st.r.disarm(c1)
    st.c1_out.send(Q1)
    (rec,) = st.poll()
    assert rec[2] == 0 and len(st.queue) == 0 and st.c1.recv(100) == Q1


def test_what_a_hand_off_could_not_send_is_kept_for_python(pair):
    st = pair
    st.s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        while True:                                   # the server's socket takes nothing more
            st.s.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    big = frame(b"Q", b"select '" + b"x" * 200000 + b"'\0")
    assert st.queue.push(st.c2.fileno(), big, st.client_sc, 1) == 1
    st.grant(owed=1, tag=1)
    st.s_out.send(ANSWER)
    rec, rec2 = st.poll()
    assert rec[2] == HANDOFF and rec2[2] == HANDED and rec2[3] == len(big) and rec2[4] < len(big)
    assert st.r.take_rest(st.s.fileno()) == big[rec2[4]:]
    assert st.r.take_rest(st.s.fileno()) == b""       # taken: let go
