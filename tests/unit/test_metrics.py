"""The metrics code without sockets: histogram buckets, error classes, merging workers, exposition, HTTP parsing."""
from __future__ import annotations

import pytest
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pgmp import config
from pgmp.link import Link
from pgmp.metrics import (CLIENT_STATES, SERVER_STATES, HttpError, Scrape, cumulative_buckets, merge_pools,
                          parse_head, response)
from pgmp.protocol.messages import error_response
from pgmp.stats import BUCKETS, BUCKETS_US, PoolStats, error_sqlstate, observe, sqlstate_class

Q, S = ord("Q"), ord("S")
IDLE, IN_TX = ord("I"), ord("T")


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- buckets ------------------------------------------------------------------------------------

def test_buckets_are_fixed_increasing_and_span_half_a_millisecond_to_thirty_seconds():
    assert list(BUCKETS) == sorted(set(BUCKETS))
    assert BUCKETS[0] == 0.0005 and BUCKETS[-1] == 30.0
    assert BUCKETS_US == tuple(round(b * 1e6) for b in BUCKETS)


@pytest.mark.parametrize("us, bucket", [
    (0, 0), (499, 0), (500, 0), (501, 1), (1000, 1), (1001, 2), (29_999_999, len(BUCKETS) - 1),
    (30_000_000, len(BUCKETS) - 1), (30_000_001, len(BUCKETS)), (10 ** 12, len(BUCKETS)),
])
def test_an_observation_lands_in_the_first_bucket_whose_bound_is_not_below_it(us, bucket):
    hist = [0] * (len(BUCKETS) + 1)
    observe(hist, us)
    assert hist.index(1) == bucket and sum(hist) == 1


def test_cumulative_buckets_end_with_inf_equal_to_the_count():
    counts = [0] * (len(BUCKETS) + 1)
    for us in (100, 100, 2_000, 400_000, 31_000_000):
        observe(counts, us)
    cum = cumulative_buckets(counts)
    assert [le for le, _ in cum] == [repr(b) if b < 1 else f"{b:.1f}" for b in BUCKETS] + ["+Inf"]
    values = [n for _, n in cum]
    assert values == sorted(values) and values[-1] == 5
    assert dict(cum)["0.0005"] == 2 and dict(cum)["0.0025"] == 3 and dict(cum)["0.5"] == 4


# ---- where the worker counts ----------------------------------------------------------------------

def logged_in_link() -> tuple[Link, PoolStats, Clock]:
    st, clock = PoolStats(), Clock()
    link = Link()
    link.logged_in(clock, st)
    return link, st, clock


def test_link_observes_each_round_trip_and_each_transaction_with_its_duration():
    link, st, clock = logged_in_link()
    # an autocommit query of 3 ms
    link.client_frame(Q)
    clock.now += 0.003
    link.server_ready(1, IDLE)
    # BEGIN (0.2 ms), a query of 40 ms, COMMIT (0.2 ms): three round trips, one transaction of 40.4 ms
    for seconds, status in ((0.0002, IN_TX), (0.04, IN_TX), (0.0002, IDLE)):
        link.client_frame(Q)
        clock.now += seconds
        link.server_ready(1, status)
    assert st.query_count == 4 and st.xact_count == 2
    assert sum(st.query_hist) == 4 and sum(st.xact_hist) == 2
    assert st.query_hist[BUCKETS.index(0.005)] == 1 and st.query_hist[BUCKETS.index(0.0005)] == 2
    assert st.query_hist[BUCKETS.index(0.05)] == 1
    assert st.xact_hist[BUCKETS.index(0.005)] == 1 and st.xact_hist[BUCKETS.index(0.05)] == 1
    assert st.query_time_us == pytest.approx(43_400, abs=4) and st.xact_time_us == pytest.approx(43_400, abs=4)


def test_a_pipelined_batch_is_one_observation_of_its_whole_time():
    link, st, clock = logged_in_link()
    for _ in range(3):
        link.client_frame(S)
    clock.now += 0.002
    link.server_ready(3, IDLE)
    assert st.query_count == 3 and sum(st.query_hist) == 1 and st.query_hist[BUCKETS.index(0.0025)] == 1


