"""pgmp's own connections to PostgreSQL: connect, log in, then carry one client's traffic at a time.

:class:`ServerLogin` is the sans-IO login exchange; :class:`ServerConnection`
is its IO glue in the worker loop.
"""
import enum
import logging
import os
import socket

from pgmp import errors, tls
from pgmp.errors import PgmpError, ServerProtocolError
from pgmp.loop import EVENT_READ, EVENT_WRITE, Endpoint
from pgmp.protocol import messages
from pgmp.link import KEEP, RELEASE, ServerSession
from pgmp.prepared import RESPONSE_TYPES
from pgmp.protocol.scanner import Scanner, make_flags
from pgmp.relay import DROP, FORWARD, REPLACE, RESCAN, relay

log = logging.getLogger("pgmp")

SERVER_MAX_MESSAGE = 1 << 30
_ALL = bytes(range(256))

# Normal relay: ReadyForQuery, CopyInResponse and ParameterStatus need a look.
NORMAL_FLAGS = make_flags(report=b"ZGSE")
# Login and internal queries: every frame is pgmp's own.
ALL_FLAGS = make_flags(report=_ALL)
WHOLE_ALL = bytes([1]) * 256
NORMAL_WHOLE = bytes(1 if i in b"ZGSE" else 0 for i in range(256))
# Transaction/statement mode: every frame that ends a response, for the client's Pipeline.
POOLED_FLAGS = make_flags(report=b"ZGS" + RESPONSE_TYPES)
POOLED_WHOLE = bytes(1 if i in b"ZGS" + RESPONSE_TYPES else 0 for i in range(256))

_normal_scanner = Scanner(NORMAL_FLAGS, SERVER_MAX_MESSAGE)
_internal_scanner = Scanner(ALL_FLAGS, 1 << 20)
_pooled_scanner = Scanner(POOLED_FLAGS, SERVER_MAX_MESSAGE)


class ServerState(enum.Enum):
    CONNECTING = "connecting"
    LOGIN = "login"
    IDLE = "idle"            # in the pool
    ACTIVE = "active"        # linked to a client
    RESET = "reset"          # running the reset query before going idle
    CLOSED = "closed"


