"""Per-pool counters kept by each worker, and the tables ``pgmp stats`` prints from them."""
import json

COUNTERS = ("xact_count", "query_count", "bytes_in", "bytes_out", "xact_time_us", "query_time_us",
            "wait_time_us", "wait_count", "login_count", "assign_count")
GAUGES = ("cl_active", "cl_waiting", "cl_idle", "cl_login", "sv_active", "sv_idle", "sv_login", "sv_reset")


class PoolStats:
    """Monotonic counters of one pool in one worker (times in microseconds)."""
    __slots__ = COUNTERS

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}


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