def test_relayed_error_responses_are_counted_by_sqlstate_class():
    link, st, _ = logged_in_link()
    link.client_frame(Q)
    link.server_error_frame(error_response("22012", "division by zero", "ERROR"))
    link.server_error_frame(error_response("22P02", "invalid input syntax", "ERROR"))
    link.server_error_frame(error_response("57P01", "terminating connection", "FATAL"))
    assert st.server_errors == {"22": 2, "57": 1} and st.pgmp_errors == {}
    assert link.ended                                   # (the FATAL one still ends the session)


@pytest.mark.parametrize("body, cls", [
    (b"SERROR\0C42601\0Msyntax\0\0", "42"),
    (b"SERROR\0Msyntax\0\0", "??"),                   # no SQLSTATE field
    (b"SERROR\0C4260\0\0", "??"),                     # four characters
    (b"SERROR\0Cab123\0\0", "??"),                    # not upper case
    (b"SERROR\0C\xff\xfe123\0\0", "??"),              # not ASCII
    (b"SERROR\0C08P01", "08"),                        # the head of a streamed error
    (b"", "??"),
])
def test_sqlstate_class_of_odd_error_responses(body, cls):
    assert sqlstate_class(error_sqlstate(body)) == cls


def test_pgmp_errors_and_server_errors_are_kept_apart():
    st = PoolStats()
    st.count_error("53300", relayed=False)
    st.count_error(b"53300", relayed=True)
    assert st.pgmp_errors == {"53": 1} and st.server_errors == {"53": 1}


# ---- merging workers and the exposition ---------------------------------------------------------

def pool_row(database="appdb", user="alice", xacts=0, waits=(), errors=None, clients=None, servers=None,
             maxwait=0.0, size=5):
    st = PoolStats()
    for us in waits:
        observe(st.wait_hist, us)
        st.wait_time_us += us
        st.wait_count += 1
    for _ in range(xacts):
        observe(st.xact_hist, 1500)
        observe(st.query_hist, 1500)
        st.xact_count += 1
        st.query_count += 1
        st.xact_time_us += 1500
        st.query_time_us += 1500
    return {"database": database, "user": user, "mode": "transaction", "pool_size": size,
            "clients": {**dict.fromkeys(CLIENT_STATES, 0), **(clients or {})},
            "servers": {**dict.fromkeys(SERVER_STATES, 0), **(servers or {})}, "maxwait": maxwait,
            "counters": st.as_dict(), "histograms": st.histograms(),
            "errors": {"server": errors or {}, "pgmp": {}}}


def test_pools_of_several_workers_are_summed_bucket_by_bucket():
    a = {"draining": False, "pools": [pool_row(xacts=3, waits=(100, 2_000_000), clients={"idle": 2},
                                               servers={"idle": 1}, errors={"22": 1}, maxwait=0.5)]}
    b = {"draining": False, "pools": [pool_row(xacts=4, clients={"active": 1, "idle": 1}, errors={"22": 2},
                                               maxwait=1.5),
                                      pool_row(user="bob", xacts=1)]}
    old = {"draining": True, "pools": [pool_row(xacts=10, size=99)]}
    pools = merge_pools([a, b, old])
    p = pools["appdb", "alice"]
    assert p.counters["xact_count"] == 17 and sum(p.histograms["xact_hist"]) == 17
    assert p.histograms["wait_hist"][BUCKETS.index(0.0005)] == 1 and p.histograms["wait_hist"][BUCKETS.index(2.5)] == 1
    assert p.clients == {"active": 1, "waiting": 0, "idle": 3, "login": 0}
    assert p.errors == {("server", "22"): 3}
    assert p.maxwait == 1.5
    assert p.pool_size == 10                          # the draining worker's share is not counted
    assert pools["appdb", "bob"].counters["xact_count"] == 1


def test_retired_counters_keep_totals_from_going_down():
    first = merge_pools([{"pools": [pool_row(xacts=5)]}])
    retired = dict(first)
    later = merge_pools([{"pools": [pool_row(xacts=2)]}], retired)
    assert later["appdb", "alice"].counters["xact_count"] == 7
    assert sum(later["appdb", "alice"].histograms["xact_hist"]) == 7
    assert later["appdb", "alice"].clients["idle"] == 0    # gauges of an exited worker are gone


