"""pgmp's own connections to PostgreSQL: connect, log in, then carry one client's traffic at a time.

:class:`ServerLogin` is the sans-IO login exchange; :class:`ServerConnection`
is its IO glue in the worker loop.
"""
import enum
import functools
import logging
import os
import socket

from pgmp import errors, tls
from pgmp.errors import PgmpError, ServerProtocolError
from pgmp.loop import EVENT_READ, EVENT_WRITE, Endpoint
from pgmp.protocol import messages
from pgmp.link import KEEP, RELEASE, ServerSession
from pgmp.prepared import RESPONSE_TYPES
from pgmp.protocol.scanner import ERR_LONG, Scanner, make_flags
from pgmp.relay import ASSEMBLE, DROP, FORWARD, REPLACE, RESCAN, WAIT, relay
from pgmp.session import ClientState

log = logging.getLogger("pgmp")

SERVER_MAX_MESSAGE = 1 << 30
_ALL = bytes(range(256))

# -- what pgmp assembles from a server, and how large it may be ---------------------------------
# libpq takes any message above 30000 bytes for lost synchronization, except the types that may
# be long (RowDescription, DataRow, CopyData, FunctionCallResponse, ErrorResponse, NoticeResponse,
# NotificationResponse), and refuses an authentication request above 2000 bytes: no server that
# libpq can use sends more. pgmp applies the same limits to every server message it assembles
# (the length word, as libpq counts it); what it only relays streams through at any size.
SMALL_MESSAGE_MAX = 30_000
AUTH_REQUEST_MAX = 2_000
# RowDescription and ParameterDescription have bounds of their own: at most 1664 columns of
# 63-byte names (about 136 kB, some 450 kB if the client encoding quadruples the names) and
# 65535 parameters of 4 bytes (262 kB).
DESCRIPTION_MAX = 1 << 20
# The long types in pgmp's own exchanges (login, settings, reset and check queries,
# connect_query, auth_query), which pgmp reads whole.
INTERNAL_LONG_MAX = 1 << 20
# A relayed ErrorResponse or FunctionCallResponse may be long (a RAISE of a large value, an
# lo_read through the fastpath): beyond SMALL_MESSAGE_MAX it streams to the client once pgmp
# has read its first STREAM_HEAD bytes (the severity, the SQLSTATE, the start of the message).
STREAMED = b"EV"
STREAM_HEAD = 1024
# ParameterStatus: PostgreSQL reports fewer than 20 settings, extensions a few more.
MAX_PARAMETERS = 256
MAX_PARAMETER_NAME = 256

_NAMES = {
    "R": "authentication request", "S": "ParameterStatus", "K": "BackendKeyData", "Z": "ReadyForQuery",
    "E": "ErrorResponse", "N": "NoticeResponse", "A": "NotificationResponse", "T": "RowDescription",
    "t": "ParameterDescription", "D": "DataRow", "d": "CopyData", "V": "FunctionCallResponse",
    "C": "CommandComplete", "G": "CopyInResponse", "H": "CopyOutResponse", "W": "CopyBothResponse",
    "c": "CopyDone", "1": "ParseComplete", "2": "BindComplete", "3": "CloseComplete", "n": "NoData",
    "s": "PortalSuspended", "I": "EmptyQueryResponse", "v": "NegotiateProtocolVersion",
}
MESSAGE_NAMES = {ord(k): v for k, v in _NAMES.items()}


def _limits(default: int, **by_type: int) -> tuple[int, ...]:
    """Largest length word accepted, by type byte (type letters as keywords)."""
    table = [default] * 256
    for kind, limit in by_type.items():
        table[ord(kind)] = limit
    return tuple(table)


RELAY_LIMITS = _limits(SMALL_MESSAGE_MAX, T=DESCRIPTION_MAX, t=DESCRIPTION_MAX,
                       E=SERVER_MAX_MESSAGE, V=SERVER_MAX_MESSAGE)
INTERNAL_LIMITS = _limits(SMALL_MESSAGE_MAX, R=AUTH_REQUEST_MAX, t=DESCRIPTION_MAX,
                          **dict.fromkeys("TDdVENA", INTERNAL_LONG_MAX))


def message_name(kind: int) -> str:
    return MESSAGE_NAMES.get(kind) or f"type {chr(kind)!r}"


def too_long(kind: int, declared: int, limit: int) -> ServerProtocolError:
    return ServerProtocolError(f"server sent a {message_name(kind)} message of {declared} bytes, more than "
                               f"the {limit} bytes pgmp accepts for that type", sqlstate=errors.PROTOCOL_VIOLATION)


