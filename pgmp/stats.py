"""Per-pool counters kept by each worker, and the views ``pgmp stats``, ``status`` and ``top`` print from them."""
import bisect
import json
import time

from pgmp.tables import (
    Column,
    human_bytes,
    human_count,
    human_percent,
    human_rate,
    human_seconds,
    human_us,
    render_pairs,
    text_width,
)
from pgmp.tables import render as render_table

COUNTERS = ("xact_count", "query_count", "bytes_in", "bytes_out", "xact_time_us", "query_time_us",
            "wait_time_us", "wait_count", "login_count", "assign_count")
GAUGES = ("cl_active", "cl_waiting", "cl_idle", "cl_login", "sv_active", "sv_idle", "sv_login", "sv_reset",
          "sv_used", "sv_held")
MAXIMA = ("maxwait_us",)        # the longest wait now: over several workers the largest, not the sum

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
    """Sum counters and gauges of several rows (same pool on several workers, or totals); keep the longest wait."""
    out = {name: 0 for name in COUNTERS + GAUGES + MAXIMA}
    for row in rows:
        for name in COUNTERS + GAUGES:
            out[name] += row.get(name, 0)
        for name in MAXIMA:
            out[name] = max(out[name], row.get(name, 0))
    return out


def averages(row: dict) -> dict:
    x, q, w = row.get("xact_count", 0), row.get("query_count", 0), row.get("wait_count", 0)
    return {
        "avg_xact_ms": row.get("xact_time_us", 0) / x / 1000 if x else 0.0,
        "avg_query_ms": row.get("query_time_us", 0) / q / 1000 if q else 0.0,
        "avg_wait_ms": row.get("wait_time_us", 0) / w / 1000 if w else 0.0,
    }


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)


def _mean_us(total_us: float, count: int) -> float | None:
    return total_us / count if count else None


def _cpu_time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 59.995 else human_seconds(seconds)


def _worker_state(w: dict) -> str:
    if w.get("draining"):
        return "draining"
    return "ready" if w.get("ready", True) else "starting"


def _missing(report: dict) -> str:
    pids = report.get("missing") or []
    if not pids:
        return ""
    return (f"no answer from worker pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}: "
            "its figures are left out")


# ---------------------------------------------------------------- pgmp stats

POOL_COLUMNS = (
    Column("database", shrink=True), Column("user", shrink=True), Column("mode", drop=6),
    Column("cl_active", numeric=True, short="cl_act"), Column("cl_waiting", numeric=True, short="cl_wait"),
    Column("cl_idle", numeric=True, drop=5, short="cl_idl"),
    Column("sv_active", numeric=True, short="sv_act"), Column("sv_idle", numeric=True, drop=2, short="sv_idl"),
    Column("sv_used", numeric=True, drop=7, short="sv_usd"), Column("sv_login", numeric=True, drop=7, short="sv_lgn"),
    Column("maxwait", numeric=True, drop=1, short="maxw"),
    Column("xacts", numeric=True, drop=3), Column("queries", numeric=True, drop=3, short="qrys"),
    Column("recv", numeric=True, drop=6), Column("sent", numeric=True, drop=6),
    Column("avg_xact", numeric=True, drop=4, short="avg_x"), Column("avg_query", numeric=True, drop=4, short="avg_q"),
    Column("avg_wait", numeric=True, drop=2, short="avg_w"),
)

PROCESS_COLUMNS = (
    Column("process"), Column("pid", numeric=True), Column("gen", numeric=True, drop=3), Column("state", drop=3),
    Column("clients", numeric=True), Column("servers", numeric=True),
    Column("xacts", numeric=True, drop=2), Column("queries", numeric=True, drop=2, short="qrys"),
    Column("recv", numeric=True, drop=4), Column("sent", numeric=True, drop=4),
    Column("rss", numeric=True, drop=1), Column("cpu", numeric=True, drop=1),
)


def _pool_cells(database: str, user: str, mode: str, p: dict) -> list:
    return [database, user, mode, p["cl_active"], p["cl_waiting"], p["cl_idle"],
            p["sv_active"], p["sv_idle"], p["sv_used"], p["sv_login"],
            human_us(p["maxwait_us"]) if p["maxwait_us"] else "0",
            human_count(p["xact_count"]), human_count(p["query_count"]),
            human_bytes(p["bytes_in"]), human_bytes(p["bytes_out"]),
            human_us(_mean_us(p["xact_time_us"], p["xact_count"])),
            human_us(_mean_us(p["query_time_us"], p["query_count"])),
            human_us(_mean_us(p["wait_time_us"], p["wait_count"]))]


