"""A client connection in the worker loop: login handled by pgmp itself, then traffic relayed to a linked server.

The state machine is pgmp.session's; this module is its IO glue.
"""
import logging
import os
import struct
import sys
from functools import partial

from pgmp import console, errors, tls
from pgmp.auth.authfile import scram_keys
from pgmp.auth.client import ClientAuthenticator, _printable
from pgmp.errors import AuthenticationFailed, ClientProtocolError, PgmpError
from pgmp.loop import Endpoint
from pgmp.protocol import messages, startup
from pgmp.protocol.scanner import ERR_SHORT, ERR_TYPE, Scanner, make_flags
from pgmp.link import CLOSE, REUSE, Link
from pgmp.prepared import Pipeline
from pgmp.relay import ASSEMBLE, FORWARD, REPLACE, STOP, WAIT, relay
from pgmp.session import SHARED_PARAMETERS, ClientState, SharedDict, check_transition, client_settings, login_parameters

log = logging.getLogger("pgmp")

FRONTEND_TYPES = b"BCcdDEfFHPQSX"
SMALL_TYPES = b"CDEHSXcf"
# Session mode: requests, the ends of COPY, and Parse/Bind/Execute (a client that leaves before
# their Sync leaves the server mid-batch).
# The C relay passes requests and Parse/Bind/Execute itself and counts them for the Link.
READY_FLAGS = make_flags(report=b"QSFcfXPBE", small=SMALL_TYPES, valid=FRONTEND_TYPES, count=b"QSFPBE")
# Transaction and statement mode also follow the extended protocol message by message; the C
# relay passes a Query itself when its text has no word that may change session state, and an
# unnamed Parse/Bind/Describe/Execute batch, whole up to its Sync, whose text has none either
# (pgmp_relay.h's PGMP_KIND_BATCH).
POOLED_FLAGS = make_flags(report=b"QSFcfXPBCDE", small=SMALL_TYPES, valid=FRONTEND_TYPES, count=b"QPBDES")
# Close and Describe are small; a named Parse is assembled (its text is the statement's key);
# a Bind and an unnamed Parse stream, with only their heads rewritten (on_partial).
POOLED_WHOLE = bytes(1 if i in b"CD" else 0 for i in range(256))
HEAD_MAX = 2 * 64 + 16            # two names of at most NAMEDATALEN bytes each, with their NULs
AUTH_FLAGS = make_flags(report=bytes(range(256)), small=b"X", valid=b"pX")
NO_WHOLE = bytes(256)
ALL_WHOLE = bytes([1]) * 256
AUTH_MAX_MESSAGE = 65535 + 1024     # PG_MAX_AUTH_TOKEN_LENGTH plus the SASL header
# A client over max_client_conn is refused once its StartupMessage arrives (after an SSLRequest's
# TLS handshake, as PostgreSQL does); one that sends none is refused after this long, not at
# client_login_timeout: refused connections must not pile up holding descriptors.
REFUSE_GRACE = 2.0
# The admin console: every message whole (a query is a few words), none larger than this.
CONSOLE_FLAGS = make_flags(report=bytes(range(256)), small=b"", valid=FRONTEND_TYPES)
CONSOLE_MAX_MESSAGE = 65536
EXTENDED_TYPES = b"PBEDCSH"

_auth_scanner = Scanner(AUTH_FLAGS, AUTH_MAX_MESSAGE)
_ready_scanners: dict[tuple[bytes, int], Scanner] = {}


def ready_scanner(flags: bytes, max_message_size: int) -> Scanner:
    sc = _ready_scanners.get((flags, max_message_size))
    if sc is None:
        sc = _ready_scanners[(flags, max_message_size)] = Scanner(flags, max_message_size)
    return sc


# A pair whose quiet state its first read ended QUIET_MISSES times in a row (its traffic is not
# plain: a SET per transaction, statements of session effects) lets QUIET_SKIP answers pass
# before it is tried again, so that it does not pay for a start and an end each time.
QUIET_MISSES, QUIET_SKIP = 3, 32