def violation(message: str) -> ServerProtocolError:
    return ServerProtocolError(message, sqlstate=errors.PROTOCOL_VIOLATION)


def record_parameter(params: dict[str, str], payload: bytes) -> tuple[str, str]:
    """Decode a ParameterStatus into ``params``: a malformed one, a long name, one name too many are refused."""
    end = payload.find(b"\0")
    if end < 0 or payload.find(b"\0", end + 1) < 0:
        raise violation("server sent a malformed ParameterStatus (a name and a value, each ending in NUL)")
    if end > MAX_PARAMETER_NAME:
        raise violation(f"server sent a ParameterStatus name of {end} bytes, more than the "
                        f"{MAX_PARAMETER_NAME} pgmp accepts")
    name, value = messages.parse_parameter_status(payload)
    if name not in params and len(params) >= MAX_PARAMETERS:
        raise violation(f"server reported more than {MAX_PARAMETERS} different settings by ParameterStatus "
                        "(PostgreSQL reports about 20): pgmp keeps no more")
    params[name] = value
    return name, value


# Normal relay: ReadyForQuery, CopyInResponse and ParameterStatus need a look.
# The C relay passes ReadyForQuery itself and counts it for the Link.
NORMAL_FLAGS = make_flags(report=b"ZGSE", count=b"Z")
# Login and internal queries: every frame is pgmp's own.
ALL_FLAGS = make_flags(report=_ALL)
# Transaction/statement mode: every frame that ends a response, for the client's Pipeline.
# While only simple Queries and unnamed extended batches are in flight (Link.c_relay_ok), the C
# relay passes a whole answer itself, through its ReadyForQuery, when it holds only these counted
# frames (ParseComplete, BindComplete, ParameterDescription, RowDescription, NoData, CommandComplete
# but a session command's, EmptyQueryResponse, PortalSuspended) besides the unreported ones.
POOLED_FLAGS = make_flags(report=b"ZGS" + RESPONSE_TYPES, count=b"12tTnCIsZ")
# No type is assembled unasked: on_partial decides, by the limits above.
NO_WHOLE = bytes(256)

_normal_scanner = Scanner(NORMAL_FLAGS, SERVER_MAX_MESSAGE)
_internal_scanner = Scanner(ALL_FLAGS, INTERNAL_LONG_MAX)
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


def bad_ready(ln: int) -> ServerProtocolError:
    """A ReadyForQuery is 5 bytes long with its status; anything else is a broken server."""
    return ServerProtocolError(f"server sent a ReadyForQuery of length {ln - 1} (expected 5)")


class ServerLogin:
    """pgmp logging in to a server: StartupMessage, authentication, parameters, key, ReadyForQuery.

    Nothing but authentication requests (and an ErrorResponse) is believed before an
    AuthenticationOk that the authenticator accepted; after it, no authentication request.
    """

    def __init__(self, user: str, database: str, authenticator, startup_params: dict[str, str] | None = None):
        self.user = user
        self.database = database
        self.auth = authenticator
        self.startup_params = {"user": user, "database": database, **(startup_params or {})}
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_secret = 0
        self.authenticated = False
        self.has_key = False
        self.done = False

    def startup(self) -> bytes:
        return messages.startup_message(self.startup_params)

    def feed(self, kind: int, payload: bytes) -> bytes:
        """One frame from the server; returns what to send back."""
        if kind == 69:                                   # 'E'
            raise ServerError(messages.parse_fields(payload))
        if kind == 118:                                  # 'v'
            raise violation("server sent NegotiateProtocolVersion, but pgmp asked for protocol 3.0 "
                            "with no protocol options: there was nothing to negotiate")
        if not self.authenticated:
            if kind == 82:                               # 'R'
                return self._auth_request(payload)
            if kind in (83, 75, 90):                     # 'S', 'K', 'Z'
                raise ServerProtocolError(
                    f"the server skipped authentication: it sent {message_name(kind)} before "
                    "AuthenticationOk", detail="A misconfigured server, or something in between "
                    "impersonating it, would do this.")
            raise self._unexpected(kind)
        if kind == 83:                                   # 'S'
            record_parameter(self.params, payload)
            return b""
        if kind == 75:                                   # 'K'
            if self.has_key:
                raise violation("server sent BackendKeyData twice during login")
            if len(payload) != 8:
                raise violation(f"server sent a malformed BackendKeyData ({len(payload)} bytes of key "
                                "data; protocol 3.0 has 8)")
            self.backend_pid, self.backend_secret = messages.parse_backend_key(payload)
            self.has_key = True
            return b""
        if kind == 90:                                   # 'Z'
            if payload != b"I":
                raise violation(f"server ended its login with a ReadyForQuery of status {payload[:8]!r}, "
                                "not idle (b'I')")
            self.done = True
            return b""
        if kind == 78:                                   # 'N'
            return b""
        if kind == 82:
            raise violation("server sent an authentication request after AuthenticationOk")
        raise self._unexpected(kind)

    def _auth_request(self, payload: bytes) -> bytes:
        try:
            code, data = messages.parse_auth_request(payload)
        except ValueError:
            raise violation(f"server sent a malformed authentication request ({len(payload)} bytes)") from None
        # AuthenticationOk goes to the authenticator too: it refuses an OK that skips SCRAM's
        # final server signature, or that server_require_auth does not allow unasked.
        reply = self.auth.feed(code, data)
        if code == messages.AUTH_OK:
            self.authenticated = True
        return reply

    @staticmethod
    def _unexpected(kind: int) -> ServerProtocolError:
        return violation(f"unexpected message type {chr(kind)!r} ({message_name(kind)}) from server during login")


