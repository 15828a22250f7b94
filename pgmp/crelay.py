"""The C relay (csrc/pgmp_relay.c): one call per epoll batch reads, walks and forwards plain traffic.

The loop (pgmp.loop) uses it in place of ``epoll.poll`` when the C helper is
built and PGMP_IMPL is not "python". A pair of plaintext endpoints in plain
traffic is *armed*: both sockets, each with the other as its peer and the
flags table of its current scanner. In session mode that is any traffic with
nothing held back; in transaction mode (``pooled``) only while nothing but
simple Queries and unnamed extended batches is in flight (Link.c_relay_ok).
C then passes only a Query whose text has no word that may change session
state (pgmp_sql_trigger; or one INSERT, UPDATE, DELETE, or a bare BEGIN,
COMMIT, ROLLBACK), an unnamed Parse/Bind/Describe/Execute batch whole up to
its Sync whose text passes the same test or is such a command (its shape is
the record's kind, from which Link.queries_relayed appends what
Pipeline.client_frame would), a Bind/Describe/Execute/Sync batch of a named
statement in the client's binds table (Binds: the statements its current
server has, by client name, made by Link.bound_statements and kept in step at
every relay_check; C rewrites the Bind to the server name in the relay buffer,
in the room the buffer keeps for it, and the record names the entry), and
a whole answer through its ReadyForQuery whose frames answer what was sent
(no ErrorResponse, no session command's CommandComplete, each within its
type's length limit, Limits): Pipeline.answered pops what it answered. An event on an
armed socket is then handled in C: recv into the loop's relay buffer, a walk
over the frames, send of the leading frames Python need not see (types
without F_REPORT, and the F_COUNT ones: requests and ReadyForQuery are
counted), and a record:

    fd, events, code, n, sent, good, count, kind, sync, peer

``code`` 0: C did nothing, Python handles the event as before. 1: C read
``n`` bytes into the relay buffer and sent ``[0:sent]`` to ``peer``;
``[sent:good]`` is for the peer's unsent queue, ``[good:n]`` for the
endpoint's ``on_data`` (a frame Python must see, a partial frame or a bad
header), ``count``/``kind``/``sync`` summarise the counted frames in
``[0:good]`` for the Link. Python applies records in order, so the Link sees
every frame in the order it crossed pgmp, and a pair is relayed at most once
per batch, and not after an event of it that Python handles, so that its first
record is taken in before its state moves on. The relay buffer is the C
relay's own: the bytes a record leaves for Python (at most one record per batch
leaves any) stay there while Python handles the batch's earlier events, which
read into the loop's scratch buffer.

Disarming is eager: every change that could make C's choice of peer or
scanner wrong (close, attach, detach, a state change, an internal query, a
scanner change) disarms the pair first; arming is lazy, after Python handled
an event of the pair (Endpoint.relay_check). The Python relay stays the
reference: PGMP_IMPL=python runs without this module.

In transaction mode a server at its client's transaction boundary may stay
linked and armed, *held* (pgmp.pool.Pool.hold), so that the client's next
Query goes through C too. C marks it (``hold``): an event of a held server is
Python's (data or EOF while idle), and C's first read of its client's bytes
clears the mark. Another client may take a held server only while the mark is
still set (``held``): otherwise bytes of its client were read in this batch
and their record is still to come.

A pair whose traffic is plain round trips (simple Queries; session mode's
extended messages through their Sync; transaction mode's unnamed batches and
named ones of a binds table whose statements have no session effects) may be *quiet*
(Quiet): ClientConnection.quiet_start, after an answer's record, when nothing
Python follows is in flight (Link.quiet_ok) and, in transaction mode, its
server was just held. C then writes no record for its plain reads and keeps
what Link.queries_relayed and ready_relayed would have recorded (and, in
transaction mode, holds the server again at each transaction's end, as
Pool.hold would); a poll whose events were all such reads waits on. The first
read that is not plain ends it: its record's code is 2, and the loop takes in
what C kept (ClientConnection.quiet_end, Link.rounds_relayed) before it
applies the record. Python ends every quiet pair before it handles anything
else, an event of its own or a timer (Loop.quiet_end_all), and when a pair is
disarmed, so that whatever it reads or decides sees the current state.
"""
import errno
import math