def scrape_of(pools) -> Scrape:
    workers = [{"slot": 0, "generation": 0, "pid": 11, "up": True, "age": 0.0, "draining": False, "clients": 3,
                "servers": 1, "process": {"rss": 1 << 20, "cpu": 0.5, "fds": 12}},
               {"slot": 1, "generation": 0, "pid": 12, "up": False, "age": 4.0, "draining": False, "clients": 1,
                "servers": 0, "process": None}]
    master = {"pid": 10, "process": {"rss": 2 << 20, "cpu": 0.25, "fds": 9}, "healthy": False, "nworkers": 2,
              "missing": 1, "duration": 3.0, "started": 1.7e9}
    return Scrape(pools, workers, master)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_text_exposition_parses_and_histograms_are_consistent():
    pools = merge_pools([{"pools": [pool_row(xacts=3, waits=(100, 40_000, 31_000_000), errors={"23": 4}),
                                    pool_row(database="other db", user='we"ird', xacts=1)]}])
    fams = families(generate_latest(scrape_of(pools)).decode())
    hist = fams["pgmp_transaction_duration_seconds"]
    assert hist.type == "histogram"
    by_pool: dict = {}
    for s in hist.samples:
        by_pool.setdefault((s.labels["database"], s.labels["user"]), []).append(s)
    assert set(by_pool) == {("appdb", "alice"), ("other db", 'we"ird')}
    for samples in by_pool.values():
        buckets = [s.value for s in samples if s.name.endswith("_bucket")]
        count = next(s.value for s in samples if s.name.endswith("_count"))
        assert buckets == sorted(buckets) and buckets[-1] == count
        assert [s.labels["le"] for s in samples if s.name.endswith("_bucket")][-1] == "+Inf"
    wait = {(s.name, s.labels.get("le")): s.value for s in fams["pgmp_client_wait_seconds"].samples
            if s.labels["user"] == "alice"}
    assert wait["pgmp_client_wait_seconds_count", None] == 3
    assert wait["pgmp_client_wait_seconds_bucket", "30.0"] == 2
    assert wait["pgmp_client_wait_seconds_sum", None] == pytest.approx(31.0401)
    errors = {(s.labels["origin"], s.labels["sqlstate_class"]): s.value for s in fams["pgmp_errors"].samples}
    assert errors == {("server", "23"): 4}
    assert fams["pgmp_transactions"].type == "counter"
    up = {s.labels["pid"]: s.value for s in fams["pgmp_worker_up"].samples}
    assert up == {"11": 1, "12": 0}
    assert "12" not in {s.labels["pid"] for s in fams["pgmp_worker_resident_memory_bytes"].samples}
    assert fams["pgmp_scrape_missing_workers"].samples[0].value == 1
    assert fams["pgmp_healthy"].samples[0].value == 0


def test_openmetrics_when_the_scraper_asks_for_it():
    pools = merge_pools([{"pools": [pool_row(xacts=2)]}])
    encoder, content_type = choose_encoder("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.4")
    assert content_type.startswith("application/openmetrics-text")
    text = encoder(scrape_of(pools)).decode()
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in openmetrics_families(text)}
    assert fams["pgmp_transactions"].type == "counter"
    assert fams["pgmp_query_duration_seconds"].type == "histogram"
    _, plain = choose_encoder("")
    assert plain.startswith("text/plain")


def test_every_metric_is_documented_in_pgmp_1():
    """Each family is a .B entry of pgmp(1) METRICS, by the name a query uses (counters with _total)."""
    import re
    from pathlib import Path
    page = (Path(__file__).resolve().parents[2] / "man" / "pgmp.1").read_text()
    metrics = re.search(r"^\.SH METRICS\n(.*?)(?=^\.SH )", page, re.S | re.M).group(1)
    documented = set(re.findall(r"^\.B (pgmp_\w+)$", metrics, re.M))
    pools = merge_pools([{"pools": [pool_row(xacts=1, errors={"22": 1})]}])
    fams = text_string_to_metric_families(generate_latest(scrape_of(pools)).decode())
    names = {f.name + ("_total" if f.type == "counter" else "") for f in fams}
    assert len(names) > 25
    assert sorted(names - documented) == [], "metrics missing from pgmp(1) METRICS"
    assert sorted(documented - names) == [], "pgmp(1) METRICS documents metrics pgmp does not have"


