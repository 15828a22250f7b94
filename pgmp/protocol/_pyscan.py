"""Pure-Python frame scanner: the reference for pgmp_scan.c and the fallback where it is not built.

A v3 frame is 1 type byte, an Int32 big-endian length that counts itself
but not the type byte, then the payload. scan() walks the complete frames in
buf[start:end], lists the ones whose type is flagged F_REPORT, and describes
the trailing incomplete frame. It never trusts a length: every header is
checked before the frame is accepted, so the caller can refuse to buffer a
bad frame. Offsets are absolute (they include `start`).
"""
import struct

F_REPORT = 1  # list complete frames of this type
F_SMALL = 2   # declared length may not exceed SMALL_MAX
F_VALID = 4   # the type byte is allowed at all
F_COUNT = 8   # reported, but the C relay (pgmp.crelay) may forward it itself and count it; scanners ignore it

ERR_NONE = 0
ERR_SHORT = 1  # declared length < 4
ERR_LONG = 2   # declared length > max_message_size, or > SMALL_MAX for a small type
ERR_TYPE = 3   # type byte without F_VALID

SMALL_MAX = 10000      # PostgreSQL's cap on non-bulk messages
LEN_MAX = 0x7FFFFFFF   # wire lengths >= 2^31 exceed every max

_HEADER = struct.Struct("!BI")
_READY_FOR_QUERY = ord("Z")


def make_flags(report: bytes = b"", small: bytes = b"", valid: bytes | None = None, count: bytes = b"") -> bytes:
    """The 256-byte flags table; valid=None allows every type byte; ``count``: reported types the C
    relay may pass and count (see pgmp.crelay)."""
    table = bytearray([F_VALID if valid is None else 0]) * 256
    for type_byte in valid or b"":
        table[type_byte] |= F_VALID
    for type_byte in report:
        table[type_byte] |= F_REPORT
    for type_byte in small:
        table[type_byte] |= F_SMALL
    for type_byte in count:
        if not table[type_byte] & F_REPORT:
            raise ValueError(f"type {chr(type_byte)!r} is counted but not reported")
        table[type_byte] |= F_COUNT
    return bytes(table)


def check_settings(flags, max_message_size: int, capacity: int) -> bytes:
    """Validate Scanner arguments (shared by both implementations); returns flags as bytes."""
    flags = bytes(flags)
    if len(flags) != 256:
        raise ValueError(f"flags must be 256 bytes, got {len(flags)}")
    if not 4 <= max_message_size <= LEN_MAX:
        raise ValueError(f"max_message_size must be in [4, {LEN_MAX}], got {max_message_size}")
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    return flags


class Scanner:
    """Scans buffers of frames; results of the last scan() are attributes.

    Offsets are absolute in buf. After scan(buf, start, end):
      consumed        just past the last complete frame scanned (start if none)
      nframes         complete frames scanned, reported or not
      nreported       the return value; frame(i) -> (type, offset, length)
                      for each complete frame whose type has F_REPORT, length
                      counting the type byte (1 + declared length)
      full            a complete reported frame at `consumed` did not fit in
                      `capacity`: scan again from `consumed`
      partial_type,   type byte and total length of the incomplete frame at
      partial_length  `consumed`, once its 5-byte header is present (header
                      checked like any other); else -1 and 0. Also -1 and 0
                      when full or on error.
      last_rfq        status byte of the last complete ReadyForQuery ('Z' of
                      declared length 5), or -1; rfq_count counts every
                      complete 'Z'. Both are per scan and ignore F_REPORT.
      error           ERR_NONE, or the first bad header's error (checked in the
                      order type, short, long); the scan stops there, and
                      error_offset == consumed is its type byte (-1 if none).
    """

    __slots__ = ("_flags", "_max", "_capacity", "_frames",
                 "consumed", "nframes", "nreported", "full",
                 "partial_type", "partial_length", "last_rfq", "rfq_count",
                 "error", "error_offset")

    def __init__(self, flags: bytes, max_message_size: int = 1 << 30, capacity: int = 128):
        self._flags = check_settings(flags, max_message_size, capacity)
        self._max = max_message_size
        self._capacity = capacity
        self._frames: list[tuple[int, int, int]] = []
        self.consumed = self.nframes = self.nreported = self.rfq_count = 0
        self.full = False
        self.partial_type = self.last_rfq = self.error_offset = -1
        self.partial_length = 0
        self.error = ERR_NONE

    def frame(self, i: int) -> tuple[int, int, int]:
        """(type, offset, total length) of the i-th reported frame."""
        if not 0 <= i < self.nreported:
            raise IndexError(f"frame {i} of {self.nreported}")
        return self._frames[i]

    def scan(self, buf, start: int, end: int) -> int:
        """Scan buf[start:end]; returns the number of reported frames."""
        if isinstance(buf, memoryview) and buf.format != "B":
            buf = buf.cast("B")
        if not 0 <= start <= end <= len(buf):
            raise ValueError(f"bad range [{start}:{end}] of a {len(buf)}-byte buffer")
        flags, max_len, capacity = self._flags, self._max, self._capacity
        frames = self._frames
        frames.clear()
        unpack = _HEADER.unpack_from
        pos = start
        nframes = rfq_count = 0
        last_rfq = partial_type = -1
        partial_length = 0
        error = ERR_NONE
        full = False
        while end - pos >= 5:
            type_byte, declared = unpack(buf, pos)
            flag = flags[type_byte]
            # Same checks, same order as check_header() in pgmp_scan.c.
            if not flag & F_VALID:
                error = ERR_TYPE
            elif declared < 4:
                error = ERR_SHORT
            elif declared > max_len or (flag & F_SMALL and declared > SMALL_MAX):
                error = ERR_LONG
            if error:
                break
            if declared - 4 > end - pos - 5:
                partial_type, partial_length = type_byte, declared + 1
                break
            if flag & F_REPORT:
                # Stop before a frame that does not fit: full means "more to report".
                if len(frames) == capacity:
                    full = True
                    break
                frames.append((type_byte, pos, declared + 1))
            if type_byte == _READY_FOR_QUERY:
                rfq_count += 1
                if declared == 5:
                    last_rfq = buf[pos + 5]
            pos += declared + 1
            nframes += 1

        self.consumed = pos
        self.nframes = nframes
        self.nreported = len(frames)
        self.full = full
        self.partial_type = partial_type
        self.partial_length = partial_length
        self.last_rfq = last_rfq
        self.rfq_count = rfq_count
        self.error = error
        self.error_offset = pos if error else -1
        return len(frames)