class ClientConnection(Endpoint):
    __slots__ = ("worker", "state", "peer", "user", "database", "reported", "pool", "server",
                 "auth", "auth_method", "secret_entry", "link", "key_pid", "key_secret", "timer", "scanner", "flags",
                 "whole", "terminating", "ssl_asked", "gss_asked", "connected_at", "over_limit", "wait_started",
                 "close_at_boundary", "replacement", "cancelled_at", "settings_pending", "logged_in",
                 "conn_id", "peer_cred", "console", "console_waiting", "binds", "quiet", "quiet_srv", "quiet_skip", "quiet_misses", "c_queued")

    def __init__(self, worker, sock, peer: str, over_limit: bool = False, peer_cred=None):
        super().__init__(worker.loop, sock)
        self.worker = worker
        self.state = ClientState.STARTUP
        self.peer = peer
        self.user = ""
        self.database = ""
        self.reported: dict[str, str] = {}
        self.pool = None
        self.server = None
        self.auth = None
        self.auth_method = ""                      # while auth_query looks the user up
        self.secret_entry = None
        self.link = Link()                         # replaced at startup, with the client's settings
        self.key_pid = 0
        self.key_secret = 0
        self.scanner = _auth_scanner
        self.flags = AUTH_FLAGS
        self.whole = ALL_WHOLE
        self.terminating = False
        self.ssl_asked = False
        self.gss_asked = False
        self.connected_at = worker.loop.clock()
        self.over_limit = over_limit
        self.wait_started = 0.0
        self.close_at_boundary = False
        self.replacement = b""
        self.cancelled_at = 0.0                    # query_timeout: the query already cancelled
        self.settings_pending = False              # waiting for the server to accept our settings
        self.logged_in = False                     # AuthenticationOk .. ReadyForQuery sent
        self.conn_id = worker.next_conn_id()       # the id of SHOW CLIENTS and KILL_CLIENT
        self.peer_cred = peer_cred                 # (pid, uid, gid) of a unix socket peer (SO_PEERCRED)
        self.console = None                        # the admin console session (pgmp.console)
        self.console_waiting = False               # its reading paused until the console answers
        self.binds = None                          # transaction mode: crelay.Binds, once it has statements
        self.quiet = None                          # crelay.Quiet, while its pair is quiet
        self.quiet_srv = None                      # the server of its quiet pair, while quiet
        self.quiet_skip = 0                        # answers to let pass before it tries quiet again
        self.quiet_misses = 0                      # quiet states in a row that a first read ended
        self.c_queued = 0                          # queued by the C relay: its request's bytes, kept there
        timeout = worker.config.client_login_timeout
        if over_limit:
            timeout = min(timeout, REFUSE_GRACE) if timeout > 0 else REFUSE_GRACE
        self.timer = worker.loop.call_later(timeout, self._login_timeout) if timeout > 0 else None

    def __repr__(self):
        return f"<client {self.user or '?'}@{self.database or '?'} from {self.peer} {self.state.value}>"

    def set_state(self, new: ClientState) -> None:
        check_transition(self.state, new)
        if self.relay_peer is not None:
            self.unrelay()
        self.state = new

    # -- the C relay (pgmp.crelay) ---------------------------------------------------
    def relay_check(self):
        """Arm this client and its server in the C relay while their traffic is plain relaying
        (session mode; in transaction mode, simple Queries and unnamed extended batches), with nothing
        held back on either side;
        disarm otherwise."""
        srv = self.server
        if self.loop.crelay is None:
            return
        link = self.link
        if (srv is not None and self.state is ClientState.ACTIVE and not self.settings_pending
                and self.tls is None and srv.tls is None and self.leftover is None and not self.skip
                and srv.leftover is None and not srv.skip and not self.terminating and self.console is None
                and not link.copy_in and srv.relay_ready() and not self.closed and not srv.closed
                and (not link.pooled or link.c_relay_ok())):
            if link.pooled:
                armed = self.relay_peer is not srv
                if armed:
                    self.relay_arm(srv, self.scanner, srv.scanner, 0, True, None, srv.c_limits())
                    if srv.held and self.relay_peer is srv:
                        self.loop.crelay.hold(srv.fd, True)
                if self.relay_peer is srv:
                    if self.binds is not None or link.pipeline.bound:
                        self.relay_binds(armed)
                    waiting = self.pool.waiting
                    if waiting.c is not None:
                        # the hand-off (Server.handed_off): allowed or not, as things are now
                        tag = self.pool.may_hand_off(srv, self) if waiting else 0
                        self.loop.crelay.handoff(srv.fd, waiting.c if tag else None, link.outstanding, tag)
            else:
                self.relay_arm(srv, self.scanner, srv.scanner, 0)
        elif self.relay_peer is not None:
            self.unrelay()

    def relay_binds(self, attach: bool = False):
        """Transaction mode, armed: the C relay's binds table in step with the Link (crelay.Binds)."""
        binds = self.binds
        if binds is None:
            from pgmp.crelay import Binds
            binds = self.binds = Binds()
            attach = True
        binds.sync(self.loop.crelay, self.fd, self.link, attach)

    def quiet_start(self, srv):
        """After a ReadyForQuery record of this armed pair: let the C relay keep the pair's
        bookkeeping while its traffic is plain round trips (crelay.Quiet), when nothing that
        Python follows is in flight and no one else needs the server. In transaction mode only
        a held server's pair (Pool.hold said yes at this boundary), which C holds again at each
        transaction's end until Python ends it: every Python event and timer ends every quiet
        pair first (Loop.quiet_end_all), so the pool's conditions for a hold are asked again
        within a second, and at once when a client queues."""
        if self.quiet_skip:
            self.quiet_skip -= 1
            return
        link = self.link
        crelay = self.loop.crelay
        if link.pooled and not (srv.held and not self.pool.waiting and crelay.held(srv.fd)):
            return                                  # (under contention nothing is held: cheap first)
        binds = self.binds
        if binds is not None:                       # named statements: only those without session effects
            if self.relay_peer is srv:
                self.relay_binds()
            if not binds.plain:
                return
        if (self.relay_peer is not srv or self.leftover is not None or self.skip
                or srv.leftover is not None or srv.skip or self.unsent or srv.unsent or self.close_at_boundary
                or srv.cancel_pending or self.settings_pending or not link.quiet_ok()):
            return
        q = self.quiet = self.loop.quiet_state()
        q.start(link.pooled, link.status, link.t_query, link.t_xact, link.t_ready)
        crelay.quiet(self.fd, q)
        self.quiet_srv = srv
        quiet = self.loop.quiet
        quiet[self.fd] = self
        quiet[srv.fd] = self

    def quiet_end(self, by_read: bool = False):
        """Take what the C relay kept of the quiet pair into the Link, the pool and the endpoints;
        the pair's records are Python's again. ``by_read``: C ended it, at a read that was not
        plain (a record with code 2)."""
        srv = self.quiet_srv
        quiet = self.loop.quiet
        quiet.pop(self.fd, None)
        quiet.pop(srv.fd, None)
        self.quiet_srv = None
        q = self.quiet
        self.quiet = None
        c = q.c
        c.on = 0
        self.loop.crelay.quiet(self.fd, None)      # C lets go of it before the loop reuses it
        self.rx += c.rx_client
        srv.rx += c.rx_server
        if q.take(self.link, self.binds) or c.rx_client:
            self.quiet_misses = 0
        elif by_read:                               # its first read was not plain
            self.quiet_misses += 1
            if self.quiet_misses >= QUIET_MISSES:   # again and again: this pair's traffic is not
                self.quiet_misses = 0
                self.quiet_skip = QUIET_SKIP
        if c.hold:
            self.pool.quiet_held(srv, c.assigns, c.t_used, bool(c.outstanding) or c.status != 73, c.xacts > 0)
        self.loop.quiet_free.append(q)

    def relay_counted(self, count, kind, sync):
        link = self.link
        if link.pooled:
            srv = self.server
            if srv.held:
                self.pool.reuse_held(srv, True)
            # in pooled mode only plain Queries, bare BEGIN, COMMIT, ROLLBACK, and extended
            # batches of unnamed statements or of ones in the binds table pass C
            if self.binds is None:
                link.queries_relayed(count, kind)
            else:
                self.rx -= self.binds.relayed(link, count, kind)     # rx: what the client sent
            return
        for _ in range(count):
            link.client_frame(kind)
        if sync:
            link.unsynced = sync == 1

    def relay_uncounted(self):
        srv = self.server
        if srv is not None and srv.held and self.relay_peer is srv:
            # no request among them (a Flush, stray CopyData): Python has seen the read, so the
            # server is free to take again; C cleared its mark when it read them
            self.loop.crelay.hold(srv.fd, True)

    def relay_orphaned(self):
        self.fail(PgmpError(errors.CONNECTION_FAILURE, "server connection lost",
                            detail="pgmp relayed bytes after the session's server had changed"))

    # -- input -------------------------------------------------------------------
    def on_data(self, view, n):
        st = self.state
        try:
            if st is ClientState.ACTIVE and not self.settings_pending:
                srv = self.server
                if srv is not None and srv.held:
                    if not srv.quiet():             # it sent a FATAL or closed meanwhile: another one
                        srv.close("server sent data or closed while idle")
                        self._need_server(view, n)
                        return
                    self.pool.reuse_held(srv, False)
                if self.skip or not self._one_frame(view, n):
                    out: list = []
                    relay(self, view, n, out)
                    srv = self.server
                    if out and srv is not None:
                        srv.send_views(out)
                        if srv.congested:
                            srv.hold_until_drained(self)
                pl = self.link.pipeline
                if pl is not None and pl.expect and pl.expect[0][0] == 30:     # SYNTHETIC first
                    self.send(pl.synthetic_ready())
                if self.terminating:
                    self.close("client sent Terminate")
            elif st is ClientState.IDLE:
                self._need_server(view, n)
            elif st is ClientState.STARTUP:
                self._startup_data(view, n)
            elif st is ClientState.AUTH or st is ClientState.CONSOLE:
                relay(self, view, n, [])
            elif st is ClientState.WAITING:         # queued for a server (_need_server): keep it for then
                if not self.pool.waiting.block(self):   # (not what the C relay would send any more)
                    self.request_lost()
                    return
                lo = self.leftover
                self.leftover = lo = lo + view[:n] if lo else bytes(view[:n])
                if len(lo) >= self.loop.max_unsent:
                    self.pause_reading()
            else:                                   # AUTH_LOOKUP / LOGIN_WAIT: keep it for later
                self.leftover = bytes(view[:n])
                self.pause_reading()
        except PgmpError as exc:
            self.fail(exc)

    def _one_frame(self, view, n) -> bool:
        """The common cases without the generic relay, True if taken: a read of whole frames of
        which one needs a look (session mode), or of one simple Query alone (pooled mode: what a
        client that waited for a server sends; CopyData is counted, not reported, so the Query
        must be the whole read)."""
        sc = self.scanner
        if sc.scan(view, 0, n) != 1 or sc.consumed != n or sc.error:
            return False
        kind, off, ln = sc.frame(0)
        link = self.link
        if link.pooled:
            if kind != 81 or off or ln != n:
                return False
            r = link.client_frame(81, bytes(view[5:n]))     # as on_frame
            data = view[:n] if r is None else r
        elif kind == 88:
            return False
        else:
            link.client_frame(kind)
            data = view[:n]
        srv = self.server
        srv.send(data)
        if srv.congested:
            srv.hold_until_drained(self)
        return True

    def _need_server(self, view, n):
        if view[0] == 88 and n >= 5:                  # Terminate with no server: just leave
            self.close("client sent Terminate")
            return
        if self.pool.link_idle(self):                 # the common case: no queueing, no copy
            if self.settings_pending:
                self.leftover = bytes(view[:n])
            else:
                self.on_data(view, n)
            return
        # Reading goes on while it waits: its EOF ends the wait at once, and what more it sends
        # joins what waits (up to max_unsent, then reading pauses). The pool times the wait.
        self.leftover = bytes(view[:n])
        self.set_state(ClientState.WAITING)
        self.wait_started = self.loop.clock()
        self.pool.request(self)

    def on_frame(self, kind, view, off, ln):
        if self.console is not None:
            return self._console_frame(kind, view, off, ln)
        if self.state is ClientState.ACTIVE:
            if kind == 88:                            # Terminate: the pooled server stays
                self.terminating = True
                return STOP
            link = self.link
            if kind == 80 and ln > self.worker.config.max_parse_size and link.pooled and view is not None \
                    and view[off + 5]:
                self._check_parse_size(ln)          # a named Parse that fit in one read
            r = link.client_frame(kind, bytes(view[off + 5:off + ln])
                                  if link.pooled and view is not None and kind in b"PBCDEQ" else None)
            if r is None:
                return FORWARD
            self.replacement = r
            return REPLACE
        # AUTH
        if kind == 88:
            self.close("client sent Terminate during login")
            return STOP
        auth = self.auth
        reply = auth.feed(bytes(view[off + 5:off + ln]))
        if reply:
            self.send(reply)
        if auth.done:
            self._authenticated()
            return STOP
        if auth.pending is not None:
            # a key derivation (PBKDF2): in a thread, so that the other sessions go on meanwhile
            self.pause_reading()
            self.worker.deriver.submit(scram_keys, auth.pending, partial(self._derived, auth))
            return STOP
        return 1                                    # DROP

    def _derived(self, auth, keys, error):
        """The key derivation of ``auth.pending`` is done (in the loop again)."""
        if self.closed or self.auth is not auth:
            return
        try:
            if error is not None:
                raise error
            reply = auth.derived(keys)
            if reply:
                self.send(reply)
            if auth.done:
                self._authenticated()
                return
        except Exception as exc:
            self.fail(exc)
            return
        self.resume_reading()
        self.kick()

    def on_partial(self, kind, view, pos, n, length):
        """A Bind or Parse too large for one read, in transaction mode: rewrite its head, stream the rest."""
        if not self.link.pooled or self.state is not ClientState.ACTIVE or (kind != 66 and kind != 80):
            self.on_frame(kind, None, pos, length)
            return None
        head = bytes(view[pos + 5:min(n, pos + 5 + HEAD_MAX)])
        names = 2 if kind == 66 else 1
        if head.count(b"\0") < names:
            if n - pos - 5 >= HEAD_MAX:
                raise ClientProtocolError("invalid statement or portal name in message")
            return WAIT
        if kind == 80 and head[0] != 0:                 # Parse: only an unnamed one can stream
            self._check_parse_size(length)
            return ASSEMBLE                             # its text is the statement's key
        return self.link.client_head(kind, head, length)

    def _check_parse_size(self, length: int) -> None:
        limit = self.worker.config.max_parse_size
        if length > limit:
            raise PgmpError(errors.PROGRAM_LIMIT_EXCEEDED,
                            f"prepared statement too large for transaction pooling: {length} bytes, "
                            f"more than max_parse_size ({limit})",
                            hint="pgmp holds a named statement's text to prepare it on any server: raise "
                                 "max_parse_size, or use an unnamed statement")

    def framing_error(self, code, view, off):
        kind = view[off]
        if code == ERR_TYPE:
            if self.state is ClientState.AUTH:
                raise ClientProtocolError(f"expected password response, got message type {kind}")
            raise ClientProtocolError(f"invalid frontend message type {kind}")
        if code == ERR_SHORT:
            raise ClientProtocolError("invalid message length")
        (length,) = struct.unpack_from("!I", view, off + 1) if len(view) >= off + 5 else (0,)
        raise ClientProtocolError(f"message of type {kind} too long: {length} bytes",
                                  detail="max_message_size limits client messages")

    # -- startup -----------------------------------------------------------------
    def _startup_data(self, view, n):
        if view[0] == 0x16 and self.tls is None and not (self.ssl_asked or self.gss_asked):
            self._direct_tls(view, n)           # a TLS record where a packet length should be
            return
        pos = 0
        while pos < n and self.state is ClientState.STARTUP:
            if n - pos < 4:
                break
            length = startup.packet_length(view[pos:pos + 4])
            if n - pos < length:
                break
            packet = startup.parse(bytes(view[pos:pos + length]))
            pos += length
            if packet.kind == "ssl":
                self._negotiate("ssl", n - pos)
            elif packet.kind == "gssenc":
                self._negotiate("gssenc", n - pos)
            elif packet.kind == "cancel":
                # held open until the server has taken the cancel, as PostgreSQL does
                self.pause_reading()
                self.worker.cancel_request(packet.cancel_pid, packet.cancel_secret,
                                           done=lambda: self.close(None))
                return
            else:
                self._startup(packet)
        if self.closed:
            return
        if pos < n:
            rest = bytes(view[pos:n])
            if self.state is ClientState.STARTUP:
                self.leftover = rest
            else:
                self.on_data(memoryview(rest), len(rest))

    def _negotiate(self, what: str, pending: int):
        """SSLRequest: 'S' and the TLS handshake, or 'N' (client_tls_mode disable). GSSENCRequest: 'N'.

        ``pending`` bytes arrived after the request. Before a handshake they would be
        taken for part of the encrypted stream (CVE-2021-23214), and after an 'N' a
        client has no reason to send anything unanswered: refused either way, as
        PostgreSQL and PgBouncer do.
        """
        name = "SSL request" if what == "ssl" else "GSSAPI encryption request"
        if self.tls is not None:
            raise ClientProtocolError(f"{name} inside an encrypted connection")
        if what == "ssl":
            if self.ssl_asked:
                raise ClientProtocolError("duplicate SSLRequest")
            self.ssl_asked = True
        else:
            if self.gss_asked:
                raise ClientProtocolError("duplicate GSSENCRequest")
            self.gss_asked = True
        if pending:
            raise ClientProtocolError(f"received unencrypted data after {name}",
                                      detail="This could be either a client-software bug or evidence "
                                             "of an attempted man-in-the-middle attack.")
        context = self.worker.client_tls if what == "ssl" else None
        if context is None:
            self.send(b"N")                     # the client may go on in cleartext or ask for TLS next
            return
        self.send(b"S")
        self.start_tls(context, server_side=True)

    def _direct_tls(self, view, n):
        """PostgreSQL 17's direct TLS (sslnegotiation=direct): the connection opens with a ClientHello."""
        context = self.worker.client_tls
        if context is None:
            # The client speaks TLS only: an ErrorResponse in cleartext would be noise to it.
            log.info("client %s: direct TLS attempted, but client_tls_mode is disable; closing", self.peer)
            self.close(None)
            return
        self.start_tls(context, server_side=True, received=view[:n])

    def on_tls_ready(self):
        # PostgreSQL 17 requires ALPN on direct TLS, so that a TLS connection meant for another
        # protocol cannot be turned into a PostgreSQL session.
        if not self.ssl_asked and self.tls.obj.selected_alpn_protocol() != tls.ALPN:
            self.fail(ClientProtocolError("received direct SSL connection request without ALPN protocol "
                                          "negotiation extension"))

    def on_tls_failed(self, exc):
        log.info("client %s: TLS handshake failed: %s", self.peer, tls.describe(exc))
        self.close(None)

    def _startup(self, packet):
        self.user = packet.user
        self.database = packet.database
        if self.over_limit:
            raise self._too_many()
        worker = self.worker
        settings = client_settings(packet)
        if worker.config.application_name_add_host:
            settings["application_name"] = f"{settings.get('application_name', '')} - {self.peer}"
        self.link = Link(settings, worker.tracked_parameters, name=f"{packet.user}@{packet.database}")
        if packet.minor > 0 or packet.unrecognized:
            self.send(messages.negotiate_protocol_version(0, packet.unrecognized))
        if self.database in console.CONSOLE_DATABASES and self._own_user():
            self._console_login(admin=True)
            return
        method = self._auth_method()
        secret = worker.secrets.get(self.user)
        if secret is None and worker.config.auth_user:
            # Not in auth_file: ask PostgreSQL (auth_query) in auth_dbname, else in the client's database.
            # A database pgmp does not know is refused only after authentication, as PostgreSQL does.
            target = worker.auth_query.target(worker.database_for(self.database))
            if target is None:
                self._begin_auth(method, None, f'database "{_printable(self.database)}" is not configured '
                                               "and auth_dbname is not set: auth_query was not run")
                return
            db = target
            self.auth_method = method
            self.set_state(ClientState.AUTH_LOOKUP)
            found = worker.auth_query.lookup(self, db, self.user)
            if found is not None:                   # cached
                self._begin_auth(method, found.secret, found.reason)
            return                                  # else auth_query_done or fail comes later
        self._begin_auth(method, secret, None)

    def auth_query_done(self, found):
        """auth_query answered (``found.secret`` may be None: then the login fails like a wrong password)."""
        if self.closed or self.state is not ClientState.AUTH_LOOKUP:
            return
        try:
            self._begin_auth(self.auth_method, found.secret, found.reason)
        except PgmpError as exc:
            self.fail(exc)
            return
        if self.state is ClientState.AUTH:
            self.resume_reading()
            self.kick()

    def _begin_auth(self, method: str, secret, missing: str | None):
        """Start the authentication exchange against ``secret`` (None: ``missing`` says why, for the log)."""
        worker = self.worker
        self.secret_entry = secret
        if method == "trust" and secret is None and (worker.config.auth_file or worker.config.auth_user):
            raise AuthenticationFailed(f'user "{self.user}" is not in auth_file',
                                       reason=f"trust: {missing or 'user not in auth_file'}",
                                       sqlstate=errors.INVALID_AUTHORIZATION)
        mock = worker.mock
        self.auth = ClientAuthenticator(method, self.user, secret, mock_seed=mock.seed,
                                        mock_iterations=mock.iterations, mock_md5=mock.md5,
                                        channel_binding=tls.channel_binding(self.tls), missing=missing,
                                        defer=True)
        first = self.auth.start()
        self.set_state(ClientState.AUTH)
        self.scanner, self.flags, self.whole = _auth_scanner, AUTH_FLAGS, ALL_WHOLE
        if first:
            self.send(first)
        if self.auth.done:
            self._authenticated()

    def _auth_method(self) -> str:
        """auth_type, or the method of the first hba_file rule that matches this client.

        TLS requirements are enforced here, before any authentication exchange:
        client_tls_mode, hostssl rules, clientcert=, and the cert method (a verified
        client certificate whose CN is the user name; it then logs in as trust does).
        """
        worker = self.worker
        encrypted = self.tls is not None
        addr = None if self.peer == "unix" else self.peer.rsplit(":", 1)[0]
        self._check_tls_mode(addr, encrypted)
        if worker.hba is None:
            return worker.config.auth_type
        from pgmp import hba
        conn_type = "local" if addr is None else "host"
        rule = worker.hba.match(conn_type=conn_type, database=self.database, user=self.user, addr=addr,
                                tls=encrypted)
        if rule is None:
            raise AuthenticationFailed(hba.no_match_message(addr=addr, user=self.user, database=self.database,
                                                            tls=encrypted),
                                       reason="no hba_file rule matches", sqlstate=errors.INVALID_AUTHORIZATION)
        where = f"hba_file line {rule.lineno}"
        if rule.method == "reject":
            raise AuthenticationFailed(
                f'pg_hba.conf rejects connection for host "{addr or "[local]"}", user "{self.user}", '
                f'database "{self.database}", {"SSL encryption" if encrypted else "no encryption"}',
                reason=f"{where}: reject", sqlstate=errors.INVALID_AUTHORIZATION)
        if rule.method == "cert":
            if "map" in rule.options:
                raise AuthenticationFailed(f'certificate authentication failed for user "{self.user}"',
                                           reason=f"{where}: cert with map= is not supported by pgmp",
                                           sqlstate=errors.INVALID_AUTHORIZATION)
            self._check_certificate(where, "cert")
            return "trust"
        if "clientcert" in rule.options:
            self._check_certificate(where, rule.options["clientcert"])
        return rule.method

    def _check_tls_mode(self, addr: str | None, encrypted: bool) -> None:
        """client_tls_mode require, verify-ca and verify-full refuse TCP clients without TLS (verify-*: without
        a verified certificate; verify-full: one whose CN is not the user name). Unix socket clients are
        exempt: libpq never uses TLS on them."""
        mode = self.worker.config.client_tls_mode
        if addr is None or mode not in ("require", "verify-ca", "verify-full"):
            return
        if not encrypted:
            raise AuthenticationFailed(f'TLS is required for connections from host "{addr}"',
                                       reason=f"client_tls_mode = {mode}: the client did not ask for TLS",
                                       sqlstate=errors.INVALID_AUTHORIZATION)
        if mode != "require":
            # verify-full: the certificate must also name the user (CN), whatever the hba rule says,
            # refused as the cert method refuses
            self._check_certificate(f"client_tls_mode = {mode}", "cert" if mode == "verify-full" else "verify-ca")

    def _check_certificate(self, where: str, check: str) -> None:
        """A verified client certificate is required; "verify-full" and "cert" also want its CN = the user name."""
        obj = self.tls.obj if self.tls is not None else None
        if obj is None or not obj.getpeercert():
            raise AuthenticationFailed("connection requires a valid client certificate",
                                       reason=f"{where}: no verified client certificate"
                                              + ("" if self.worker.config.client_tls_ca_file
                                                 else " (client_tls_ca_file is not set)"),
                                       sqlstate=errors.INVALID_AUTHORIZATION)
        if check == "verify-ca":
            return
        name = tls.peer_common_name(obj)
        if name != self.user:
            message = (f'certificate authentication failed for user "{self.user}"' if check == "cert" else
                       f'certificate validation (clientcert=verify-full) failed for user "{self.user}": CN mismatch')
            raise AuthenticationFailed(message, reason=f"{where}: certificate CN {name!r} is not the user name",
                                       sqlstate=errors.INVALID_AUTHORIZATION)

    def _authenticated(self):
        worker = self.worker
        if self.database in console.CONSOLE_DATABASES:
            self.auth = None
            self._console_login(admin=None)
            return
        db = worker.database_for(self.database)
        if db is None:
            raise self._no_database()
        if db.name in worker.disabled_dbs:
            raise PgmpError(console.NOT_IN_PREREQUISITE_STATE, f'database "{db.name}" is disabled',
                            hint="an administrator ran DISABLE on the admin console; ENABLE lets clients in again")
        self.pool = worker.get_pool(db, self.user)
        self.pool.learn_credentials(self.auth, self.secret_entry)
        self.auth = None
        self.set_state(ClientState.LOGIN_WAIT)
        if self.pool.mode == "session":
            # Session mode is a direct connection: the client's server is linked before its login
            # ends, so BackendKeyData carries the server's real pid (pg_backend_pid, NOTIFY,
            # pg_terminate_backend behave as without pgmp) and ParameterStatus its real values.
            self.wait_started = self.loop.clock()
            self.pool.request(self)
            return
        params = self.pool.want_params(self)
        if params is not None:
            self.finish_login(params)

    def _no_database(self) -> PgmpError:
        return PgmpError(errors.INVALID_CATALOG_NAME, f'database "{self.database}" does not exist',
                         hint="pgmp knows only the databases in its [databases] sections")

    def finish_login(self, params: dict[str, str], srv=None):
        """The pool knows its server parameters (session mode: ``srv`` is the client's server): complete the login."""
        if self.closed:
            return
        worker = self.worker
        link = self.link
        reported = login_parameters(params, link.settings)
        # most clients see the same values as many others (often the pool's): one dict for all
        # until one changes (memory per idle client; see report)
        self.reported = SHARED_PARAMETERS.get(reported)
        self.user = sys.intern(self.user)        # logged in: one string per name, not per client
        self.database = sys.intern(self.database)
        self.key_pid, self.key_secret = worker.new_cancel_key(self, srv.backend_pid if srv is not None else 0)
        out = [messages.auth_ok()]
        for name, value in self.reported.items():
            out.append(messages.parameter_status(name, value))
        out.append(messages.backend_key_data(self.key_pid, self.key_secret))
        out.append(messages.ready_for_query(b"I"))
        self.send(b"".join(out))
        self.logged_in = True
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if srv is None:
            self.set_state(ClientState.IDLE)
        self.pool.clients[self] = None
        self.pool.stats.login_count += 1
        if self.pool.mode == "session":
            flags, whole = READY_FLAGS, NO_WHOLE
            link.logged_in(self.loop.clock, self.pool.stats)
        else:
            flags, whole = POOLED_FLAGS, POOLED_WHOLE
            link.logged_in(self.loop.clock, self.pool.stats,
                           Pipeline(worker.statement_cache, worker.config.max_prepared_statements > 0,
                                    worker.config.max_prepared_size),
                           statement_mode=self.pool.mode == "statement")
        self.scanner, self.flags, self.whole = ready_scanner(flags, worker.config.max_message_size), flags, whole
        if worker.config.log_connections:
            log.info("login: user=%s db=%s from %s", self.user, self.database, self.peer)
        self.resume_reading()
        self.kick()

    # -- admin console -------------------------------------------------------------
    def _own_user(self) -> bool:
        """Over the unix socket, pgmp's own OS user logging in as user pgmp or pgbouncer (peer authentication)."""
        cred = self.peer_cred
        return cred is not None and cred[1] == os.getuid() and self.user in console.CONSOLE_USERS

    def _console_login(self, admin: bool | None):
        """An authenticated client of the console (``admin`` None: admin_users or stats_users decide)."""
        cfg = self.worker.config
        if admin is None:
            if self.user in cfg.admin_users:
                admin = True
            elif self.user in cfg.stats_users:
                admin = False
            else:
                raise AuthenticationFailed(f'user "{self.user}" is not allowed to use the admin console',
                                           reason="not in admin_users or stats_users",
                                           sqlstate=errors.INVALID_AUTHORIZATION)
        self.set_state(ClientState.CONSOLE)
        self.console = console.Console(_ConsoleHost(self), admin)
        self.key_pid, self.key_secret = self.worker.new_cancel_key(self)
        self.send(console.welcome(self.key_pid, self.key_secret))
        self.logged_in = True
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.scanner = ready_scanner(CONSOLE_FLAGS, CONSOLE_MAX_MESSAGE)
        self.flags, self.whole = CONSOLE_FLAGS, ALL_WHOLE
        if cfg.log_connections:
            log.info("login: user=%s db=%s from %s (admin console, %s)", self.user, self.database, self.peer,
                     "admin" if admin else "stats only")
        self.resume_reading()
        self.kick()

    def _console_frame(self, kind, view, off, ln):
        if kind == 88:                                  # Terminate
            self.close("client sent Terminate")
            return STOP
        if kind in EXTENDED_TYPES:
            raise ClientProtocolError("extended query protocol not supported by admin console",
                                      hint="use the simple query protocol (psql; psycopg's execute() without "
                                           "parameters)")
        if kind != 81:
            raise ClientProtocolError(f"unsupported message type for admin console: {chr(kind)!r}")
        text = bytes(view[off + 5:off + ln]).rstrip(b"\0").decode("utf-8", "replace")
        self.console.query(text)
        if self.console.busy and not self.closed:
            self.console_waiting = True         # the answer comes from the master: the next query waits
            self.pause_reading()
            return STOP
        return 1                                # DROP

    def console_done(self):
        """The console sent ReadyForQuery: read the next query."""
        if self.console_waiting and not self.closed:
            self.console_waiting = False
            self.resume_reading()
            self.kick()

    # -- server link -------------------------------------------------------------
    def attach(self, srv):
        """The pool linked ``srv`` to this client: bring its settings over, then send what waited."""
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.server = srv
        self.set_state(ClientState.ACTIVE)           # (disarms the C relay's pair, if any)
        srv.use_normal_scanner(self.link.pooled)
        q = self.link.attach(srv.session)
        if not self.logged_in:                  # session mode: the login ends once the server has our settings
            if q is None:
                self.finish_login(srv.params, srv)
                return
            self.settings_pending = True
            srv.internal_query(q, self._settings_applied)
            return
        if q is not None:
            # The client's own messages wait for the answer: a setting the server refuses must
            # stop the session before any of its queries runs with the others half applied.
            self.settings_pending = True
            self.pause_reading()
            srv.internal_query(q, self._settings_applied)
            return
        self.resume_reading()
        self.kick()
        if not self.closed:
            # arm the pair now: the pool may link it while applying a C record of the server's
            # (its last client's answer), after which the loop does not look at the pair again
            self.relay_check()

    def queued_by_c(self, n: int):
        """The C relay read this idle client's request, ``n`` bytes, and queued it for a server in
        the pool's queue, where the bytes stay (it was a member: the old client of a hand-off):
        as _need_server does when no server is free. (Not if it closed earlier in the batch:
        its entry went with it, Pool.forget; its fd may be a new connection's now.)"""
        if self.closed or self.pool is None:
            return
        if self.state is not ClientState.IDLE:      # (cannot be) as if Python had read it now
            waiting = self.pool.waiting
            data = waiting.c.data(self.fd) if waiting.c is not None else None
            if data is not None:
                waiting.c.remove(self.fd)
                self.rx += n
                self.on_data(memoryview(data), len(data))
            return
        self.rx += n
        self.c_queued = n
        self.set_state(ClientState.WAITING)
        self.wait_started = self.loop.clock()
        self.pool.queued_by_c(self)

    def request_bytes(self) -> int:
        """Bytes of the request a queued client waits with (in Python or in the C queue)."""
        lo = self.leftover
        return len(lo) if lo is not None else self.c_queued

    def handed(self, srv, sent: int, count: int, kind: int):
        """The C relay handed ``srv`` to this queued client and sent ``sent`` bytes of the request it
        waited with, ``count`` requests of ``kind`` (Server.handed_off; the pool's settings are the
        server's): as attach and the relay of those requests."""
        if self.timer:
            self.timer.cancel()
            self.timer = None
        data = self.leftover
        self.leftover = None
        self.need = 0
        self.c_queued = 0
        self.server = srv
        self.set_state(ClientState.ACTIVE)
        link = self.link
        if link.attach(srv.session) is not None:        # (the pool's settings: cannot happen)
            self.loop.crelay.disarm(self.fd)
            self.loop.crelay.disarm(srv.fd)
            self.server = None
            link.detach()
            srv.client = None
            srv.close("handed to a client whose settings it does not have")
            self.fail(PgmpError(errors.INTERNAL_ERROR, "internal error in pgmp: server handed over unprepared"))
            return
        self.relay_peer = srv
        srv.relay_peer = self
        link.queries_relayed(count, kind)
        rest = self.loop.crelay.take_rest(srv.fd)        # (C's copy: for a request only C kept)
        if data is not None:
            rest = memoryview(data)[sent:]
        if rest:
            srv.queue(rest)
            if srv.congested:
                srv.hold_until_drained(self)
        if self.binds is not None or link.pipeline.bound:
            self.relay_binds(True)
        if not self.reading and srv.paused_peer is not self:
            self.resume_reading()

    def request_lost(self):
        """The request the C relay kept for this queued client is gone (it cannot be): fail it
        rather than serve it without."""
        log.error("the request of queued client %r is gone from the C relay's queue; closing it", self)
        self.pool.waiting.handed(self)
        self.fail(PgmpError(errors.INTERNAL_ERROR, "internal error in pgmp: queued request lost"))

    def handoff_lost(self):
        """The C relay sent this queued client's request to a server whose Python state changed in
        the same batch (it closed, or its client did): what became of it is unknown."""
        if self.closed:
            return
        self.pool.waiting.handed(self)
        self.fail(PgmpError(errors.CONNECTION_FAILURE, "server connection lost",
                            detail="the server given to this session closed as its request reached it"))

    def _settings_applied(self, srv, error):
        self.settings_pending = False
        if error is not None:
            # A refused setting ends the session; what the server holds now is unknown to pgmp.
            self.server = None
            self.link.detach()
            srv.client = None
            srv.close(f"client settings refused: {error.message}")
            self.fail(error)
            return
        if self.server is not srv:
            return
        if not self.logged_in:
            self.finish_login(srv.params, srv)
            return
        self.resume_reading()
        self.kick()

    def report(self, name: str, value: str) -> bool:
        """Record a ParameterStatus value the client has seen; False if it already had it."""
        reported = self.reported
        if reported.get(name) == value:
            return False
        if type(reported) is SharedDict:
            reported = self.reported = dict(reported)
        reported[name] = value
        return True

    def detach(self):
        """Transaction boundary in transaction or statement mode: the server goes back to the pool,
        or stays linked, held, until another client needs it (Pool.hold)."""
        srv = self.server
        if self.pool.hold(srv, self):
            return
        self.server = None
        self.link.detach()
        self.set_state(ClientState.IDLE)             # (disarms the C relay's pair)
        self.pool.release(srv, REUSE)
        if self.close_at_boundary:
            self.leave_at_boundary()

    def unlink_held(self, srv):
        """The pool took back ``srv``, held for this client between transactions: idle, no server."""
        self.server = None
        self.link.detach()
        self.set_state(ClientState.IDLE)             # (disarms the C relay's pair)

    def leave_at_boundary(self):
        """A stop waits for this client's transaction (close_at_boundary): once it is over, end the session."""
        if self.link.idle:
            self.fail(PgmpError(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command"))

    def server_lost(self, srv, exc: PgmpError):
        self.unrelay()
        if self.server is srv:
            self.server = None
            self.link.detach()
        if self.link.ended:                 # the server's own FATAL error reached the client: as direct
            self.close(f"server ended the session ({exc.message})")
            return
        self.fail(exc)

    # -- ending ------------------------------------------------------------------
    def fail(self, exc):
        """Report ``exc`` to the client as an ErrorResponse and close."""
        if self.closed:
            return
        if not isinstance(exc, PgmpError):
            log.error("internal error on %r: %r", self, exc)
            exc = PgmpError(errors.INTERNAL_ERROR, "internal error in pgmp")
        if isinstance(exc, AuthenticationFailed):
            log.warning("login failed: user=%s db=%s from %s: %s", self.user or "-", self.database or "-",
                        self.peer, exc.reason)
        data = messages.error_response(exc.sqlstate, exc.message, "FATAL", exc.detail, exc.hint)
        if self.pool is not None:
            self.pool.stats.count_error(exc.sqlstate, relayed=False)
        self.send(data)
        self.close(f"{exc.sqlstate} {exc.message}", linger=True)

    def on_eof(self, reason: str):
        self.close(reason)

    def close(self, reason: str | None, linger: bool = False):
        """Close the session (``linger``: after an ErrorResponse, see Endpoint.close_socket)."""
        if self.closed:
            return
        srv = self.server
        # held, but C has read bytes of ours this batch (a request may be on the server already)
        unseen = srv is not None and srv.held and not self.pool.held_free(srv)
        self.server = None
        was = self.state
        self.state = ClientState.CLOSED
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.outq:
            self.flush()
        self.close_socket(linger)
        self.worker.client_closed(self)
        if self.pool is not None:
            self.pool.forget(self)
            if self in self.pool.clients:
                del self.pool.clients[self]
                self.pool.stats.bytes_in += self.rx
            if srv is not None:
                verdict, why = self.link.leave(self.skip > 0, srv.swallow > 0)
                if unseen:
                    verdict, why = CLOSE, "client left as its request reached the server"
                self.link.detach()
                self.pool.release(srv, verdict, why)
        if reason and self.worker.config.log_disconnections and was is not ClientState.STARTUP:
            log.info("disconnect: user=%s db=%s from %s: %s", self.user or "-", self.database or "-",
                     self.peer, reason)

    def _too_many(self) -> PgmpError:
        return PgmpError(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already",
                         detail=f"pgmp's max_client_conn ({self.worker.config.max_client_conn}) is reached")

    def _login_timeout(self):
        self.timer = None
        if self.over_limit and self.state is ClientState.STARTUP:
            self.fail(self._too_many())
        elif self.state in (ClientState.STARTUP, ClientState.AUTH_LOOKUP, ClientState.AUTH, ClientState.LOGIN_WAIT):
            self.fail(PgmpError(errors.PROTOCOL_VIOLATION, "client_login_timeout: login took too long"))

    def wait_timed_out(self):
        """The pool's query_wait_timeout (Pool.wait_expired): this client waited that long."""
        if self.state is ClientState.WAITING:
            self.fail(PgmpError(errors.PROTOCOL_VIOLATION, "query_wait_timeout: no server connection became free",
                                hint="raise pool_size or query_wait_timeout, or look for long transactions"))


class _ConsoleHost:
    """What pgmp.console.Console needs from its connection and worker."""
    __slots__ = ("client",)

    def __init__(self, client):
        self.client = client

    @property
    def config(self):
        return self.client.worker.config

    @property
    def closed(self) -> bool:
        return self.client.closed

    def auth_users(self):
        return self.client.worker.secrets.keys()

    def send(self, data: bytes) -> None:
        self.client.send(data)

    def ask(self, command: str, args: dict, callback) -> None:
        self.client.worker.console_ask(command, args, callback)

    def later(self, seconds: float, fn) -> None:
        self.client.loop.call_later(seconds, fn)

    def done(self) -> None:
        self.client.console_done()