from pgmp.prepared import BATCH_KIND, BATCH_NAMED, KIND_STMT_SHIFT
from pgmp.protocol import scanner as _scanner

REC = 10          # int32 fields per record (PGMP_R_SIZE)
REWRITE_ROOM = 4096   # PGMP_REWRITE_ROOM: the relay buffer's room for rewritten Bind heads
MAX_EVENTS = 256


class CRelay:
    """The C relay's table of armed sockets, and the batch poll."""
    __slots__ = ("_lib", "_ffi", "_r", "_buf", "_size", "_recs", "_unpack", "_poll", "_arm", "_disarm")

    def __init__(self, scratch: bytearray, size: int):
        from pgmp._scan import ffi, lib
        self._ffi, self._lib = ffi, lib
        r = lib.pgmp_relay_new()
        if r == ffi.NULL:
            raise MemoryError("pgmp_relay_new")
        self._r = ffi.gc(r, lib.pgmp_relay_free)
        self._buf = ffi.from_buffer(scratch)       # the loop's relay buffer, never resized
        self._size = size
        self._recs = ffi.new("int32_t[]", 2 * MAX_EVENTS * REC)     # (a hand-off writes two records)
        self._unpack = ffi.unpack
        self._poll = lib.pgmp_relay_poll
        self._arm = lib.pgmp_relay_arm
        self._disarm = lib.pgmp_relay_disarm

    def poll(self, epfd: int, timeout: float) -> list[int]:
        """One epoll_wait (``timeout`` in seconds) and the relay of what it can: the records, flat."""
        ms = math.ceil(timeout * 1000) if timeout > 0 else 0
        k = self._poll(self._r, epfd, ms, self._buf, self._size, self._recs, MAX_EVENTS)
        if k < 0:
            if -k == errno.EINTR:
                return []
            raise OSError(-k, "epoll_wait failed")
        return self._unpack(self._recs, k * REC) if k else []

    def arm(self, fd: int, peer: int, sc, side: int, pooled: bool = False, limits=None) -> bool:
        """Relay ``fd``'s input to ``peer`` with scanner ``sc``'s flags (side 0 client, 1 server);
        ``pooled``: transaction mode's rules; ``limits``: a Limits table for the counted types."""
        lim = limits.c if limits is not None else self._ffi.NULL
        return self._arm(self._r, fd, peer, sc._flags, sc._max, side, 1 if pooled else 0, lim) == 0

    def disarm(self, fd: int) -> None:
        self._disarm(self._r, fd)

    def blocked(self, fd: int, blocked: bool) -> None:
        self._lib.pgmp_relay_blocked(self._r, fd, 1 if blocked else 0)

    def armed(self, fd: int) -> bool:
        return bool(self._lib.pgmp_relay_is_armed(self._r, fd))

    def hold(self, fd: int, held: bool) -> None:
        """Mark the armed server ``fd`` held (between its client's transactions) or not."""
        self._lib.pgmp_relay_hold(self._r, fd, 1 if held else 0)

    def held(self, fd: int) -> bool:
        """``fd`` is armed and still held: C has read none of its client's bytes since the mark."""
        return bool(self._lib.pgmp_relay_held(self._r, fd))

    def binds(self, fd: int, binds: "Binds | None") -> None:
        """Give the armed pooled client ``fd`` its binds table (None: none)."""
        self._lib.pgmp_relay_binds(self._r, fd, binds.c if binds is not None else self._ffi.NULL)

    def quiet(self, fd: int, quiet: "Quiet | None") -> None:
        """Give the armed client ``fd`` its quiet state (None: none)."""
        self._lib.pgmp_relay_quiet(self._r, fd, quiet.c if quiet is not None else self._ffi.NULL)

    def quiet_end_all(self) -> None:
        """A new quiet epoch: a pair still quiet ends at its next read (Python ends them first)."""
        self._lib.pgmp_relay_quiet_end_all(self._r)

    def quiet_reads(self) -> int:
        """Reads C kept in quiet state, since the worker started."""
        return self._lib.pgmp_relay_quiet_reads(self._r)

    def epoch(self) -> int:
        return self._lib.pgmp_relay_epoch(self._r)

    def handoff(self, fd: int, queue: "CQueue | None", owed: int, tag: int = 0) -> None:
        """The armed pooled server ``fd``, whose settings have ``tag``, may be handed over to
        ``queue``'s first client at its client's transaction end, if that one's tag is the same
        (None or tag 0: to none), until handoff_end_all; its client has ``owed`` requests
        outstanding (Link.outstanding)."""
        self._lib.pgmp_relay_handoff(self._r, fd, queue.c if queue is not None else self._ffi.NULL, owed, tag)

    def handoff_end_all(self) -> None:
        """A new hand-off epoch: no server is handed over by C until Python allows it again."""
        self._lib.pgmp_relay_handoff_end_all(self._r)

    def take_rest(self, fd: int) -> bytes:
        """What a hand-off to server ``fd`` could not send of the request (b"": nothing)."""
        lib, ffi = self._lib, self._ffi
        n = lib.pgmp_relay_take_rest(self._r, fd, ffi.NULL, 0)
        if n <= 0:
            return b""
        out = bytearray(n)
        lib.pgmp_relay_take_rest(self._r, fd, ffi.from_buffer(out), n)
        return bytes(out)

    def handoffs(self) -> int:
        """Servers C handed over, since the worker started."""
        return self._lib.pgmp_relay_handoffs(self._r)

    def retire(self) -> None:
        """A statement name left the worker's cache: every binds table made before is stale."""
        self._lib.pgmp_relay_retire(self._r)


