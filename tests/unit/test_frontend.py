"""pgmp.protocol.frontend: malformed frontend messages refused with PostgreSQL 15's own SQLSTATE and text.

The expected answers were taken from PostgreSQL's source (pqformat.c, postgres.c)
and confirmed against a PostgreSQL 15 server; these tests need no server.
"""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgmp.errors import ClientProtocolError
from pgmp.protocol import frontend
from pgmp.protocol.frontend import check_head, check_message

P, B, D, C, E, Q, H, S = (ord(c) for c in "PBDCEQHS")

INVALID_STRING = "invalid string in message"
INSUFFICIENT = "insufficient data left in message"
NO_DATA = "no data left in message"
BAD_FORMAT = "invalid message format"


def i16(v: int) -> bytes:
    return struct.pack("!H", v & 0xFFFF)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def parse(name=b"", query=b"select 1", oids=()) -> bytes:
    return name + b"\0" + query + b"\0" + i16(len(oids)) + b"".join(i32(o) for o in oids)


def bind(portal=b"", stmt=b"", formats=(), params=(), rformats=()) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + i16(len(formats)) + b"".join(i16(f) for f in formats)
    body += i16(len(params))
    for p in params:
        body += i32(-1) if p is None else i32(len(p)) + p
    return body + i16(len(rformats)) + b"".join(i16(f) for f in rformats)


def execute(portal=b"", max_rows=0) -> bytes:
    return portal + b"\0" + i32(max_rows)


def refused(kind: int, payload, message: str, sqlstate: str = "08P01") -> None:
    with pytest.raises(ClientProtocolError) as info:
        check_message(kind, payload)
    assert type(info.value) is ClientProtocolError
    assert info.value.sqlstate == sqlstate
    assert info.value.message == message
    assert str(info.value) == message


def head_refused(kind: int, head: bytes, message: str, sqlstate: str = "08P01") -> None:
    with pytest.raises(ClientProtocolError) as info:
        check_head(kind, head)
    assert (info.value.sqlstate, info.value.message) == (sqlstate, message)


def outcome(fn, kind, payload):
    try:
        fn(kind, payload)
    except ClientProtocolError as exc:
        return exc.sqlstate, exc.message
    return None


VALID = [
    (P, parse()),
    (P, parse(b"s1", b"select $1::int, $2::text", oids=[23, 25])),
    (P, parse(b"s2", b"select $1", oids=[0])),
    (P, parse(b"", b"")),
    (B, bind()),
    (B, bind(b"p1", b"s1", params=[b"ab", None, b""])),
    (B, bind(formats=[1], params=[b"\x00\x00\x00\x01", None])),
    (B, bind(formats=[0, 1], params=[None, b"\xff\x00\xfe"], rformats=[1])),
    (B, bind(params=[None] * 3, rformats=[0, 1, 1])),
    (B, bind(formats=[1] * 300, params=[b"x" * 10] * 300)),
    (B, bind(formats=[7], params=[b"a"], rformats=[9])),    # format values are the server's to judge
    (D, b"S\0"), (D, b"Sstmt\0"), (D, b"P\0"), (D, b"Pportal\0"),
    (C, b"S\0"), (C, b"Sstmt\0"), (C, b"P\0"), (C, b"Pportal\0"),
    (E, execute()), (E, execute(b"p1", 100)), (E, execute(b"p1", -1)),
    (Q, b"select 1\0"), (Q, b"\0"),
    (H, b""), (S, b""),
]


@pytest.mark.parametrize("kind,payload", VALID)
def test_valid_messages_pass(kind, payload):
    check_message(kind, payload)
    check_message(kind, memoryview(payload))
    check_message(kind, bytearray(payload))


@pytest.mark.parametrize("kind,payload", [(k, p) for k, p in VALID if p])
def test_every_proper_prefix_of_a_valid_message_is_refused(kind, payload):
    for cut in range(len(payload)):
        with pytest.raises(ClientProtocolError) as info:
            check_message(kind, payload[:cut])
        # 22023 only for the Bind whose parameter has format code 7, once that parameter is whole
        assert info.value.sqlstate == "08P01" or info.value.message == "unsupported format code: 7"


@pytest.mark.parametrize("kind", [ord("F"), ord("X"), ord("d"), ord("c"), ord("f"), ord("p"), 0, 255])
def test_other_types_are_not_checked(kind):
    check_message(kind, b"")
    check_message(kind, b"\xff\xff\xff")


