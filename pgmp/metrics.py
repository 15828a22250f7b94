"""The master's metrics endpoint: every worker's figures in the Prometheus/OpenMetrics format, and /health.

A scrape (GET /metrics) asks every worker for its figures with a
``metrics_request`` control message (the master's request machinery: an id,
a 3 s timeout). A worker answers from its loop between two events; it never
waits for anything. The master sums the pools of all workers by (database,
user), adds the process figures it reads itself (psutil), and lets the
prometheus_client library write the answer in the format the scraper asked
for. A worker that does not answer in time is reported from the last figures
it sent, marked stale (``pgmp_worker_up 0``, ``pgmp_worker_figures_age_seconds``,
``pgmp_scrape_missing_workers``), so that no counter seems to go back; the
last figures of a worker that exits are kept in the totals for the same
reason. Scrapes that arrive while one is being gathered share its answer.

The HTTP side is a small, strict HTTP/1.1 server on the master's own loop:
GET or HEAD of /metrics and /health, one request per connection (Connection:
close), a request head of at most MAX_HEAD bytes and MAX_HEADERS fields
that must arrive within READ_TIMEOUT, a response that must be taken within
SEND_TIMEOUT. The answer is queued on the connection like any endpoint's
output: a slow reader costs memory for its answer, never a wait.

Worker side: :func:`worker_figures`. Master side: :class:`MetricsServer`.
"""
import email.utils
import errno
import logging
import os
import re
import socket

import psutil
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from pgmp import __version__
from pgmp.config import split_host_port
from pgmp.listen import ListenError, tcp_listener
from pgmp.loop import Endpoint
from pgmp.server import ServerState
from pgmp.session import ClientState
from pgmp.stats import BUCKETS, COUNTERS, HISTOGRAMS

log = logging.getLogger("pgmp")

MAX_HEAD = 8192               # request line and header fields, bytes
MAX_HEADERS = 64
READ_TIMEOUT = 5.0            # the whole request head must have arrived by then (else 408)
SEND_TIMEOUT = 30.0           # the whole answer must have been taken by then (else the connection is closed)
MAX_CONNECTIONS = 64          # HTTP connections at once; more are answered 503 at once
ACCEPT_RETRY = 1.0
HEALTH_HEARTBEAT_AGE = 3.0    # a worker silent this long (heartbeats come every second) is not healthy

CLIENT_STATES = ("active", "waiting", "idle", "login")
SERVER_STATES = ("active", "idle", "used", "tested", "login", "being_canceled")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


# ---- worker side ---------------------------------------------------------------------------

def worker_figures(worker) -> dict:
    """What a worker answers to metrics_request: its counts and, per pool, gauges, counters, histograms."""
    now = worker.loop.clock()
    return {"slot": worker.slot, "generation": worker.generation, "pid": os.getpid(),
            "clients": len(worker.clients), "servers": sum(len(p.servers) for p in worker.pools.values()),
            "draining": bool(worker.draining),
            "pools": [pool_figures(p, now, worker.config) for p in worker.pools.values()]}


_CLIENT_STATE = {ClientState.ACTIVE: "active", ClientState.WAITING: "waiting", ClientState.IDLE: "idle",
                 ClientState.LOGIN_WAIT: "login"}


