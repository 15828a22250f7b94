"""The control channel codec (pgmp.control) and the stats counters (pgmp.stats), sans-IO; the tables are in test_tables."""
import json
import struct

import pytest

from pgmp import control, stats
from pgmp.control import ControlError, Decoder, encode

# One realistic message per type, with the fields control.py documents.
EXAMPLES = {
    "ready": {"slot": 1, "generation": 0, "pid": 4242},
    "heartbeat": {"clients": 3, "servers": 2},
    "reload": {"path": "/etc/pgmp/pgmp.toml", "text": '[pgmp]\nauth_type = "trust"\n', "id": 7},
    "reload_result": {"id": 7, "ok": False, "error": "[pgmp] workers: must be an integer"},
    "drain": {"mode": "graceful"},
    "stop": {"mode": "immediate"},
    "stats_request": {"id": 12},
    "stats": {"id": 12, "data": {"slot": 0, "pools": [{"database": "appdb", "user": "u", "xact_count": 5}]}},
    "cancel": {"pid": (1 << 30) | (3 << 22) | 17, "secret": 0xDEADBEEF},
    "pool_command": {"id": 3, "action": "pause", "database": None},
    "pool_result": {"id": 3, "ok": True, "data": {"pools": ["appdb/alice"], "busy_servers": 0}},
    "metrics_request": {"id": 14},
    "metrics": {"id": 14, "data": {"slot": 0, "pid": 4242, "pools": [{"database": "appdb", "user": "u",
                                                                      "histograms": {"xact_hist": [1, 0, 2]}}]}},
    "command": {"command": "stop", "args": {"mode": "fast"}},
    "reply": {"ok": True, "error": None, "data": {"pid": 1, "workers": []}},
    "console": {"id": 4, "command": "stats", "args": {"detail": "sockets"}},
    "console_result": {"id": 4, "ok": True, "error": None, "data": {"workers": [], "missing": [123]}},
    "host_state": {"hosts": [{"host": "10.0.0.5", "port": 5432, "up": True, "in_recovery": True,
                              "read_only": True, "lag": 0.25, "checked_at": 1234.5, "banned_until": 0.0,
                              "banned_at": 0.0, "error": ""}]},
    "host_report": {"host": "10.0.0.5", "port": 5432, "event": "failed", "error": "connection refused"},
}


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def test_examples_cover_every_type():
    assert set(EXAMPLES) == control.TYPES


@pytest.mark.parametrize("msg_type", sorted(control.TYPES))
def test_round_trip(msg_type):
    fields = EXAMPLES[msg_type]
    data = encode(msg_type, **fields)
    (n,) = struct.unpack_from("!I", data)
    assert n == len(data) - 4
    msgs = Decoder().feed(data)
    assert msgs == [{"type": msg_type, "v": control.VERSION, **fields}]


def test_round_trip_non_ascii_text():
    data = encode("reply", ok=False, error="fichier «pgmp.toml»: clé inconnue ✗")
    assert Decoder().feed(data)[0]["error"] == "fichier «pgmp.toml»: clé inconnue ✗"


def test_encode_refuses_unknown_type():
    with pytest.raises(ValueError, match="unknown control message type"):
        encode("launch_missiles")


def test_split_at_every_byte():
    data = encode("stats", **EXAMPLES["stats"])
    for cut in range(len(data) + 1):
        dec = Decoder()
        first = dec.feed(data[:cut])
        second = dec.feed(data[cut:])
        assert first + second == [{"type": "stats", "v": 1, **EXAMPLES["stats"]}], cut
        assert (len(first), len(second)) == ((1, 0) if cut == len(data) else (0, 1)), cut
        assert dec.buf == b""


def test_one_byte_at_a_time():
    stream = b"".join(encode(t, **EXAMPLES[t]) for t in sorted(control.TYPES))
    dec = Decoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert [m["type"] for m in out] == sorted(control.TYPES)
    assert dec.buf == b""


def test_several_messages_in_one_feed():
    stream = b"".join(encode(t, **EXAMPLES[t]) for t in sorted(control.TYPES))
    msgs = Decoder().feed(stream)
    assert [m["type"] for m in msgs] == sorted(control.TYPES)
    for m in msgs:
        assert {k: v for k, v in m.items() if k not in ("type", "v")} == EXAMPLES[m["type"]]


def test_messages_and_a_partial_tail():
    a, b = encode("heartbeat", clients=1, servers=0), encode("drain", mode="fast")
    dec = Decoder()
    assert [m["type"] for m in dec.feed(a + a + b[:5])] == ["heartbeat", "heartbeat"]
    assert dec.buf == b[:5]
    assert dec.feed(b[5:]) == [{"type": "drain", "v": 1, "mode": "fast"}]


def test_empty_feed():
    dec = Decoder()
    assert dec.feed(b"") == []
    assert dec.feed(b"\x00\x00") == []


