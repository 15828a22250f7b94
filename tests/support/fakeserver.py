"""A scriptable fake PostgreSQL server, to play a hostile server (or a man in the middle) on pgmp's server link.

    def script(conn):                     # runs in a thread of its own, once per connection pgmp opens
        conn.send(auth(AUTH_CLEARTEXT))
        conn.read()                       # what pgmp answered: (type, payload), None at end of stream
        conn.send(login_ok())
        conn.serve()                      # answer queries until pgmp hangs up

    with FakeServer(script) as fake:      # listens on 127.0.0.1:fake.port; stopped and joined on exit
        ...
        fake.connections[0].received      # every message pgmp sent after its StartupMessage

The server answers an SSLRequest or GSSENCRequest with 'N', reads the
StartupMessage (kept in ``conn.startup``), then leaves the rest to the script.
An exception in a script (other than the peer hanging up) fails stop().
"""
from __future__ import annotations

import base64
import socket
import struct
import threading

from scramp import ScramException, ScramMechanism

from pgmp.protocol import messages
from pgmp.protocol.messages import (AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
                                    GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, auth_request, backend_key_data,
                                    error_response, frame, parameter_status, ready_for_query)

_U32 = struct.Struct("!I")
PARAMS = {"server_version": "17.0", "server_encoding": "UTF8", "client_encoding": "UTF8",
          "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
          "TimeZone": "UTC", "IntervalStyle": "postgres", "is_superuser": "off",
          "session_authorization": "fake"}


def auth(code: int, data: bytes = b"") -> bytes:
    return auth_request(code, data)


def after_auth(params: dict[str, str] | None = None, key: tuple[int, int] = (4242, 77)) -> bytes:
    """What a server sends once authentication is over: ParameterStatus*, BackendKeyData, ReadyForQuery."""
    return (b"".join(parameter_status(k, v) for k, v in (PARAMS if params is None else params).items())
            + backend_key_data(*key) + ready_for_query(b"I"))


def login_ok(**kw) -> bytes:
    return auth(AUTH_OK) + after_auth(**kw)


def one_row(value: str = "fake") -> bytes:
    """The answer to a simple Query: one text column "?column?", one row, then ReadyForQuery."""
    desc = struct.pack("!h", 1) + b"?column?\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    row = struct.pack("!hi", 1, len(value.encode())) + value.encode()
    return frame(b"T", desc) + frame(b"D", row) + frame(b"C", b"SELECT 1\0") + ready_for_query(b"I")


class FakeConnection:
    """One connection from pgmp, as the script sees it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.startup: dict[str, str] = {}
        self.received: list[tuple[bytes, bytes]] = []
        self.buf = bytearray()

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except OSError:
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def _take(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_startup(self) -> bool:
        while True:
            head = self._take(8)
            if head is None:
                return False
            length, code = struct.unpack("!Ii", head)
            body = self._take(length - 8)
            if body is None:
                return False
            if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
                self.send(b"N")
                continue
            parts = body.split(b"\0")
            self.startup = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 2, 2)}
            return True

    def read(self) -> tuple[bytes, bytes] | None:
        """The next message from pgmp, or None once it has closed the connection."""
        head = self._take(5)
        if head is None:
            return None
        body = self._take(_U32.unpack_from(head, 1)[0] - 4)
        if body is None:
            return None
        msg = (head[:1], body)
        self.received.append(msg)
        return msg

    def send(self, *data: bytes) -> bool:
        """Send; False if pgmp has closed the connection."""
        try:
            self.sock.sendall(b"".join(data))
            return True
        except OSError:
            return False

    def stream(self, head: bytes, length: int, tail: bytes = b"", chunk: int = 1 << 16,
               skip_header: int = 0) -> int:
        """Send a message of type head[:1] whose length word says ``length`` (it counts itself): the
        rest of ``head``, filler, then ``tail``, until it is complete or pgmp hangs up. Returns the
        bytes sent. ``skip_header``: the first bytes after the type byte were sent already."""
        if not skip_header and not self.send(head[:1] + _U32.pack(length) + head[1:]):
            return 0
        sent = 4 + len(head)
        left = length - max(4 + len(head) - 1, skip_header) - len(tail)
        filler = b"x" * chunk
        while left > 0:
            n = min(left, chunk)
            if not self.send(filler[:n]):
                return sent
            sent += n
            left -= n
        return sent + len(tail) if self.send(tail) else sent

    def serve_until(self, marker: bytes) -> bool:
        """Answer queries with one row until a Query containing ``marker`` arrives (True), or pgmp
        hangs up (False): pgmp's own queries (settings, checks) come first."""
        while (msg := self.read()) is not None:
            if msg[0] == b"Q" and marker in msg[1]:
                return True
            if msg[0] == b"Q":
                self.send(one_row())
            elif msg[0] == b"S":
                self.send(ready_for_query(b"I"))
        return False

    def serve(self) -> None:
        """Answer each Query with one row and each Sync with ReadyForQuery, until pgmp hangs up or sends Terminate."""
        while (msg := self.read()) is not None and msg[0] != b"X":
            if msg[0] == b"Q":
                self.send(one_row())
            elif msg[0] == b"S":
                self.send(ready_for_query(b"I"))

    def wait_closed(self) -> bool:
        """Read (and keep) whatever pgmp still sends until it closes; True when it did."""
        while self.read() is not None:
            pass
        return True


