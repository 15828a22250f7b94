"""Frame scanner tests, run against both implementations, plus C-vs-Python property checks."""
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgmp
from pgmp.protocol import scanner
from pgmp.protocol.scanner import (
    ERR_LONG, ERR_NONE, ERR_SHORT, ERR_TYPE, F_REPORT, F_SMALL, F_VALID, SMALL_MAX,
    make_flags)

LEN_MAX = 0x7FFFFFFF
ALL_TYPES = bytes(range(256))
REPORT_ALL = make_flags(report=ALL_TYPES)
RESULT_ATTRS = ("consumed", "nframes", "nreported", "full", "partial_type",
                "partial_length", "last_rfq", "rfq_count", "error", "error_offset")


def load_or_skip(impl: str) -> type:
    try:
        return scanner.load(impl)
    except ImportError:
        pytest.skip("the C scanner (pgmp._scan) is not built")


# Module scope: the value is a class, and hypothesis refuses function-scoped fixtures.
@pytest.fixture(params=["python", "c"], scope="module")
def Scanner(request):
    return load_or_skip(request.param)


@pytest.fixture(scope="module")
def both():
    return load_or_skip("python"), load_or_skip("c")


def header(type_byte: bytes, declared: int) -> bytes:
    return type_byte + struct.pack("!I", declared)


def frame(type_byte: bytes, payload: bytes = b"") -> bytes:
    return header(type_byte, len(payload) + 4) + payload


def rfq(status: bytes) -> bytes:
    return frame(b"Z", status)


def results(sc, n: int) -> dict:
    """Everything a scan produced, for comparisons."""
    got = {name: getattr(sc, name) for name in RESULT_ATTRS}
    got["n"] = n
    got["frames"] = [sc.frame(i) for i in range(n)]
    return got


def scan(sc, buf, start: int = 0, end: int | None = None) -> dict:
    return results(sc, sc.scan(buf, start, len(buf) if end is None else end))


def assert_clean_end(got: dict, consumed: int) -> None:
    assert got["error"] == ERR_NONE and got["error_offset"] == -1
    assert not got["full"]
    assert got["consumed"] == consumed


# ---- interface and argument checks ------------------------------------------

def test_make_flags_bits():
    flags = make_flags(report=b"Z", small=b"S")
    assert len(flags) == 256 and isinstance(flags, bytes)
    assert all(f & F_VALID for f in flags)
    assert flags[ord("Z")] == F_REPORT | F_VALID
    assert flags[ord("S")] == F_SMALL | F_VALID
    assert flags[ord("D")] == F_VALID


def test_make_flags_valid_set():
    flags = make_flags(report=b"Z", small=b"S", valid=b"ZD")
    assert flags[ord("Z")] == F_REPORT | F_VALID
    assert flags[ord("D")] == F_VALID
    assert flags[ord("S")] == F_SMALL
    assert flags[ord("Q")] == 0


def test_impl_is_known():
    assert scanner.IMPL in ("c", "python")
    assert scanner.Scanner is scanner.load(scanner.IMPL)


@pytest.mark.parametrize("kwargs", [
    {"flags": b"\x04" * 255},
    {"max_message_size": 3},
    {"max_message_size": LEN_MAX + 1},
    {"capacity": 0},
])
def test_bad_settings(Scanner, kwargs):
    args = {"flags": REPORT_ALL, **kwargs}
    with pytest.raises(ValueError):
        Scanner(**args)


@pytest.mark.parametrize("start, end", [(-1, 3), (4, 3), (0, 11), (11, 11)])
def test_bad_range(Scanner, start, end):
    with pytest.raises(ValueError):
        Scanner(REPORT_ALL).scan(b"x" * 10, start, end)


def test_frame_index_checked(Scanner):
    sc = Scanner(REPORT_ALL)
    assert sc.scan(frame(b"Q", b"x\0"), 0, 7) == 1
    assert sc.frame(0) == (ord("Q"), 0, 7)
    for i in (1, -1):
        with pytest.raises(IndexError):
            sc.frame(i)