class CQueue:
    """A pool's queue of waiting clients in C memory (pgmp_queue), kept in step with Pool.waiting
    (pgmp.pool.WaitQueue): with each client the request it waits with, when C may send it to the
    server it hands over (Server.handed_off)."""
    __slots__ = ("c", "_lib", "_ffi")

    def __init__(self):
        from pgmp._scan import ffi, lib
        q = lib.pgmp_queue_new()
        if q == ffi.NULL:
            raise MemoryError("pgmp_queue_new")
        self.c = ffi.gc(q, lib.pgmp_queue_free)
        self._lib, self._ffi = lib, ffi

    def push(self, fd: int, data, sc, tag: int = 0) -> int:
        """``fd`` joins the end: 1 if C may hand it a server of settings ``tag`` with ``data`` (its
        request, scanned with scanner ``sc``'s flags), 0 if only Python may, -1 out of memory (not
        queued in C)."""
        if data is None or not tag:
            return self._lib.pgmp_queue_push(self.c, fd, self._ffi.NULL, 0, self._ffi.NULL, 0, 0)
        return self._lib.pgmp_queue_push(self.c, fd, data, len(data), sc._flags, sc._max, tag)

    def remove(self, fd: int) -> bool:
        """``fd`` leaves the queue; False if it was not in it (C handed it a server in this batch)."""
        return self._lib.pgmp_queue_remove(self.c, fd) == 1

    def block(self, fd: int) -> None:
        """Only Python may hand ``fd`` a server now (what it waits with changed)."""
        self._lib.pgmp_queue_block(self.c, fd)

    def data(self, fd: int) -> bytes | None:
        """The request ``fd``'s entry holds (a member's, which C queued: ClientConnection.queued_by_c),
        or None if ``fd`` is not in the queue."""
        lib, ffi = self._lib, self._ffi
        n = lib.pgmp_queue_data(self.c, fd, ffi.NULL, 0)
        if n < 0:
            return None
        out = bytearray(n)
        lib.pgmp_queue_data(self.c, fd, ffi.from_buffer(out), n)
        return bytes(out)

    def clear(self) -> None:
        self._lib.pgmp_queue_clear(self.c)

    def __len__(self) -> int:
        return self._lib.pgmp_queue_len(self.c)