def test_a_memoryview_slice_is_read_in_place():
    frame = b"junk" + bind(b"p", b"s", params=[b"v"]) + b"more"
    view = memoryview(frame)[4:-4]
    check_message(B, view)
    refused(B, memoryview(frame)[4:-5], INSUFFICIENT)
    refused(Q, memoryview(b"select 1\0tail")[:8], INVALID_STRING)


# ---- Parse ---------------------------------------------------------------------------

def test_parse_without_statement_name_nul():
    refused(P, b"stmt", INVALID_STRING)


def test_parse_without_query_nul():
    refused(P, b"s1\0select 1", INVALID_STRING)
    refused(P, b"s1\0select 1\x01\x02", INVALID_STRING)


def test_parse_without_parameter_count():
    refused(P, b"s1\0select 1\0", INSUFFICIENT)
    refused(P, b"s1\0select 1\0\0", INSUFFICIENT)


def test_parse_with_truncated_oid_list():
    refused(P, parse(oids=[23, 25])[:-4], INSUFFICIENT)
    refused(P, parse(oids=[23, 25])[:-1], INSUFFICIENT)
    refused(P, b"\0select $1\0" + i16(1), INSUFFICIENT)


def test_parse_count_is_unsigned():
    # 0xFFFF is 65535 OIDs to read, not -1 (pq_getmsgint treats values as unsigned)
    refused(P, b"\0select 1\0" + i16(0xFFFF), INSUFFICIENT)


def test_parse_with_trailing_bytes():
    refused(P, parse() + b"\0", BAD_FORMAT)
    refused(P, parse(oids=[23]) + b"xyz", BAD_FORMAT)


# ---- Bind ----------------------------------------------------------------------------

def test_bind_without_names():
    refused(B, b"", INVALID_STRING)
    refused(B, b"portal", INVALID_STRING)
    refused(B, b"portal\0stmt", INVALID_STRING)


def test_bind_without_counts():
    refused(B, b"\0\0", INSUFFICIENT)
    refused(B, b"\0\0" + i16(0), INSUFFICIENT)
    refused(B, b"\0\0" + i16(2) + i16(0), INSUFFICIENT)          # format codes cut short


def test_bind_with_truncated_parameter():
    body = bind(params=[b"hello"])
    refused(B, body[:-2 - 1], INSUFFICIENT)                     # value one byte short, no result count
    refused(B, bind(params=[b"a", b"b"])[:-2 - 5], INSUFFICIENT)    # second length missing
    refused(B, bind(params=[b"a", b"b"])[:-2 - 3], INSUFFICIENT)    # second length cut


def test_bind_with_length_past_the_end():
    refused(B, b"\0\0" + i16(0) + i16(1) + i32(100) + b"abc" + i16(0), INSUFFICIENT)
    refused(B, b"\0\0" + i16(0) + i16(1) + i32(0x7FFFFFFF) + i16(0), INSUFFICIENT)


@pytest.mark.parametrize("length", [-2, -5, -1000, -0x80000000])
def test_bind_with_negative_length_other_than_null(length):
    refused(B, b"\0\0" + i16(0) + i16(1) + i32(length) + i16(0), INSUFFICIENT)


def test_bind_null_parameters_take_no_bytes():
    check_message(B, b"\0\0" + i16(0) + i16(2) + i32(-1) + i32(-1) + i16(0))


@pytest.mark.parametrize("nformats,nparams", [(2, 1), (3, 2), (2, 0), (2, 3)])
def test_bind_format_and_parameter_counts_disagree(nformats, nparams):
    body = bind(formats=[0] * nformats, params=[b"x"] * nparams)
    refused(B, body, f"bind message has {nformats} parameter formats but {nparams} parameters")


def test_bind_count_mismatch_is_found_before_the_parameters_are_read():
    body = b"\0\0" + i16(2) + i16(0) + i16(0) + i16(3)            # no parameter data at all
    refused(B, body, "bind message has 2 parameter formats but 3 parameters")


@pytest.mark.parametrize("nformats,nparams", [(0, 3), (1, 3), (1, 0), (0, 0), (3, 3)])
def test_bind_accepted_format_counts(nformats, nparams):
    check_message(B, bind(formats=[1] * nformats, params=[b"x"] * nparams))