def test_fresh_scanner_has_empty_results(Scanner):
    sc = Scanner(REPORT_ALL)
    assert results(sc, 0) == {
        "consumed": 0, "nframes": 0, "nreported": 0, "full": False, "partial_type": -1,
        "partial_length": 0, "last_rfq": -1, "rfq_count": 0, "error": ERR_NONE,
        "error_offset": -1, "n": 0, "frames": []}


# ---- complete frames --------------------------------------------------------

def test_empty_buffer(Scanner):
    got = scan(Scanner(REPORT_ALL), b"")
    assert_clean_end(got, 0)
    assert got["n"] == got["nframes"] == 0
    assert (got["partial_type"], got["partial_length"]) == (-1, 0)


@pytest.mark.parametrize("type_value", range(256))
def test_single_frame_of_every_type(Scanner, type_value):
    data = frame(bytes([type_value]), b"payload")
    got = scan(Scanner(REPORT_ALL), data)
    assert_clean_end(got, len(data))
    assert got["frames"] == [(type_value, 0, len(data))]
    assert got["nframes"] == 1
    assert (got["partial_type"], got["partial_length"]) == (-1, 0)


def test_unreported_frames_are_counted_not_listed(Scanner):
    data = frame(b"D", b"row") + frame(b"C", b"SELECT 1\0") + rfq(b"I")
    got = scan(Scanner(make_flags(report=b"C")), data)
    assert_clean_end(got, len(data))
    assert got["nframes"] == 3
    assert got["frames"] == [(ord("C"), 8, 14)]


def test_many_frames(Scanner):
    frames, data = [], bytearray()
    for i in range(2000):
        type_byte = b"DCTZ"[i % 4:i % 4 + 1]
        payload = bytes(i % 50)
        frames.append((type_byte[0], len(data), 5 + len(payload)))
        data += frame(type_byte, payload)
    sc = Scanner(make_flags(report=b"CT"), capacity=2000)
    got = scan(sc, data)
    assert_clean_end(got, len(data))
    assert got["nframes"] == 2000
    assert got["frames"] == [f for f in frames if f[0] in b"CT"]


def test_length_exactly_4(Scanner):
    data = frame(b"S") + frame(b"H")
    got = scan(Scanner(REPORT_ALL), data)
    assert_clean_end(got, 10)
    assert got["frames"] == [(ord("S"), 0, 5), (ord("H"), 5, 5)]


def test_start_and_end_inside_a_buffer(Scanner):
    body = frame(b"T", b"desc") + frame(b"D", b"row") + rfq(b"T")
    data = b"garbage!" + body + b"\xff\xff\xff"
    start, end = 8, 8 + len(body)
    got = scan(Scanner(REPORT_ALL), data, start, end)
    assert_clean_end(got, end)
    assert got["frames"] == [(ord("T"), 8, 9), (ord("D"), 17, 8), (ord("Z"), 25, 6)]
    assert got["last_rfq"] == ord("T")


def test_start_equals_end(Scanner):
    got = scan(Scanner(REPORT_ALL), b"\xff" * 20, 7, 7)
    assert_clean_end(got, 7)
    assert got["n"] == 0 and got["partial_type"] == -1


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview,
                                  lambda b: memoryview(bytearray(b)),
                                  lambda b: memoryview(b"..." + b)[3:]],
                         ids=["bytes", "bytearray", "memoryview", "memoryview-rw", "memoryview-slice"])
def test_buffer_kinds(Scanner, wrap):
    data = frame(b"E", b"SERROR\0\0") + rfq(b"E") + b"D\0\0"
    got = scan(Scanner(make_flags(report=b"EZ")), wrap(data))
    assert_clean_end(got, 19)
    assert got["frames"] == [(ord("E"), 0, 13), (ord("Z"), 13, 6)]
    assert got["last_rfq"] == ord("E")