def render(report: dict, width: int | None = None, style: bool = False, ellipsis: str = "…") -> str:
    """``pgmp stats``: one row per pool (database, user) over the whole instance and a total, then one per process."""
    per_pool: dict[tuple[str, str], list[dict]] = {}
    for w in report.get("workers", []):
        for p in w.get("pools", []):
            per_pool.setdefault((p["database"], p["user"]), []).append(p)
    rows = []
    for (database, user), pools in sorted(per_pool.items()):
        mode = pools[0].get("mode", "") + (" paused" if any(p.get("paused") for p in pools) else "")
        rows.append(_pool_cells(database, user, mode, merge(pools)))
    rows.append(_pool_cells("TOTAL", "", "", merge([p for pools in per_pool.values() for p in pools])))

    m = report.get("master", {})
    procs = [["master", m.get("pid", "-"), "", "", "", "", "", "", "", "",
              human_bytes(m.get("rss", 0)), _cpu_time(m.get("cpu", 0))]]
    for w in report.get("workers", []):
        t = merge(w.get("pools", []))
        procs.append([f"worker {w.get('slot', '?')}", w.get("pid", "-"), w.get("generation", 0), _worker_state(w),
                      w.get("clients", 0), w.get("servers", 0), human_count(t["xact_count"]),
                      human_count(t["query_count"]), human_bytes(t["bytes_in"]), human_bytes(t["bytes_out"]),
                      human_bytes(w.get("rss", 0)), _cpu_time(w.get("cpu", 0))])
    parts = [render_table(POOL_COLUMNS, rows, width, style, ellipsis),
             render_table(PROCESS_COLUMNS, procs, width, style, ellipsis)]
    if _missing(report):
        parts.append(_missing(report))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- pgmp status

STATUS_COLUMNS = (
    Column("slot", numeric=True), Column("pid", numeric=True), Column("gen", numeric=True, drop=3), Column("state"),
    Column("clients", numeric=True), Column("servers", numeric=True), Column("rss", numeric=True, drop=2),
    Column("cpu%", numeric=True, drop=1), Column("uptime", numeric=True, drop=4),
)


def process_figures(pids) -> dict[int, dict]:
    """RSS and CPU use (average since the process started, in percent) of each pid that can be read."""
    import psutil
    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t, rss, age = p.cpu_times(), p.memory_info().rss, time.time() - p.create_time()
        except psutil.Error:
            continue
        out[pid] = {"rss": rss, "cpu_percent": 100 * (t.user + t.system) / age if age > 0 else 0.0}
    return out


def render_status(status: dict, figures: dict[int, dict], width: int | None = None, style: bool = False,
                  ellipsis: str = "…") -> str:
    """``pgmp status``: the instance, then one row per worker process (``figures`` from process_figures)."""
    workers = status.get("workers", [])
    states = [_worker_state(w) for w in workers]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("ready", "starting", "draining") if s in states)
    block = render_pairs([
        ("state", f"stopping ({status['stopping']})" if status.get("stopping") else "running"),
        ("pid", status.get("pid")), ("version", status.get("version")),
        ("uptime", human_seconds(status.get("uptime", 0))), ("generation", status.get("generation")),
        ("config", status.get("config")), ("workers", counts or "none"),
    ])
    rows = []
    for w, state in zip(workers, states):
        f = figures.get(w["pid"])
        rows.append([w["slot"], w["pid"], w["generation"], state, w["clients"], w["servers"],
                     human_bytes(f["rss"]) if f else "-", human_percent(f["cpu_percent"]) if f else "-",
                     human_seconds(w.get("uptime", 0))])
    return block + "\n\n" + render_table(STATUS_COLUMNS, rows, width, style, ellipsis)


# ---------------------------------------------------------------- pgmp top

