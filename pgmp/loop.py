"""The worker's IO loop: one epoll selector, a timer heap, and the only code that calls accept, recv and send.

Connections are :class:`Endpoint` objects. An endpoint reads into the
loop's shared scratch buffer and hands the bytes to its ``on_data``; what it
cannot send at once is copied into its own unsent queue and the loop is
told to wait for writability. Memory per idle connection is therefore the
Python objects alone: no buffer is kept while nothing is pending.

TLS sits inside the endpoint (``start_tls``): an ssl.SSLObject over memory
BIOs, so the socket still only sees recv and send, handshake bytes that
were already read can be fed in (direct TLS), and nothing blocks. A
plaintext endpoint pays one ``tls is None`` check per read and send.
Decrypted bytes can stay in the SSLObject when reading pauses; epoll does
not know about them, so resume_reading schedules their delivery.
"""
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import ssl
import time

from pgmp.tls import describe as describe_tls_error

log = logging.getLogger("pgmp")

# epoll used directly: the selectors module's per-event bookkeeping costs more than the
# rest of a relayed round trip's Python code.
EVENT_READ = select.EPOLLIN
EVENT_WRITE = select.EPOLLOUT
_EVENT_FAIL = select.EPOLLERR | select.EPOLLHUP
_QUIET_END = 2       # a record's code (PGMP_EV_QUIET_END): the read ended its pair's quiet state
_HANDOFF = 4         # PGMP_EV_HANDOFF: C handed the server over; the next record (PGMP_EV_HANDED) is
_HANDED = 5          # its new client's
_QUEUED = 6          # PGMP_EV_QUEUED: C queued a member client's request (ClientConnection.queued_by_c)
_MEMBER = 7          # PGMP_EV_MEMBER: a member's read that is Python's, in the relay buffer
_BLOCKED = (BlockingIOError, InterruptedError)


class Timer:
    __slots__ = ("deadline", "fn", "args", "cancelled", "loop")

    def __init__(self, deadline, fn, args, loop):
        self.deadline = deadline
        self.fn = fn
        self.args = args
        self.cancelled = False
        self.loop = loop

    def cancel(self):
        if not self.cancelled:
            self.cancelled = True
            self.loop.cancelled_timers += 1