def test_bytearray_is_not_pinned_after_scan(Scanner):
    # The IO loop compacts and grows its buffer between scans.
    buf = bytearray(frame(b"D", b"x") + b"D\0")
    sc = Scanner(REPORT_ALL)
    sc.scan(buf, 0, len(buf))
    del buf[:sc.consumed]
    buf += b"\0\0\x05y"
    assert sc.scan(buf, 0, len(buf)) == 1
    assert sc.frame(0) == (ord("D"), 0, 6)


# ---- ReadyForQuery tracking ------------------------------------------------

def test_ready_for_query_tracking(Scanner):
    data = rfq(b"I") + frame(b"D", b"r") + rfq(b"T") + rfq(b"E") + frame(b"C", b"c\0")
    got = scan(Scanner(make_flags(report=b"C")), data)
    assert got["last_rfq"] == ord("E")
    assert got["rfq_count"] == 3
    assert got["frames"] == [(ord("C"), 24, 7)]


def test_ready_for_query_of_wrong_length_counts_without_status(Scanner):
    got = scan(Scanner(REPORT_ALL), frame(b"Z", b"IX") + frame(b"Z"))
    assert got["rfq_count"] == 2
    assert got["last_rfq"] == -1


def test_partial_ready_for_query_is_not_counted(Scanner):
    data = rfq(b"I") + rfq(b"T")[:-1]
    got = scan(Scanner(REPORT_ALL), data)
    assert (got["rfq_count"], got["last_rfq"]) == (1, ord("I"))
    assert (got["partial_type"], got["partial_length"]) == (ord("Z"), 6)


def test_ready_for_query_state_resets_each_scan(Scanner):
    sc = Scanner(REPORT_ALL)
    scan(sc, rfq(b"T"))
    got = scan(sc, frame(b"D"))
    assert (got["rfq_count"], got["last_rfq"]) == (0, -1)


# ---- partial frames ----------------------------------------------------------

@pytest.mark.parametrize("have", range(5))
def test_partial_header(Scanner, have):
    whole = frame(b"Q", b"select\0")
    data = frame(b"S") + whole[:have]
    got = scan(Scanner(REPORT_ALL), data)
    assert_clean_end(got, 5)
    assert got["frames"] == [(ord("S"), 0, 5)]
    assert (got["partial_type"], got["partial_length"]) == (-1, 0)


@pytest.mark.parametrize("have", range(5, 12))
def test_partial_body(Scanner, have):
    whole = frame(b"Q", b"select\0")  # 12 bytes
    data = frame(b"S") + whole[:have]
    got = scan(Scanner(REPORT_ALL), data)
    assert_clean_end(got, 5)
    assert got["frames"] == [(ord("S"), 0, 5)]
    assert (got["partial_type"], got["partial_length"]) == (ord("Q"), 12)


def test_partial_frame_larger_than_buffer(Scanner):
    data = header(b"d", 1 << 30)
    got = scan(Scanner(REPORT_ALL), data)
    assert_clean_end(got, 0)
    assert (got["partial_type"], got["partial_length"]) == (ord("d"), (1 << 30) + 1)


def test_partial_info_ignores_bytes_past_end(Scanner):
    data = frame(b"D", b"abc") + frame(b"D", b"abc")
    got = scan(Scanner(REPORT_ALL), data, 0, len(data) - 1)
    assert_clean_end(got, 8)
    assert (got["partial_type"], got["partial_length"]) == (ord("D"), 8)


# ---- errors ----------------------------------------------------------------

@pytest.mark.parametrize("declared", [0, 1, 2, 3])
def test_length_below_4(Scanner, declared):
    data = rfq(b"I") + header(b"D", declared) + frame(b"D")
    got = scan(Scanner(REPORT_ALL), data)
    assert got["error"] == ERR_SHORT
    assert got["error_offset"] == got["consumed"] == 6
    assert got["frames"] == [(ord("Z"), 0, 6)]
    assert got["nframes"] == 1 and got["last_rfq"] == ord("I")
    assert (got["partial_type"], got["partial_length"], got["full"]) == (-1, 0, False)