# ---- SCRAM, as a server -----------------------------------------------------------------

def sasl_begin(conn: FakeConnection) -> bytes | None:
    """Ask for SCRAM-SHA-256; returns pgmp's client-first-message-bare (None if pgmp hung up instead)."""
    conn.send(auth(AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    msg = conn.read()
    if msg is None or msg[0] != b"p":
        return None
    _mech, pos = messages.read_cstr(msg[1], 0)
    return msg[1][pos + 4:].split(b",", 2)[2]           # after "n,," (gs2 header)


def server_first(client_first_bare: bytes, salt: bytes = b"fakesalt", iterations: int = 4096) -> bytes:
    nonce = dict(p.split(b"=", 1) for p in client_first_bare.split(b","))[b"r"] + b"srv"
    return b"r=" + nonce + b",s=" + base64.b64encode(salt) + b",i=" + str(iterations).encode()


def sasl_login(conn: FakeConnection, secret) -> bool:
    """A real SCRAM-SHA-256 exchange against ``secret`` (a pgmp.auth.authfile.Secret of kind scram),
    then the rest of a login; False if pgmp hung up or its proof was wrong."""
    server = ScramMechanism("SCRAM-SHA-256").make_server(
        lambda _user: (secret.salt, secret.stored_key, secret.server_key, secret.iterations))
    conn.send(auth(AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    msg = conn.read()
    if msg is None or msg[0] != b"p":
        return False
    _mech, pos = messages.read_cstr(msg[1], 0)
    server.set_client_first(msg[1][pos + 4:].decode())
    conn.send(auth(AUTH_SASL_CONTINUE, server.get_server_first().encode()))
    msg = conn.read()
    if msg is None:
        return False
    try:
        server.set_client_final(msg[1].decode())
    except ScramException:
        conn.send(error_response("28P01", "password authentication failed"))
        return False
    return conn.send(auth(AUTH_SASL_FINAL, server.get_server_final().encode()), login_ok())


class FakeServer:
    """Accepts pgmp's connections on 127.0.0.1 (random port) and runs ``script(conn)`` for each."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[FakeConnection] = []
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="fakeserver", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = FakeConnection(sock)
            self.connections.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), name="fakeserver-conn", daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: FakeConnection) -> None:
        try:
            if conn.read_startup():
                self.script(conn)
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception as exc:       # reported by stop(), in the test's thread
            self.errors.append(exc)
        finally:
            conn.sock.close()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, hang up every connection, join the threads; raise a script's own error."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._accepting.join(timeout)
        for conn in list(self.connections):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self.threads):
            t.join(timeout)
            assert not t.is_alive(), "a fake server script did not end"
        if self.errors:
            raise self.errors[0]
