"""Per-pool counters kept by each worker, and the tables ``pgmp stats`` prints from them."""
import bisect
import json

COUNTERS = ("xact_count", "query_count", "bytes_in", "bytes_out", "xact_time_us", "query_time_us",
            "wait_time_us", "wait_count", "login_count")
GAUGES = ("cl_active", "cl_waiting", "cl_idle", "cl_login", "sv_active", "sv_idle", "sv_login", "sv_reset")

# Upper bounds (seconds) of the latency histogram buckets, the same for query, transaction and
# wait times: a pooler's round trips are sub-millisecond to seconds, its waits up to
# query_wait_timeout. Fixed, so that every worker's buckets add up in the master.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BUCKETS_US = tuple(round(b * 1e6) for b in BUCKETS)
# Histograms of each pool: (name, the counter that is their sum, in microseconds).
HISTOGRAMS = (("query_hist", "query_time_us"), ("xact_hist", "xact_time_us"), ("wait_hist", "wait_time_us"))
bucket_of = bisect.bisect_left     # bucket_of(BUCKETS_US, us): the first bucket whose bound is >= us


def observe(hist: list, us: int) -> None:
    """Count one observation of ``us`` microseconds (the hot paths inline this)."""
    hist[bucket_of(BUCKETS_US, us)] += 1


def sqlstate_class(code) -> str:
    """The class (first two characters) of an SQLSTATE, or "??" for one that is not five [0-9A-Z]."""
    if isinstance(code, (bytes, bytearray)):
        code = bytes(code).decode("ascii", "replace")
    if len(code) == 5 and all("0" <= c <= "9" or "A" <= c <= "Z" for c in code):
        return code[:2]
    return "??"


def error_sqlstate(body: bytes) -> bytes:
    """The SQLSTATE field of an ErrorResponse body (possibly cut short), or b"" when it has none."""
    for field in body.split(b"\0"):
        if field[:1] == b"C":
            return field[1:]
    return b""


class PoolStats:
    """Monotonic counters of one pool in one worker (times in microseconds).

    Besides the counters: a bucket count list per latency histogram (len(BUCKETS) + 1, the
    last for +Inf; each sums to the matching counter's number of observations), and the
    ErrorResponses clients got, by SQLSTATE class, relayed from servers or made by pgmp.
    """
    __slots__ = COUNTERS + tuple(h for h, _ in HISTOGRAMS) + ("server_errors", "pgmp_errors")

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)
        for name, _ in HISTOGRAMS:
            setattr(self, name, [0] * (len(BUCKETS) + 1))
        self.server_errors: dict[str, int] = {}
        self.pgmp_errors: dict[str, int] = {}

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def count_error(self, sqlstate, relayed: bool) -> None:
        """An ErrorResponse reached a client: ``relayed`` from its server, or made by pgmp."""
        table = self.server_errors if relayed else self.pgmp_errors
        cls = sqlstate_class(sqlstate)
        table[cls] = table.get(cls, 0) + 1

    def histograms(self) -> dict:
        return {name: list(getattr(self, name)) for name, _ in HISTOGRAMS}


def merge(rows: list[dict]) -> dict:
    """Sum counters and gauges of several rows (same pool on several workers, or totals)."""
    out = {name: 0 for name in COUNTERS + GAUGES}
    for row in rows:
        for name in out:
            out[name] += row.get(name, 0)
    return out


def averages(row: dict) -> dict:
    x, q, w = row.get("xact_count", 0), row.get("query_count", 0), row.get("wait_count", 0)
    return {
        "avg_xact_ms": row.get("xact_time_us", 0) / x / 1000 if x else 0.0,
        "avg_query_ms": row.get("query_time_us", 0) / q / 1000 if q else 0.0,
        "avg_wait_ms": row.get("wait_time_us", 0) / w / 1000 if w else 0.0,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def render(report: dict) -> str:
    """The text table of ``pgmp stats``: per worker and pool, then totals per pool and overall."""
    lines = []
    head = (f"{'worker':>6} {'pool':<24} {'mode':<11} {'cl_act':>6} {'cl_wait':>7} {'cl_idle':>7} "
            f"{'sv_act':>6} {'sv_idle':>7} {'xacts':>9} {'queries':>9} {'in':>8} {'out':>8} "
            f"{'avg_xact':>9} {'avg_query':>9} {'avg_wait':>9}")
    lines.append(head)
    per_pool: dict[str, list[dict]] = {}
    for w in report.get("workers", []):
        for p in w.get("pools", []):
            name = f"{p['database']}/{p['user']}"
            per_pool.setdefault(name, []).append(p)
            lines.append(_row(str(w["slot"]), name, p.get("mode", ""), p))
    lines.append("")
    for name, rows in sorted(per_pool.items()):
        lines.append(_row("all", name, rows[0].get("mode", ""), merge(rows)))
    total = merge([r for rows in per_pool.values() for r in rows])
    lines.append(_row("all", "TOTAL", "", total))
    lines.append("")
    lines.append(f"{'process':<10} {'pid':>8} {'gen':>4} {'clients':>8} {'servers':>8} {'rss':>9} {'cpu_s':>8}")
    m = report.get("master", {})
    lines.append(f"{'master':<10} {m.get('pid', '-'):>8} {'':>4} {'':>8} {'':>8} "
                 f"{_human_bytes(m.get('rss', 0)):>9} {m.get('cpu', 0):>8.2f}")
    for w in report.get("workers", []):
        lines.append(f"{'worker ' + str(w['slot']):<10} {w.get('pid', '-'):>8} {w.get('generation', 0):>4} "
                     f"{w.get('clients', 0):>8} {w.get('servers', 0):>8} {_human_bytes(w.get('rss', 0)):>9} "
                     f"{w.get('cpu', 0):>8.2f}")
    return "\n".join(lines)


def _row(worker: str, name: str, mode: str, p: dict) -> str:
    a = averages(p)
    return (f"{worker:>6} {name:<24} {mode:<11} {p.get('cl_active', 0):>6} {p.get('cl_waiting', 0):>7} "
            f"{p.get('cl_idle', 0):>7} {p.get('sv_active', 0):>6} {p.get('sv_idle', 0):>7} "
            f"{p.get('xact_count', 0):>9} {p.get('query_count', 0):>9} {_human_bytes(p.get('bytes_in', 0)):>8} "
            f"{_human_bytes(p.get('bytes_out', 0)):>8} {a['avg_xact_ms']:>7.2f}ms {a['avg_query_ms']:>7.2f}ms "
            f"{a['avg_wait_ms']:>7.2f}ms")


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
