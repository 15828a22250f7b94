"""Fuzz the Python side of the frame scanner: pgmp/protocol/scanner.py's C Scanner (cffi) against the Python reference.

Input: flags choice, max_message_size, capacity, start and end offsets (first 8 bytes),
then the buffer. Both implementations scan buf[start:end] (as bytes, bytearray and
memoryview) and must agree on every result attribute and frame; scanning on from
``consumed`` while ``full`` must list the frames one large-capacity scan lists.

Documented errors: ValueError (a range outside the buffer; only for bad start/end).
"""
from pgmp.protocol import scanner
from pgmp.protocol._pyscan import Scanner as PythonScanner
from pgmp.protocol._pyscan import make_flags
from tests.fuzz.harnesses._common import Bytes, check

MAX_LEN = 4096
CScanner = scanner.load("c")
ATTRS = ("consumed", "nframes", "nreported", "full", "partial_type", "partial_length", "last_rfq",
         "rfq_count", "error", "error_offset")
FLAGS = (make_flags(report=bytes(range(256)), small=b"X", valid=b"pX"),
         make_flags(report=b"QSFcfXPBE", small=b"CDEHSXcf", valid=b"BCcdDEfFHPQSX"),
         make_flags(report=b"QSFcfXPBCDE", small=b"CDEHSXcf", valid=b"BCcdDEfFHPQSX"),
         make_flags(report=b"ZGSE"), make_flags(report=b"ZGS123tTnCIsEZGV"), make_flags(report=bytes(range(256))))
_cache: dict = {}


def _scanners(flags: bytes, max_len: int, capacity: int):
    key = (flags, max_len, capacity)
    if key not in _cache:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = CScanner(flags, max_len, capacity), PythonScanner(flags, max_len, capacity)
    return _cache[key]


def _result(sc, n: int) -> tuple:
    return tuple(getattr(sc, a) for a in ATTRS) + (n, tuple(sc.frame(i) for i in range(n)))


def one_input(data: bytes) -> None:
    b = Bytes(data)
    choice = b.byte()
    flags = FLAGS[choice % len(FLAGS)] if choice < 0xF0 else bytes(x & 7 for x in b.take(256).ljust(256, b"\4"))
    max_len = b.pick((1 << 30, 4 + b.byte(), 10000, 65535 + 1024, 0x7FFFFFFF))
    capacity = 1 + b.byte() % 8
    buf = b.rest()
    start = (data[-1] if data else 0) % (len(buf) + 1)
    end = len(buf) - ((data[-2] if len(data) > 1 else 0) % (len(buf) - start + 1))
    c, py = _scanners(flags, max_len, capacity)
    reference = None
    for form in (bytes(buf), bytearray(buf), memoryview(buf)):
        got = [_result(sc, sc.scan(form, start, end)) for sc in (c, py)]
        check(got[0] == got[1], f"C and Python scanners differ on [{start}:{end}]: {got[0]} != {got[1]}")
        check(reference is None or got[0] == reference, "the result depends on the buffer type")
        reference = got[0]
    # scanning on while full lists what one scan with room for everything lists
    listed, pos = [], start
    while True:
        n = c.scan(buf, pos, end)
        listed += [c.frame(i) for i in range(n)]
        if not c.full:
            break
        check(c.consumed > pos or n > 0, "a full scan made no progress")
        pos = c.consumed
    big = PythonScanner(flags, max_len, 1 << 16)
    n = big.scan(buf, start, end)
    check(listed == [big.frame(i) for i in range(n)], "scanning on from consumed lists other frames")
    for bad in ((end + 1, end), (0, len(buf) + 1), (-1, end)):
        try:
            c.scan(buf, *bad)
        except ValueError:
            continue
        check(False, f"scan accepted the range {bad} of a {len(buf)}-byte buffer")