def test_bind_counts_are_unsigned():
    refused(B, b"\0\0" + i16(0xFFFF), INSUFFICIENT)
    refused(B, b"\0\0" + i16(0) + i16(0xFFFF), INSUFFICIENT)


def test_bind_without_result_formats():
    refused(B, bind(params=[b"x"])[:-2], INSUFFICIENT)
    refused(B, bind(rformats=[1, 1])[:-2], INSUFFICIENT)


def test_bind_with_trailing_bytes():
    refused(B, bind() + b"\0", BAD_FORMAT)
    refused(B, bind(params=[b"x", None], rformats=[1]) + b"tail", BAD_FORMAT)


def test_bind_unsupported_format_code_comes_before_a_later_fault():
    # PostgreSQL converts each parameter as soon as it is read: a bad format code on a
    # parameter read whole is reported (22023) before a fault further on.
    refused(B, bind(formats=[0xFFFF], params=[b"a"]) + b"x", "unsupported format code: -1", "22023")
    refused(B, bind(formats=[0, 7], params=[b"a", b"b"])[:-2], "unsupported format code: 7", "22023")
    refused(B, bind(formats=[7, 0], params=[b"a", b"b"])[:-2 - 5], "unsupported format code: 7", "22023")
    refused(B, b"\0\0" + i16(1) + i16(9) + i16(2) + i32(1) + b"a" + i32(-3) + i16(0),
            "unsupported format code: 9", "22023")


def test_bind_fault_before_the_bad_format_parameter_is_read():
    # the parameter with the bad code is itself the one cut short: nothing was converted
    refused(B, bind(formats=[0, 7], params=[b"a", b"b"])[:-2 - 5], INSUFFICIENT)
    refused(B, b"\0\0" + i16(1) + i16(9) + i16(1) + i32(-3) + i16(0), INSUFFICIENT)
    # no parameters: the single format code is never applied
    refused(B, b"\0\0" + i16(1) + i16(9) + i16(0) + i16(0) + b"x", BAD_FORMAT)
    # a count mismatch comes before any parameter is read
    refused(B, bind(formats=[7, 7], params=[b"a"]), "bind message has 2 parameter formats but 1 parameters")


# ---- Describe / Close ----------------------------------------------------------------

@pytest.mark.parametrize("kind,what", [(D, "DESCRIBE"), (C, "CLOSE")])
def test_describe_close_bad_subtype(kind, what):
    refused(kind, b"X\0", f"invalid {what} message subtype 88")
    refused(kind, b"s\0", f"invalid {what} message subtype 115")
    refused(kind, b"\x80name\0", f"invalid {what} message subtype 128")     # unsigned byte
    refused(kind, b"\0\0", f"invalid {what} message subtype 0")


@pytest.mark.parametrize("kind", [D, C])
def test_describe_close_without_nul(kind):
    refused(kind, b"S", INVALID_STRING)
    refused(kind, b"Pportal", INVALID_STRING)
    refused(kind, b"Xname", INVALID_STRING)          # the name is read before the subtype is judged


@pytest.mark.parametrize("kind", [D, C])
def test_describe_close_empty(kind):
    refused(kind, b"", NO_DATA)


@pytest.mark.parametrize("kind", [D, C])
def test_describe_close_trailing_bytes(kind):
    refused(kind, b"Sname\0x", BAD_FORMAT)
    refused(kind, b"Xname\0x", BAD_FORMAT)           # before the subtype too


# ---- Execute, Query, Flush, Sync -----------------------------------------------------

def test_execute_truncated():
    refused(E, b"", INVALID_STRING)
    refused(E, b"portal", INVALID_STRING)
    refused(E, b"portal\0", INSUFFICIENT)
    refused(E, execute(b"portal")[:-1], INSUFFICIENT)


def test_execute_trailing_bytes():
    refused(E, execute() + b"\0", BAD_FORMAT)


def test_query_without_nul():
    refused(Q, b"", INVALID_STRING)
    refused(Q, b"select 1", INVALID_STRING)


def test_query_with_bytes_after_its_nul():
    refused(Q, b"select 1\0x", BAD_FORMAT)
    refused(Q, b"select 1\0\0", BAD_FORMAT)


@pytest.mark.parametrize("kind", [S, H])
def test_sync_flush_with_a_body(kind):
    refused(kind, b"x", BAD_FORMAT)
    refused(kind, b"\0\0\0\0", BAD_FORMAT)


