"""Refuse a malformed frontend message with the error PostgreSQL would send for it (sans-IO).

In transaction and statement pooling pgmp reads the client's Parse, Bind,
Describe, Close and Execute (and Query, Flush, Sync) itself, so a malformed one
must be refused before pgmp acts on it, with the answer PostgreSQL 15 gives:
SQLSTATE 08P01 (protocol_violation) and the server's own message text. The
checks are those of src/backend/libpq/pqformat.c as PostgresMain and
exec_bind_message (src/backend/tcop/postgres.c) apply them, in the same order,
so the first fault found is the one the server would report:

- a string field (pq_getmsgstring) with no NUL before the end of the message:
  "invalid string in message";
- an integer or counted field (pq_getmsgint, pq_getmsgbytes) that does not fit in
  what is left, or a Bind parameter length below -1: "insufficient data left in
  message";
- a Describe or Close with an empty body (pq_getmsgbyte): "no data left in message";
- bytes left over after the last field (pq_getmsgend): "invalid message format";
- a Bind with more than one parameter format code and not one per parameter:
  "bind message has %d parameter formats but %d parameters";
- a Describe or Close whose subtype is neither 'S' nor 'P' (judged after the whole
  message was read): "invalid DESCRIBE message subtype %d", "invalid CLOSE message
  subtype %d".

Counts are unsigned 16-bit integers, as pq_getmsgint(msg, 2) reads them: 0xFFFF is
65535 entries, not -1.

Format codes other than 0 and 1 do not make a Bind malformed: PostgreSQL raises
"unsupported format code: %d" (SQLSTATE 22023) only when it converts the parameter,
after the statement was found and the parameters before it went through their
types' input functions, so a well-framed Bind is left to the server to answer. In
a Bind that is malformed anyway, a bad code on a parameter read whole before the
fault is what the server reports first, and so is what is raised here.

Left to the server, which answers them itself once the message is forwarded: whether
the statement or portal exists, whether the Bind's parameter count matches the
statement's, result format codes and their count against the columns, the encoding
of strings, and the parameter values.

Validation costs a few ``find`` and ``struct.unpack_from`` calls per message; a Bind
loops over its parameters by offset only, never byte by byte.
"""
import re
import struct

from pgmp.errors import ClientProtocolError

# PostgreSQL's message texts (pqformat.c and postgres.c).
INVALID_STRING = "invalid string in message"
INSUFFICIENT_DATA = "insufficient data left in message"
NO_DATA = "no data left in message"
INVALID_FORMAT = "invalid message format"
INVALID_PARAMETER_VALUE = "22023"   # SQLSTATE of "unsupported format code: %d"

_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_u16 = _U16.unpack_from
_i16 = _I16.unpack_from
_i32 = _I32.unpack_from
_NUL = re.compile(b"\0")

_P, _B, _D, _C, _E, _Q, _H, _S = 80, 66, 68, 67, 69, 81, 72, 83
_STATEMENT, _PORTAL = 83, 80        # Describe/Close subtypes 'S' and 'P'


def _nul(buf, pos: int) -> int:
    """Index of the first NUL at or after ``pos``, or -1."""
    try:
        return buf.find(0, pos)                 # bytes, bytearray
    except AttributeError:                      # memoryview: search it in place, no copy
        m = _NUL.search(buf, pos)
        return m.start() if m is not None else -1


def _string(buf, pos: int) -> int:
    """pq_getmsgstring: the position after the NUL-terminated string at ``pos``."""
    end = _nul(buf, pos)
    if end < 0:
        raise ClientProtocolError(INVALID_STRING)
    return end + 1


def _end(pos: int, n: int) -> None:
    """pq_getmsgend."""
    if pos != n:
        raise ClientProtocolError(INVALID_FORMAT)


def _parse(buf, n: int) -> None:
    """Parse: statement name, query string, Int16 count, that many Int32 type OIDs."""
    pos = _string(buf, _string(buf, 0))
    if pos + 2 > n:
        raise ClientProtocolError(INSUFFICIENT_DATA)
    pos += 2 + 4 * _u16(buf, pos)[0]
    if pos > n:
        raise ClientProtocolError(INSUFFICIENT_DATA)
    _end(pos, n)