def test_length_max_and_max_plus_one(Scanner):
    sc = Scanner(REPORT_ALL, max_message_size=100)
    at_max = frame(b"d", bytes(96))
    got = scan(sc, at_max)
    assert_clean_end(got, 101)
    assert got["frames"] == [(ord("d"), 0, 101)]

    got = scan(sc, frame(b"C") + frame(b"d", bytes(97)))
    assert got["error"] == ERR_LONG and got["error_offset"] == got["consumed"] == 5
    assert got["frames"] == [(ord("C"), 0, 5)]


def test_small_types_are_capped_at_small_max(Scanner):
    sc = Scanner(make_flags(report=b"SD", small=b"S"))
    at_cap = frame(b"S", bytes(SMALL_MAX - 4))
    got = scan(sc, at_cap)
    assert_clean_end(got, SMALL_MAX + 1)
    assert got["frames"] == [(ord("S"), 0, SMALL_MAX + 1)]

    over = frame(b"S", bytes(SMALL_MAX - 3))
    got = scan(sc, at_cap + over)
    assert got["error"] == ERR_LONG and got["error_offset"] == SMALL_MAX + 1
    assert got["frames"] == [(ord("S"), 0, SMALL_MAX + 1)]

    big = frame(b"D", bytes(SMALL_MAX - 3))  # not a small type
    got = scan(sc, big)
    assert_clean_end(got, len(big))


def test_type_not_valid(Scanner):
    sc = Scanner(make_flags(report=b"Q", valid=b"QX"))
    data = frame(b"Q", b"q\0") + frame(b"X") + frame(b"Y") + frame(b"Q", b"q\0")
    got = scan(sc, data)
    assert got["error"] == ERR_TYPE and got["error_offset"] == got["consumed"] == 12
    assert got["frames"] == [(ord("Q"), 0, 7)]
    assert got["nframes"] == 2


def test_type_checked_before_length(Scanner):
    sc = Scanner(make_flags(valid=b"Q"))
    assert scan(sc, header(b"Y", 0))["error"] == ERR_TYPE


@pytest.mark.parametrize("declared, error", [
    (3, ERR_SHORT), (10001, ERR_LONG), (0x80000000, ERR_LONG), (0xFFFFFFFF, ERR_LONG)])
def test_partial_header_is_validated(Scanner, declared, error):
    sc = Scanner(make_flags(report=b"S", small=b"S"))
    got = scan(sc, frame(b"S") + header(b"S", declared))
    assert got["error"] == error and got["error_offset"] == got["consumed"] == 5
    assert (got["partial_type"], got["partial_length"]) == (-1, 0)


@pytest.mark.parametrize("declared", [0x80000000, 0x80000004, 0xFFFFFFFB, 0xFFFFFFFF])
def test_lengths_from_2_31_exceed_the_largest_max(Scanner, declared):
    got = scan(Scanner(REPORT_ALL, max_message_size=LEN_MAX), header(b"D", declared) + bytes(64))
    assert got["error"] == ERR_LONG and got["error_offset"] == 0


def test_largest_max_is_accepted(Scanner):
    got = scan(Scanner(REPORT_ALL, max_message_size=LEN_MAX), header(b"D", LEN_MAX))
    assert_clean_end(got, 0)
    assert (got["partial_type"], got["partial_length"]) == (ord("D"), LEN_MAX + 1)


# ---- capacity ----------------------------------------------------------------

def test_full_stops_before_the_frame_that_does_not_fit(Scanner):
    data = (frame(b"E", b"e") + frame(b"D") + frame(b"N", b"n") + frame(b"D")
            + frame(b"E", b"e") + rfq(b"I"))
    sc = Scanner(make_flags(report=b"ENZ"), capacity=2)
    got = scan(sc, data)
    assert got["full"] and got["error"] == ERR_NONE
    assert got["frames"] == [(ord("E"), 0, 6), (ord("N"), 11, 6)]
    assert got["consumed"] == 22 and got["nframes"] == 4  # the 'D' after 'N' is consumed
    assert (got["partial_type"], got["partial_length"]) == (-1, 0)

    got = scan(sc, data, got["consumed"])
    assert_clean_end(got, len(data))
    assert got["frames"] == [(ord("E"), 22, 6), (ord("Z"), 28, 6)]
    assert got["last_rfq"] == ord("I")