class ServerConnection(Endpoint):
    """One connection to PostgreSQL, owned by a pool."""
    __slots__ = ("conn_id", "pool", "state", "login", "params", "session", "client", "swallow", "swallow_error",
                 "swallow_done", "backend_pid", "backend_secret", "scanner", "flags", "whole", "created",
                 "last_used", "timer", "addr_text", "cancel_pending", "release_after",
                 "replacement", "parked", "swallow_rows", "release_reset", "host", "address", "held")

    def __init__(self, loop, pool, sock: socket.socket, addr_text: str, login: ServerLogin, host=None,
                 address=None):
        super().__init__(loop, sock, EVENT_WRITE)
        self.conn_id = 0                   # set by the worker: SHOW SERVERS' id
        self.pool = pool
        self.host = host                   # the config.HostSpec it connected to (of the pool's host list)
        self.address = address             # (family, sockaddr) it connected to: where its cancels go
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
        self.whole = NO_WHOLE          # what is assembled is on_partial's decision
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
        self.held = False                  # linked to its client between transactions (Pool.hold)

    def __repr__(self):
        return f"<server {self.pool.name} {self.addr_text} pid={self.backend_pid} {self.state.value}>"

    # -- connecting and login --------------------------------------------------
    def handle_event(self, mask: int):
        if self.held and mask & EVENT_READ:
            self._held_event()
            return
        if self.state is ServerState.CONNECTING:
            if mask & (EVENT_WRITE | EVENT_READ):
                self._connected()
            return
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and self.reading and not self.closed:
            self.read()

    def _held_event(self):
        """Data or EOF from a held server (Pool.hold): nothing was asked of it, so it is closed, as an
        idle server would be, and its client goes on without it. If C relayed a request of the
        client's to it in this batch (the record comes later), the client's query is lost with it."""
        client = self.client
        if client.relay_peer is self and not self.loop.crelay.held(self.fd):
            self.pool.reuse_held(self, True)
            self.abort(ServerProtocolError("server closed the connection unexpectedly",
                                           detail=f"{self.addr_text}: it sent data or closed while idle, "
                                                  "as the client's query reached it"))
            return
        self.close("server sent data or closed while idle")

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
            self.start_tls(worker.server_tls, server_side=False, server_hostname=self.host.host)
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
        host = self.host.host
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
                if kind == 90 and ln == 6:
                    link = client.link
                    link.server_ready(1, view[off + 5])
                    client.send(view[:n])
                    if client.unsent > client.loop.max_unsent:
                        client.hold_until_drained(self)
                    if client.close_at_boundary:
                        client.leave_at_boundary()
                    return
        out: list = []
        try:
            relay(self, view, n, out)
        except PgmpError as exc:
            self.abort(exc)
            return
        except ValueError as exc:           # a decoder refused a malformed frame (messages.py)
            self.abort(ServerProtocolError(f"server sent a malformed message: {exc}"))
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
                elif client.close_at_boundary:
                    client.leave_at_boundary()
            elif not self.closed:
                self.abort(ServerProtocolError("server sent data while idle"), quiet=False)

    def on_frame(self, kind, view, off, ln):
        if self.scanner is _pooled_scanner:
            return self._pooled_frame(kind, view, off, ln)
        if self.scanner is _normal_scanner:
            if ln > RELAY_LIMITS[kind] + 1:
                raise too_long(kind, ln - 1, RELAY_LIMITS[kind])
            client = self.client
            if kind == 90:                                   # ReadyForQuery
                if ln != 6:
                    raise bad_ready(ln)
                client.link.server_ready(1, view[off + 5])
                return FORWARD
            if kind == 71:                                   # CopyInResponse
                client.link.server_copy_in()
                return FORWARD
            if kind == 69:                                   # ErrorResponse: a FATAL one ends the session
                client.link.server_error_frame(view[off:off + ln])
                return FORWARD
            self._param_changed(bytes(view[off + 5:off + ln]))
            return FORWARD
        if ln > INTERNAL_LIMITS[kind] + 1:
            raise too_long(kind, ln - 1, INTERNAL_LIMITS[kind])
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
            name, value = record_parameter(self.params, payload)
            self.session.reported[name.lower()] = value
            client = self.client
            # (a client still logging in gets its values with the login's ParameterStatus)
            if client is not None and client.logged_in and client.report(name, value):
                return FORWARD
        return DROP

    def _pooled_frame(self, kind, view, off, ln):
        """Transaction/statement mode: keep the client's Link in step, release at the boundary."""
        if ln > RELAY_LIMITS[kind] + 1:
            raise too_long(kind, ln - 1, RELAY_LIMITS[kind])
        client = self.client
        if kind == 83:                                   # ParameterStatus
            self._param_changed(bytes(view[off + 5:off + ln]))
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

    def on_partial(self, kind, view, pos, n, length):
        """A reported frame split across reads: assemble it (ASSEMBLE) if its type's limit allows.

        Beyond SMALL_MESSAGE_MAX a relayed ErrorResponse or FunctionCallResponse streams to the
        client, once pgmp has acted on its head; anything else larger than its limit ends the
        connection before a byte of it is buffered.
        """
        declared = length - 1
        if self.scanner is _internal_scanner:
            if declared > INTERNAL_LIMITS[kind]:
                raise too_long(kind, declared, INTERNAL_LIMITS[kind])
            return ASSEMBLE
        if declared <= SMALL_MESSAGE_MAX or kind not in STREAMED:
            if declared > RELAY_LIMITS[kind]:
                raise too_long(kind, declared, RELAY_LIMITS[kind])
            return ASSEMBLE
        if n - pos < STREAM_HEAD:
            return WAIT
        return self._stream_head(kind, view[pos:pos + STREAM_HEAD], declared)

    def _stream_head(self, kind, head, declared):
        """What on_frame does for a long ErrorResponse or FunctionCallResponse, seen by its head.

        The Link reads only the head of these (severity, SQLSTATE, message): their replacement,
        if any, is made-up responses owed before them, sent ahead of the head.
        """
        client = self.client
        if client is None:
            raise ServerProtocolError("server sent data while idle")
        if self.scanner is _normal_scanner:              # session mode reports only ErrorResponse
            client.link.server_error_frame(head)
            return None
        r = client.link.server_frame(kind, head)
        if r is None:
            return None
        head = bytes(head)
        if r.endswith(head):
            return r, len(head)
        raise violation(f"server sent a {message_name(kind)} message of {declared} bytes where pgmp must "
                        f"rewrite it: more than the {SMALL_MESSAGE_MAX} bytes pgmp accepts there")

    def _param_changed(self, payload: bytes):
        name, value = record_parameter(self.params, payload)
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
        self.unrelay()
        self.scanner, self.flags = _internal_scanner, ALL_FLAGS
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
        self.unrelay()
        if pooled is None:
            pooled = self.client is not None and self.client.link.pooled
        if pooled:
            self.scanner, self.flags = _pooled_scanner, POOLED_FLAGS
        else:
            self.scanner, self.flags = _normal_scanner, NORMAL_FLAGS

    # -- the C relay (pgmp.crelay) ----------------------------------------------
    def relay_ready(self) -> bool:
        """This server's side of a pair the C relay may carry: relaying the client's requests."""
        return (self.scanner is _normal_scanner or self.scanner is _pooled_scanner) and not self.release_after \
            and self.swallow == 0 and self.state is ServerState.ACTIVE

    @staticmethod
    @functools.cache
    def c_limits():
        """RELAY_LIMITS in C memory, for the C relay's pooled walk (made on first use)."""
        from pgmp.crelay import Limits
        return Limits(RELAY_LIMITS)

    def relayed(self, n, sent, good, count, kind, sync, peer_fd):
        if not super().relayed(n, sent, good, count, kind, sync, peer_fd):
            return False
        if self.release_after:                  # as on_data: the boundary after the read is relayed
            self.release_after = False
            client = self.client
            if client is not None and client.server is self:
                client.detach()
        if count and self.loop.quiet_ok:
            client = self.client
            if client is not None and client.relay_peer is self:
                client.quiet_start(self)
        return True

    def handed_off(self, old, new, n, count, kind, new_n, new_sent, new_count, new_kind):
        """The C relay handed this server over (a hand-off's two records, see pgmp_relay.h): it
        relayed ``n`` bytes of answers, ``count`` ReadyForQuery frames the last with status
        ``kind``, that ended the transaction of client ``old``, then sent ``new_sent`` of the
        ``new_n`` bytes of the request (``new_count`` of ``new_kind``) that client ``new``, the
        first of the pool's queue, waited with, and armed the server with it: as Python's detach,
        release, _put_idle and _link would have, which Pool.may_hand_off allowed. Take both in
        (the endpoints are those the batch began with: Loop.handing).

        An earlier record of the same batch may have changed what C acted on (closed one of the
        clients, re-linked the server): then what is not followed any more ends, the server
        closed and the new client failed, rather than one client's request or answer reaching
        another."""
        loop = self.loop
        crelay = loop.crelay
        live = loop.endpoints.get
        new_ok = new is not None and not new.closed and live(new.fd) is new
        if old is None or old.closed or self.client is not old or self.relay_peer is not old \
                or old.relay_peer is not self:
            if old is not None and not old.closed and live(old.fd) is old and old.relay_peer is None:
                crelay.disarm(old.fd)           # (C made it a member of the queue)
            if new_ok:
                crelay.disarm(new.fd)
                new.handoff_lost()
            crelay.disarm(self.fd)
            self.relay_peer = None
            self.abort(ServerProtocolError("server connection closed: pgmp's C relay handed it over after "
                                           "its client had changed"))
            return
        self.rx += n
        self.relay_peer = old.relay_peer = None     # C disarmed the old client, armed this server with the new
        link = old.link
        verdict = link.ready_relayed(count, kind)
        old.server = None
        link.detach()
        old.set_state(ClientState.IDLE)
        if verdict != RELEASE or not new_ok or new.state is not ClientState.WAITING \
                or new.request_bytes() != new_n:
            if new_ok:
                crelay.disarm(new.fd)
            crelay.disarm(self.fd)
            self.client = None
            if verdict != RELEASE:
                log.error("the C relay handed over the server of %r before its transaction ended; closing", old)
                self.close("handed over before its client's transaction ended")
                old.fail(PgmpError(errors.INTERNAL_ERROR, "internal error in pgmp: server handed over too early"))
            else:
                self.close("client left as its request reached the server")
            if new_ok:
                new.handoff_lost()
        else:
            self.pool.handed(self, new, new_sent, new_count, new_kind)
        if old.close_at_boundary and not old.closed:
            old.leave_at_boundary()

    def relay_check(self):
        client = self.client
        if client is not None:
            client.relay_check()
        elif self.relay_peer is not None:
            self.unrelay()

    def relay_counted(self, count, kind, sync):
        """ReadyForQuery frames the C relay passed to the client: as on_data's fast path, and in
        pooled mode as _pooled_frame (statement mode is never armed)."""
        client = self.client
        link = client.link
        if link.pooled:
            verdict = link.ready_relayed(count, kind)
            if client.binds is not None and client.relay_peer is self:
                client.binds.answered(self.loop.crelay, client.fd, link)
            if verdict == RELEASE:
                self.release_after = True       # relayed() detaches once the record is applied
                return
        else:
            link.server_ready(count, kind)
        if client.close_at_boundary:
            client.leave_at_boundary()

    def relay_orphaned(self):
        self.abort(ServerProtocolError("server connection closed: pgmp relayed bytes to it after its client "
                                       "had changed"))

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
        if self.held:                   # its client goes on without it
            self.pool.unhold(self)
        was = self.state
        self.state = ServerState.CLOSED
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.close_socket()
        return was

    def framing_error(self, code, view, off):
        kind = view[off]
        declared = int.from_bytes(view[off + 1:off + 5], "big")
        if code == ERR_LONG:
            internal = self.scanner is _internal_scanner
            self.abort(too_long(kind, declared, INTERNAL_LIMITS[kind] if internal else SERVER_MAX_MESSAGE))
        else:
            self.abort(violation(f"invalid message framing from server: a {message_name(kind)} message "
                                 f"of length {declared} (scanner error {code})"))
