"""The frame scanner interface: one Scanner API over pgmp_scan.c (via cffi) or the pure-Python reference.

PGMP_IMPL picks the implementation when this module is imported: "c" (the
C helper, ImportError if it is not built), "python", or unset (C if
pgmp._scan is built, else Python). IMPL names the one picked. Both share
the contract documented in _pyscan and one test suite.

    flags = make_flags(report=b"ZSEKA", small=b"SHCDX")
    sc = Scanner(flags, max_message_size=1 << 30, capacity=128)
    for i in range(sc.scan(buf, start, end)):
        type_byte, offset, length = sc.frame(i)
    # then sc.consumed, sc.error, sc.full, sc.partial_type, sc.last_rfq, ...

This module owns every call into pgmp._scan's scanner; pgmp.crelay those into its relay.
"""
import os

from pgmp.protocol._pyscan import (  # noqa: F401  (re-exported interface)
    ERR_LONG, ERR_NONE, ERR_SHORT, ERR_TYPE, F_COUNT, F_REPORT, F_SMALL, F_VALID,
    SMALL_MAX, check_settings, make_flags)
from pgmp.protocol._pyscan import Scanner as PythonScanner

_ffi = _lib = None  # set by load("c")


class _CScanner:
    """Scanner backed by pgmp_scan(); results are copied to plain attributes after each scan.

    Measured: copying a result field costs about 50 ns once, a property over
    the result struct about 100 ns per read, so the fields the IO loop reads
    on every scan are copied and the rarely read ones are properties.
    """

    __slots__ = ("_flags", "_max", "_capacity", "_frames", "_res", "_start",
                 "_from_buffer", "_pgmp_scan",
                 "consumed", "nreported", "full", "partial_type", "partial_length",
                 "last_rfq", "rfq_count", "error")

    def __init__(self, flags: bytes, max_message_size: int = 1 << 30, capacity: int = 128):
        flags = check_settings(flags, max_message_size, capacity)
        # Allocated once: scan() only refills them.
        self._flags = _ffi.new("uint8_t[256]", flags)
        self._frames = _ffi.new("pgmp_frame[]", capacity)
        self._res = _ffi.new("pgmp_scan_result *")
        self._max = max_message_size
        self._capacity = capacity
        self._start = 0
        self._from_buffer = _ffi.from_buffer
        self._pgmp_scan = _lib.pgmp_scan
        self.consumed = self.nreported = self.rfq_count = 0
        self.full = False
        self.partial_type = self.last_rfq = -1
        self.partial_length = 0
        self.error = ERR_NONE

    @property
    def nframes(self) -> int:
        return self._res.nframes

    @property
    def error_offset(self) -> int:
        return self.consumed if self.error else -1

    def frame(self, i: int) -> tuple[int, int, int]:
        """(type, offset, total length) of the i-th reported frame."""
        if not 0 <= i < self.nreported:
            raise IndexError(f"frame {i} of {self.nreported}")
        f = self._frames[i]
        return f.type, f.offset + self._start, f.length

    def scan(self, buf, start: int, end: int) -> int:
        """Scan buf[start:end]; returns the number of reported frames."""
        # A fresh view per call: the caller's bytearray may be resized between scans,
        # and the view is released (unpinning it) when this function returns.
        view = self._from_buffer(buf)  # char[]: the fastest form; cffi passes it as uint8_t *
        if not 0 <= start <= end <= len(view):
            raise ValueError(f"bad range [{start}:{end}] of a {len(view)}-byte buffer")
        res = self._res
        error = self._pgmp_scan(view + start, end - start, self._flags, self._max,
                                self._frames, self._capacity, res)
        self._start = start
        self.consumed = res.consumed + start
        self.nreported = n = res.nreported
        self.full = res.full != 0
        self.partial_type = res.partial_type
        self.partial_length = res.partial_length
        self.last_rfq = res.last_rfq
        self.rfq_count = res.rfq_count
        self.error = error
        return n


def load(impl: str) -> type:
    """The Scanner class of one implementation, "c" (ImportError if not built) or "python"."""
    global _ffi, _lib
    if impl == "python":
        return PythonScanner
    if impl == "c":
        from pgmp._scan import ffi, lib
        _ffi, _lib = ffi, lib
        return _CScanner
    raise ValueError(f"unknown scanner implementation {impl!r}")


def _pick() -> tuple[str, type]:
    wanted = os.environ.get("PGMP_IMPL", "")
    if wanted not in ("", "c", "python"):
        raise ImportError(f"PGMP_IMPL must be 'c' or 'python', not {wanted!r}")
    if wanted:
        return wanted, load(wanted)
    try:
        return "c", load("c")
    except ImportError:
        return "python", PythonScanner


IMPL, Scanner = _pick()
