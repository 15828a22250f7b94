"""Build and decode the protocol messages pgmp creates or must act on (sans-IO).

Builders return complete frames as bytes. Decoders take a frame's payload
(the bytes after the 5-byte header) and never trust a field to be present.
"""
import struct

_HDR = struct.Struct("!cI")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")

# Protocol codes in the startup slot (the "version" field).
PROTOCOL_3_0 = 196608
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# Authentication request codes ('R' messages).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

MAX_STARTUP_PACKET = 10000


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One message: type byte, Int32 length (counting itself), payload."""
    return _HDR.pack(kind, len(payload) + 4) + payload


def cstr(s: str | bytes) -> bytes:
    """NUL-terminated bytes. Text pgmp read off the wire with surrogateescape (statement text
    that is not UTF-8: a LATIN1 client, a SQL_ASCII database) goes back as the bytes it came as."""
    if isinstance(s, str):
        s = s.encode("utf-8", "surrogateescape")
    return s + b"\0"


# ---- backend messages pgmp sends to clients -------------------------------

def auth_request(code: int, data: bytes = b"") -> bytes:
    return frame(b"R", _I32.pack(code) + data)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


def auth_cleartext() -> bytes:
    return auth_request(AUTH_CLEARTEXT)


def auth_md5(salt: bytes) -> bytes:
    return auth_request(AUTH_MD5, salt)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return auth_request(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return auth_request(AUTH_SASL_FINAL, data)


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", _U32.pack(pid) + _U32.pack(secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return frame(b"Z", status)


def negotiate_protocol_version(minor: int, unrecognized: list[str]) -> bytes:
    body = _I32.pack(minor) + _I32.pack(len(unrecognized))
    body += b"".join(cstr(o) for o in unrecognized)
    return frame(b"v", body)


def error_response(sqlstate: str, message: str, severity: str = "FATAL",
                   detail: str | None = None, hint: str | None = None,
                   notice: bool = False) -> bytes:
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate),
              b"M" + cstr(message)]
    if detail:
        fields.append(b"D" + cstr(detail))
    if hint:
        fields.append(b"H" + cstr(hint))
    return frame(b"N" if notice else b"E", b"".join(fields) + b"\0")


def error_from(exc) -> bytes:
    """ErrorResponse for a :class:`pgmp.errors.PgmpError`."""
    return error_response(exc.sqlstate, exc.message, exc.severity, exc.detail, exc.hint)


# ---- frontend messages pgmp sends to servers -------------------------------

def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0)
    for k, v in params.items():
        body += cstr(k) + cstr(v)
    body += b"\0"
    return _U32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _U32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _U32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _U32.pack(pid) + _U32.pack(secret)


def password_message(data: bytes) -> bytes:
    return frame(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return frame(b"Q", cstr(sql))


def terminate() -> bytes:
    return frame(b"X")


def extended_query(sql: str, params: list[bytes | None]) -> bytes:
    """Parse, Bind, Execute and Sync of an unnamed statement: ``params`` are bound as text ($1, $2, …),
    never spliced into the SQL; results come back in text."""
    body = cstr("") + cstr("") + _I16.pack(0) + _I16.pack(len(params))
    for value in params:
        body += _I32.pack(-1) if value is None else _I32.pack(len(value)) + value
    body += _I16.pack(0)
    return (frame(b"P", cstr("") + cstr(sql) + _I16.pack(0)) + frame(b"B", body)
            + frame(b"E", cstr("") + _I32.pack(0)) + sync())


def sync() -> bytes:
    return frame(b"S")


# ---- decoders ----------------------------------------------------------------

def read_cstr(buf: bytes, pos: int) -> tuple[bytes, int]:
    """The NUL-terminated string at ``pos`` and the position after it; ValueError if unterminated."""
    end = buf.index(b"\0", pos)
    return buf[pos:end], end + 1


def parse_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse: {'C': '28P01', 'M': ..., ...}. Any may be missing."""
    fields: dict[str, str] = {}
    pos = 0
    n = len(payload)
    while pos < n and payload[pos] != 0:
        code = chr(payload[pos])
        end = payload.find(b"\0", pos + 1)
        if end < 0:
            end = n
        fields[code] = payload[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def parse_data_row(payload: bytes) -> list[bytes | None]:
    """DataRow: its column values (None for NULL); ValueError if the lengths do not add up."""
    if len(payload) < 2:
        raise ValueError("DataRow too short")
    (count,) = _I16.unpack_from(payload, 0)
    pos, out = 2, []
    for _ in range(count):
        if len(payload) - pos < 4:
            raise ValueError("DataRow too short")
        (n,) = _I32.unpack_from(payload, pos)
        pos += 4
        if n < 0:
            out.append(None)
            continue
        if len(payload) - pos < n:
            raise ValueError("DataRow too short")
        out.append(payload[pos:pos + n])
        pos += n
    return out


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, pos = read_cstr(payload, 0)
    value, _ = read_cstr(payload, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_backend_key(payload: bytes) -> tuple[int, int]:
    if len(payload) < 8:
        raise ValueError("BackendKeyData too short")
    return _U32.unpack_from(payload, 0)[0], _U32.unpack_from(payload, 4)[0]


def parse_auth_request(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ValueError("Authentication message too short")
    return _I32.unpack_from(payload, 0)[0], payload[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    mechs = []
    for part in data.split(b"\0"):
        if part:
            mechs.append(part.decode("ascii", "replace"))
    return mechs


def parse_sasl_initial(payload: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: mechanism name, Int32 length (-1 = none), data."""
    mech, pos = read_cstr(payload, 0)
    if len(payload) - pos < 4:
        raise ValueError("SASLInitialResponse too short")
    (n,) = _I32.unpack_from(payload, pos)
    pos += 4
    data = b"" if n < 0 else payload[pos:pos + n]
    if n >= 0 and len(data) != n:
        raise ValueError("SASLInitialResponse length does not match")
    return mech.decode("ascii", "replace"), data
