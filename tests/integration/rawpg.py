"""A small raw-socket PostgreSQL protocol client for tests that must send what real drivers never send.

Messages are built by hand (with pgmp.protocol.messages where it has a
builder) and frames are read back one by one, so a test sees exactly what
pgmp answered: an ErrorResponse's fields, a single 'N' byte, a
NegotiateProtocolVersion, or the connection being closed.

    conn = RawPG.connect(proxy.host, proxy.port)
    conn.send(startup_packet({"user": "scram_user", "database": "appdb"}))
    conn.authenticate("scram_user", "scram_pass")      # up to ReadyForQuery
    msgs = conn.query("select 1")                        # frames up to ReadyForQuery
    conn.send(b"Z" + struct.pack("!I", 4))
    err = conn.expect_error()                            # {'S': 'FATAL', 'C': '08P01', ...}
    assert conn.wait_closed()
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from scramp import ScramClient

from pgmp.protocol import messages
from pgmp.protocol.messages import (CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0,
                                    SSL_REQUEST_CODE, cstr, frame, parse_fields)

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")


# ---- frontend messages -----------------------------------------------------------

def version_code(major: int, minor: int) -> int:
    return (major << 16) | minor


def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0, terminator: bool = True,
                   length: int | None = None) -> bytes:
    """A StartupMessage; ``terminator=False`` leaves out the final NUL, ``length`` overrides the length word."""
    body = _I32.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items())
    if terminator:
        body += b"\0"
    return _U32.pack(len(body) + 4 if length is None else length) + body


def ssl_request() -> bytes:
    return messages.ssl_request()


def gssenc_request() -> bytes:
    return _U32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return messages.cancel_request(pid, secret)


def query(sql: str) -> bytes:
    return messages.query(sql)


def terminate() -> bytes:
    return messages.terminate()


def sync() -> bytes:
    return messages.sync()


def password(text: str) -> bytes:
    return messages.password_message(cstr(text))


def flush() -> bytes:
    return frame(b"H")


def parse(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    return frame(b"P", cstr(name) + cstr(sql) + _I16.pack(len(types)) + b"".join(_U32.pack(t) for t in types))


def bind(params: tuple[str | None, ...] = (), portal: str = "", statement: str = "") -> bytes:
    """Bind with text parameters and text results."""
    body = cstr(portal) + cstr(statement) + _I16.pack(0) + _I16.pack(len(params))
    for p in params:
        body += _I32.pack(-1) if p is None else _I32.pack(len(p.encode())) + p.encode()
    return frame(b"B", body + _I16.pack(0))


def describe_portal(portal: str = "") -> bytes:
    return frame(b"D", b"P" + cstr(portal))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(b"E", cstr(portal) + _I32.pack(max_rows))


def copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


def copy_done() -> bytes:
    return frame(b"c")


def copy_fail(message: str) -> bytes:
    return frame(b"f", cstr(message))


def function_call(oid: int, args: list[bytes | None], arg_format: int = 1, result_format: int = 1) -> bytes:
    """FunctionCall ('F'): every argument in ``arg_format`` (1 = binary), the result in ``result_format``."""
    body = _U32.pack(oid) + _I16.pack(1) + _I16.pack(arg_format) + _I16.pack(len(args))
    for arg in args:
        body += _I32.pack(-1) if arg is None else _I32.pack(len(arg)) + arg
    body += _I16.pack(result_format)
    return frame(b"F", body)


def header(kind: bytes, length: int) -> bytes:
    """Only the 5-byte header of a message announcing ``length`` (the length word counts itself)."""
    return kind + _U32.pack(length)


# ---- reading -----------------------------------------------------------------------

@dataclass
class Message:
    type: bytes
    payload: bytes

    @property
    def fields(self) -> dict[str, str]:
        """ErrorResponse / NoticeResponse fields."""
        return parse_fields(self.payload)

    def __repr__(self) -> str:
        body = self.fields if self.type in (b"E", b"N") else self.payload[:60]
        return f"Message({self.type!r}, {body!r})"


class Closed(ConnectionError):
    """The peer closed the connection (carries whatever was read before)."""


class RawPG:
    """One raw protocol connection; every read has a deadline."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        self.timeout = timeout
        self.buf = bytearray()
        self.params: dict[str, str] = {}
        self.key: tuple[int, int] | None = None
        self.notices: list[Message] = []

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0) -> "RawPG":
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout)

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 10.0) -> "RawPG":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing from the peer in {self.timeout:g}s; buffered: {bytes(self.buf)[:80]!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(f"nothing from the peer in time; buffered: {bytes(self.buf)[:80]!r}") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(f"connection closed by the peer; buffered: {bytes(self.buf)[:80]!r}")
        self.buf += chunk

    def read_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_message(self, timeout: float | None = None) -> Message:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < 5:
            self._fill(deadline)
        kind = bytes(self.buf[:1])
        (length,) = _U32.unpack_from(self.buf, 1)
        if length < 4 or length > 1 << 30:
            raise AssertionError(f"bad frame from the peer: type {kind!r} length {length}")
        while len(self.buf) < length + 1:
            self._fill(deadline)
        payload = bytes(self.buf[5:length + 1])
        del self.buf[:length + 1]
        return Message(kind, payload)

    def read_until(self, kind: bytes = b"Z", timeout: float | None = None) -> list[Message]:
        """Messages up to and including the first of type ``kind``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = []
        while True:
            msg = self.read_message(max(0.0, deadline - time.monotonic()) or 0.001)
            out.append(msg)
            if msg.type == kind:
                return out

    def expect_error(self, timeout: float | None = None) -> dict[str, str]:
        """Read until an ErrorResponse (other messages are skipped) and return its fields."""
        msgs = self.read_until(b"E", timeout)
        return msgs[-1].fields

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """True once the peer has closed the connection (anything it still sends is discarded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._fill(deadline)
            except Closed:
                return True
            except TimeoutError:
                return False
            except OSError:
                return True
            self.buf.clear()

    # ---- conversations --------------------------------------------------------------

    def authenticate(self, user: str, password_text: str | None, timeout: float | None = None) -> list[Message]:
        """Answer authentication requests until ReadyForQuery; ErrorResponse raises AuthError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        scram = None
        seen = []
        while True:
            msg = self.read_message(max(0.001, deadline - time.monotonic()))
            seen.append(msg)
            if msg.type == b"E":
                raise ServerError(msg.fields)
            if msg.type == b"S":
                name, value = messages.parse_parameter_status(msg.payload)
                self.params[name] = value
            elif msg.type == b"K":
                self.key = messages.parse_backend_key(msg.payload)
            elif msg.type == b"Z":
                return seen
            elif msg.type == b"R":
                code, data = messages.parse_auth_request(msg.payload)
                if code == messages.AUTH_OK:
                    continue
                if code == messages.AUTH_CLEARTEXT:
                    self.send(password(password_text))
                elif code == messages.AUTH_MD5:
                    from pgmp.auth.authfile import md5_response, md5_secret
                    inner = md5_secret(password_text.encode(), user.encode())[3:]
                    self.send(messages.password_message(md5_response(inner, data) + b"\0"))
                elif code == messages.AUTH_SASL:
                    scram = ScramClient(["SCRAM-SHA-256"], user, password_text)
                    first = scram.get_client_first().encode()
                    self.send(messages.sasl_initial_response("SCRAM-SHA-256", first))
                elif code == messages.AUTH_SASL_CONTINUE:
                    scram.set_server_first(data.decode())
                    self.send(messages.password_message(scram.get_client_final().encode()))
                elif code == messages.AUTH_SASL_FINAL:
                    scram.set_server_final(data.decode())
                else:
                    raise AssertionError(f"unexpected authentication request {code}")

    def login(self, user: str = "scram_user", password_text: str | None = "scram_pass", database: str = "appdb",
              **params: str) -> list[Message]:
        self.send(startup_packet({"user": user, "database": database, **params}))
        return self.authenticate(user, password_text)

    def query(self, sql: str, timeout: float | None = None) -> list[Message]:
        """Send a simple Query; the frames up to ReadyForQuery."""
        self.send(query(sql))
        return self.read_until(b"Z", timeout)

    def scalar(self, sql: str) -> str | None:
        """The first column of the first row of a simple query (text); ServerError on an error."""
        msgs = self.query(sql)
        for m in msgs:
            if m.type == b"E":
                raise ServerError(m.fields)
        for m in msgs:
            if m.type == b"D":
                return data_row(m.payload)[0]
        return None


def refused_login(host: str, port: int, user: str, password: str | None, database: str = "appdb",
                  timeout: float = 10.0, **params: str) -> dict[str, str]:
    """A login that must fail: the ErrorResponse's fields, after which the server must close."""
    with RawPG.connect(host, port, timeout) as conn:
        conn.send(startup_packet({"user": user, "database": database, **params}))
        try:
            conn.authenticate(user, password)
        except ServerError as exc:
            assert conn.wait_closed(5), "the connection stayed open after the error"
            return exc.fields
        raise AssertionError(f"user {user!r} logged in to {database!r}")


class ServerError(Exception):
    def __init__(self, fields: dict[str, str]):
        super().__init__(f"{fields.get('S')} {fields.get('C')}: {fields.get('M')}")
        self.fields = fields


def data_row(payload: bytes) -> list[str | None]:
    (n,) = _I16.unpack_from(payload, 0)
    pos, out = 2, []
    for _ in range(n):
        (ln,) = _I32.unpack_from(payload, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(payload[pos:pos + ln].decode())
            pos += ln
    return out


__all__ = [
    "CANCEL_REQUEST_CODE", "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE", "PROTOCOL_3_0",
    "Closed", "Message", "RawPG", "ServerError", "bind", "cancel_request", "copy_data", "copy_done",
    "copy_fail", "data_row", "describe_portal", "execute", "flush", "function_call", "gssenc_request",
    "header", "parse", "password", "query", "ssl_request", "startup_packet", "sync", "terminate",
    "version_code",
]