def test_not_full_when_capacity_is_reached_at_the_end(Scanner):
    data = frame(b"E") + frame(b"D") + frame(b"D", b"xx")[:-1]
    got = scan(Scanner(make_flags(report=b"E"), capacity=1), data)
    assert_clean_end(got, 10)
    assert got["frames"] == [(ord("E"), 0, 5)]
    assert (got["partial_type"], got["partial_length"]) == (ord("D"), 7)


def test_full_does_not_count_the_pending_ready_for_query(Scanner):
    sc = Scanner(make_flags(report=b"Z"), capacity=1)
    got = scan(sc, rfq(b"T") + rfq(b"I"))
    assert got["full"] and got["consumed"] == 6
    assert (got["rfq_count"], got["last_rfq"]) == (1, ord("T"))


def test_capacity_loop_collects_everything(Scanner):
    data = b"".join(frame(b"AN"[i % 2:i % 2 + 1], bytes(i % 7)) for i in range(100))
    sc = Scanner(REPORT_ALL, capacity=7)
    pos, collected = 0, []
    while True:
        got = scan(sc, data, pos)
        collected += got["frames"]
        pos = got["consumed"]
        if not got["full"]:
            break
        assert got["n"] == 7
    assert pos == len(data)
    assert collected == scan(Scanner(REPORT_ALL, capacity=100), data)["frames"]


# ---- implementation choice -------------------------------------------------