# ---- HTTP requests ------------------------------------------------------------------------------

def test_a_complete_get_request():
    req = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost:9127\r\nAccept: text/plain\r\n"
                     b"User-Agent: Prometheus/2.51\r\n\r\n")
    assert (req.method, req.path, req.query, req.version) == ("GET", "/metrics", "x=1", (1, 1))
    assert req.headers == {"host": "localhost:9127", "accept": "text/plain", "user-agent": "Prometheus/2.51"}


def test_a_request_head_in_pieces_is_not_complete_until_its_empty_line():
    data = b"GET /health HTTP/1.0\r\nUser-Agent: lb\r\n\r\n"
    for cut in range(len(data)):
        assert parse_head(data[:cut]) is None, cut
    assert parse_head(b"\r\n" + data).path == "/health"      # (an empty line before it is ignored)
    assert parse_head(b"\r") is None


@pytest.mark.parametrize("data, status", [
    (b"hello\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01", 400),                           # a TLS ClientHello: refused before a line ends
    (b"GET /metrics\x00", 400),
    (b"GET /metrics\r\n\r\n", 400),                                  # HTTP/0.9
    (b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),             # methods are upper case
    (b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),            # two spaces
    (b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),     # absolute-form
    (b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\n\r\n", 400),                        # HTTP/1.1 needs Host
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", 400),            # space before the colon
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),  # obsolete line folding
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\nHost: x\n\n", 400),                   # bare LF
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /" + b"a" * 9000, 414),                                   # no end of line in sight
    (b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 9000, 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(70)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(70)), 431),
])
def test_refused_requests_get_the_status_that_says_why(data, status):
    with pytest.raises(HttpError) as info:
        parse_head(data)
    assert info.value.status == status, info.value.message


def test_responses_close_the_connection_and_say_their_length():
    data = response(503, b"stopping\n")
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Connection: close" in lines and "Content-Length: 9" in lines and body == b"stopping\n"
    assert response(200, b"abc", head_only=True).endswith(b"\r\n\r\n")
    assert b"Content-Length: 3" in response(200, b"abc", head_only=True)


# ---- the setting --------------------------------------------------------------------------------

@pytest.mark.parametrize("value, host, port", [
    ("127.0.0.1:9127", "127.0.0.1", 9127), ("[::1]:9127", "::1", 9127), ("localhost:80", "127.0.0.1", 80),
    ("0.0.0.0:9127", "0.0.0.0", 9127), ("[::]:1", "::", 1),
])
def test_metrics_listen_addresses(value, host, port):
    cfg = config.loads(f'[pgmp]\nauth_type = "trust"\nmetrics_listen = "{value}"\n')
    assert cfg.metrics_listen == value and config.split_host_port(value) == (host, port)


@pytest.mark.parametrize("value, message", [
    ("9127", 'expected "host:port"'),
    ("::1:9127", 'expected "host:port"'),
    ("[127.0.0.1]:9127", "brackets are for IPv6 addresses only"),
    ("example.com:9127", "'example.com' is not an IP address (or localhost)"),
    ("127.0.0.1:0", "port 0 is not in 1..65535"),
    ("127.0.0.1:65536", "port 65536 is not in 1..65535"),
])
def test_metrics_listen_refuses_what_it_cannot_listen_on(value, message):
    with pytest.raises(config.ConfigError) as info:
        config.loads(f'[pgmp]\nauth_type = "trust"\nmetrics_listen = "{value}"\n')
    assert str(info.value).startswith("<string>: [pgmp] metrics_listen: ") and message in str(info.value)


def test_metrics_are_off_by_default():
    assert config.loads('[pgmp]\nauth_type = "trust"\n').metrics_listen == ""