def _bind(buf, n: int, whole: bool) -> None:
    """Bind: portal, statement, Int16 + formats, Int16 + (Int32 length + bytes) per parameter,
    Int16 + result formats. Returns quietly where a head (``whole`` false) runs out."""
    end = _nul(buf, 0)
    if end >= 0:
        end = _nul(buf, end + 1)
    if end < 0:
        if whole:
            raise ClientProtocolError(INVALID_STRING)
        return
    pos = end + 1
    if pos + 2 > n:
        if whole:
            raise ClientProtocolError(INSUFFICIENT_DATA)
        return
    nformats = _u16(buf, pos)[0]
    formats = pos + 2
    pos = formats + 2 * nformats
    if pos + 2 > n:
        if whole:
            raise ClientProtocolError(INSUFFICIENT_DATA)
        return
    nparams = _u16(buf, pos)[0]
    pos += 2
    if nformats > 1 and nformats != nparams:
        raise ClientProtocolError(f"bind message has {nformats} parameter formats but {nparams} parameters")
    for i in range(nparams):
        if pos + 4 > n:
            if whole:
                raise _after_params(buf, formats, nformats, i, INSUFFICIENT_DATA)
            return
        length = _i32(buf, pos)[0]
        pos += 4
        if length < 0:
            if length != -1:                    # pq_getmsgbytes refuses a negative length
                raise _after_params(buf, formats, nformats, i, INSUFFICIENT_DATA)
        else:
            pos += length
            if pos > n:
                if whole:
                    raise _after_params(buf, formats, nformats, i, INSUFFICIENT_DATA)
                return
    if pos + 2 > n:
        if whole:
            raise _after_params(buf, formats, nformats, nparams, INSUFFICIENT_DATA)
        return
    pos += 2 + 2 * _u16(buf, pos)[0]
    if whole:
        if pos > n:
            raise _after_params(buf, formats, nformats, nparams, INSUFFICIENT_DATA)
        if pos != n:
            raise _after_params(buf, formats, nformats, nparams, INVALID_FORMAT)


def _after_params(buf, formats: int, nformats: int, read: int, message: str) -> ClientProtocolError:
    """The error for a Bind fault found once ``read`` parameters were read whole.

    PostgreSQL converts each parameter as soon as it has read it, so a parameter
    with a format code other than 0 or 1 among those is reported first, as
    "unsupported format code: %d" (SQLSTATE 22023; the code printed as the int16 it
    is stored in). Only reached for a message already known to be malformed.
    """
    if nformats and read:
        for i in range(read if nformats > 1 else 1):
            code = _i16(buf, formats + 2 * i)[0]
            if code != 0 and code != 1:
                return ClientProtocolError(f"unsupported format code: {code}", INVALID_PARAMETER_VALUE)
    return ClientProtocolError(message)


def _describe_or_close(buf, n: int, what: str) -> None:
    """Describe / Close: Byte1 subtype, name; the subtype is judged after the whole message is read."""
    if n < 1:
        raise ClientProtocolError(NO_DATA)
    _end(_string(buf, 1), n)
    subtype = buf[0]
    if subtype != _STATEMENT and subtype != _PORTAL:
        raise ClientProtocolError(f"invalid {what} message subtype {subtype}")


def check_message(kind: int, payload: bytes | memoryview) -> None:
    """Raise ClientProtocolError (08P01, PostgreSQL's message) if the whole frontend message is malformed.

    ``kind`` is the type byte, ``payload`` the body after the length word. Only
    Parse, Bind, Describe, Close, Execute, Query, Flush and Sync are checked; any
    other type passes unchecked.
    """
    n = len(payload)
    if kind == _B:
        _bind(payload, n, True)
    elif kind == _P:
        _parse(payload, n)
    elif kind == _E:
        pos = _string(payload, 0)
        if pos + 4 > n:
            raise ClientProtocolError(INSUFFICIENT_DATA)
        _end(pos + 4, n)
    elif kind == _D:
        _describe_or_close(payload, n, "DESCRIBE")
    elif kind == _C:
        _describe_or_close(payload, n, "CLOSE")
    elif kind == _Q:
        _end(_string(payload, 0), n)
    elif kind == _S or kind == _H:
        _end(0, n)


def check_head(kind: int, head: bytes | memoryview) -> None:
    """Check the first bytes of a Bind or Parse whose body is longer than ``head``.

    Raises what :func:`check_message` would for a fault already visible in the head
    (a parameter length below -1, a Bind's format and parameter counts that disagree);
    a field that runs past the end of ``head`` is taken to continue in the part not yet
    seen, never as an error. Other message types pass unchecked.
    """
    if kind == _B:
        _bind(head, len(head), False)
    # A Parse's head holds nothing that can be wrong on its own: every fault PostgreSQL
    # finds in a Parse is a field running past the end, or bytes after the last one.
