"""Parse the first packet of a client connection: SSLRequest, GSSENCRequest, CancelRequest or StartupMessage (sans-IO).

The rules and the SQLSTATEs are PostgreSQL's own (ProcessStartupPacket).
"""
import struct
from dataclasses import dataclass, field

from pgmp import errors
from pgmp.errors import ClientProtocolError
from pgmp.protocol.messages import (CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET,
                                    SSL_REQUEST_CODE)

_HEAD = struct.Struct("!Ii")


@dataclass
class StartupPacket:
    """What a client asked for in its first packet."""
    kind: str                                   # "ssl" | "gssenc" | "cancel" | "startup"
    params: dict[str, str] = field(default_factory=dict)
    minor: int = 0                              # requested 3.x minor version
    unrecognized: list[str] = field(default_factory=list)   # _pq_.* options
    cancel_pid: int = 0
    cancel_secret: int = 0

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database") or self.user


def packet_length(head: bytes) -> int:
    """The length of a startup packet from its first 4 bytes; refuses bad lengths before anything is buffered."""
    (length,) = struct.unpack_from("!I", head, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ClientProtocolError("invalid length of startup packet")
    return length


def parse(packet: bytes) -> StartupPacket:
    """Decode one complete startup-slot packet (length word included)."""
    length, code = _HEAD.unpack_from(packet, 0)
    if length != len(packet):
        raise ClientProtocolError("invalid length of startup packet")
    if code == SSL_REQUEST_CODE:
        return StartupPacket("ssl")
    if code == GSSENC_REQUEST_CODE:
        return StartupPacket("gssenc")
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise ClientProtocolError("invalid length of cancel request packet")
        pid, secret = struct.unpack_from("!II", packet, 8)
        return StartupPacket("cancel", cancel_pid=pid, cancel_secret=secret)
    major, minor = (code >> 16) & 0xFFFF, code & 0xFFFF
    if major != 3:
        raise ClientProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            sqlstate=errors.FEATURE_NOT_SUPPORTED)
    return _parse_params(packet, minor)


def _parse_params(packet: bytes, minor: int) -> StartupPacket:
    body = packet[8:]
    if not body or body[-1] != 0:
        raise ClientProtocolError("invalid startup packet layout: expected terminator as last byte")
    sp = StartupPacket("startup", minor=minor)
    parts = body[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()         # body ended "...value\0\0": the split leaves one empty tail
    else:
        raise ClientProtocolError("invalid startup packet layout: expected terminator as last byte")
    if len(parts) % 2:
        raise ClientProtocolError("invalid startup packet layout: name without value")
    for i in range(0, len(parts), 2):
        try:
            name, value = parts[i].decode(), parts[i + 1].decode()
        except UnicodeDecodeError:
            raise ClientProtocolError("invalid byte sequence in startup packet") from None
        if not name:
            raise ClientProtocolError("invalid startup packet layout: empty parameter name")
        if name.startswith("_pq_."):
            sp.unrecognized.append(name)
        else:
            sp.params[name] = value
    if not sp.params.get("user"):
        raise ClientProtocolError("no PostgreSQL user name specified in startup packet",
                                  sqlstate=errors.INVALID_AUTHORIZATION)
    if "replication" in sp.params and sp.params["replication"].lower() not in ("false", "off", "no", "0"):
        raise ClientProtocolError("pgmp does not support replication connections",
                                  sqlstate=errors.FEATURE_NOT_SUPPORTED)
    sp.params.pop("replication", None)
    return sp


def parse_options(options: str) -> dict[str, str]:
    """Settings from the startup `options` parameter (`-c name=value` / `--name=value`).

    Anything else (other backend switches) is refused: pgmp cannot apply it to pooled servers.
    """
    out: dict[str, str] = {}
    words = _split_options(options)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif w.startswith("-c") and len(w) > 2:
            setting = w[2:]
            i += 1
        elif w.startswith("--") and "=" in w:
            setting = w[2:]
            i += 1
        else:
            raise ClientProtocolError(f"unsupported startup option {w!r}: pgmp accepts only -c name=value",
                                      sqlstate=errors.FEATURE_NOT_SUPPORTED)
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise ClientProtocolError(f"invalid startup option {setting!r}: expected name=value")
        out[name.replace("-", "_")] = value
    return out


def _split_options(s: str) -> list[str]:
    """Split like PostgreSQL's pg_split_opts: whitespace separates, backslash escapes."""
    words, cur, esc, have = [], [], False, False
    for ch in s:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc, have = True, True
        elif ch.isspace():
            if cur or have:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(ch)
            have = True
    if cur or have:
        words.append("".join(cur))
    return words