def rates(before: dict, after: dict, seconds: float) -> dict:
    """What happened between two ``pgmp stats`` reports ``seconds`` apart, per database and per worker.

    Counters count from the earlier report; a worker that was not in it (respawned, or
    did not answer) adds no rates until the next pair, and a counter that went back adds none.
    """
    old = {(w["pid"], p["database"], p["user"]): p for w in before.get("workers", []) for p in w.get("pools", [])}
    old_cpu = {w["pid"]: w.get("cpu", 0.0) for w in before.get("workers", [])}
    seconds = max(seconds, 1e-6)
    databases: dict[str, dict] = {}
    workers: dict[int, dict] = {}
    for w in after.get("workers", []):
        pid, known = w["pid"], w["pid"] in old_cpu
        wdelta = dict.fromkeys(COUNTERS, 0)
        for p in w.get("pools", []):
            prev = old.get((pid, p["database"], p["user"]), {})
            delta = {n: max(p.get(n, 0) - prev.get(n, 0), 0) if known else 0 for n in COUNTERS}
            db = databases.setdefault(p["database"], {"delta": dict.fromkeys(COUNTERS, 0), "pools": []})
            db["pools"].append(p)
            for n in COUNTERS:
                db["delta"][n] += delta[n]
                wdelta[n] += delta[n]
        workers[pid] = {"slot": w.get("slot"), "state": _worker_state(w), "clients": w.get("clients", 0),
                        "servers": w.get("servers", 0), "rss": w.get("rss", 0),
                        "tps": wdelta["xact_count"] / seconds, "qps": wdelta["query_count"] / seconds,
                        "cpu_percent": 100 * max(w.get("cpu", 0.0) - old_cpu[pid], 0) / seconds if known else None}
    out = {}
    for name, db in databases.items():
        d, now = db["delta"], merge(db["pools"])
        out[name] = {"tps": d["xact_count"] / seconds, "qps": d["query_count"] / seconds,
                     "recv_rate": d["bytes_in"] / seconds, "sent_rate": d["bytes_out"] / seconds,
                     "avg_wait_us": _mean_us(d["wait_time_us"], d["wait_count"]),
                     "avg_query_us": _mean_us(d["query_time_us"], d["query_count"]),
                     **{n: now[n] for n in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait_us")}}
    return {"databases": out, "workers": workers}


TOP_COLUMNS = (
    Column("database", shrink=True), Column("tps", numeric=True), Column("qps", numeric=True),
    Column("cl_active", numeric=True, short="cl_act"), Column("cl_waiting", numeric=True, short="cl_wait"),
    Column("sv_active", numeric=True, short="sv_act"), Column("sv_idle", numeric=True, drop=2, short="sv_idl"),
    Column("avg_wait", numeric=True, drop=3, short="avg_w"), Column("maxwait", numeric=True, drop=1, short="maxw"),
    Column("avg_query", numeric=True, drop=4, short="avg_q"),
    Column("recv/s", numeric=True, drop=5), Column("sent/s", numeric=True, drop=5),
)

TOP_WORKER_COLUMNS = (
    Column("worker", numeric=True), Column("pid", numeric=True), Column("state", drop=2),
    Column("clients", numeric=True), Column("servers", numeric=True), Column("tps", numeric=True),
    Column("qps", numeric=True, drop=1), Column("cpu%", numeric=True), Column("rss", numeric=True, drop=1),
)


def render_top(status: dict, before: dict, after: dict, seconds: float, width: int | None = None,
               height: int | None = None, style: bool = False, ellipsis: str = "…", now: float | None = None) -> str:
    """One frame of ``pgmp top``: the instance, databases by tps, workers; cut to ``height`` lines if given."""
    r = rates(before, after, seconds)
    dbs = sorted(r["databases"].items(), key=lambda kv: (-kv[1]["tps"], -kv[1]["qps"], kv[0]))
    ws = sorted(r["workers"].items(), key=lambda kv: (kv[1]["slot"] is None, kv[1]["slot"], kv[0]))
    # the instance line, most telling first: what does not fit a narrow terminal is left out whole
    head = [f"pgmp {status.get('version', '?')}", f"pid {status.get('pid', '?')}",
            f"up {human_seconds(status.get('uptime', 0))}",
            f"{human_rate(sum(d['tps'] for _, d in dbs))} tps", f"{human_rate(sum(d['qps'] for _, d in dbs))} qps",
            f"{sum(w['clients'] for _, w in ws)} clients", f"{sum(w['servers'] for _, w in ws)} servers",
            f"{len(ws)} workers", time.strftime("%H:%M:%S", time.localtime(time.time() if now is None else now))]
    if status.get("stopping"):
        head.insert(3, f"stopping ({status['stopping']})")
    line = head[0]
    for item in head[1:]:
        if width is None or text_width(line) + 2 + text_width(item) <= width:
            line += "  " + item
    lines = [line]
    if _missing(after):
        lines.append(_missing(after))

    worker_rows = [[w["slot"], pid, w["state"], w["clients"], w["servers"], human_rate(w["tps"]),
                    human_rate(w["qps"]), human_percent(w["cpu_percent"]), human_bytes(w["rss"])] for pid, w in ws]
    shown, more = dbs, 0
    if height:
        fixed = len(lines) + 2 + (2 + len(worker_rows))       # blank + header, blank + workers table
        if height - fixed < min(len(dbs), 3):
            worker_rows, fixed = [], fixed - 2 - len(worker_rows)
        room = max(height - fixed, 0)
        if len(dbs) > room:
            shown, more = dbs[:max(room - 1, 0)], len(dbs) - max(room - 1, 0)
    rows = [[name, human_rate(d["tps"]), human_rate(d["qps"]), d["cl_active"], d["cl_waiting"], d["sv_active"],
             d["sv_idle"], human_us(d["avg_wait_us"]), human_us(d["maxwait_us"]) if d["maxwait_us"] else "0",
             human_us(d["avg_query_us"]), human_bytes(d["recv_rate"]), human_bytes(d["sent_rate"])]
            for name, d in shown]
    lines += ["", render_table(TOP_COLUMNS, rows, width, style, ellipsis)]
    if more:
        lines.append(f"{ellipsis} {more} more databases")
    if worker_rows:
        lines += ["", render_table(TOP_WORKER_COLUMNS, worker_rows, width, style, ellipsis)]
    return "\n".join(lines)
