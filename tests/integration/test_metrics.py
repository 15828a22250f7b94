"""The metrics endpoint of a real pgmp: scraped over HTTP, parsed with prometheus_client, checked against the traffic.

Every pgmp here listens for metrics on a free port (metrics_listen). Scrapes use
http.client; the answers are parsed with prometheus_client's parsers, so a
format error fails the test as it would fail Prometheus.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import threading
import time

import psutil
import psycopg
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_for
from tests.support.proxy import PgmpFactory, PgmpStartError
from tests.support.waiting import process_alive

cli = PgmpFactory.cli
SCRAPE_DEADLINE = 6.0          # a scrape answers within the 3 s worker timeout, with room for a busy machine
POOL = {"database": "appdb", "user": "scram_user"}


# ---- helpers ------------------------------------------------------------------------------------

def start(pgmp, workers: int = 1, config: dict | None = None, **kw):
    port = free_port()
    proxy = pgmp.start(workers=workers, config={"metrics_listen": f"127.0.0.1:{port}", **(config or {})}, **kw)
    proxy.metrics_port = port
    wait_healthy(proxy)
    return proxy


def wait_healthy(proxy, timeout: float = 15.0) -> None:
    wait_for(lambda: get(proxy, "/health")[0] == 200, timeout=timeout,
             message=lambda: f"/health never said 200: {get(proxy, '/health')}\n{proxy.log()}")


def get(proxy, path: str, headers: dict | None = None, port: int | None = None, timeout: float = SCRAPE_DEADLINE,
        method: str = "GET") -> tuple[int, dict, str]:
    """(status, headers, body) of one HTTP request to the metrics endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port or proxy.metrics_port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def scrape(proxy, **kw) -> dict:
    """The parsed families of one scrape: {name: family}."""
    status, headers, body = get(proxy, "/metrics", **kw)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body)}