def pool_figures(pool, now: float, config) -> dict:
    """One pool's figures; server states as PgBouncer names them (see METRICS in pgmp(1))."""
    client_state = _CLIENT_STATE
    clients = dict.fromkeys(CLIENT_STATES, 0)
    seen = set()
    for group in (pool.clients, pool.waiting, pool.login_waiters):
        for c in group:
            if c not in seen and not c.closed:
                seen.add(c)
                name = client_state.get(c.state)
                if name == "active" and c.server is not None and c.server.held:
                    name = "idle"                   # between transactions, its server held (Pool.hold)
                if name is not None:
                    clients[name] += 1
    servers = dict.fromkeys(SERVER_STATES, 0)
    idle = set(pool.idle)
    check = bool(config.server_check_query)
    for s in pool.servers:
        st = s.state
        if st is ServerState.ACTIVE and not s.held:
            name = "active"
        elif st is ServerState.RESET:
            name = "tested"                 # running server_reset_query or server_check_query
        elif st is ServerState.CONNECTING or st is ServerState.LOGIN:
            name = "login"
        elif s.parked:
            name = "being_canceled"         # released, held until a cancel sent for its last client is done
        elif s in idle and check and now - s.last_used > config.server_check_delay:
            name = "used"                   # idle, needs server_check_query before it serves again
        elif st is ServerState.IDLE or s.held:
            name = "idle"
        else:
            continue
        servers[name] += 1
    waits = [now - c.wait_started for c in pool.waiting if not c.closed and c.wait_started]
    counters = pool.stats.as_dict()
    counters["bytes_in"] += sum(c.rx for c in pool.clients)
    counters["bytes_out"] += sum(s.rx for s in pool.servers)
    return {"database": pool.db.name, "user": pool.client_user, "mode": pool.mode, "pool_size": pool.size,
            "clients": clients, "servers": servers, "maxwait": max(waits, default=0.0),
            "counters": counters, "histograms": pool.stats.histograms(),
            "errors": {"server": dict(pool.stats.server_errors), "pgmp": dict(pool.stats.pgmp_errors)}}


# ---- merging in the master -------------------------------------------------------------------

class PoolTotals:
    """One (database, user) pool summed over workers: gauges, counters, histogram buckets, errors."""
    __slots__ = ("clients", "servers", "pool_size", "maxwait", "counters", "histograms", "errors")

    def __init__(self):
        self.clients = dict.fromkeys(CLIENT_STATES, 0)
        self.servers = dict.fromkeys(SERVER_STATES, 0)
        self.pool_size = 0
        self.maxwait = 0.0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.histograms = {name: [0] * (len(BUCKETS) + 1) for name, _ in HISTOGRAMS}
        self.errors: dict[tuple[str, str], int] = {}

    def add_monotonic(self, row: dict) -> None:
        """Counters, histograms and errors of one worker's pool."""
        for name, value in (row.get("counters") or {}).items():
            if name in self.counters:
                self.counters[name] += value
        for name, buckets in (row.get("histograms") or {}).items():
            mine = self.histograms.get(name)
            if mine is not None and len(buckets) == len(mine):
                for i, n in enumerate(buckets):
                    mine[i] += n
        for origin, table in (row.get("errors") or {}).items():
            for cls, n in table.items():
                self.errors[origin, cls] = self.errors.get((origin, cls), 0) + n

    def add_current(self, row: dict, serving: bool) -> None:
        """Gauges of one worker's pool (its size only if the worker is not draining)."""
        for table, name in ((self.clients, "clients"), (self.servers, "servers")):
            for state, n in (row.get(name) or {}).items():
                if state in table:
                    table[state] += n
        if serving:
            self.pool_size += row.get("pool_size", 0)
        self.maxwait = max(self.maxwait, row.get("maxwait", 0.0))

    def add_totals(self, other: "PoolTotals") -> None:
        for name, value in other.counters.items():
            self.counters[name] += value
        for name, buckets in other.histograms.items():
            mine = self.histograms[name]
            for i, n in enumerate(buckets):
                mine[i] += n
        for key, n in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + n


def merge_pools(workers: list[dict], retired: dict | None = None) -> dict[tuple[str, str], PoolTotals]:
    """Sum the pools of several workers' figures (``{"draining": bool, "pools": [...]}``) by (database, user).

    ``retired``: counters of workers that have exited, added so that no total goes down.
    """
    pools: dict[tuple[str, str], PoolTotals] = {}
    for key, totals in (retired or {}).items():
        pools.setdefault(key, PoolTotals()).add_totals(totals)
    for figures in workers:
        for row in figures.get("pools") or ():
            key = (str(row.get("database", "")), str(row.get("user", "")))
            totals = pools.setdefault(key, PoolTotals())
            totals.add_monotonic(row)
            totals.add_current(row, serving=not figures.get("draining"))
    return pools