def test_oversized_length_is_refused_before_buffering():
    dec = Decoder(max_message=1024)
    with pytest.raises(ControlError, match="1025 bytes exceeds the limit of 1024"):
        dec.feed(struct.pack("!I", 1025))            # the header alone is enough to refuse
    dec = Decoder()
    with pytest.raises(ControlError, match="exceeds the limit"):
        dec.feed(struct.pack("!I", 0xFFFFFFFF) + b"x" * 10)
    # exactly the limit is fine, and waits for the body
    dec = Decoder(max_message=64)
    assert dec.feed(struct.pack("!I", 64)) == []


def test_oversized_length_after_good_messages():
    dec = Decoder(max_message=1024)
    with pytest.raises(ControlError):
        dec.feed(encode("heartbeat", clients=0, servers=0) + struct.pack("!I", 1 << 20))


def test_encode_refuses_too_large(monkeypatch):
    monkeypatch.setattr(control, "MAX_MESSAGE", 100)
    with pytest.raises(ValueError, match="too large"):
        encode("reply", ok=True, data="x" * 200)


@pytest.mark.parametrize("body, what", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'"reply"', "not an object"),
    (b'{"type": "reply"}', "version None not supported"),
    (b'{"type": "reply", "v": 2}', "version 2 not supported"),
    (b'{"type": "reply", "v": "1"}', "version '1' not supported"),
    (b'{"type": "shutdown_everything", "v": 1}', "unknown control message type 'shutdown_everything'"),
    (b'{"v": 1}', "unknown control message type None"),
])
def test_bad_messages(body, what):
    with pytest.raises(ControlError, match=what):
        Decoder().feed(frame(body))


def test_bad_message_after_a_good_one_still_raises():
    dec = Decoder()
    with pytest.raises(ControlError):
        dec.feed(encode("heartbeat", clients=0, servers=0) + frame(b"nope"))


# ---------------------------------------------------------------- stats

def pool_row(database, user, **counts):
    row = {"database": database, "user": user, "mode": "transaction", "pool_size": 10}
    row.update({name: 0 for name in stats.COUNTERS + stats.GAUGES})
    row.update(counts)
    return row


REPORT = {
    "master": {"pid": 100, "rss": 30 * 1024 * 1024, "cpu": 1.25},
    "workers": [
        {"slot": 0, "generation": 0, "pid": 101, "clients": 3, "servers": 2, "rss": 40 * 1024 * 1024, "cpu": 2.5,
         "pools": [pool_row("appdb", "alice", xact_count=10, query_count=20, bytes_in=1000, bytes_out=5000,
                            xact_time_us=50_000, query_time_us=40_000, wait_time_us=3_000, wait_count=3,
                            cl_active=1, cl_idle=2, sv_active=1, sv_idle=1),
                   pool_row("otherdb", "bob", xact_count=1, query_count=1, bytes_in=10, bytes_out=20,
                            xact_time_us=1_000, query_time_us=1_000)]},
        {"slot": 1, "generation": 0, "pid": 102, "clients": 1, "servers": 1, "rss": 41 * 1024 * 1024, "cpu": 0.5,
         "pools": [pool_row("appdb", "alice", xact_count=30, query_count=60, bytes_in=3000, bytes_out=2 * 1024 * 1024,
                            xact_time_us=150_000, query_time_us=120_000, wait_time_us=0, wait_count=0,
                            cl_waiting=1, sv_idle=1)]},
    ],
    "missing": [],
}


def test_merge_sums_counters_and_gauges():
    a, b = REPORT["workers"][0]["pools"][0], REPORT["workers"][1]["pools"][0]
    m = stats.merge([a, b])
    assert set(m) == set(stats.COUNTERS + stats.GAUGES + stats.MAXIMA)
    assert m["xact_count"] == 40 and m["query_count"] == 80
    assert m["bytes_in"] == 4000 and m["bytes_out"] == 5000 + 2 * 1024 * 1024
    assert m["cl_active"] == 1 and m["cl_idle"] == 2 and m["cl_waiting"] == 1
    assert m["sv_active"] == 1 and m["sv_idle"] == 2
    assert stats.merge([]) == {name: 0 for name in stats.COUNTERS + stats.GAUGES + stats.MAXIMA}
    assert stats.merge([{"xact_count": 2}])["xact_count"] == 2          # missing keys count 0


def test_averages():
    m = stats.merge([p for w in REPORT["workers"] for p in w["pools"] if p["database"] == "appdb"])
    avg = stats.averages(m)
    assert avg["avg_xact_ms"] == pytest.approx(200_000 / 40 / 1000)     # 5 ms
    assert avg["avg_query_ms"] == pytest.approx(160_000 / 80 / 1000)    # 2 ms
    assert avg["avg_wait_ms"] == pytest.approx(1.0)
    assert stats.averages({}) == {"avg_xact_ms": 0.0, "avg_query_ms": 0.0, "avg_wait_ms": 0.0}


def test_pool_stats_counters_start_at_zero():
    ps = stats.PoolStats()
    assert ps.as_dict() == {name: 0 for name in stats.COUNTERS}
    ps.xact_count += 2
    assert ps.as_dict()["xact_count"] == 2


def test_to_json_round_trips():
    assert json.loads(stats.to_json(REPORT)) == REPORT