def value(fams: dict, family: str, sample: str | None = None, default: float | None = None, **labels) -> float:
    """The sum of the samples of ``family`` (named ``sample``, default the family's own) matching ``labels``.

    ``default``: the value of a series not there (error counters appear with their first error).
    """
    name = sample or family
    found = [s.value for s in fams[family].samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    if not found and default is not None:
        return default
    assert found, f"no sample {name}{labels} in {[s for s in fams[family].samples][:20]}"
    return sum(found)


def histogram(fams: dict, family: str, **labels) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets as (le, count), _count, _sum) of one histogram series."""
    samples = [s for s in fams[family].samples if all(s.labels.get(k) == v for k, v in labels.items())]
    buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name == family + "_bucket"]
    count = next(s.value for s in samples if s.name == family + "_count")
    total = next(s.value for s in samples if s.name == family + "_sum")
    return buckets, count, total


def check_histogram(fams: dict, family: str, **labels) -> tuple[float, float]:
    """A histogram as Prometheus wants it: buckets increasing in le and count, +Inf = _count; (_count, _sum)."""
    buckets, count, total = histogram(fams, family, **labels)
    les = [le for le, _ in buckets]
    assert les == sorted(les) and les[-1] == float("inf") and len(les) == 16
    counts = [n for _, n in buckets]
    assert counts == sorted(counts), f"{family} buckets not cumulative: {buckets}"
    assert counts[-1] == count, f"{family}: +Inf bucket {counts[-1]} != _count {count}"
    return count, total


def stats(proxy) -> dict:
    return proxy.stats()


def connect(proxy, **kw) -> psycopg.Connection:
    """Autocommit, and no prepared statements: each execute is one round trip (psycopg's prepare is another)."""
    return psycopg.connect(proxy.dsn(**kw), autocommit=True, prepare_threshold=None)


def worker_pids(fams: dict) -> dict[str, int]:
    """worker slot -> pid of the non-draining workers in a scrape."""
    return {s.labels["worker"]: int(s.labels["pid"]) for s in fams["pgmp_worker_draining"].samples if not s.value}


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as it is and read the whole answer (until the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def status_of(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), answer[:200]
    return int(line.split()[1])


# ---- the figures --------------------------------------------------------------------------------

def test_scrape_counts_what_both_workers_did(pgmp):
    proxy = start(pgmp, workers=2, config={"pool_mode": "transaction", "default_pool_size": 8})
    conns = [connect(proxy) for _ in range(8)]
    try:
        # connect until both workers hold clients (SO_REUSEPORT spreads them by the client's port)
        wait_for(lambda: len({w["pid"] for w in stats(proxy)["workers"] if w["clients"]}) == 2
                 or conns.append(connect(proxy)) or len(conns) > 40, timeout=30)
        per_worker = {w["pid"]: w["clients"] for w in stats(proxy)["workers"]}
        assert all(per_worker.values()) and len(per_worker) == 2, f"not spread over both workers: {per_worker}"
        n = len(conns)
        before = scrape(proxy)
        assert value(before, "pgmp_clients", **POOL, state="idle") == n
        assert value(before, "pgmp_logins", "pgmp_logins_total", **POOL) == n
        rounds = 25
        for c in conns:
            for i in range(rounds):
                assert c.execute("select %s::int", (i,)).fetchone()[0] == i
        with conns[0].transaction():                 # one transaction of three round trips
            conns[0].execute("select 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conns[1].execute("select 1/0")           # one transaction that fails: still a transaction
        after = scrape(proxy)

        def delta(family, sample=None, **labels):
            return value(after, family, sample, **labels) - value(before, family, sample, 0, **labels)
        xacts = n * rounds + 2
        assert delta("pgmp_transactions", "pgmp_transactions_total", **POOL) == xacts
        assert delta("pgmp_queries", "pgmp_queries_total", **POOL) == xacts + 2
        count_before, sum_before = check_histogram(before, "pgmp_transaction_duration_seconds", **POOL)
        count_after, sum_after = check_histogram(after, "pgmp_transaction_duration_seconds", **POOL)
        assert count_after - count_before == xacts and sum_after > sum_before
        q_before, _ = check_histogram(before, "pgmp_query_duration_seconds", **POOL)
        q_after, _ = check_histogram(after, "pgmp_query_duration_seconds", **POOL)
        assert q_after - q_before == xacts + 2
        check_histogram(after, "pgmp_client_wait_seconds", **POOL)
        assert delta("pgmp_errors", "pgmp_errors_total", **POOL, origin="server", sqlstate_class="22") == 1
        assert delta("pgmp_received_bytes", "pgmp_received_bytes_total", **POOL) > 0
        assert delta("pgmp_sent_bytes", "pgmp_sent_bytes_total", **POOL) > 0
        assert value(after, "pgmp_clients", **POOL, state="idle") == n
        assert value(after, "pgmp_servers", **POOL, state="active") == 0
        assert value(after, "pgmp_pool_size", **POOL) == 8
        # both workers' traffic is in the totals: they agree with each worker's own counters
        report = stats(proxy)
        per_worker = [sum(p["xact_count"] for p in w["pools"] if p["database"] == "appdb") for w in report["workers"]]
        assert len(per_worker) == 2 and all(per_worker), per_worker
        assert value(after, "pgmp_transactions", "pgmp_transactions_total", **POOL) == sum(per_worker)
        pids = {str(w["pid"]) for w in report["workers"]}
        assert {s.labels["pid"] for s in after["pgmp_worker_up"].samples if s.value == 1} == pids
        assert value(after, "pgmp_worker_clients") == n
        for pid in pids:
            assert value(after, "pgmp_worker_resident_memory_bytes", pid=pid) > 1 << 20
            assert value(after, "pgmp_worker_open_fds", pid=pid) > 2
            assert value(after, "pgmp_worker_cpu_seconds", "pgmp_worker_cpu_seconds_total", pid=pid) > 0
        assert value(after, "pgmp_master_resident_memory_bytes") > 1 << 20
        assert value(after, "pgmp_scrape_missing_workers") == 0
        assert value(after, "pgmp_workers") == 2 and value(after, "pgmp_healthy") == 1
    finally:
        for c in conns:
            c.close()


def test_openmetrics_and_head_requests(pgmp):
    proxy = start(pgmp)
    with connect(proxy) as c:
        c.execute("select 1")
    status, headers, body = get(proxy, "/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    fams = {f.name: f for f in openmetrics_families(body)}
    assert fams["pgmp_transactions"].type == "counter"
    assert fams["pgmp_transaction_duration_seconds"].type == "histogram"
    assert value(fams, "pgmp_transactions", "pgmp_transactions_total", **POOL) == 1
    status, headers, body = get(proxy, "/metrics", method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 1000
    status, _, body = get(proxy, "/health", method="HEAD")
    assert status == 200 and body == ""


def test_waiting_clients_maxwait_and_pgmp_own_errors(pgmp):
    databases = {"appdb": {}, "nopool": {"dbname": "appdb", "pool_size": 0}}
    proxy = start(pgmp, config={"pool_mode": "transaction", "default_pool_size": 1}, databases=databases)
    holder, waiter = connect(proxy), connect(proxy)
    result: list = []
    try:
        holder.execute("begin")
        holder.execute("select 1")                   # holds the pool's only server
        t = threading.Thread(target=lambda: result.append(waiter.execute("select 42").fetchone()[0]))
        t.start()

        def waiting():
            fams = scrape(proxy)
            return fams if value(fams, "pgmp_clients", **POOL, state="waiting") == 1 else None
        fams = wait_for(waiting, timeout=10)
        assert value(fams, "pgmp_clients", **POOL, state="active") == 1
        assert value(fams, "pgmp_servers", **POOL, state="active") == 1
        assert value(fams, "pgmp_servers", **POOL, state="idle") == 0
        wait_for(lambda: value(scrape(proxy), "pgmp_maxwait_seconds", **POOL) >= 0.2, timeout=10)
        count_before, _ = check_histogram(scrape(proxy), "pgmp_client_wait_seconds", **POOL)
        holder.execute("commit")
        t.join(10)
        assert result == [42]
        fams = scrape(proxy)
        assert value(fams, "pgmp_clients", **POOL, state="waiting") == 0
        assert value(fams, "pgmp_maxwait_seconds", **POOL) == 0
        count, total = check_histogram(fams, "pgmp_client_wait_seconds", **POOL)
        assert count == count_before + 1 and total >= 0.2
        buckets, _, _ = histogram(fams, "pgmp_client_wait_seconds", **POOL)
        assert dict(buckets)[0.1] < dict(buckets)[float("inf")]      # the wait of >= 0.2 s is above 0.1 s
        # an error pgmp makes itself (no server allowed for that pool) is counted apart from the servers'
        with pytest.raises(psycopg.OperationalError, match="no server connections allowed"):
            connect(proxy, dbname="nopool")
        fams = scrape(proxy)
        assert value(fams, "pgmp_errors", "pgmp_errors_total", database="nopool", origin="pgmp",
                     sqlstate_class="53") == 1
    finally:
        holder.close()
        waiter.close()


# ---- a slow or stopped worker, a drain ----------------------------------------------------------

def test_health_and_scrapes_while_a_worker_is_stopped(pgmp):
    proxy = start(pgmp, workers=2, config={"pool_mode": "transaction"})
    conns = [connect(proxy) for _ in range(6)]
    for c in conns:
        c.execute("select 1")
    status, _, body = get(proxy, "/health")
    assert (status, body) == (200, "ok\n")
    before = scrape(proxy)
    total_before = value(before, "pgmp_transactions", "pgmp_transactions_total", **POOL)
    assert total_before == 6
    busy = [w for w in stats(proxy)["workers"] if any(p["xact_count"] for p in w["pools"])]
    assert busy, "no worker served a transaction"
    stopped, slot = busy[0]["pid"], busy[0]["slot"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        def unhealthy():
            status, _, body = get(proxy, "/health")
            return body if status == 503 else None
        body = wait_for(unhealthy, timeout=10)
        assert f"worker {slot} (pid {stopped}): no heartbeat" in body
        t0 = time.monotonic()
        fams = scrape(proxy, timeout=SCRAPE_DEADLINE)
        assert time.monotonic() - t0 < SCRAPE_DEADLINE
        assert value(fams, "pgmp_scrape_missing_workers") == 1
        assert value(fams, "pgmp_worker_up", pid=str(stopped)) == 0
        assert value(fams, "pgmp_worker_figures_age_seconds", pid=str(stopped)) > 0
        assert value(fams, "pgmp_healthy") == 0
        # the stopped worker's last figures are still in the totals: no counter goes back
        assert value(fams, "pgmp_transactions", "pgmp_transactions_total", **POOL) == total_before
        # two scrapes at once while the worker cannot answer: both answer, sharing one gather
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(get(proxy, "/metrics")[0])) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(SCRAPE_DEADLINE + 2)
        assert answers == [200, 200]
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_healthy(proxy, timeout=10)
    assert value(scrape(proxy), "pgmp_scrape_missing_workers") == 0
    for c in conns:
        c.execute("select 1")
        c.close()
    assert process_alive(stopped)


def test_health_is_503_during_a_graceful_drain(pgmp):
    proxy = start(pgmp)
    c = connect(proxy)
    try:
        c.execute("begin")
        c.execute("select 1")                        # the drain waits for this transaction
        proxy.signal(signal.SIGTERM)
        wait_for(lambda: get(proxy, "/health")[:3:2] == (503, "stopping (graceful)\n"), timeout=10)
        assert scrape(proxy)["pgmp_healthy"].samples[0].value == 0
        c.execute("commit")
    finally:
        c.close()
    wait_for(lambda: not proxy.alive, timeout=15)


def test_counters_stay_when_a_new_generation_replaces_the_workers(pgmp):
    proxy = start(pgmp, workers=1)
    with connect(proxy) as c:
        for _ in range(5):
            c.execute("select 1")
        assert value(scrape(proxy), "pgmp_transactions", "pgmp_transactions_total", **POOL) == 5
        for _ in range(3):
            c.execute("select 1")                    # after the last scrape: counted in the worker's last figures
    old = worker_pids(scrape(proxy))["0"]
    with connect(proxy) as c:
        c.execute("select 1")
    proxy.rewrite_config(workers=2)
    assert cli("reload", "-c", proxy.config_path).returncode == 0
    wait_for(lambda: not process_alive(old), timeout=20, message=proxy.log)
    wait_healthy(proxy)
    fams = scrape(proxy)
    assert value(fams, "pgmp_transactions", "pgmp_transactions_total", **POOL) == 9
    count, _ = check_histogram(fams, "pgmp_transaction_duration_seconds", **POOL)
    assert count == 9
    assert str(old) not in {s.labels["pid"] for s in fams["pgmp_worker_up"].samples}


# ---- HTTP, strictly -----------------------------------------------------------------------------

BAD_REQUESTS = [
    (b"hello\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n\r\n", 400),                                   # no Host
    (b"GET /metrics HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /metrics HTTP/1.1\nHost: x\n\n", 400),
    (b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 20000 + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n", 431),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) * 8, 400),   # a TLS ClientHello
]


def test_bad_requests_get_4xx_and_disturb_nothing(pgmp):
    proxy = start(pgmp)
    port = proxy.metrics_port
    psql = connect(proxy)
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")          # ... and nothing more
    slow_started = time.monotonic()
    # a scraper that never reads its (large) answer
    deaf = socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.connect(("127.0.0.1", port))
    deaf.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        for data, status in BAD_REQUESTS:
            answer = raw_request(port, data)
            assert status_of(answer) == status, (data[:60], answer[:300])
            assert b"\r\nConnection: close\r\n" in answer
            head, body = answer.split(b"\r\n\r\n", 1)
            assert f"Content-Length: {len(body)}".encode() in head
        # a stream of garbage with no end of line in sight: refused once the limit is passed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            with contextlib.suppress(OSError):
                for _ in range(16):
                    s.sendall(b"A" * 8192)
            assert status_of(s.recv(65536)) == 414
        # meanwhile: the master answers scrapes at once and clients are served
        t0 = time.monotonic()
        for _ in range(5):
            scrape(proxy)
        assert time.monotonic() - t0 < SCRAPE_DEADLINE
        assert psql.execute("select 7").fetchone()[0] == 7
        # the slow client is told it was too slow, after its 5 s
        slow.settimeout(15)
        answer = slow.recv(65536)
        assert status_of(answer) == 408 and 4.0 < time.monotonic() - slow_started < 12
        assert proxy.alive and "Traceback" not in proxy.log() and "internal error" not in proxy.log()
    finally:
        slow.close()
        deaf.close()
        psql.close()


def test_metrics_listen_moves_on_reload_and_a_bad_address_keeps_the_old_one(pgmp):
    proxy = start(pgmp)
    first = proxy.metrics_port
    second = free_port()
    proxy.rewrite_config({"metrics_listen": f"127.0.0.1:{second}"})
    r = cli("reload", "-c", proxy.config_path)
    assert r.returncode == 0, r.stderr
    assert get(proxy, "/health", port=second)[0] == 200
    with pytest.raises(ConnectionRefusedError):
        get(proxy, "/health", port=first)
    # a port another program holds (without SO_REUSEPORT): the reload fails, nothing changes
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proxy.rewrite_config({"metrics_listen": f"127.0.0.1:{busy}", "log_level": "debug"})
        r = cli("reload", "-c", proxy.config_path)
        assert r.returncode != 0
        assert f"metrics_listen: cannot listen on 127.0.0.1:{busy}: Address already in use" in r.stdout + r.stderr
        assert get(proxy, "/health", port=second)[0] == 200
    assert cli("status", "-c", proxy.config_path).returncode == 0
    proxy.rewrite_config({"metrics_listen": "", "log_level": "info"})
    assert cli("reload", "-c", proxy.config_path).returncode == 0
    with pytest.raises(ConnectionRefusedError):
        get(proxy, "/health", port=second)


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "SO_REUSEPORT"])
def test_a_port_in_use_stops_pgmp_at_start(pgmp, reuseport):
    """Also a holder with SO_REUSEPORT (another pgmp with the same metrics_listen): never a silent share."""
    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(PgmpStartError) as info:
            pgmp.start(config={"metrics_listen": f"127.0.0.1:{busy}"}, ready_timeout=10)
        assert f"metrics_listen: cannot listen on 127.0.0.1:{busy}: Address already in use" in str(info.value)


def test_restart_hands_the_metrics_address_over_without_a_failed_health_check(pgmp, strays):
    proxy = start(pgmp, workers=2)
    answers: list = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                status, _, body = get(proxy, "/health", timeout=5)
                answers.append((status, body))
            except OSError as exc:
                answers.append((0, repr(exc)))
            done.wait(0.02)                          # a load balancer's health checks, quickened
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        r = cli("restart", "-c", proxy.config_path, timeout=60)
        assert r.returncode == 0, (r, proxy.log())
        new_pid = int(proxy.wait_log(r"restart: new master started \(pid (\d+)\)").group(1))
        strays.append(new_pid)
        assert proxy.process.wait(30) == 0, "the old master did not drain and exit"
        count = len(answers)
        wait_for(lambda: len(answers) > count + 5, timeout=10)
    finally:
        done.set()
        poller.join(10)
    failed = [a for a in answers if a[0] != 200]
    assert not failed and len(answers) > 20, (failed[:5], len(answers))
    fams = scrape(proxy)
    assert {int(s.labels["pid"]) for s in fams["pgmp_worker_up"].samples} <= set(
        c.pid for c in psutil.Process(new_pid).children())
    r = cli("stop", "-c", proxy.config_path, timeout=60)
    assert r.returncode == 0, r
