"""Fuzz the client-server state machine: pgmp/link.py Link (and the Pipeline it drives) fed client and server frames.

Input: the pool mode and max_prepared_statements (first two bytes), then records, each
a direction byte and a frame (read leniently): 'C' a client frame, 'S' a server frame,
'H' the head of a Bind or Parse too large to assemble (client), anything else makes the
client leave. Frames reach the Link only where pgmp's client and server connections
would hand them over (the types their scanners report, payloads whole only in
transaction/statement mode); a server released at ReadyForQuery is detached, and the
next client frame attaches the other one, as the pool does.

Documented errors: PgmpError (a malformed or refused client message: the client is
failed), ValueError from messages.parse_parameter_status (a malformed ParameterStatus).
Invariants: what the Link sends to a server instead of a client frame (and the settings
query at attach) is whole, valid frontend frames; a rewritten Bind head keeps the frame's
length consistent; what it sends to the client instead of a server frame is whole frames;
outstanding never goes below 0; a server that gains a statement is within the limit; a RELEASE
verdict comes only when leave() would REUSE the server; REFUSE_BLOCK only in statement
mode; leave() answers REUSE only for an unpinned client.
"""
import itertools
import struct

from pgmp import link as link_mod
from pgmp.errors import PgmpError
from pgmp.link import CLOSE, KEEP, REFUSE_BLOCK, RELEASE, RESET, REUSE, Link, ServerSession
from pgmp.prepared import RESPONSE_TYPES, Pipeline, StatementCache
from pgmp.protocol import messages
from pgmp.protocol._pyscan import Scanner, make_flags
from pgmp.session import TRACKED
from pgmp.stats import PoolStats
from tests.fuzz.harnesses._common import Bytes, check, frames

MAX_LEN = 8192
FRONTEND_TYPES = b"BCcdDEfFHPQSX"
READY_REPORT = b"QSFcfXPBE"             # pgmp/client.py READY_FLAGS / POOLED_FLAGS
POOLED_REPORT = b"QSFcfXPBCDE"
SERVER_NORMAL = b"ZGSE"                 # pgmp/server.py NORMAL_FLAGS / POOLED_FLAGS
SERVER_POOLED = b"ZGS" + RESPONSE_TYPES
_frontend = Scanner(make_flags(valid=FRONTEND_TYPES), 1 << 30, 1 << 16)
_backend = Scanner(make_flags(), 1 << 30, 1 << 16)


def _whole_frames(out: bytes, scanner, what: str) -> None:
    scanner.scan(out, 0, len(out))
    check(not scanner.error and scanner.consumed == len(out) and not scanner.full,
          f"{what} is not whole frames: {out[:80]!r}")


def _server_bound(link, servers) -> None:
    if link.server is None:
        srv = next(servers)
        query = link.attach(srv)
        if query is not None:
            _whole_frames(query, _frontend, "the settings query")
            check(query[:1] == b"Q", "the settings query is not a Query")