class Quiet:
    """One client's quiet state in C memory (pgmp_quiet): while its pair's traffic is plain round
    trips, C keeps the Link's bookkeeping of them (the requests outstanding, the status, the
    clocks, the pool's counts and histograms, the bytes read) and writes no record.
    ClientConnection.quiet_start starts it, quiet_end takes what C kept into the Link, the pool's
    stats and the endpoints."""
    __slots__ = ("c", "_lib")

    def __init__(self):
        from pgmp._scan import ffi, lib
        from pgmp.stats import BUCKETS_US
        self.c = ffi.new("pgmp_quiet *")
        self._lib = lib
        if len(BUCKETS_US) >= lib.PGMP_HIST_MAX:
            raise ValueError("more histogram buckets than pgmp_quiet holds")
        self.c.nbounds = len(BUCKETS_US)
        for i, b in enumerate(BUCKETS_US):
            self.c.bounds[i] = b

    def start(self, hold: bool, status: int, t_query: float, t_xact: float, t_ready: float) -> None:
        self._lib.pgmp_quiet_start(self.c, 1 if hold else 0, status, t_query, t_xact, t_ready)

    def take(self, link, binds: "Binds | None" = None) -> bool:
        """What C kept of the pair's requests and answers, into ``link`` (Link.rounds_relayed),
        and the client's binds table's flag as C left it into ``binds``; False if it kept none."""
        c = self.c
        if binds is not None:
            binds.enabled = binds.c_enabled()
        if not (c.readies or c.outstanding):
            return False
        used = [binds.entries[c.used[i]] for i in range(c.nused)] if binds is not None else []
        link.rounds_relayed(self.kinds(), c.last_batch, c.status, c.t_query, c.t_xact, c.t_ready,
                            c.readies, c.query_us, c.query_hist, c.xacts, c.xact_us, c.xact_hist,
                            used, binds.entries if binds is not None else None)
        return True

    def kinds(self) -> list[int]:
        """The outstanding requests' types, oldest first."""
        c = self.c
        n = len(c.kinds)
        return [c.kinds[(c.head + i) % n] for i in range(c.outstanding)]


class Limits:
    """A per-type table of the largest length word accepted (a tuple of 256 ints, as
    pgmp.server.RELAY_LIMITS), held in C memory for as long as this object lives."""
    __slots__ = ("c",)

    def __init__(self, table):
        from pgmp._scan import ffi
        self.c = ffi.new("uint32_t[256]", [min(v, 0xffffffff) for v in table])