class Loop:
    """A selectors loop with timers; ``run`` returns when ``stop()`` is called."""

    def __init__(self, buffer_size: int = 65536, clock=None, relay: bool | None = None):
        self.clock = clock or time.monotonic
        self.poller = select.epoll()
        self.endpoints: dict[int, "Endpoint"] = {}
        self.buffer_size = buffer_size
        # room for one recv plus a carried-over partial frame of up to buffer_size
        self.scratch = bytearray(2 * buffer_size)
        self.view = memoryview(self.scratch)
        self._timers: list = []
        self._seq = itertools.count()
        self.cancelled_timers = 0
        self.running = False
        self.stopped = False
        self.max_unsent = 4 * buffer_size
        self.lingering = 0                    # closed sockets kept a moment so their last bytes arrive
        # the C relay (pgmp.crelay) reads, walks and forwards armed pairs' traffic in one call per batch
        self.crelay = None
        if relay is None:
            from pgmp import crelay
            relay = crelay.available()
        if relay:
            from pgmp.crelay import CRelay
            # its own buffer: a record's bytes for Python stay there while Python handles the
            # batch's earlier events, which read into scratch; C reads at most buffer_size into
            # it, the rest is room for the Bind heads it rewrites (crelay.REWRITE_ROOM)
            from pgmp.crelay import REWRITE_ROOM
            self.relay_buf = bytearray(buffer_size + REWRITE_ROOM)
            self.relay_view = memoryview(self.relay_buf)
            self.crelay = CRelay(self.relay_buf, buffer_size + REWRITE_ROOM)
        # quiet pairs (crelay.Quiet): the fd of either side -> the ClientConnection; C keeps their
        # bookkeeping while their traffic is plain round trips. Only with the real clock (C's),
        # and not with PGMP_RELAY_QUIET=0.
        self.quiet: dict[int, "Endpoint"] = {}
        self.quiet_free: list = []            # crelay.Quiet states no pair uses
        # the C relay's hand-offs in the batch being applied (Server.handed_off), until their records
        # are: server fd -> (the server, its old client, its new client) as the batch began (an
        # fd may be another endpoint's by the time the record is applied), and new client -> server
        self.handing: dict = {}
        self.handed_clients: dict = {}
        self.members: dict = {}               # fd -> the member of its QUEUED or MEMBER record, likewise
        self.quiet_ok = (self.crelay is not None and self.clock is time.monotonic
                         and os.environ.get("PGMP_RELAY_QUIET", "1") != "0")

    def quiet_state(self):
        """A crelay.Quiet for a pair that starts being quiet: one a pair gave back, or a new one
        (so there are at most as many as pairs were quiet at once, not one per client)."""
        if self.quiet_free:
            return self.quiet_free.pop()
        from pgmp.crelay import Quiet
        return Quiet()

    def quiet_end_all(self) -> None:
        """Take every quiet pair's state into Python: before Python handles anything but a record
        of a pair of its own (an event of its own, a timer), so that what it reads is current."""
        if self.quiet:
            for client in list(dict.fromkeys(self.quiet.values())):
                client.quiet_end()
            self.crelay.quiet_end_all()

    def handoff_end_all(self) -> None:
        """No server is handed over by the C relay (Server.handed_off) until Python allows it again
        (Pool.may_hand_off, asked at the pair's next Python event): what the permissions rest on
        changed."""
        if self.crelay is not None:
            self.crelay.handoff_end_all()

    # -- timers --------------------------------------------------------------
    def call_later(self, delay: float, fn, *args) -> Timer:
        t = Timer(self.clock() + delay, fn, args, self)
        heapq.heappush(self._timers, (t.deadline, next(self._seq), t))
        return t

    def _run_timers(self) -> float | None:
        now = self.clock()
        timers = self._timers
        if self.cancelled_timers > 256 and self.cancelled_timers * 2 > len(timers):
            # login timers of 10,000 idle clients would otherwise sit here for client_login_timeout
            timers[:] = [e for e in timers if not e[2].cancelled]
            heapq.heapify(timers)
            self.cancelled_timers = 0
        if self.quiet and timers and timers[0][0] <= now:
            self.quiet_end_all()
        while timers and timers[0][0] <= now:
            _, _, t = heapq.heappop(timers)
            if t.cancelled:
                self.cancelled_timers -= 1
                continue
            t.cancelled = True              # fired: a later cancel() must not count it
            try:
                t.fn(*t.args)
            except Exception:
                log.exception("timer callback %r failed", t.fn)
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
            self.cancelled_timers -= 1
        if not timers:
            return None
        return max(0.0, timers[0][0] - self.clock())

    # -- registration --------------------------------------------------------
    def register(self, ep: "Endpoint", mask: int):
        self.poller.register(ep.fd, mask)
        self.endpoints[ep.fd] = ep

    def modify(self, ep: "Endpoint", mask: int):
        self.poller.modify(ep.fd, mask)

    def unregister(self, ep: "Endpoint"):
        try:
            self.poller.unregister(ep.fd)
        except (OSError, ValueError):
            pass
        if self.endpoints.get(ep.fd) is ep:
            del self.endpoints[ep.fd]

    def close(self):
        self.poller.close()

    # -- the loop ------------------------------------------------------------
    def run(self):
        self.running = True
        self.stopped = False
        while self.running:
            self.run_once()

    def run_once(self, max_timeout: float = 1.0):
        timeout = self._run_timers() if self._timers else None
        if self.stopped:
            return                          # a timer stopped the loop: do not wait out a poll
        if timeout is None or timeout > max_timeout:
            timeout = max_timeout
        if self.crelay is not None:
            self._run_relayed(timeout)
            return
        endpoints = self.endpoints
        for fd, ev in self.poller.poll(timeout):
            ep = endpoints.get(fd)
            if ep is None:
                continue
            if ev & _EVENT_FAIL:
                ev |= EVENT_READ | EVENT_WRITE
            try:
                ep.handle_event(ev)
            except Exception as exc:        # one connection's bug must not stop the worker
                _internal_error(ep, exc)

    def _run_relayed(self, timeout: float):
        """One batch through the C relay: apply what it relayed, handle the rest as run_once does."""
        recs = self.crelay.poll(self.poller.fileno(), timeout)
        endpoints = self.endpoints
        codes = recs[2::10]
        if codes and max(codes) >= _HANDOFF:
            self._batch_endpoints(recs)
        elif self.handing or self.members:
            self.handing, self.handed_clients, self.members = {}, {}, {}
        members = self.members
        for i in range(0, len(recs), 10):
            ep = endpoints.get(recs[i])
            try:
                code = recs[i + 2]
                if code:
                    if code >= _HANDOFF:
                        if code == _HANDOFF:
                            self._handed_off(self.handing.pop(recs[i]), recs, i)
                        elif code >= _QUEUED:
                            if ep is not None and ep is members.get(recs[i]) and not ep.closed:
                                if code == _QUEUED:
                                    ep.queued_by_c(recs[i + 3])
                                else:
                                    ep.rx += recs[i + 3]
                                    ep._relayed_to_python(0, recs[i + 3])
                        continue                    # (_HANDED: taken in with the record before it)
                    if code == _QUIET_END:          # the pair's quiet state first, then the record
                        client = self.quiet.get(recs[i])
                        if client is not None:
                            client.quiet_end(True)
                    if ep is None or not ep.relayed(recs[i + 3], recs[i + 4], recs[i + 5], recs[i + 6],
                                                    recs[i + 7], recs[i + 8], recs[i + 9]):
                        self._relay_lost(recs[i], recs[i + 9])
                    continue
                if self.quiet:                      # Python's event: what it reads must be current
                    client = self.quiet.get(recs[i])
                    if client is not None:
                        client.quiet_end()
                    else:
                        self.quiet_end_all()
                if ep is None:
                    continue
                ev = recs[i + 1]
                if ev & _EVENT_FAIL:
                    ev |= EVENT_READ | EVENT_WRITE
                ep.handle_event(ev)
                if not ep.closed:
                    ep.relay_check()
            except Exception as exc:        # one connection's bug must not stop the worker
                _internal_error(ep, exc)

    def _batch_endpoints(self, recs: list) -> None:
        """The endpoints of the batch's hand-offs and member records as it began (see handing and
        members): a record applied after an earlier one closed its endpoint must not reach
        another that took the fd."""
        get = self.endpoints.get
        handing, handed, members = {}, {}, {}
        for i in range(0, len(recs), 10):
            code = recs[i + 2]
            if code == _HANDOFF:
                srv, new = get(recs[i]), get(recs[i + 10])
                handing[recs[i]] = (srv, get(recs[i + 9]), new)
                if new is not None:
                    handed[new] = srv
            elif code >= _QUEUED:
                members[recs[i]] = get(recs[i])
        self.handing, self.handed_clients, self.members = handing, handed, members

    def _handed_off(self, snap: tuple, recs: list, i: int) -> None:
        """A hand-off's two records (crelay: the server's at ``i``, its new client's after it), with
        the endpoints the batch began with."""
        srv, old, new = snap
        try:
            if srv is None or srv.closed or self.endpoints.get(recs[i]) is not srv:
                # the server is gone (its fd may be another's now): the new client's request with it
                if new is not None and not new.closed:
                    self.crelay.disarm(new.fd)
                    new.handoff_lost()
                return
            srv.handed_off(old, new, recs[i + 3], recs[i + 6], recs[i + 7], recs[i + 13], recs[i + 14],
                           recs[i + 16], recs[i + 17])
        except Exception:
            if new is not None and not new.closed and new.server is None:
                new.handoff_lost()          # (its request went out: never to be sent again)
            raise
        finally:
            self.handed_clients.pop(new, None)

    def _relay_lost(self, fd: int, peer_fd: int):
        """C relayed bytes of ``fd`` to ``peer_fd`` after Python had changed the pair (an earlier
        record of the batch closed or re-linked it): the peer has bytes pgmp did not follow."""
        peer = self.endpoints.get(peer_fd)
        log.warning("relayed bytes of socket %d reached %s after their pair changed; closing it",
                    fd, peer or f"socket {peer_fd}")
        if peer is not None and not peer.closed:
            peer.relay_orphaned()

    def stop(self):
        self.running = False
        self.stopped = True