class Client:
    def __init__(self, b: Bytes):
        mode = b.byte() % 3
        limit = b.pick((0, 1, 2, 100))
        self.pooled = mode > 0
        self.statement_mode = mode == 2
        self.limit = limit
        ticks = itertools.count()
        self.link = Link({"application_name": "fuzz"}, TRACKED, name="fuzz@db")
        pipeline = Pipeline(StatementCache(), limit > 0) if self.pooled else None
        self.link.logged_in(lambda: next(ticks) * 0.001, PoolStats(), pipeline, self.statement_mode)
        self.servers = itertools.cycle([ServerSession(limit), ServerSession(limit)])
        self.link.attach(next(self.servers))

    def client_frame(self, kind: int, payload: bytes) -> bool:
        link = self.link
        if kind not in FRONTEND_TYPES:
            return False                         # the scanner refuses the type: the client is failed
        if kind not in (POOLED_REPORT if self.pooled else READY_REPORT):
            return True                          # forwarded without a look
        if kind == 88:
            return False                         # Terminate
        _server_bound(link, self.servers)
        before = len(link.server.statements.names)
        r = link.client_frame(kind, payload if self.pooled and kind in b"PBCDEQ" else None)
        if r is not None:
            check(self.pooled, "session mode replaced a client frame")
            if r:
                _whole_frames(r, _frontend, "what replaces a client frame")
        self._statement_limit(before)
        return True

    def client_head(self, kind: int, payload: bytes) -> bool:
        if not self.pooled or kind not in (66, 80):
            return self.client_frame(kind, payload) if kind in FRONTEND_TYPES else False
        link = self.link
        head = payload[:144]
        if head.count(b"\0") < (2 if kind == 66 else 1) or (kind == 80 and head[:1] != b"\0"):
            return True                          # pgmp waits for more, or assembles it
        length = 5 + len(payload) + 1000         # the frame goes on past what was read
        _server_bound(link, self.servers)
        before = len(link.server.statements.names)
        r = link.client_head(kind, head, length)
        if r is not None:
            out, replaced = r
            b_at = out.rindex(b"B")
            while True:                          # the rewritten head follows whole frames
                _backend.scan(out, 0, b_at)
                if _backend.consumed == b_at or b_at == 0:
                    break
                b_at = out.rindex(b"B", 0, b_at)
            _whole_frames(out[:b_at], _frontend, "the frames before a rewritten Bind head")
            (declared,) = struct.unpack_from("!I", out, b_at + 1)
            check(declared + 1 == len(out) - b_at + (length - replaced),
                  "a rewritten Bind head does not keep the frame's length")
        self._statement_limit(before)
        return True

    def server_frame(self, kind: int, payload: bytes) -> bool:
        link = self.link
        if link.server is None:
            return True                          # released: the pool owns the server now
        whole = messages.frame(bytes([kind]), payload)
        if not self.pooled:
            if kind not in SERVER_NORMAL:
                return True
            if kind == 90:
                if len(payload) != 1:
                    return True                  # server.py refuses it before the Link sees it
                link.server_ready(1, whole[5])
            elif kind == 71:
                link.server_copy_in()
            elif kind == 69:
                link.server_error_frame(whole)
            else:
                return self._parameter_status(payload)
            return True
        if kind not in SERVER_POOLED:
            return True
        if kind == 83 and payload:
            return self._parameter_status(payload)
        r = link.server_frame(kind, whole)
        if r:
            _whole_frames(r, _backend, "what replaces a server frame")
        check(link.outstanding >= 0, "outstanding went below 0")
        if kind == 90:
            verdict = link.after_ready(False)
            check(verdict in (KEEP, RELEASE, REFUSE_BLOCK), f"after_ready answered {verdict}")
            check(verdict != REFUSE_BLOCK or self.statement_mode, "REFUSE_BLOCK outside statement mode")
            if verdict == RELEASE:
                check(link.leave(False, False)[0] == REUSE,
                      f"RELEASE of a server that leave() would not reuse: {link.leave(False, False)}")
                link.detach()
            elif verdict == REFUSE_BLOCK:
                return False                     # the client is failed
        return True

    def _parameter_status(self, payload: bytes) -> bool:
        try:
            name, value = messages.parse_parameter_status(payload)
        except ValueError:
            return False
        self.link.parameter_status(name, value)
        return True

    def _statement_limit(self, before: int) -> None:
        """A server that gained a statement has had the oldest beyond the limit closed.

        (It may hold more otherwise: an error makes the server skip an eviction's Close.)"""
        names = self.link.server.statements.names
        if self.limit and len(names) > before:
            check(len(names) <= self.limit, f"{len(names)} statements on a server after preparing one, "
                                            f"limit {self.limit}")

    def leave(self) -> None:
        verdict, why = self.link.leave(False, False)
        check(verdict in (REUSE, RESET, CLOSE) and isinstance(why, str), f"leave answered {verdict}")
        check(verdict != REUSE or not self.link.pinned, "a pinned client's server would be reused")


def _records(data: bytes):
    """(direction, kind, payload) records: a direction byte, then a lenient frame."""
    pos = 0
    while pos < len(data):
        direction = data[pos]
        kind, payload = next(frames(data[pos + 1:]), (None, b""))
        if kind is None:
            return
        yield direction, kind, payload
        pos += 1 + 5 + len(payload) if len(data) - pos - 1 >= 5 else len(data)


def one_input(data: bytes) -> None:
    b = Bytes(data[:2])
    client = Client(b)
    link_mod.log.disabled = True
    for direction, kind, payload in _records(data[2:]):
        try:
            if direction == 67:                  # 'C'
                go_on = client.client_frame(kind, payload)
            elif direction == 83:                # 'S'
                go_on = client.server_frame(kind, payload)
            elif direction == 72:                # 'H'
                go_on = client.client_head(kind, payload)
            else:
                go_on = False
        except PgmpError:
            return
        if not go_on:
            break
    client.leave()