class Binds:
    """One pooled client's named statements as the C relay may bind them on its current server
    (pgmp_binds): client name -> server name, in C memory, and ``entries``, the same in Python, by
    the index C reports (Link.bound_statements makes them). ``tag`` says what they were made
    from; ``enabled`` mirrors the table's flag as far as Python knows (C clears it when it passes
    a Query)."""
    __slots__ = ("c", "entries", "tag", "enabled", "plain", "_lib")

    def __init__(self):
        from pgmp._scan import ffi, lib
        t = lib.pgmp_binds_new()
        if t == ffi.NULL:
            raise MemoryError("pgmp_binds_new")
        self.c = ffi.gc(t, lib.pgmp_binds_free)
        self._lib = lib
        self.entries: list = []
        self.tag = None
        self.enabled = False
        self.plain = True          # no entry's statement has session effects (a quiet pair may bind them)

    def fill(self, entries: list, epoch: int, tag) -> bool:
        """Make the table ``entries`` (client name, server name, ...), disabled; False when C ran
        out of memory (then it is left empty)."""
        lib, t = self._lib, self.c
        lib.pgmp_binds_reset(t, epoch)
        self.enabled = False
        self.tag = tag
        for i, e in enumerate(entries):
            name, sname = e[0], e[1]
            if lib.pgmp_binds_add(t, name, len(name), sname, len(sname)) != i:
                lib.pgmp_binds_reset(t, epoch)
                self.entries = []
                self.plain = True
                return False
        self.entries = entries
        self.plain = not any(e[3] for e in entries)
        return True

    def enable(self, ok: bool) -> None:
        self._lib.pgmp_binds_enable(self.c, 1 if ok else 0)
        self.enabled = ok

    def sync(self, relay: CRelay, fd: int, link, attach: bool) -> None:
        """Bring the table in step with the pooled ``link`` (its statements, its server's, the
        worker's cache: Link.bound_statements), enabled while no simple Query is unanswered;
        ``attach``: give it to the client ``fd``'s slot (just armed, or a new table)."""
        pl = link.pipeline
        srv = link.server.statements
        tag = (pl.version, srv, srv.version, pl.cache.evictions)
        if tag != self.tag:
            self.fill(link.bound_statements(), relay.epoch(), tag)
        ok = bool(self.entries) and not pl.query_unanswered()
        if ok != self.enabled or attach:        # (newly armed: C's flag may differ from ours)
            self.enable(ok)
        if attach:
            relay.binds(fd, self)

    def relayed(self, link, count: int, kind: int) -> int:
        """A record of the client's requests C passed, for ``link`` (Link.queries_relayed with
        this table's entries); returns how many bytes more C sent than the client did (the
        Binds it rewrote). A Query C passed disabled the table (C clears its flag)."""
        if kind < BATCH_KIND:
            link.queries_relayed(count, kind)
            self.enabled = False
            return 0
        link.queries_relayed(count, kind, self.entries)
        if kind & BATCH_NAMED:
            name, sname = self.entries[kind >> KIND_STMT_SHIFT][:2]
            return count * (len(sname) - len(name))
        return 0

    def answered(self, relay: CRelay, fd: int, link) -> None:
        """The client's server answered through C: a Query that disabled the table may be
        answered now."""
        if not self.enabled:
            self.sync(relay, fd, link, False)

    def c_enabled(self) -> bool:
        """The flag as C has it (for tests)."""
        return bool(self._lib.pgmp_binds_enabled(self.c))


def walk(buf: bytes, flags: bytes, max_len: int, side: int, pooled: bool = False,
         limits: Limits | None = None, binds: Binds | None = None):
    """The C relay's frame walk over ``buf`` alone: (good, count, kind, sync), for tests; with
    ``binds``, (good, count, kind, bytes): the bytes as the walk rewrote them."""
    from pgmp._scan import ffi, lib
    rec = ffi.new("int32_t[]", REC)
    room = bytearray(buf) + bytearray(lib.PGMP_REWRITE_ROOM)
    lib.pgmp_relay_walk(ffi.from_buffer(room), len(buf), len(room), ffi.from_buffer(flags), max_len, side,
                        1 if pooled else 0, limits.c if limits is not None else ffi.NULL,
                        binds.c if binds is not None else ffi.NULL, rec)
    if binds is not None:
        return rec[5], rec[6], rec[7], bytes(room[:rec[3]])
    return rec[5], rec[6], rec[7], rec[8]


def sql_trigger(text: bytes) -> bool:
    """The C prefilter of a pooled Query's text (see pgmp.protocol.sql's _TRIGGER), for tests."""
    from pgmp._scan import ffi, lib
    return bool(lib.pgmp_sql_trigger(bytes(text), len(text)))


def sql_control(text: bytes) -> int:
    """The C relay's bare transaction command test (pgmp_sql_control): "b", "c", "r" as ints, or 0."""
    from pgmp._scan import ffi, lib
    return lib.pgmp_sql_control(bytes(text), len(text))


def sql_dml(text: bytes) -> bool:
    """The C relay's one-INSERT/UPDATE/DELETE test (pgmp_sql_dml), for tests."""
    from pgmp._scan import ffi, lib
    return bool(lib.pgmp_sql_dml(bytes(text), len(text)))


def available() -> bool:
    """The C relay is used: the C helper is built and picked (PGMP_IMPL is not "python")."""
    return _scanner.IMPL == "c"