def cumulative_buckets(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (the last for +Inf) as the cumulative (le, count) pairs of a Prometheus histogram."""
    out, total = [], 0
    for bound, n in zip(BUCKETS + (float("inf"),), counts):
        total += n
        out.append((floatToGoString(bound), total))
    return out


# ---- the collector ---------------------------------------------------------------------------

_POOL = ["database", "user"]
_WORKER = ["worker", "generation", "pid"]
_COUNTER_METRICS = (
    ("transactions", "xact_count", "Transactions completed (ReadyForQuery idle after a request), per pool."),
    ("queries", "query_count", "Requests answered (one per ReadyForQuery relayed: a simple Query, an "
                               "extended-protocol Sync, a FunctionCall), per pool."),
    ("received_bytes", "bytes_in", "Bytes received from the pool's clients."),
    ("sent_bytes", "bytes_out", "Bytes received from the pool's servers, to be sent to its clients "
                                "(pgmp's own queries on them included)."),
    ("logins", "login_count", "Client logins completed, per pool."),
)
_HISTOGRAM_METRICS = (
    ("query_duration_seconds", "query_hist", "query_time_us",
     "Time from a request sent while none was in flight to the ReadyForQuery that leaves none in flight "
     "(a pipelined batch is one observation), per pool."),
    ("transaction_duration_seconds", "xact_hist", "xact_time_us",
     "Time from the first request of a transaction to the ReadyForQuery that ends it, per pool."),
    ("client_wait_seconds", "wait_hist", "wait_time_us",
     "Time a client waited for a server connection of its pool, one observation per wait (_sum: total wait "
     "time), per pool."),
)


class Scrape:
    """One gathered answer; ``collect()`` yields it as prometheus_client metric families."""

    def __init__(self, pools: dict, workers: list[dict], master: dict, hosts: list[dict] | None = None):
        self.pools = pools            # (database, user) -> PoolTotals
        self.workers = workers        # per worker: slot, generation, pid, up, age, figures, process
        self.master = master          # pid, process, healthy, nworkers, missing, duration, started
        self.hosts = hosts or []      # the master's health checks (pgmp.health.HealthChecker.rows)

    def collect(self):
        yield from self._pool_families()
        yield from self._worker_families()
        yield from self._master_families()
        yield from self._host_families()

    def _host_families(self):
        labels = ["host", "port"]
        up = GaugeMetricFamily("pgmp_host_up", "1 if the master's latest health check of the host succeeded, 0 "
                               "if it failed (hosts of databases that choose among hosts; none yet: no sample).",
                               labels=labels)
        standby = GaugeMetricFamily("pgmp_host_in_recovery", "1 for a standby (pg_is_in_recovery()), 0 for a "
                                    "primary, as the latest health check found it.", labels=labels)
        banned = GaugeMetricFamily("pgmp_host_banned", "1 while the host is left out for host_ban_time after a "
                                   "failure.", labels=labels)
        lag = GaugeMetricFamily("pgmp_host_replica_lag_seconds", "Replay lag of a standby at its latest health "
                                "check (what max_replica_lag compares).", labels=labels)
        for row in sorted(self.hosts, key=lambda r: (str(r["host"]), int(r["port"] or 0))):
            key = [str(row["host"]), str(row["port"])]
            if row.get("up") is not None:
                up.add_metric(key, 1 if row["up"] else 0)
            if row.get("in_recovery") is not None:
                standby.add_metric(key, 1 if row["in_recovery"] else 0)
                if row["in_recovery"] and row.get("lag") is not None:
                    lag.add_metric(key, float(row["lag"]))
            banned.add_metric(key, 1 if row.get("banned") else 0)
        yield from (up, standby, banned, lag)

    def _pool_families(self):
        pools = sorted(self.pools.items())
        clients = GaugeMetricFamily("pgmp_clients", "Client connections of the pool by state: active (linked to "
                                    "a server), waiting (for a server), idle, login (logging in).",
                                    labels=_POOL + ["state"])
        servers = GaugeMetricFamily("pgmp_servers", "Server connections of the pool by state: active, idle, used "
                                    "(idle, to be checked before reuse), tested (running the reset or check "
                                    "query), login, being_canceled.", labels=_POOL + ["state"])
        size = GaugeMetricFamily("pgmp_pool_size", "Server connections the pool may open (the workers' shares "
                                 "added up; draining workers not counted).", labels=_POOL)
        maxwait = GaugeMetricFamily("pgmp_maxwait_seconds", "How long the longest-waiting client of the pool "
                                    "has been waiting for a server.", labels=_POOL)
        for (db, user), p in pools:
            for state in CLIENT_STATES:
                clients.add_metric([db, user, state], p.clients[state])
            for state in SERVER_STATES:
                servers.add_metric([db, user, state], p.servers[state])
            size.add_metric([db, user], p.pool_size)
            maxwait.add_metric([db, user], p.maxwait)
        yield from (clients, servers, size, maxwait)
        for name, key, doc in _COUNTER_METRICS:
            fam = CounterMetricFamily("pgmp_" + name, doc, labels=_POOL)
            for (db, user), p in pools:
                fam.add_metric([db, user], p.counters[key])
            yield fam
        errors = CounterMetricFamily("pgmp_errors", "ErrorResponses sent to the pool's clients, by SQLSTATE class "
                                     "(its first two characters; ?? for a malformed one) and origin: server "
                                     "(relayed) or pgmp (pgmp's own).", labels=_POOL + ["origin", "sqlstate_class"])
        for (db, user), p in pools:
            for (origin, cls), n in sorted(p.errors.items()):
                errors.add_metric([db, user, origin, cls], n)
        yield errors
        for name, key, total, doc in _HISTOGRAM_METRICS:
            fam = HistogramMetricFamily("pgmp_" + name, doc, labels=_POOL)
            for (db, user), p in pools:
                fam.add_metric([db, user], cumulative_buckets(p.histograms[key]), sum_value=p.counters[total] / 1e6)
            yield fam

    def _worker_families(self):
        up = GaugeMetricFamily("pgmp_worker_up", "1 if the worker answered this scrape, 0 if its figures are "
                               "the last it reported.", labels=_WORKER)
        age = GaugeMetricFamily("pgmp_worker_figures_age_seconds", "Age of the worker's figures in this answer "
                                "(0 when it answered this scrape).", labels=_WORKER)
        draining = GaugeMetricFamily("pgmp_worker_draining", "1 if the worker is draining (stopping, or "
                                     "replaced by a new generation).", labels=_WORKER)
        clients = GaugeMetricFamily("pgmp_worker_clients", "Client connections of the worker.", labels=_WORKER)
        servers = GaugeMetricFamily("pgmp_worker_servers", "Server connections of the worker.", labels=_WORKER)
        rss = GaugeMetricFamily("pgmp_worker_resident_memory_bytes", "Resident memory of the worker process.",
                                labels=_WORKER)
        cpu = CounterMetricFamily("pgmp_worker_cpu_seconds", "CPU time (user and system) of the worker process.",
                                  labels=_WORKER)
        fds = GaugeMetricFamily("pgmp_worker_open_fds", "Open file descriptors of the worker process.",
                                labels=_WORKER)
        for w in self.workers:
            labels = [str(w["slot"]), str(w["generation"]), str(w["pid"])]
            up.add_metric(labels, 1 if w["up"] else 0)
            age.add_metric(labels, w["age"])
            draining.add_metric(labels, 1 if w["draining"] else 0)
            clients.add_metric(labels, w["clients"])
            servers.add_metric(labels, w["servers"])
            proc = w["process"]
            if proc:
                rss.add_metric(labels, proc["rss"])
                cpu.add_metric(labels, proc["cpu"])
                fds.add_metric(labels, proc["fds"])
        yield from (up, age, draining, clients, servers, rss, cpu, fds)

    def _master_families(self):
        m = self.master
        yield InfoMetricFamily("pgmp", "pgmp's version.", value={"version": __version__})
        yield GaugeMetricFamily("pgmp_healthy", "1 when /health answers 200: the master and all current "
                                "workers are ready.", value=1 if m["healthy"] else 0)
        yield GaugeMetricFamily("pgmp_workers", "Worker processes configured (the workers setting, or one "
                                "per CPU).", value=m["nworkers"])
        yield GaugeMetricFamily("pgmp_master_start_time_seconds", "When the master started, in seconds since "
                                "the epoch.", value=m["started"])
        proc = m["process"]
        if proc:
            yield GaugeMetricFamily("pgmp_master_resident_memory_bytes", "Resident memory of the master process.",
                                    value=proc["rss"])
            yield CounterMetricFamily("pgmp_master_cpu_seconds", "CPU time (user and system) of the master "
                                      "process.", value=proc["cpu"])
            yield GaugeMetricFamily("pgmp_master_open_fds", "Open file descriptors of the master process.",
                                    value=proc["fds"])
        yield GaugeMetricFamily("pgmp_scrape_missing_workers", "Workers that did not answer this scrape in time "
                                "(reported from their last figures).", value=m["missing"])
        yield GaugeMetricFamily("pgmp_scrape_duration_seconds", "Time the master took to gather this answer "
                                "from the workers.", value=m["duration"])


def _check_free(host: str, port: int) -> None:
    """ListenError if a socket is already bound to (host, port): a bind without SO_REUSEPORT fails then."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def process_figures(pid: int) -> dict | None:
    """RSS, CPU seconds and open descriptors of a process (None if it is gone)."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return {"rss": p.memory_info().rss, "cpu": round(t.user + t.system, 2), "fds": p.num_fds()}
    except psutil.Error:
        return None


# ---- health ----------------------------------------------------------------------------------

def health(master) -> tuple[bool, str]:
    """(healthy, why): the master runs and every worker of the serving generation is ready and alive.

    During a reload that starts a new generation, the old one serves until the new one is
    ready: either being whole is healthy. A worker whose heartbeat is older than
    HEALTH_HEARTBEAT_AGE (stopped, hung) makes pgmp unhealthy.
    """
    if master.stopping:
        if master.successor and psutil.pid_exists(master.successor):
            return True, f"ok: pid {master.successor} takes over"     # pgmp restart: the address stays served
        return False, f"stopping ({master.stopping})"
    if not master.announced:
        return False, "starting"
    now = master.loop.clock()
    problems = []
    for gen in [master.generation] + list(reversed(master.retiring)):
        if gen not in master.listen:
            continue
        want = master.nworkers_of(gen)
        ws = {w.slot: w for w in master.workers.values() if w.generation == gen and not w.draining}
        bad = []
        for slot in range(want):
            w = ws.get(slot)
            if w is None:
                bad.append(f"worker {slot}: not running")
            elif not w.ready:
                bad.append(f"worker {slot}: starting")
            elif now - w.last_heartbeat > HEALTH_HEARTBEAT_AGE:
                bad.append(f"worker {slot} (pid {w.pid}): no heartbeat for {now - w.last_heartbeat:.0f}s")
        if not bad:
            return True, "ok"
        problems += bad
    return False, "; ".join(problems) or "no workers"


# ---- HTTP ------------------------------------------------------------------------------------

class HttpError(Exception):
    """A request pgmp refuses: the status to answer and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    __slots__ = ("method", "path", "query", "version", "headers")

    def __init__(self, method: str, path: str, query: str, version: tuple[int, int], headers: dict[str, str]):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers


_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_NOT_REQUEST_LINE = re.compile(rb"[^A-Z]|[A-Z]*[^A-Z ]|.*[^\x20-\x7e\r]", re.S)   # (of a request line's start)


def parse_head(data: bytes) -> Request | None:
    """The request in ``data`` once its head is complete; None while it is not; HttpError if refused."""
    start = 0
    while data.startswith(b"\r\n", start):         # empty lines before a request are ignored (RFC 9112 2.2)
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if _BARE_LF.search(data, start, end if end >= 0 else len(data)):
        raise HttpError(400, "lines of the request head must end with CRLF")
    line_end = data.find(b"\r\n", start)
    if (line_end < 0 and len(data) > MAX_HEAD) or line_end > MAX_HEAD:
        raise HttpError(414, f"request line longer than {MAX_HEAD} bytes")
    if end < 0:
        first = data[start:line_end] if line_end >= 0 else data[start:]
        if first != b"\r" and _NOT_REQUEST_LINE.match(first):
            raise HttpError(400, "not an HTTP request")          # (a TLS ClientHello, say: no need to wait)
        if len(data) > MAX_HEAD:
            raise HttpError(431, f"request header fields longer than {MAX_HEAD} bytes")
        if data.count(b"\r\n", start) > MAX_HEADERS + 1:
            raise HttpError(431, f"more than {MAX_HEADERS} header fields")
        return None
    if end + 4 > MAX_HEAD:
        raise HttpError(431, f"request header fields longer than {MAX_HEAD} bytes")
    lines = bytes(data[start:end]).split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if not m:
        raise HttpError(400, "malformed request line (expected: METHOD /path HTTP/1.1)")
    method, target = m[1].decode(), m[2].decode()
    version = (int(m[3]), int(m[4]))
    if version[0] != 1:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if not target.startswith("/"):
        raise HttpError(400, "request target must be a path (origin-form)")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header field" if line[:1] not in b" \t"
                            else "obsolete line folding in a header field")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "control character in a header field value")
        key = name.decode().lower()
        text = value.decode("latin-1")
        if key in headers:
            if key in ("host", "content-length"):
                raise HttpError(400, f"more than one {name.decode()} header field")
            headers[key] += ", " + text
        else:
            headers[key] = text
    if version >= (1, 1) and "host" not in headers:
        raise HttpError(400, "an HTTP/1.1 request needs a Host header field")
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise HttpError(400, "a request body is not accepted")
    path, _, query = target.partition("?")
    return Request(method, path, query, version, headers)


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False, extra: tuple = ()) -> bytes:
    """A whole HTTP/1.1 response, closing the connection after it."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
             f"Date: {email.utils.formatdate(usegmt=True)}",
             "Server: pgmp",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Cache-Control: no-store",
             "Connection: close", *extra]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class HttpConnection(Endpoint):
    """One HTTP client: reads one request head (bounded, timed), answers once, closes."""
    __slots__ = ("server", "buf", "timer", "answered")

    def __init__(self, loop, sock, server):
        super().__init__(loop, sock)
        self.server = server
        self.buf = bytearray()
        self.answered = False
        self.timer = loop.call_later(READ_TIMEOUT, self._read_timeout)

    def on_data(self, view, n):
        if self.answered:
            return
        self.buf += view[:n]
        try:
            request = parse_head(self.buf)
        except HttpError as exc:
            log.debug("metrics endpoint: %d for a request: %s", exc.status, exc.message)
            self.answer(response(exc.status, exc.message.encode() + b"\n"))
            return
        if request is None:
            return
        self.pause_reading()            # one request per connection: the rest is not read
        self.buf = bytearray()
        self.timer.cancel()
        self.server.handle(self, request)

    def _read_timeout(self):
        if not self.answered and not self.closed:
            self.answer(response(408, f"the request did not arrive within {READ_TIMEOUT:g}s\n".encode()))

    def answer(self, data: bytes):
        if self.answered or self.closed:
            return
        self.answered = True
        self.timer.cancel()
        self.pause_reading()
        self.timer = self.loop.call_later(SEND_TIMEOUT, self.close)
        self.send(data)
        if not self.outq:
            self.close()

    def on_drained(self):
        if self.answered:
            self.close()

    def on_eof(self, reason):
        self.close()

    def close(self):
        if self.closed:
            return
        self.timer.cancel()
        self.server.connections.discard(self)
        # lingering: the client gets the whole answer even if it sent more than pgmp read
        self.close_socket(linger=not self.outq)


class MetricsListener(Endpoint):
    __slots__ = ("server",)

    def __init__(self, loop, sock, server):
        super().__init__(loop, sock)
        self.server = server

    def read(self):
        for _ in range(16):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # level-triggered: retrying at once (out of descriptors, say) would spin the master
                log.error("metrics_listen: accept() failed: %s; trying again in %gs", exc.strerror or exc,
                          ACCEPT_RETRY)
                self.pause_reading()
                self.loop.call_later(ACCEPT_RETRY, self.resume_reading)
                return
            self.server.accepted(sock)

    def on_eof(self, reason):
        pass


class MetricsServer:
    """The metrics endpoint of one master: its listener, its HTTP connections, the figures it keeps."""

    def __init__(self, master):
        self.master = master
        self.loop = master.loop
        self.address = ""
        self.listener: MetricsListener | None = None
        self.connections: set[HttpConnection] = set()
        self.last: dict[int, tuple[float, dict]] = {}        # pid -> (when, last figures it sent)
        self.retired: dict[tuple[str, str], PoolTotals] = {}  # counters of workers that have exited
        self.waiting: list | None = None                      # callbacks of the scrape being gathered
        self.gather_started = 0.0

    # -- the listening socket --------------------------------------------------------------
    def listen(self, address: str, shared: bool = False) -> None:
        """Listen on ``address`` (host:port) instead of the current one; ListenError leaves the old one.

        The socket has SO_REUSEPORT, so that a new master (``shared``: pgmp restart) binds the
        address while the old one still answers on it. Anything else already bound there (another
        pgmp with the same metrics_listen, say) is an error, not a silent share.
        """
        if address == self.address:
            return
        sock = None
        if address:
            host, port = split_host_port(address)
            try:
                if not shared and port != self.port:
                    _check_free(host, port)
                sock = tcp_listener(host, port, backlog=64)
            except ListenError as exc:
                raise ListenError(f"metrics_listen: {exc}") from None
        self.close_listener()
        self.address = address
        if sock is not None:
            self.listener = MetricsListener(self.loop, sock, self)
            log.info("metrics endpoint on http://%s/metrics", address)

    @property
    def port(self) -> int:
        return split_host_port(self.address)[1] if self.address else 0

    def close_listener(self) -> None:
        """Stop listening; connections already in the accept queue are taken and answered first."""
        if self.listener is not None:
            self.listener.read()
            self.listener.close_socket()
            self.listener = None
        self.address = ""

    def close(self) -> None:
        self.close_listener()
        for conn in list(self.connections):
            conn.close()

    def close_sockets(self) -> None:
        """In a new worker: close the inherited descriptors (the master's stay open)."""
        for ep in [self.listener, *self.connections]:
            if ep is not None:
                ep.sock.close()

    def accepted(self, sock) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            try:
                sock.setblocking(False)
                sock.send(response(503, b"too many metrics connections\n"))
            except OSError:
                pass
            sock.close()
            return
        self.connections.add(HttpConnection(self.loop, sock, self))

    # -- requests --------------------------------------------------------------------------
    def handle(self, conn: HttpConnection, req: Request) -> None:
        if req.path not in ("/metrics", "/health"):
            conn.answer(response(404, b"not found: try /metrics or /health\n", head_only=req.method == "HEAD"))
            return
        if req.method not in ("GET", "HEAD"):
            conn.answer(response(405, b"only GET and HEAD\n", extra=("Allow: GET, HEAD",)))
            return
        head_only = req.method == "HEAD"
        if req.path == "/health":
            ok, why = health(self.master)
            conn.answer(response(200 if ok else 503, (why + "\n").encode(), head_only=head_only))
            return
        encoder, content_type = choose_encoder(req.headers.get("accept", ""))

        def done(scrape: Scrape):
            if conn.closed:
                return
            try:
                body = encoder(scrape)
            except Exception:
                log.exception("metrics endpoint: cannot write the answer")
                conn.answer(response(500, b"internal error in pgmp (see its log)\n"))
                return
            conn.answer(response(200, body, content_type, head_only=head_only))
        self.gather(done)

    # -- gathering -------------------------------------------------------------------------
    def gather(self, callback) -> None:
        """Call ``callback(scrape)`` once every worker answered or the request timed out."""
        if self.waiting is not None:
            self.waiting.append(callback)          # a scrape is being gathered: share it
            return
        self.waiting = [callback]
        self.gather_started = self.loop.clock()
        self.master._ask_workers("metrics_request", None, {}, on_done=self._gathered)

    def figures_arrived(self, wp, msg: dict) -> None:
        """A worker's figures (an answer, late or not, or the last it sends before it exits)."""
        data = msg.get("data")
        if isinstance(data, dict):
            self.last[wp.pid] = (self.loop.clock(), data)

    def worker_exited(self, wp) -> None:
        """Keep the counters of a worker that exited in the totals, so that they never go down."""
        entry = self.last.pop(wp.pid, None)
        if entry is None:
            return
        for key, totals in merge_pools([entry[1]]).items():
            self.retired.setdefault(key, PoolTotals()).add_totals(totals)

    def _gathered(self, req: dict) -> None:
        callbacks, self.waiting = self.waiting or [], None
        scrape = self.snapshot(answered=set(req["replies"]), duration=self.loop.clock() - self.gather_started)
        for cb in callbacks:
            try:
                cb(scrape)
            except Exception:
                log.exception("metrics endpoint: answering a scrape failed")

    def snapshot(self, answered: set, duration: float) -> Scrape:
        m = self.master
        now = self.loop.clock()
        workers, figures = [], []
        missing = 0
        for wp in sorted(m.workers.values(), key=lambda w: (w.generation, w.slot)):
            entry = self.last.get(wp.pid)
            up = wp.pid in answered
            if wp.ready and not up:
                missing += 1
            data = entry[1] if entry is not None else {}
            if entry is not None:
                figures.append(dict(data, draining=wp.draining or bool(data.get("draining"))))
            workers.append({"slot": wp.slot, "generation": wp.generation, "pid": wp.pid, "up": up,
                            "age": 0.0 if up or entry is None else now - entry[0],
                            "draining": wp.draining or bool(data.get("draining")),
                            "clients": data.get("clients", wp.clients), "servers": data.get("servers", wp.servers),
                            "process": process_figures(wp.pid)})
        healthy, _ = health(m)
        master = {"pid": os.getpid(), "process": process_figures(os.getpid()), "healthy": healthy,
                  "nworkers": m.nworkers, "missing": missing, "duration": duration, "started": m.started}
        hosts = m.health.rows() if getattr(m, "health", None) is not None else []
        return Scrape(merge_pools(figures, self.retired), workers, master, hosts)


def scrape_text(scrape: Scrape) -> str:
    """The Prometheus text format of a scrape (for tests and the README)."""
    from prometheus_client.exposition import generate_latest
    return generate_latest(scrape).decode()