# ---- check_head ----------------------------------------------------------------------

def test_head_of_valid_bind_passes_at_every_length():
    body = bind(b"portal", b"statement", formats=[0, 1], params=[b"v" * 200, None], rformats=[1])
    for cut in range(len(body)):
        check_head(B, body[:cut])
        check_head(B, memoryview(body)[:cut])


def test_head_with_incomplete_names_passes():
    check_head(B, b"")
    check_head(B, b"portal")
    check_head(B, b"portal\0stmt")
    check_head(B, b"p" * 200)
    check_head(P, b"s" * 200)


def test_head_bind_negative_length():
    head_refused(B, b"\0\0" + i16(0) + i16(2) + i32(-2), INSUFFICIENT)
    head_refused(B, b"\0\0" + i16(0) + i16(2) + i32(-1) + i32(-7), INSUFFICIENT)


def test_head_bind_count_mismatch():
    head_refused(B, b"p\0s\0" + i16(2) + i16(1) + i16(1) + i16(3),
                 "bind message has 2 parameter formats but 3 parameters")


def test_head_bind_unsupported_format_before_negative_length():
    head_refused(B, b"\0\0" + i16(1) + i16(2) + i16(2) + i32(1) + b"a" + i32(-2),
                 "unsupported format code: 2", "22023")


def test_head_does_not_judge_what_is_not_there_yet():
    check_head(B, b"\0\0" + i16(0) + i16(1) + i32(1000) + b"abc")      # value continues
    check_head(B, b"\0\0" + i16(0xFFFF) + i16(0) * 10)                 # formats continue
    check_head(B, bind(params=[b"x"]))                                   # may continue past the end
    check_head(P, b"\0select 1\0" + i16(0xFFFF))
    check_head(P, parse() + b"whatever")


@pytest.mark.parametrize("kind", [D, C, E, Q, S, H, ord("F")])
def test_head_of_other_types_is_not_checked(kind):
    check_head(kind, b"\xff")


# ---- properties ----------------------------------------------------------------------

_param = st.one_of(st.none(), st.binary(max_size=6), st.sampled_from([-2, -100, 50, 0x7FFFFFFF]))


@st.composite
def binds(draw):
    """Bind bodies, mostly well formed, some with bad lengths, counts or format codes, maybe cut or extended."""
    params = draw(st.lists(_param, max_size=5))
    nformats = draw(st.sampled_from([0, 1, len(params), len(params), len(params) + 1]))
    formats = draw(st.lists(st.sampled_from([0, 1, 0, 1, 2, 0xFFFF]), min_size=nformats, max_size=nformats))
    body = b"p\0s\0" + i16(len(formats)) + b"".join(i16(f) for f in formats) + i16(len(params))
    for p in params:
        body += i32(p) if isinstance(p, int) else i32(-1) if p is None else i32(len(p)) + p
    body += i16(1) + i16(1)
    body = body[:draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    return body + draw(st.binary(max_size=3))


@settings(max_examples=300, deadline=None)
@given(binds(), st.data())
def test_head_faults_are_those_of_any_whole_message(body, data):
    """An error check_head raises is the error check_message raises for every completion of that head."""
    cut = data.draw(st.integers(0, len(body)))
    head = body[:cut]
    found = outcome(check_head, B, head)
    if found is not None:
        assert outcome(check_message, B, body) == found
        rest = data.draw(st.binary(max_size=12))
        assert outcome(check_message, B, head + rest) == found


@settings(max_examples=300, deadline=None)
@given(binds())
def test_bytes_and_memoryview_agree(body):
    assert outcome(check_message, B, body) == outcome(check_message, B, memoryview(body))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([P, B, D, C, E, Q, H, S]), st.binary(max_size=40))
def test_arbitrary_bytes_never_raise_anything_else(kind, payload):
    found = outcome(check_message, kind, payload)
    assert found is None or found[0] in ("08P01", "22023")
    outcome(check_head, kind, payload)


def test_module_exports_the_message_texts():
    assert frontend.INVALID_STRING == INVALID_STRING
    assert frontend.INSUFFICIENT_DATA == INSUFFICIENT
    assert frontend.NO_DATA == NO_DATA
    assert frontend.INVALID_FORMAT == BAD_FORMAT