class ServerError(PgmpError):
    """An ErrorResponse from the server during login or an internal query, kept whole for the client."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(fields.get("C", errors.CONNECTION_FAILURE), fields.get("M", "server error"),
                         severity=fields.get("S", "FATAL"), detail=fields.get("D"), hint=fields.get("H"))
        self.fields = fields


class ServerLogin:
    """pgmp logging in to a server: StartupMessage, authentication, parameters, key, ReadyForQuery."""

    def __init__(self, user: str, database: str, authenticator, startup_params: dict[str, str] | None = None):
        self.user = user
        self.database = database
        self.auth = authenticator
        self.startup_params = {"user": user, "database": database, **(startup_params or {})}
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_secret = 0
        self.done = False

    def startup(self) -> bytes:
        return messages.startup_message(self.startup_params)

    def feed(self, kind: int, payload: bytes) -> bytes:
        """One frame from the server; returns what to send back."""
        if kind == 82:                                   # 'R'
            code, data = messages.parse_auth_request(payload)
            # AuthenticationOk goes to the authenticator too: it refuses an OK that skips
            # SCRAM's final server signature.
            return self.auth.feed(code, data)
        if kind == 83:                                   # 'S'
            name, value = messages.parse_parameter_status(payload)
            self.params[name] = value
            return b""
        if kind == 75:                                   # 'K'
            self.backend_pid, self.backend_secret = messages.parse_backend_key(payload)
            return b""
        if kind == 90:                                   # 'Z'
            self.done = True
            return b""
        if kind == 69:                                   # 'E'
            raise ServerError(messages.parse_fields(payload))
        if kind in (78, 118):                            # 'N' notice, 'v' NegotiateProtocolVersion
            return b""
        raise ServerProtocolError(f"unexpected message type {chr(kind)!r} from server during login")


class ServerConnection(Endpoint):
    """One connection to PostgreSQL, owned by a pool."""
    __slots__ = ("pool", "state", "login", "params", "session", "client", "swallow", "swallow_error",
                 "swallow_done", "backend_pid", "backend_secret", "scanner", "flags", "whole", "created",
                 "last_used", "timer", "addr_text", "cancel_pending", "release_after",
                 "replacement", "parked", "swallow_rows", "release_reset")

    def __init__(self, loop, pool, sock: socket.socket, addr_text: str, login: ServerLogin):
        super().__init__(loop, sock, EVENT_WRITE)
        self.pool = pool
        self.state = ServerState.CONNECTING
        self.login = login
        self.params: dict[str, str] = {}
        self.session = ServerSession(pool.worker.config.max_prepared_statements)
        self.client = None
        self.swallow = 0
        self.swallow_error: ServerError | None = None
        self.swallow_done = None
        self.swallow_rows: list | None = None   # DataRow payloads of an internal query, when wanted
        self.backend_pid = 0
        self.backend_secret = 0
        self.scanner = _internal_scanner
        self.flags = ALL_FLAGS
        self.whole = WHOLE_ALL
        self.created = loop.clock()
        self.last_used = self.created
        self.timer = None
        self.addr_text = addr_text
        self.cancel_pending = 0
        self.release_after = False
        self.replacement = b""
        self.parked = False                # released, but held until a pending cancel is done
        self.release_reset = False         # released by a pinned client: DISCARD ALL before reuse (kept
                                           # on the server, as a release can wait out a pending cancel)

    def __repr__(self):
        return f"<server {self.pool.name} {self.addr_text} pid={self.backend_pid} {self.state.value}>"

    # -- connecting and login --------------------------------------------------
    def handle_event(self, mask: int):
        if self.state is ServerState.CONNECTING:
            if mask & (EVENT_WRITE | EVENT_READ):
                self._connected()
            return
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and self.reading and not self.closed:
            self.read()

    def _connected(self):
        """An event while CONNECTING: the TCP connect finished, or the answer to our SSLRequest came.

        With server_tls_mode other than disable, pgmp sends an SSLRequest first (not on
        unix sockets, where PostgreSQL has no TLS) and reads its answer in _tls_answer,
        still CONNECTING. Then comes LOGIN: the TLS handshake if any, the StartupMessage.
        """
        if self.reading:                         # only set once the SSLRequest is sent
            self._tls_answer()
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.abort(ServerProtocolError(
                f"could not connect to server {self.addr_text}: {os.strerror(err)}"))
            return
        self.reading = True
        self._update_mask()
        if self.pool.worker.server_tls is not None and self.sock.family != socket.AF_UNIX:
            self.send(messages.ssl_request())
            return
        self.state = ServerState.LOGIN
        self.send(self.login.startup())

    def _tls_answer(self):
        """The server's one-byte answer to the SSLRequest: 'S' starts the handshake, 'N' is cleartext if allowed."""
        if self.outq:
            self.flush()
        try:
            answer = self.receive(64)
        except OSError as exc:
            self.abort(ServerProtocolError(f"could not connect to server {self.addr_text}: {exc.strerror or exc}"))
            return
        if answer is None:
            return
        worker = self.pool.worker
        mode = worker.config.server_tls_mode
        kind = answer[:1]
        if len(answer) > 1 and kind in (b"S", b"N"):
            # CVE-2021-23222: bytes before the handshake would be taken for the server's own.
            self.abort(ServerProtocolError(
                f"server {self.addr_text} sent unencrypted data after its answer to SSLRequest "
                f"(CVE-2021-23222)", sqlstate=errors.PROTOCOL_VIOLATION,
                detail="This could be either a server bug or evidence of an attempted man-in-the-middle attack."))
        elif kind == b"S":
            self.state = ServerState.LOGIN
            self.start_tls(worker.server_tls, server_side=False, server_hostname=self.pool.db.host)
        elif kind == b"N" and mode == "prefer":
            self.state = ServerState.LOGIN
            self.send(self.login.startup())
        elif kind == b"N":
            self.abort(ServerProtocolError(
                f'server {self.addr_text} does not support TLS, but server_tls_mode is "{mode}"',
                hint='turn on ssl in the server, or set server_tls_mode = "prefer" to allow cleartext'))
        elif not kind:
            self.abort(ServerProtocolError(f"server {self.addr_text} closed the connection after SSLRequest"))
        else:
            self.abort(ServerProtocolError(
                f"server {self.addr_text} answered SSLRequest with {kind!r}, not 'S' or 'N'",
                detail="is it a PostgreSQL server?"))

    def on_tls_ready(self):
        self.send(self.login.startup())

    def on_tls_failed(self, exc):
        host = self.pool.db.host
        if tls.is_name_mismatch(exc):
            err = ServerProtocolError(
                f'server certificate does not match host name "{host}"', detail=tls.describe(exc),
                hint='server_tls_mode = "verify-full" checks the host of the database section against the '
                     "names in the server's certificate")
        elif tls.is_unverified(exc):
            err = ServerProtocolError(
                f"server certificate of {self.addr_text} could not be verified: {tls.describe(exc)}",
                hint="server_tls_ca_file must hold the CA that signed the server's certificate")
        else:
            err = ServerProtocolError(f"TLS handshake with server {self.addr_text} failed: {tls.describe(exc)}")
        self.abort(err)

    def on_data(self, view, n):
        client = self.client
        if self.scanner is _normal_scanner and not self.skip and client is not None:
            # The common case, without the generic relay: whole frames ending in ReadyForQuery.
            sc = _normal_scanner
            if sc.scan(view, 0, n) == 1 and sc.consumed == n and not sc.error:
                kind, off, ln = sc.frame(0)
                if kind == 90:
                    link = client.link
                    link.server_ready(1, view[off + 5])
                    client.send(view[:n])
                    if client.unsent > client.loop.max_unsent:
                        client.hold_until_drained(self)
                    if client.close_at_boundary and link.idle:
                        client.fail(PgmpError(errors.ADMIN_SHUTDOWN,
                                              "terminating connection due to administrator command"))
                    return
        out: list = []
        try:
            relay(self, view, n, out)
        except PgmpError as exc:
            self.abort(exc)
            return
        if out:
            client = self.client
            if client is not None:
                client.send_views(out)
                if client.congested:
                    client.hold_until_drained(self)
                if self.release_after:
                    self.release_after = False
                    if client.server is self:
                        client.detach()
                elif client.close_at_boundary and client.link.idle:
                    client.fail(PgmpError(errors.ADMIN_SHUTDOWN,
                                          "terminating connection due to administrator command"))
            elif not self.closed:
                self.abort(ServerProtocolError("server sent data while idle"), quiet=False)

    def on_frame(self, kind, view, off, ln):
        if self.scanner is _pooled_scanner:
            return self._pooled_frame(kind, view, off, ln)
        if self.scanner is _normal_scanner:
            client = self.client
            if kind == 90:                                   # ReadyForQuery
                client.link.server_ready(1, view[off + 5])
                return FORWARD
            if kind == 71:                                   # CopyInResponse
                client.link.server_copy_in()
                return FORWARD
            if kind == 69:                                   # ErrorResponse: a FATAL one ends the session
                client.link.server_error_frame(view[off:off + ln])
                return FORWARD
            name, value = messages.parse_parameter_status(bytes(view[off + 5:off + ln]))
            self._param_changed(name, value)
            return FORWARD
        payload = bytes(view[off + 5:off + ln])
        if self.login is not None:
            return self._login_frame(kind, payload)
        # an internal query pgmp sent (session settings, reset): its answer is pgmp's
        if kind == 90:
            self.swallow -= 1
            if self.swallow == 0:
                self._swallowed()
                return RESCAN
            return DROP
        if kind == 69 and self.swallow_error is None:
            self.swallow_error = ServerError(messages.parse_fields(payload))
        elif kind == 68 and self.swallow_rows is not None:
            self.swallow_rows.append(payload)
        elif kind == 83:
            name, value = messages.parse_parameter_status(payload)
            self.params[name] = value
            self.session.reported[name.lower()] = value
            client = self.client
            # (a client still logging in gets its values with the login's ParameterStatus)
            if client is not None and client.logged_in and client.report(name, value):
                return FORWARD
        return DROP

    def _pooled_frame(self, kind, view, off, ln):
        """Transaction/statement mode: keep the client's Link in step, release at the boundary."""
        client = self.client
        if kind == 83 and ln > 5:                        # ParameterStatus (not Sync: servers send no 'S' Sync)
            name, value = messages.parse_parameter_status(bytes(view[off + 5:off + ln]))
            self._param_changed(name, value)
            return FORWARD
        link = client.link
        r = link.server_frame(kind, view[off:off + ln])
        if kind == 90:                                   # ReadyForQuery
            verdict = link.after_ready(client.skip > 0)
            if verdict == RELEASE:
                self.release_after = True
            elif verdict != KEEP:
                client.close_at_boundary = False
                self.loop.call_later(0, client.fail, link.statement_mode_error())
        if r is None:
            return FORWARD
        if not r:
            return DROP
        self.replacement = r
        return REPLACE

    def _login_frame(self, kind, payload):
        try:
            reply = self.login.feed(kind, payload)
        except PgmpError as exc:
            self.abort(exc)
            return RESCAN
        if reply:
            self.send(reply)
        if self.login.done:
            self.params = self.login.params
            self.session.reported.update((k.lower(), v) for k, v in self.params.items())
            self.backend_pid = self.login.backend_pid
            self.backend_secret = self.login.backend_secret
            self.login = None
            # still LOGIN (and under server_connect_timeout) until connect_query, if any, is done
            log.debug("server login ok: %r", self)
            self.pool.server_logged_in(self)
            return RESCAN
        return DROP

    def _param_changed(self, name: str, value: str):
        self.params[name] = value
        client = self.client
        if client is not None:
            client.report(name, value)
            client.link.parameter_status(name, value)
        else:
            self.session.reported[name.lower()] = value

    # -- internal queries --------------------------------------------------------
    def internal_query(self, query: bytes, done=None, rows: list | None = None):
        """Send a query whose answer pgmp consumes; ``done(self, error)`` runs at its ReadyForQuery.

        ``rows``, if given, receives the payload of each DataRow of the answer.
        """
        self.swallow += 1
        self.swallow_done = done
        self.swallow_rows = rows
        self.scanner, self.flags, self.whole = _internal_scanner, ALL_FLAGS, WHOLE_ALL
        self.send(query)

    def _swallowed(self):
        err, done = self.swallow_error, self.swallow_done
        self.swallow_error = None
        self.swallow_done = None
        self.swallow_rows = None
        if self.state is ServerState.ACTIVE:
            self.use_normal_scanner()
        if done is not None:
            done(self, err)

    def use_normal_scanner(self, pooled: bool | None = None):
        if pooled is None:
            pooled = self.client is not None and self.client.link.pooled
        if pooled:
            self.scanner, self.flags, self.whole = _pooled_scanner, POOLED_FLAGS, POOLED_WHOLE
        else:
            self.scanner, self.flags, self.whole = _normal_scanner, NORMAL_FLAGS, NORMAL_WHOLE

    # -- ending ----------------------------------------------------------------
    def on_eof(self, reason: str):
        if self.closed:
            return
        if self.state is ServerState.CONNECTING:
            self.abort(ServerProtocolError(f"could not connect to server {self.addr_text}: {reason}"))
            return
        if self.state is ServerState.LOGIN:
            self.abort(ServerProtocolError(f"server {self.addr_text} closed the connection during login"))
            return
        self.abort(ServerProtocolError("server closed the connection unexpectedly",
                                       detail=f"{self.addr_text}: {reason}"), quiet=self.state is ServerState.IDLE)

    def abort(self, exc: PgmpError, quiet: bool = False):
        """Close this server connection and tell whoever depends on it why."""
        if self.closed:
            return
        was = self._shut()
        log_fn = log.info if quiet else log.warning
        log_fn("server connection closed: db=%s user=%s %s pid=%s state=%s: %s",
               self.pool.dbname, self.pool.server_user, self.addr_text, self.backend_pid or "-", was.value, exc.message)
        client = self.client
        self.client = None
        if client is not None:
            client.server_lost(self, exc)
        self.pool.server_closed(self, exc, was)

    def close(self, reason: str):
        """Close deliberately (pool decisions): Terminate first, so the server logs a clean exit."""
        if self.closed:
            return
        if self.state is not ServerState.CONNECTING:
            self.send(messages.terminate())
        was = self._shut()
        log.info("server connection closed: db=%s user=%s %s pid=%s: %s",
                 self.pool.dbname, self.pool.server_user, self.addr_text, self.backend_pid or "-", reason)
        self.pool.server_closed(self, None, was)

    def quiet(self) -> bool:
        """Nothing arrived while idle: no FATAL (pg_terminate_backend, shutdown) and no EOF
        waiting unread. One non-blocking peek, so a dead server is not handed to a client."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True                 # nothing to read: alive and quiet
        except OSError:
            pass
        return False                    # data, EOF or an error: not fit to hand out

    def _shut(self) -> ServerState:
        """Mark closed, stop the timer, close the socket; returns the state it was in."""
        was = self.state
        self.state = ServerState.CLOSED
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.close_socket()
        return was

    def framing_error(self, code, view, off):
        self.abort(ServerProtocolError(f"invalid message framing from server (scanner error {code})"))