def impl_in_subprocess(value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PGMP_IMPL", None)
    if value is not None:
        env["PGMP_IMPL"] = value
    env["PYTHONPATH"] = str(Path(pgmp.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-c", "import pgmp.protocol.scanner as s; print(s.IMPL)"],
        env=env, capture_output=True, text=True, timeout=60)


def c_is_built() -> bool:
    try:
        scanner.load("c")
    except ImportError:
        return False
    return True


def test_env_selects_python():
    proc = impl_in_subprocess("python")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "python"


def test_env_selects_c():
    proc = impl_in_subprocess("c")
    if c_is_built():
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "c"
    else:
        assert "ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr


def test_env_unset_prefers_c():
    proc = impl_in_subprocess(None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("c" if c_is_built() else "python")


def test_env_rejects_unknown_value():
    proc = impl_in_subprocess("rust")
    assert proc.returncode != 0 and "PGMP_IMPL" in proc.stderr


# ---- properties: C and Python agree -----------------------------------------

TYPE_ALPHABET = b"DZCESQTdXK\x00\xff"

type_bytes = st.sampled_from([bytes([t]) for t in TYPE_ALPHABET])
payloads = st.binary(max_size=24)
whole_frames = st.builds(frame, type_bytes, payloads)
rfq_frames = st.builds(rfq, st.sampled_from([b"I", b"T", b"E"]))
ADVERSARIAL_LENGTHS = (list(range(0, 5)) + list(range(0x7FFFFFFB, 0x80000005))
                       + list(range(0xFFFFFFFB, 0x100000000)))
adversarial_headers = st.builds(header, type_bytes, st.sampled_from(ADVERSARIAL_LENGTHS))
random_headers = st.builds(header, type_bytes, st.integers(0, 0xFFFFFFFF))

flag_tables = st.one_of(
    st.binary(min_size=256, max_size=256),
    st.builds(make_flags,
              report=st.binary(max_size=6), small=st.binary(max_size=6),
              valid=st.one_of(st.none(), st.binary(max_size=12))),
    st.just(REPORT_ALL))
max_sizes = st.one_of(st.integers(4, 64), st.integers(4, LEN_MAX), st.just(LEN_MAX))
capacities = st.integers(1, 6)


@st.composite
def buffers(draw, pieces):
    """A buffer of pieces, and a [start:end] range inside it."""
    data = b"".join(draw(st.lists(pieces, max_size=12)))
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    return data, start, end


def agree(both, flags, max_size, capacity, data, start, end) -> dict:
    """Scan with both implementations, check they agree and stay inside the range."""
    python, c = (cls(flags, max_message_size=max_size, capacity=capacity) for cls in both)
    py_got = scan(python, data, start, end)
    c_got = scan(c, memoryview(data), start, end)
    assert c_got == py_got
    assert start <= py_got["consumed"] <= end
    for _, offset, length in py_got["frames"]:
        assert start <= offset and offset + length <= py_got["consumed"]
    if py_got["partial_type"] != -1:
        assert py_got["partial_length"] > end - py_got["consumed"]
    return py_got


@settings(max_examples=1000, deadline=None)
@given(flags=flag_tables, max_size=max_sizes, capacity=capacities,
       buf=buffers(st.one_of(st.binary(max_size=40), whole_frames, rfq_frames, random_headers)))
def test_c_and_python_agree(both, flags, max_size, capacity, buf):
    agree(both, flags, max_size, capacity, *buf)


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=200), flags=flag_tables, max_size=max_sizes, capacity=capacities)
def test_c_and_python_agree_on_raw_bytes(both, data, flags, max_size, capacity):
    agree(both, flags, max_size, capacity, data, 0, len(data))


@settings(max_examples=1000, deadline=None)
@given(max_size=st.one_of(st.just(LEN_MAX), st.integers(4, LEN_MAX)),
       flags=st.sampled_from([REPORT_ALL, make_flags(report=b"DZ", small=b"S")]),
       buf=buffers(st.one_of(whole_frames, rfq_frames, adversarial_headers)))
def test_adversarial_lengths(both, max_size, flags, buf):
    got = agree(both, flags, max_size, 64, *buf)
    if got["error"] == ERR_NONE and got["partial_type"] != -1:
        assert got["partial_length"] <= LEN_MAX + 1


# ---- property: split delivery equals whole delivery --------------------------

def scan_until_done(sc, buf, pos: int, base: int, collected: list) -> int:
    """Scan from pos until not full, appending frames with offsets shifted by base."""
    while True:
        n = sc.scan(buf, pos, len(buf))
        assert sc.error == ERR_NONE
        collected += [(t, base + off, length) for t, off, length in map(sc.frame, range(n))]
        pos = sc.consumed
        if not sc.full:
            return pos


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(st.one_of(whole_frames, rfq_frames), min_size=1, max_size=10),
       report=st.binary(max_size=4), capacity=capacities)
def test_split_delivery_matches_whole(Scanner, frames, report, capacity):
    data = b"".join(frames)
    flags = make_flags(report=report + b"Z")
    whole = Scanner(flags, capacity=len(frames))
    expected = scan(whole, data)
    assert_clean_end(expected, len(data))

    sc = Scanner(flags, capacity=capacity)
    for split in range(len(data) + 1):
        # What the IO loop does: scan what arrived, drop the consumed bytes, append the rest.
        buf = bytearray(data[:split])
        collected: list = []
        consumed = scan_until_done(sc, buf, 0, 0, collected)
        if sc.partial_type != -1:
            next_frame = next(f for f in frames_at(frames) if f[1] == consumed)
            assert (sc.partial_type, sc.partial_length) == (next_frame[0], next_frame[2])
        del buf[:consumed]
        buf += data[split:]
        assert scan_until_done(sc, buf, 0, consumed, collected) == len(buf)
        assert collected == expected["frames"], split


def frames_at(frames: list[bytes]) -> list[tuple[int, int, int]]:
    """(type, offset, length) of each frame in the concatenation."""
    out, offset = [], 0
    for f in frames:
        out.append((f[0], offset, len(f)))
        offset += len(f)
    return out
