"""Fuzz the backend message decoders of pgmp/protocol/messages.py on a server's frames.

Input: a server's byte stream, cut into frames (leniently); each payload goes to the
decoder of its type ('R' parse_auth_request, then parse_sasl_mechanisms for SASL; 'E'/'N'
parse_fields; 'D' parse_data_row; 'S' parse_parameter_status; 'K' parse_backend_key),
and every payload to all of them and to parse_sasl_initial (a client's 'p').

Documented errors: ValueError (a field missing or lengths that do not add up).
Invariants: what a decoder returns has the documented types and sizes; a DataRow's values
lie inside the payload and re-encode to it; builders and decoders round-trip
(parameter_status, backend_key_data, sasl_initial_response, error_response, auth_request).
"""
import struct

from pgmp.protocol import messages
from tests.fuzz.harnesses._common import check, frames

MAX_LEN = 4096


def _try(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return None


def _auth(payload: bytes) -> None:
    r = _try(messages.parse_auth_request, payload)
    if r is None:
        check(len(payload) < 4, "parse_auth_request refused a payload of 4 bytes or more")
        return
    code, data = r
    check(-2**31 <= code < 2**31 and data == payload[4:], "parse_auth_request returned bad fields")
    check(messages.auth_request(code, data)[5:] == payload, "auth_request does not round-trip")
    if code == messages.AUTH_SASL:
        mechs = messages.parse_sasl_mechanisms(data)
        check(all(m and "\0" not in m for m in mechs), f"bad mechanism names {mechs}")


def _fields(payload: bytes) -> None:
    fields = messages.parse_fields(payload)
    check(all(len(k) == 1 and k != "\0" for k in fields), f"bad field codes {list(fields)}")
    check(all("\0" not in v for v in fields.values()), "a field value holds a NUL")


def _data_row(payload: bytes) -> None:
    row = _try(messages.parse_data_row, payload)
    if row is None:
        return
    (count,) = struct.unpack_from("!h", payload, 0)
    check(len(row) == max(count, 0), f"DataRow of {count} columns gave {len(row)} values")
    body = struct.pack("!h", count) + b"".join(
        struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in row)
    # NULLs may be written as any negative length; everything else must match byte for byte
    if all(v is not None for v in row):
        check(payload.startswith(body), "a DataRow's values do not re-encode to its payload")
    check(len(body) <= len(payload), "a DataRow's values are larger than its payload")


def _parameter_status(payload: bytes) -> None:
    r = _try(messages.parse_parameter_status, payload)
    if r is None:
        check(payload.count(b"\0") < 2, "parse_parameter_status refused a payload with two NULs")
        return
    name, value = r
    check("\0" not in name and "\0" not in value, "a ParameterStatus name or value holds a NUL")
    if payload.count(b"\0") == 2 and payload.endswith(b"\0"):
        try:
            exact = (payload[:payload.index(b"\0")].decode(), payload[payload.index(b"\0") + 1:-1].decode())
        except UnicodeDecodeError:
            return
        check(r == exact and messages.parameter_status(*r)[5:] == payload,
              "parameter_status does not round-trip")


def _backend_key(payload: bytes) -> None:
    r = _try(messages.parse_backend_key, payload)
    if r is None:
        check(len(payload) < 8, "parse_backend_key refused 8 bytes or more")
        return
    check(all(0 <= x < 2**32 for x in r), f"backend key out of range {r}")
    check(messages.backend_key_data(*r)[5:] == payload[:8], "backend_key_data does not round-trip")


def _sasl_initial(payload: bytes) -> None:
    r = _try(messages.parse_sasl_initial, payload)
    if r is None:
        return
    mech, data = r
    check(isinstance(mech, str) and isinstance(data, bytes), "parse_sasl_initial returned bad types")
    if mech.isascii() and "\0" not in mech:
        again = messages.parse_sasl_initial(messages.sasl_initial_response(mech, data)[5:])
        check(again == (mech, data), "sasl_initial_response does not round-trip")


_BY_TYPE = {ord("R"): _auth, ord("E"): _fields, ord("N"): _fields, ord("D"): _data_row,
            ord("S"): _parameter_status, ord("K"): _backend_key, ord("p"): _sasl_initial}


def one_input(data: bytes) -> None:
    for kind, payload in frames(data):
        decoder = _BY_TYPE.get(kind)
        if decoder is not None:
            decoder(payload)
        else:
            for decoder in _BY_TYPE.values():
                decoder(payload)
    # the error builder's output decodes to what it was given
    text = data[:64].decode("utf-8", "replace").replace("\0", "")
    fields = messages.parse_fields(messages.error_response("08P01", text, detail=text or None)[5:])
    check(fields.get("M") == text and fields.get("C") == "08P01", "error_response does not round-trip")