def _internal_error(ep, exc: Exception) -> None:
    """An exception escaped a connection's handler: log it and close that connection only."""
    log.exception("internal error on %s", ep)
    try:
        ep.fail(exc)
    except Exception:
        log.exception("error while closing %s", ep)


def _sent_split(views: list, sent: int) -> list[bytes]:
    """Copies of the parts of ``views`` beyond the first ``sent`` bytes."""
    rest = []
    for v in views:
        ln = len(v)
        if sent >= ln:
            sent -= ln
            continue
        rest.append(bytes(v[sent:]))
        sent = 0
    return rest


class TlsLayer:
    """An ssl.SSLObject between an endpoint's socket and its plaintext, fed through memory BIOs.

    Ciphertext read from the socket goes into ``incoming``; what the SSLObject
    writes (handshake, records, alerts) comes out of ``outgoing`` and joins the
    endpoint's unsent queue like any other bytes.
    """
    __slots__ = ("obj", "incoming", "outgoing", "ready")

    def __init__(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.ready = False                     # the handshake is done

    def buffered(self) -> bool:
        """Received bytes wait here, decrypted or not (epoll cannot know); during the handshake, never."""
        return self.ready and (self.incoming.pending > 0 or self.obj.pending() > 0)

    def seal(self, data) -> bytes:
        """``data`` as TLS records for the socket; b"" before the handshake is done (nothing may go out)."""
        if not self.ready:
            return b""
        view = memoryview(data)
        while view:
            view = view[self.obj.write(view):]
        return self.outgoing.read()


class Endpoint:
    """One non-blocking socket in the loop: reading, sending with an unsent queue, backpressure."""
    __slots__ = ("loop", "sock", "fd", "outq", "unsent", "reading", "mask", "closed",
                 "leftover", "need", "skip", "paused_peer", "rx", "tls", "relay_peer", "__weakref__")

    def __init__(self, loop: Loop, sock: socket.socket, events: int = EVENT_READ):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.outq: list | tuple = ()           # bytes not sent yet, in order (a list while any; () saves an idle one's list)
        self.unsent = 0
        self.reading = bool(events & EVENT_READ)
        self.closed = False
        self.leftover: bytes | None = None    # unprocessed bytes carried to the next read
        self.need = 0                          # bytes the leftover must reach before it is worth processing
        self.skip = 0                          # bytes of a streamed frame still to pass through
        self.paused_peer = None                # the endpoint that stopped reading because of us
        self.rx = 0                            # bytes received, for the stats
        self.tls: TlsLayer | None = None       # set by start_tls: then every byte goes through it
        self.relay_peer: "Endpoint | None" = None   # armed in the C relay with this peer (pgmp.crelay)
        self.mask = events
        sock.setblocking(False)
        loop.register(self, events)

    # -- events --------------------------------------------------------------
    def handle_event(self, mask: int):
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and self.reading and not self.closed:
            self.read()

    def read(self):
        if self.tls is not None:
            self._tls_read()
            return
        loop = self.loop
        lo = self.leftover
        k = len(lo) if lo else 0
        size = loop.buffer_size
        try:
            if k > size or (k and self.need > k + size):
                # a frame larger than one read being assembled (bounded by its type's limit):
                # append in place and look at it again only once it is complete
                chunk = self.sock.recv(size)
                n = len(chunk)
                if n:
                    self.rx += n
                    if type(lo) is not bytearray:
                        lo = bytearray(lo)
                    lo += chunk
                    if len(lo) < self.need:
                        self.leftover = lo
                        return
                    self.leftover = None
                    self.need = 0
                    self.on_data(memoryview(lo), len(lo))
                    return
            else:
                view = loop.view
                if k:
                    loop.scratch[:k] = lo
                n = self.sock.recv_into(view[k:k + size])
                if n:
                    self.rx += n
                    self.leftover = None
                    self.need = 0
                    self.on_data(view, k + n)
                    return
        except _BLOCKED:
            return
        except (ConnectionError, OSError) as exc:
            self.on_eof(f"read error: {exc.strerror or exc}")
            return
        self.on_eof("closed by peer")

    def receive(self, size: int) -> bytes | None:
        """One plain recv, for the answer to a negotiation before on_data takes over.

        None when nothing has arrived yet, b"" at end of stream; an OSError goes to the caller.
        """
        try:
            return self.sock.recv(size)
        except _BLOCKED:
            return None

    def kick(self):
        """Process carried-over bytes now (after a state change made them processable)."""
        lo = self.leftover
        if lo and not self.closed:
            self.leftover = None
            self.need = 0
            self.on_data(memoryview(lo), len(lo))

    # -- sending -------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self.tls is not None:
            self._tls_send(data)
            return
        self._send_raw(data)

    def _send_raw(self, data) -> None:
        """Send bytes as they are (TLS records once sealed): what the socket does not take now is queued."""
        if self.outq:
            self._enqueue(bytes(data))
            return
        try:
            sent = self.sock.send(data)
        except _BLOCKED:
            sent = 0
        except OSError as exc:
            self._write_failed(exc)
            return
        if sent < len(data):
            self._enqueue(bytes(data[sent:]))
            self._want_write()

    def _enqueue(self, data: bytes) -> None:
        """Queue ``data`` after anything unsent (outq is () while nothing is)."""
        if self.outq:
            self.outq.append(data)
        else:
            self.outq = [data]
        self.unsent += len(data)

    def send_views(self, views: list) -> None:
        """Send byte ranges (memoryviews into a buffer the caller will reuse) with one writev."""
        if self.closed or not views:
            return
        if self.tls is not None:
            self._tls_send(b"".join(views))
            return
        if len(views) == 1:
            self.send(views[0])
            return
        if self.outq:
            for v in views:
                self._enqueue(bytes(v))
            return
        try:
            sent = self.sock.sendmsg(views)
        except _BLOCKED:
            sent = 0
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:         # more ranges than IOV_MAX: send one by one
                for v in views:
                    self.send(v)
                return
            self._write_failed(exc)
            return
        total = sum(len(v) for v in views)
        if sent < total:
            self.outq = _sent_split(views, sent)
            self.unsent += total - sent
            self._want_write()

    def _write_failed(self, exc: OSError):
        """A send failed: drop what is queued and close from the loop, not from inside the caller."""
        self.outq = ()
        self.unsent = 0
        if not self.closed:
            self.pause_reading()
            self.loop.call_later(0, self._eof_later, f"write error: {exc.strerror or exc}")

    def _eof_later(self, reason: str):
        if not self.closed:
            self.on_eof(reason)

    def flush(self):
        while self.outq and not self.closed:
            try:
                if len(self.outq) == 1:
                    sent = self.sock.send(self.outq[0])
                else:
                    sent = self.sock.sendmsg(self.outq[:512])
            except _BLOCKED:
                return
            except OSError as exc:
                self._write_failed(exc)
                return
            self.unsent -= sent
            rest = _sent_split(self.outq[:512], sent) + self.outq[512:]
            self.outq = rest if rest else ()
            if rest and sent == 0:
                return
        if not self.outq and not self.closed:
            self._update_mask()
            self.on_drained()

    def on_drained(self):
        """All queued data went out: resume the peer we paused."""
        peer = self.paused_peer
        if peer is not None:
            self.paused_peer = None
            peer.resume_reading()

    @property
    def congested(self) -> bool:
        return self.unsent > self.loop.max_unsent

    def hold_until_drained(self, src: "Endpoint"):
        """Backpressure: stop reading ``src`` until our unsent data is gone."""
        src.pause_reading()
        self.paused_peer = src

    # -- interest ------------------------------------------------------------
    def _want_write(self):
        self._update_mask()

    def pause_reading(self):
        if self.reading:
            self.reading = False
            self._update_mask()

    def resume_reading(self):
        if not self.reading and not self.closed:
            self.reading = True
            self._update_mask()
            if self.tls is not None and self.tls.buffered():
                # decrypted data waits in the TLS layer: epoll will not report it
                self.loop.call_later(0, self._tls_deliver)

    def _update_mask(self):
        if self.closed:
            return
        mask = (EVENT_READ if self.reading else 0) | (EVENT_WRITE if self.outq else 0)
        if mask != self.mask:
            loop = self.loop
            if loop.crelay is not None and (mask ^ self.mask) & EVENT_WRITE:
                loop.crelay.blocked(self.fd, bool(mask & EVENT_WRITE))   # C must not send past our queue
            if self.mask == 0:
                loop.register(self, mask)
            elif mask == 0:
                loop.unregister(self)
            else:
                loop.modify(self, mask)
            self.mask = mask

    # -- TLS -----------------------------------------------------------------
    def start_tls(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None,
                  received=b"") -> None:
        """Encrypt this connection from now on; ``received``: handshake bytes already read (direct TLS).

        As the TLS client, the hello goes out at once; as the TLS server, pgmp waits
        for the peer's. on_tls_ready or on_tls_failed reports how the handshake ended.
        """
        self.tls = TlsLayer(context, server_side, server_hostname)
        if received:
            self.tls.incoming.write(received)
        if received or not server_side:
            self._tls_handshake()

    def _tls_handshake(self) -> bool:
        """One handshake step with what has arrived; True once it is done (and the endpoint still open)."""
        tls = self.tls
        try:
            tls.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_output()
            return False
        except ssl.SSLError as exc:
            self._tls_output()                 # the alert that tells the peer why
            self.on_tls_failed(exc)
            return False
        tls.ready = True
        self._tls_output()
        self.on_tls_ready()
        return not self.closed

    def _tls_read(self):
        """Ciphertext from the socket into the TLS layer; then the handshake, or plaintext to on_data."""
        loop = self.loop
        tls = self.tls
        try:
            n = self.sock.recv_into(loop.view[:loop.buffer_size])
        except _BLOCKED:
            return
        except (ConnectionError, OSError) as exc:
            self.on_eof(f"read error: {exc.strerror or exc}")
            return
        if n:
            tls.incoming.write(loop.view[:n])
        else:
            tls.incoming.write_eof()
        if tls.ready or self._tls_handshake():
            self._tls_deliver()
        if not n and not self.closed:
            self.on_eof("closed by peer")

    def _tls_deliver(self):
        """Hand decrypted bytes to on_data as read() does, until none is left or reading pauses."""
        loop = self.loop
        view = loop.view
        size = loop.buffer_size
        ended = None
        while self.reading and not self.closed and ended is None:
            lo = self.leftover
            k = len(lo) if lo else 0
            # a frame larger than one read being assembled: append in place, as read() does, and
            # look at it again only once complete (copying it whole at every read is quadratic)
            big = k > size or (k and self.need > k + size)
            if k and not big:
                loop.scratch[:k] = lo
            start = 0 if big else k
            got, ended = self._tls_decrypt(view[start:start + size])
            if not got:
                break
            self.rx += got
            if big:
                if type(lo) is not bytearray:
                    lo = bytearray(lo)
                lo += view[:got]
                if len(lo) < self.need:
                    self.leftover = lo
                    continue
                self.leftover = None
                self.need = 0
                self.on_data(memoryview(lo), len(lo))
            else:
                self.leftover = None
                self.need = 0
                self.on_data(view, k + got)
        if not self.closed:
            if ended is not None:
                self.on_eof(ended)
            elif self.tls.outgoing.pending:
                self._tls_output()             # e.g. a TLS 1.3 KeyUpdate answer

    def _tls_decrypt(self, into: memoryview) -> tuple[int, str | None]:
        """Decrypt into ``into``: (bytes written, why the stream ended or None)."""
        tls = self.tls
        obj = tls.obj
        got, size = 0, len(into)
        try:
            while got < size:                  # one record per read: fill the buffer for one on_data
                if not tls.buffered() and not tls.incoming.eof:
                    break                      # nothing to decrypt: a read would only raise SSLWantReadError
                m = obj.read(size - got, into[got:])
                if not m:
                    break
                got += m
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return got, "closed by peer"
        except ssl.SSLError as exc:
            return got, f"TLS error: {describe_tls_error(exc)}"
        return got, None

    def _tls_send(self, data) -> None:
        try:
            out = self.tls.seal(data)
        except ssl.SSLError as exc:
            self._write_failed(exc)
            return
        if out:
            self._send_raw(out)

    def _tls_output(self) -> None:
        out = self.tls.outgoing.read()
        if out:
            self._send_raw(out)

    def _tls_close_notify(self) -> None:
        """Best effort: tell the peer the stream ends here (close_notify), without waiting for its answer."""
        tls = self.tls
        if not tls.ready:
            return
        try:
            tls.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        out = tls.outgoing.read()
        if out:
            try:
                self.sock.send(out)
            except OSError:
                pass

    # -- closing -------------------------------------------------------------
    def close_socket(self, linger: bool = False):
        """Close now; with ``linger`` (after a final ErrorResponse) the socket is half-closed and
        kept a moment while what the peer still sends is read and dropped: closing with unread
        bytes would make the kernel reset the connection and drop the error on its way out."""
        if self.closed:
            return
        self.closed = True
        self.unrelay()
        if self.mask:
            self.loop.unregister(self)
            self.mask = 0
        if self.loop.crelay is not None:
            self.loop.crelay.disarm(self.fd)             # (armed by C in a hand-off, or as a peer)
            self.loop.crelay.blocked(self.fd, False)     # the fd number will be reused
        if self.tls is not None and not self.outq:
            self._tls_close_notify()
        if linger and not self.outq and self.loop.lingering < MAX_LINGERING:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                _Linger(self.loop, self.sock)
            except OSError:
                linger = False
        if not linger:
            try:
                self.sock.close()
            except OSError:
                pass
        self.outq = ()
        self.leftover = None
        peer = self.paused_peer
        if peer is not None:
            self.paused_peer = None
            peer.resume_reading()

    def send_and_close(self, data: bytes):
        """Best effort: send a final message (an ErrorResponse) and close (lingering)."""
        if not self.closed and data:
            try:
                if self.tls is not None:
                    data = self.tls.seal(data)          # an SSLError is an OSError
                if data and not self.outq:
                    self.sock.send(data)
            except OSError:
                pass
        self.close_socket(linger=True)

    # -- the C relay ---------------------------------------------------------
    def relay_arm(self, peer: "Endpoint", sc, peer_sc, side: int, pooled: bool = False,
                  limits=None, peer_limits=None) -> None:
        """Arm this endpoint and ``peer`` for each other in the C relay (``side``: ours, 0 client;
        ``pooled``: transaction mode's rules; ``limits``: crelay.Limits for each side, or None)."""
        crelay = self.loop.crelay
        if self.relay_peer is peer and peer.relay_peer is self:
            return
        self.unrelay()
        peer.unrelay()
        if crelay.arm(self.fd, peer.fd, sc, side, pooled, limits) and \
                crelay.arm(peer.fd, self.fd, peer_sc, 1 - side, pooled, peer_limits):
            self.relay_peer = peer
            peer.relay_peer = self
        else:
            crelay.disarm(self.fd)
            crelay.disarm(peer.fd)

    def unrelay(self) -> None:
        """Disarm this endpoint and its peer: Python handles their events again."""
        peer = self.relay_peer
        if peer is not None:
            quiet = self.loop.quiet
            if quiet:
                client = quiet.get(self.fd)
                if client is not None:
                    client.quiet_end()
            crelay = self.loop.crelay
            self.relay_peer = None
            crelay.disarm(self.fd)
            if peer.relay_peer is self:
                peer.relay_peer = None
                crelay.disarm(peer.fd)

    def relayed(self, n: int, sent: int, good: int, count: int, kind: int, sync: int, peer_fd: int) -> bool:
        """A record of the C relay (see pgmp.crelay); False if the pair changed since it was armed."""
        peer = self.relay_peer
        if peer is None or peer.fd != peer_fd or self.closed:
            if good or self.closed:
                return False
            # Nothing of it went to the old peer: the bytes are Python's, as if it had read them now.
            self.rx += n
            self._relayed_to_python(0, n)
            return True
        self.rx += n
        if count or sync:
            self.relay_counted(count, kind, sync)
        elif good:
            self.relay_uncounted()
        if sent < good and not peer.closed:
            peer.queue(self.loop.relay_view[sent:good])
            if peer.congested:
                peer.hold_until_drained(self)
        if good < n and not self.closed:
            self._relayed_to_python(good, n)
        return True

    def _relayed_to_python(self, start: int, n: int) -> None:
        """The relay buffer's [start:n] is for on_data: through the scratch buffer, as a read."""
        loop = self.loop
        loop.scratch[0:n - start] = loop.relay_view[start:n]
        self.on_data(loop.view, n - start)
        if not self.closed:
            self.relay_check()

    def queue(self, data) -> None:
        """Bytes the C relay could not send: to the unsent queue, before anything sent later."""
        if self.closed:
            return
        self._enqueue(bytes(data))
        self._want_write()

    def relay_counted(self, count: int, kind: int, sync: int) -> None:
        """The C relay passed ``count`` counted frames (requests or ReadyForQuery): tell the Link."""
        raise NotImplementedError

    def relay_uncounted(self) -> None:
        """The C relay passed frames of this endpoint's that it does not count (no request, no
        ReadyForQuery)."""

    def relay_check(self) -> None:
        """After Python handled an event: arm or disarm this endpoint's pair in the C relay."""

    def relay_orphaned(self) -> None:
        """The C relay sent this endpoint bytes pgmp did not follow: it cannot be trusted."""
        self.on_eof("relayed bytes pgmp did not follow")

    # -- hooks ---------------------------------------------------------------
    def on_partial(self, kind: int, view, pos: int, n: int, length: int):
        """A reported frame split across reads (relay): by default it is seen at its header."""
        self.on_frame(kind, None, pos, length)
        return None

    def on_data(self, view: memoryview, n: int):
        raise NotImplementedError

    def on_eof(self, reason: str):
        raise NotImplementedError

    def fail(self, exc: Exception):
        self.on_eof(f"internal error: {exc!r}")

    def on_tls_ready(self):
        """The TLS handshake is done: decisions that depend on the peer's certificate go here."""

    def on_tls_failed(self, exc: Exception):
        self.on_eof(f"TLS handshake failed: {describe_tls_error(exc)}")


LINGER_TIME = 2.0        # seconds a closed client's socket waits for the peer to close its side
MAX_LINGERING = 256      # sockets lingering per loop at most; beyond, close at once


class _Linger(Endpoint):
    """A socket we closed for writing after our last message: reads and drops what the peer still
    sends until it closes too, LINGER_TIME passes or LINGER_BYTES have come."""
    __slots__ = ("timer", "budget")
    LINGER_BYTES = 4 << 20

    def __init__(self, loop, sock):
        super().__init__(loop, sock)
        loop.lingering += 1
        self.budget = self.LINGER_BYTES
        self.timer = loop.call_later(LINGER_TIME, self.close_socket)

    def read(self):
        view = self.loop.view
        while True:
            try:
                n = self.sock.recv_into(view)
            except _BLOCKED:
                return
            except OSError:
                n = 0
            self.budget -= n
            if not n or self.budget <= 0:
                self.close_socket()
                return

    def close_socket(self, linger: bool = False):
        if self.closed:
            return
        self.loop.lingering -= 1
        self.timer.cancel()
        super().close_socket()
