"""The admin console (virtual database pgmp, alias pgbouncer): its commands, their answers as bytes, and the session.

PgBouncer's console, for the whole instance: the worker that holds the
console connection asks the master, which gathers from every worker. This
module is sans-IO: ``parse`` turns a Query's text into commands; the
``show_*`` functions turn a gathered report into (columns, rows); ``result``
and friends encode RowDescription/DataRow/CommandComplete; ``Console`` runs
the commands of one session against a host (pgmp.client's glue) that sends
bytes, asks the master and sets timers.

Column names, order and types are PgBouncer's (src/admin.c, src/stats.c);
what pgmp has no equivalent for is given as PgBouncer gives it with the
feature off. pgmp(1), section CONSOLE, lists each decision.
"""
from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass

from pgmp import __version__
from pgmp import config as configmod
from pgmp.protocol import messages

CONSOLE_DATABASES = ("pgmp", "pgbouncer")
CONSOLE_USERS = ("pgmp", "pgbouncer")          # pgmp's own OS user, over the unix socket: no password

# SQLSTATEs of the console's errors. PgBouncer sends 08P01 for all of them; pgmp uses PostgreSQL's
# codes, since a class 08 code tells drivers and pools the connection is broken (pgmp(1) says why).
SYNTAX_ERROR = "42601"
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_CATALOG_NAME = "3D000"
FEATURE_NOT_SUPPORTED = "0A000"
NOT_IN_PREREQUISITE_STATE = "55000"
CONFIG_FILE_ERROR = "F0000"
INVALID_PARAMETER_VALUE = "22023"
SYSTEM_ERROR = "58000"
WARNING = "01000"

ADMIN_ONLY = "admin access needed"
PAUSE_POLL = 0.2           # seconds between looks at the servers a PAUSE waits for


class ConsoleError(Exception):
    """A command refused; the session goes on (ErrorResponse, then ReadyForQuery)."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.detail, self.hint = sqlstate, message, detail, hint


# ---------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Command:
    verb: str                  # lower case: show, pause, set, ...
    arg: str = ""              # SHOW's subject (lower case), a database name, a client id, SET's key
    value: str | None = None   # SET's value
    text: str = ""             # the statement as written, for errors


_WS = r"[ \t\n\r]"
_WORD = r'"(?:[^"]|"")+"|[0-9A-Za-z_]+'
_VALUE = r'"(?:[^"]|"")+"|[0-9A-Za-z_.:/+-]+'
_STRING = r"'(?:[^']|'')*'"
_CMD = re.compile(rf"{_WS}*({_WORD})(?:{_WS}+({_WORD}))?{_WS}*")
_SET = re.compile(rf"{_WS}*set{_WS}+({_WORD}){_WS}*(?:=|{_WS}to{_WS}){_WS}*({_STRING}|{_VALUE}){_WS}*", re.I)


def _unquote(word: str) -> str:
    if word[:1] == '"':
        return word[1:-1].replace('""', '"')
    if word[:1] == "'":
        return word[1:-1].replace("''", "'")
    return word


def split_statements(query: str) -> list[str]:
    """The statements of one Query, split at each ';' outside quotes; empty ones dropped."""
    out, start, quote = [], 0, ""
    for i, ch in enumerate(query):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            out.append(query[start:i])
            start = i + 1
    out.append(query[start:])
    return [s for s in out if s.strip()]


def syntax_error(text: str) -> ConsoleError:
    return ConsoleError(SYNTAX_ERROR, f"invalid command '{text.strip()}', use SHOW HELP;")


def parse_statement(text: str) -> Command:
    """One statement: ``WORD [WORD]`` or ``SET key = value`` / ``SET key TO value``, keywords in any case."""
    m = _SET.fullmatch(text)
    if m:
        return Command("set", _unquote(m[1]).lower(), _unquote(m[2]), text)
    m = _CMD.fullmatch(text)
    if not m:
        raise syntax_error(text)
    verb = _unquote(m[1]).lower()
    if verb == "set":
        raise syntax_error(text)             # SET without "= value"
    arg = _unquote(m[2]) if m[2] else ""
    if verb in ("show", "select"):
        arg = arg.lower()
    return Command(verb, arg, None, text)


def parse(query: str) -> list[Command]:
    """The commands of one Query; ConsoleError (42601) when one is not a console command."""
    return [parse_statement(s) for s in split_statements(query)]


# ---------------------------------------------------------------- encoding

TYPE_OIDS = {"s": (25, -1), "i": (23, 4), "q": (20, 8), "N": (1700, -1), "T": (25, -1), "b": (17, -1)}
_FIELD = struct.Struct("!IhIhih")


def row_description(columns) -> bytes:
    """RowDescription for ``columns`` = [(name, type letter)], text format (PgBouncer's letters)."""
    body = [struct.pack("!h", len(columns))]
    for name, kind in columns:
        oid, size = TYPE_OIDS[kind]
        body.append(messages.cstr(name) + _FIELD.pack(0, 0, oid, size, -1, 0))
    return messages.frame(b"T", b"".join(body))


def format_time(epoch: float) -> str:
    """A 'T' column: local time with the zone's abbreviation, as PgBouncer prints it."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def _text(value, kind: str) -> bytes | None:
    if value is None:
        return None
    if kind == "T":
        return format_time(value).encode()
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if kind in "iqN" and isinstance(value, float) and kind != "N":
        value = int(value)
    return str(value).encode()


def data_row(values, columns) -> bytes:
    body = [struct.pack("!h", len(values))]
    for value, (_, kind) in zip(values, columns):
        data = _text(value, kind)
        body.append(struct.pack("!i", -1) if data is None else struct.pack("!i", len(data)) + data)
    return messages.frame(b"D", b"".join(body))


def command_complete(tag: str) -> bytes:
    return messages.frame(b"C", messages.cstr(tag))


def result(columns, rows, tag: str = "SHOW") -> bytes:
    """RowDescription, a DataRow per row, CommandComplete."""
    return row_description(columns) + b"".join(data_row(r, columns) for r in rows) + command_complete(tag)


def error(exc: ConsoleError) -> bytes:
    return messages.error_response(exc.sqlstate, exc.message, "ERROR", exc.detail, exc.hint)


def notice(message: str, detail: str | None = None, severity: str = "WARNING", sqlstate: str = WARNING) -> bytes:
    return messages.error_response(sqlstate, message, severity, detail, notice=True)


def empty_query() -> bytes:
    return messages.frame(b"I")


# What a console client is told at login, as PgBouncer tells its console clients.
WELCOME_PARAMETERS = (
    ("server_version", f"{__version__}/pgmp"), ("client_encoding", "UTF8"), ("server_encoding", "UTF8"),
    ("DateStyle", "ISO"), ("TimeZone", "GMT"), ("standard_conforming_strings", "on"), ("is_superuser", "on"),
)


def welcome(key_pid: int, key_secret: int) -> bytes:
    out = [messages.auth_ok()]
    out += [messages.parameter_status(n, v) for n, v in WELCOME_PARAMETERS]
    out.append(messages.backend_key_data(key_pid, key_secret))
    out.append(messages.ready_for_query(b"I"))
    return b"".join(out)


# ---------------------------------------------------------------- the answers

VERSION_COLUMNS = [("version", "s")]
POOLS_COLUMNS = [("database", "s"), ("user", "s"), ("cl_active", "i"), ("cl_waiting", "i"),
                 ("cl_active_cancel_req", "i"), ("cl_waiting_cancel_req", "i"), ("sv_active", "i"),
                 ("sv_active_cancel", "i"), ("sv_being_canceled", "i"), ("sv_idle", "i"), ("sv_used", "i"),
                 ("sv_tested", "i"), ("sv_login", "i"), ("maxwait", "i"), ("maxwait_us", "i"),
                 ("pool_mode", "s"), ("load_balance_hosts", "s")]
# The counters of SHOW STATS, in PgBouncer's order, and the pgmp counter each comes from
# (None: not counted by pgmp, shown as 0).
STAT_FIELDS = (("server_assignment_count", "assign_count"), ("xact_count", "xact_count"),
               ("query_count", "query_count"), ("received", "bytes_in"), ("sent", "bytes_out"),
               ("xact_time", "xact_time_us"), ("query_time", "query_time_us"), ("wait_time", "wait_time_us"),
               ("client_parse_count", None), ("server_parse_count", None), ("bind_count", None),
               ("client_login_count", "login_count"))
_AVG_NAMES = ("server_assignment_count", "xact_count", "query_count", "recv", "sent", "xact_time", "query_time",
              "wait_time", "client_parse_count", "server_parse_count", "bind_count", "client_login_count")
STATS_COLUMNS = [("database", "s")] + [(f"total_{n}", "N") for n, _ in STAT_FIELDS] + \
                [(f"avg_{n}", "N") for n in _AVG_NAMES]
_TOTALS_NAMES = ("server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
                 "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
                 "client_login_count")
STATS_TOTALS_COLUMNS = [("database", "s")] + [(n, "N") for n in _TOTALS_NAMES]
STATS_AVERAGES_COLUMNS = [("database", "s")] + [(n, "N") for n in _TOTALS_NAMES[:8]] + \
                         [(f"avg_{n}", "N") for n in _TOTALS_NAMES[8:]]
_TOTALS_ROWS = ("server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
                "ps_bind_count", "client_login_count")
TOTALS_COLUMNS = [("name", "s"), ("value", "N")]
SOCKET_COLUMNS = [("type", "s"), ("user", "s"), ("database", "s"), ("replication", "s"), ("state", "s"),
                  ("addr", "s"), ("port", "i"), ("local_addr", "s"), ("local_port", "i"), ("connect_time", "T"),
                  ("request_time", "T"), ("wait", "i"), ("wait_us", "i"), ("close_needed", "i"), ("ptr", "s"),
                  ("link", "s"), ("remote_pid", "i"), ("tls", "s"), ("application_name", "s"),
                  ("prepared_statements", "i"), ("id", "q")]
SOCKET_DEBUG_COLUMNS = SOCKET_COLUMNS + [(n, "i") for n in ("recv_pos", "pkt_pos", "pkt_remain", "send_pos",
                                                              "send_remain", "pkt_avail", "send_avail")]
DATABASES_COLUMNS = [("name", "s"), ("host", "s"), ("port", "i"), ("database", "s"), ("force_user", "s"),
                     ("pool_size", "i"), ("min_pool_size", "i"), ("reserve_pool_size", "i"),
                     ("server_lifetime", "i"), ("pool_mode", "s"), ("load_balance_hosts", "s"),
                     ("max_connections", "i"), ("current_connections", "i"), ("max_client_connections", "i"),
                     ("current_client_connections", "i"), ("paused", "i"), ("disabled", "i")]
USERS_COLUMNS = [("name", "s"), ("pool_size", "s"), ("reserve_pool_size", "s"), ("pool_mode", "s"),
                 ("max_user_connections", "i"), ("current_connections", "i"),
                 ("max_user_client_connections", "i"), ("current_client_connections", "i")]
LISTS_COLUMNS = [("list", "s"), ("items", "i")]
STATE_COLUMNS = [("key", "s"), ("value", "s")]
MEM_COLUMNS = [("name", "s"), ("size", "i"), ("used", "i"), ("free", "i"), ("memtotal", "q")]
CONFIG_COLUMNS = [("key", "s"), ("value", "s"), ("default", "s"), ("changeable", "s")]
FDS_COLUMNS = [("fd", "i"), ("task", "s"), ("user", "s"), ("database", "s"), ("addr", "s"), ("port", "i"),
               ("cancel", "q"), ("link", "i"), ("client_encoding", "s"), ("std_strings", "s"),
               ("datestyle", "s"), ("timezone", "s"), ("password", "s"), ("scram_client_key", "b"),
               ("scram_server_key", "b")]
HOSTS_COLUMNS = [("database", "s"), ("host", "s"), ("port", "i"), ("role", "s"), ("state", "s"), ("lag", "N"),
                 ("banned_until", "T"), ("last_check", "T")]
DNS_HOSTS_COLUMNS = [("hostname", "s"), ("ttl", "q"), ("addrs", "s")]
WORKERS_COLUMNS = [("pid", "i"), ("generation", "i"), ("slot", "i"), ("clients", "i"), ("servers", "i"),
                   ("rss", "q"), ("cpu", "N"), ("state", "s")]

# SHOW of these answers a constant, and SET of them is ignored, as PgBouncer does for clients that
# set them on every connection.
FAKE_PARAMETERS = {"client_encoding": "UTF-8", "default_transaction_isolation": "read committed",
                   "standard_conforming_strings": "on", "datestyle": "ISO", "timezone": "GMT"}

HELP = ("\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|WORKERS"
        "\n\tSHOW FDS|SOCKETS|LISTS|MEM|STATE|HOSTS|DNS_HOSTS"
        "\n\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS"
        "\n\tSET key = arg\n\tRELOAD\n\tPAUSE [<db>]\n\tRESUME [<db>]\n\tDISABLE <db>\n\tENABLE <db>"
        "\n\tRECONNECT [<db>]\n\tKILL [<db>]\n\tKILL_CLIENT <client_id>"
        "\n\tSHUTDOWN\n\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS")


def show_version():
    return VERSION_COLUMNS, [(f"pgmp {__version__}",)]


def _pools(report) -> dict[tuple[str, str], list[dict]]:
    """Pool rows of every worker, grouped by (database, user), in order of appearance."""
    out: dict[tuple[str, str], list[dict]] = {}
    for w in report.get("workers", []):
        for p in w.get("pools", []):
            out.setdefault((p["database"], p["user"]), []).append(p)
    return out


def _sum(rows, name) -> int:
    return sum(r.get(name, 0) for r in rows)


def show_pools(report):
    rows = []
    for (db, user), ps in _pools(report).items():
        wait = max((p.get("maxwait_us", 0) for p in ps), default=0)
        rows.append((db, user, _sum(ps, "cl_active") + _sum(ps, "cl_idle"), _sum(ps, "cl_waiting") + _sum(ps, "cl_login"),
                     0, 0, _sum(ps, "sv_active"), 0, _sum(ps, "sv_being_canceled"), _sum(ps, "sv_idle"),
                     _sum(ps, "sv_used"), _sum(ps, "sv_reset"), _sum(ps, "sv_login"),
                     wait // 1_000_000, wait % 1_000_000, ps[0].get("mode"), None))
    return POOLS_COLUMNS, rows


def _by_database(report) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for (db, _), ps in _pools(report).items():
        out.setdefault(db, []).extend(ps)
    return out


def _totals(ps) -> list[int]:
    return [_sum(ps, field) if field else 0 for _, field in STAT_FIELDS]


def _averages(ps) -> list[int]:
    """PgBouncer's averages over the last stats period: counts and bytes per second, times per count."""
    rate = [0.0] * len(STAT_FIELDS)
    delta = [0] * len(STAT_FIELDS)
    for p in ps:
        prev, period = p.get("prev") or {}, p.get("period_s") or 0
        for i, (_, field) in enumerate(STAT_FIELDS):
            if field is None:
                continue
            d = p.get(field, 0) - prev.get(field, 0)
            delta[i] += d
            if period > 0:
                rate[i] += d / period
    names = [n for n, _ in STAT_FIELDS]
    out = []
    for i, name in enumerate(names):
        if name.endswith("_time"):
            count = delta[names.index("server_assignment_count" if name == "wait_time" else
                                      name.replace("_time", "_count"))]
            out.append(delta[i] // count if count else 0)
        else:
            out.append(int(rate[i]))
    return out


def show_stats(report):
    rows = [(db, *_totals(ps), *_averages(ps)) for db, ps in _by_database(report).items()]
    return STATS_COLUMNS, rows


def show_stats_totals(report):
    return STATS_TOTALS_COLUMNS, [(db, *_totals(ps)) for db, ps in _by_database(report).items()]


def show_stats_averages(report):
    return STATS_AVERAGES_COLUMNS, [(db, *_averages(ps)) for db, ps in _by_database(report).items()]


def show_totals(report):
    ps = [p for rows in _pools(report).values() for p in rows]
    totals, avgs = _totals(ps), _averages(ps)
    rows = [(f"total_{n}", v) for n, v in zip(_TOTALS_ROWS, totals)]
    rows += [(f"avg_{n}", v) for n, v in zip(_TOTALS_ROWS, avgs)]
    return TOTALS_COLUMNS, rows


def _socket_row(r: dict, state: str, debug: bool = False) -> tuple:
    wait = r.get("wait_us", 0)
    row = (r["type"], r.get("user") or "(nouser)", r.get("database") or "(nodb)", "none", state,
           r.get("addr"), r.get("port"), r.get("local_addr"), r.get("local_port"), r.get("connect_time"),
           r.get("request_time"), wait // 1_000_000, wait % 1_000_000, int(r.get("close_needed", 0)),
           r.get("ptr"), r.get("link") or "", r.get("remote_pid", 0), r.get("tls", ""),
           r.get("application_name", ""), r.get("prepared_statements", 0), r.get("id"))
    if debug:
        row += (0, 0, r.get("pkt_remain", 0), 0, 0, r.get("pkt_avail", 0), r.get("send_avail", 0))
    return row


def _rows(report, key: str) -> list[dict]:
    return [r for w in report.get("workers", []) for r in w.get(key, [])]


# pgmp's states of a client or server -> PgBouncer's names in SHOW CLIENTS/SERVERS, then SHOW SOCKETS
CLIENT_STATES = {"active": ("active", "cl_active"), "idle": ("idle", "cl_active"),
                 "waiting": ("waiting", "cl_waiting"), "login": (None, "cl_login")}
SERVER_STATES = {"active": ("active", "sv_active"), "idle": ("idle", "sv_idle"), "used": ("used", "sv_used"),
                 "tested": ("tested", "sv_tested"), "new": ("new", "sv_login"),
                 "being_canceled": ("being_canceled", "sv_active")}


def show_clients(report):
    rows = [_socket_row(r, CLIENT_STATES[r["state"]][0]) for r in _rows(report, "client_rows")
            if CLIENT_STATES[r["state"]][0]]
    return SOCKET_COLUMNS, rows


def show_servers(report):
    return SOCKET_COLUMNS, [_socket_row(r, SERVER_STATES[r["state"]][0]) for r in _rows(report, "server_rows")]


def show_sockets(report):
    rows = [_socket_row(r, CLIENT_STATES[r["state"]][1], True) for r in _rows(report, "client_rows")]
    rows += [_socket_row(r, SERVER_STATES[r["state"]][1], True) for r in _rows(report, "server_rows")]
    return SOCKET_DEBUG_COLUMNS, rows


def show_fds(report):
    rows = []
    for w in report.get("workers", []):
        for fd, addr, port in w.get("listener_rows", []):
            rows.append((fd, "pooler", None, None, addr, port, 0, 0, None, None, None, None, None, None, None))
        for task, key in (("client", "client_rows"), ("server", "server_rows")):
            for r in w.get(key, []):
                v = r.get("params") or {}
                rows.append((r.get("fd"), task, r.get("user"), r.get("database"), r.get("addr"), r.get("port"),
                             0, r.get("link_fd") or 0, v.get("client_encoding"),
                             v.get("standard_conforming_strings"), v.get("DateStyle"), v.get("TimeZone"),
                             None, None, None))
    return FDS_COLUMNS, rows


def _paused(report, name: str | None = None) -> bool:
    ws = report.get("workers", [])
    if not ws:
        return False
    if name is None:
        return all(w.get("paused_all") for w in ws)
    return all(w.get("paused_all") or name in w.get("paused_dbs", ()) for w in ws)


def _disabled(report, name: str) -> bool:
    return any(name in w.get("disabled_dbs", ()) for w in report.get("workers", []))


def database_names(cfg, report) -> list[str]:
    """Configured databases, then those a "*" section made pools for."""
    names = [n for n in cfg.databases if n != "*"]
    for db, _ in _pools(report):
        if db not in names:
            names.append(db)
    return names


def show_databases(cfg, report):
    per_db = _by_database(report)
    counts: dict[str, tuple[int, int]] = {}
    for db, ps in per_db.items():
        counts[db] = (_sum(ps, "servers"), _sum(ps, "clients"))
    rows = []
    for name in database_names(cfg, report):
        db = configmod.database_for(cfg, name)
        if db is None:
            continue
        servers, clients = counts.get(name, (0, 0))
        rows.append((name, ",".join(db.host), db.port, db.dbname, db.user or None, db.pool_size, db.min_pool_size,
                     db.reserve_pool_size, int(cfg.server_lifetime),
                     db.pool_mode if db.pool_mode != cfg.pool_mode else None,
                     db.load_balance_hosts if len(db.hosts) > 1 else None, db.max_db_connections,
                     servers, 0, clients, int(_paused(report, name)), int(_disabled(report, name))))
    return DATABASES_COLUMNS, rows


def show_users(cfg, report, auth_users=()):
    names = list(dict.fromkeys([*cfg.users, *auth_users, *(u for _, u in _pools(report))]))
    servers: dict[str, int] = {}
    clients: dict[str, int] = {}
    for (_, user), ps in _pools(report).items():
        for p in ps:
            servers[p.get("server_user", user)] = servers.get(p.get("server_user", user), 0) + p.get("servers", 0)
            clients[user] = clients.get(user, 0) + p.get("clients", 0)
    rows = []
    for name in names:
        u = cfg.users.get(name)
        limit = u.max_user_connections if u is not None else cfg.max_user_connections
        rows.append((name, "", "", u.pool_mode if u is not None else None, limit, servers.get(name, 0), 0,
                     clients.get(name, 0)))
    return USERS_COLUMNS, rows


def show_lists(cfg, report, auth_users=()):
    ws = report.get("workers", [])
    users = set(cfg.users) | set(auth_users) | {u for _, u in _pools(report)}
    rows = [("databases", len(database_names(cfg, report))), ("users", len(users)), ("peers", 0),
            ("pools", len(_pools(report))), ("peer_pools", 0), ("free_clients", 0),
            ("used_clients", sum(w.get("clients", 0) for w in ws)),
            ("login_clients", sum(w.get("login_clients", 0) for w in ws)), ("free_servers", 0),
            ("used_servers", sum(w.get("servers", 0) for w in ws)),
            ("dns_names", len(_dns_entries(report))), ("dns_zones", 0), ("dns_queries", 0), ("dns_pending", 0)]
    return LISTS_COLUMNS, rows


def show_state(report):
    paused = _paused(report)
    return STATE_COLUMNS, [("active", "no" if paused else "yes"), ("paused", "yes" if paused else "no"),
                           ("suspended", "no")]


def show_mem(report):
    """One row per process: connections it holds (used) and its resident memory (memtotal, bytes)."""
    m = report.get("master") or {}
    rows = [("master", 0, 0, 0, m.get("rss", 0))]
    for w in report.get("workers", []):
        rows.append((f"worker {w.get('slot')}", 0, w.get("clients", 0) + w.get("servers", 0), 0, w.get("rss", 0)))
    return MEM_COLUMNS, rows


def show_workers(report):
    rows = []
    for w in report.get("workers", []):
        state = "draining" if w.get("draining") else "running"
        rows.append((w.get("pid"), w.get("generation"), w.get("slot"), w.get("clients", 0), w.get("servers", 0),
                     w.get("rss", 0), f"{w.get('cpu', 0.0):.2f}", state))
    for w in report.get("missing_workers", []):
        rows.append((w.get("pid"), w.get("generation"), w.get("slot"), w.get("clients", 0), w.get("servers", 0),
                     w.get("rss", 0), f"{w.get('cpu', 0.0):.2f}", "not answering"))
    rows.sort(key=lambda r: (r[1], r[2]))
    return WORKERS_COLUMNS, rows


def _host_rows(report) -> tuple[dict, dict]:
    """The master's host table and the workers' own knowledge (merged), each by (host, port)."""
    master = {(r.get("host"), r.get("port")): r for r in report.get("hosts", [])}
    local: dict = {}
    for w in report.get("workers", []):
        for r in w.get("hosts", []):
            key = (r.get("host"), r.get("port"))
            have = local.get(key)
            if have is None:
                local[key] = dict(r)
                continue
            if (r.get("role_at") or 0) > (have.get("role_at") or 0):
                have["role"], have["role_at"] = r.get("role"), r.get("role_at")
            if r.get("banned") and (r.get("banned_until_epoch") or 0) > (have.get("banned_until_epoch") or 0):
                have["banned"], have["banned_until_epoch"] = True, r.get("banned_until_epoch")
    return master, local


def show_hosts(cfg, report):
    """One row per host of each database: its role and state as the health checks and the workers know them."""
    master, local = _host_rows(report)
    rows = []
    for name in database_names(cfg, report):
        db = configmod.database_for(cfg, name)
        if db is None:
            continue
        for spec in db.hosts:
            m, w = master.get((spec.host, spec.port)), local.get((spec.host, spec.port)) or {}
            role = m.get("role") if m and m.get("role") != "unknown" else w.get("role") or "unknown"
            bans = [r.get("banned_until_epoch") for r in (m, w) if r and r.get("banned")]
            banned_until = max(bans) if bans else None
            lag = m.get("lag") if m else None
            if m and m.get("up") is False:
                state = "down"
            elif banned_until is not None:
                state = "banned"
            elif role == "standby" and lag is not None and 0 < db.max_replica_lag < lag:
                state = "lagging"
            elif (m and m.get("up")) or w.get("role", "unknown") != "unknown":
                state = "up"
            else:
                state = "unknown"
            rows.append((name, spec.host, spec.port, role, state, f"{lag:.3f}" if lag is not None else None,
                         banned_until, m.get("last_check") if m else None))
    return HOSTS_COLUMNS, rows


def _dns_entries(report) -> dict[str, dict]:
    names: dict[str, dict] = {}
    for rows in [report.get("dns", [])] + [w.get("dns", []) for w in report.get("workers", [])]:
        for r in rows:
            have = names.get(r.get("hostname"))
            if have is None or r.get("ttl", 0) > have.get("ttl", 0):
                names[r.get("hostname")] = r
    return names


def show_dns_hosts(report):
    """PgBouncer's SHOW DNS_HOSTS over the master's and every worker's cache: the longest-lived answer per name."""
    return DNS_HOSTS_COLUMNS, [(n, r.get("ttl", 0), r.get("addrs", "")) for n, r in sorted(_dns_entries(report).items())]


def show_config(cfg):
    rows = []
    for s in configmod.SCHEMA:
        if s.section == "pgmp":
            rows.append((s.name, configmod.value_text(s, getattr(cfg, s.name)), configmod.default_value_text(s),
                         "yes" if s.reloadable else "no"))
    return CONFIG_COLUMNS, rows


# SHOW subjects answered from the asking worker alone, and those that need the instance gathered
# (the detail level a worker reports at).
LOCAL_SHOWS = {"version", "config", "help"}
GATHERED_SHOWS = {"pools": None, "stats": None, "stats_totals": None, "stats_averages": None, "totals": None,
                  "databases": None, "users": None, "lists": None, "state": None, "mem": None, "workers": None,
                  "hosts": None, "dns_hosts": None,
                  "clients": "sockets", "servers": "sockets", "sockets": "sockets", "fds": "sockets"}


def answer_show(subject: str, cfg, report, auth_users=()):
    """(columns, rows) of SHOW ``subject`` from a gathered report."""
    if subject in ("users", "lists"):
        return globals()[f"show_{subject}"](cfg, report, auth_users)
    if subject in ("databases", "hosts"):
        return globals()[f"show_{subject}"](cfg, report)
    return globals()[f"show_{subject}"](report)


def missing_notice(report) -> bytes:
    """A WARNING naming the workers that did not answer, or nothing."""
    pids = report.get("missing") or []
    if not pids:
        return b""
    return notice(f"workers with pid {', '.join(map(str, pids))} did not answer in time: this answer "
                  "covers the other workers only",
                  detail="a worker that is stopped, overloaded or hung does not answer the master within 3 s")


# ---------------------------------------------------------------- the session

# Commands and the master command each becomes (None: handled by the console itself).
ADMIN_COMMANDS = {"pause": "pause", "resume": "resume", "reconnect": "reconnect", "disable": "disable",
                  "enable": "enable", "kill": "kill", "kill_client": "kill_client", "reload": "reload",
                  "shutdown": "stop", "set": "set", "suspend": None}
SHUTDOWN_MODES = {"": "fast", "wait_for_servers": "graceful", "wait_for_clients": "graceful"}
NEEDS_DATABASE = {"disable", "enable"}


class Console:
    """One console session: runs the commands of each Query in turn, asking the host for instance data.

    The host (pgmp.client's glue) provides ``config``, ``auth_users()``, ``send(bytes)``,
    ``ask(command, args, callback(reply))`` (a master command; reply = {ok, error, data}),
    ``later(seconds, fn)``, ``done()`` (ReadyForQuery was sent: read the next message) and
    ``closed``.
    """

    def __init__(self, host, admin: bool):
        self.host = host
        self.admin = admin
        self.queue: list[Command] = []
        self.busy = False

    # -- driving -------------------------------------------------------------------
    def query(self, sql: str) -> None:
        """A Query message arrived; its answers (ending with ReadyForQuery) go to host.send."""
        self.busy = True
        try:
            self.queue = parse(sql)
        except ConsoleError as exc:
            self.queue = []
            self._finish(error(exc))
            return
        if not self.queue:
            self._finish(empty_query())
            return
        self._next()

    def _next(self) -> None:
        while self.queue:
            cmd = self.queue.pop(0)
            try:
                if self._run(cmd):
                    return                      # an answer from the master comes later
            except ConsoleError as exc:
                self._finish(error(exc))
                return
        self._finish(b"")

    def _finish(self, data: bytes) -> None:
        self.queue = []
        self.busy = False
        self.host.send(data + messages.ready_for_query(b"I"))
        self.host.done()

    def _then(self, fn):
        """A callback for an answer: runs ``fn(reply)``, then the next command (or reports the error)."""
        def callback(reply):
            if self.host.closed:
                return
            try:
                if fn(reply):
                    return
            except ConsoleError as exc:
                self._finish(error(exc))
                return
            self._next()
        return callback

    # -- commands --------------------------------------------------------------------
    def _run(self, cmd: Command) -> bool:
        """Run one command; True if it waits for an answer (then its callback goes on)."""
        if cmd.verb in ("show", "select"):
            return self._show(cmd)
        if cmd.verb == "set" and cmd.arg in FAKE_PARAMETERS:
            self.host.send(notice("SET ignored", severity="NOTICE", sqlstate="00000") + command_complete("SET"))
            return False
        if cmd.verb not in ADMIN_COMMANDS:
            raise syntax_error(cmd.text)
        if not self.admin:
            raise ConsoleError(INSUFFICIENT_PRIVILEGE, ADMIN_ONLY,
                               hint="only users in admin_users may run this command; stats_users may run SHOW")
        return getattr(self, f"_cmd_{cmd.verb}")(cmd)

    def _show(self, cmd: Command) -> bool:
        subject = cmd.arg
        if subject in FAKE_PARAMETERS:
            self.host.send(result([(subject, "s")], [(FAKE_PARAMETERS[subject],)]))
            return False
        if subject == "help":
            self.host.send(notice("Console usage", detail=HELP, severity="NOTICE", sqlstate="00000")
                           + command_complete("SHOW"))
            return False
        if subject == "version":
            self.host.send(result(*show_version()))
            return False
        if subject == "config":
            self.host.send(result(*show_config(self.host.config)))
            return False
        if subject not in GATHERED_SHOWS:
            raise syntax_error(cmd.text)
        if subject == "fds" and not self.admin:
            raise ConsoleError(INSUFFICIENT_PRIVILEGE, ADMIN_ONLY)

        def answer(reply):
            report = self._data(reply)
            self.host.send(missing_notice(report) +
                           result(*answer_show(subject, self.host.config, report, self.host.auth_users())))
        self.host.ask("stats", {"detail": GATHERED_SHOWS[subject]}, self._then(answer))
        return True

    def _data(self, reply) -> dict:
        if not reply.get("ok"):
            raise ConsoleError(SYSTEM_ERROR, reply.get("error") or "the master did not answer")
        return reply.get("data") or {}

    def _database(self, cmd: Command, required: bool = False) -> str | None:
        name = cmd.arg
        if not name:
            if required:
                raise ConsoleError(SYNTAX_ERROR, "a database is required")
            return None
        if name in CONSOLE_DATABASES:
            raise ConsoleError(FEATURE_NOT_SUPPORTED, f"cannot {cmd.verb} admin db: {name}")
        if configmod.database_for(self.host.config, name) is None:
            raise ConsoleError(INVALID_CATALOG_NAME, f"no such database: {name}")
        return name

    def _pool_command(self, cmd: Command, tag: str, required: bool = False, then=None) -> bool:
        database = self._database(cmd, required)

        def answer(reply):
            data = self._data_or_partial(reply)
            if then is not None:
                return then(database, data)
            self.host.send(command_complete(tag))
            return False
        self.host.ask(ADMIN_COMMANDS[cmd.verb], {"database": database}, self._then(answer))
        return True

    def _data_or_partial(self, reply) -> dict:
        """A command's answer: a WARNING first if some workers did not take it (they will when they answer)."""
        data = reply.get("data") or {}
        if data.get("missing"):
            self.host.send(missing_notice(data))
        elif not reply.get("ok"):
            raise ConsoleError(SYSTEM_ERROR, reply.get("error") or "the master did not answer")
        return data

    def _cmd_pause(self, cmd):
        return self._pool_command(cmd, "PAUSE", then=self._pause_wait)

    def _pause_wait(self, database, data) -> bool:
        """PAUSE returns once no server of the paused databases is in use, as PgBouncer's does."""
        if not data.get("busy_servers"):
            self.host.send(command_complete("PAUSE"))
            return False

        def look():
            if not self.host.closed:
                self.host.ask("stats", {"detail": None}, self._then(check))

        def check(reply):
            report = self._data(reply)
            busy = sum(p.get("sv_active", 0) for (db, _), ps in _pools(report).items() for p in ps
                       if database is None or db == database)
            if busy:
                self.host.later(PAUSE_POLL, look)
                return True
            self.host.send(command_complete("PAUSE"))
            return False
        self.host.later(PAUSE_POLL, look)
        return True

    def _cmd_resume(self, cmd):
        return self._pool_command(cmd, "RESUME")

    def _cmd_reconnect(self, cmd):
        return self._pool_command(cmd, "RECONNECT")

    def _cmd_disable(self, cmd):
        return self._pool_command(cmd, "DISABLE", required=True)

    def _cmd_enable(self, cmd):
        return self._pool_command(cmd, "ENABLE", required=True)

    def _cmd_kill(self, cmd):
        return self._pool_command(cmd, "KILL")

    def _cmd_kill_client(self, cmd):
        try:
            target = int(cmd.arg)
        except ValueError:
            raise ConsoleError(INVALID_PARAMETER_VALUE, "invalid client pointer supplied",
                               hint="give the id column of SHOW CLIENTS") from None

        def answer(reply):
            data = self._data_or_partial(reply)
            if not data.get("killed"):
                raise ConsoleError(INVALID_PARAMETER_VALUE, "client not found")
            self.host.send(command_complete("KILL_CLIENT"))
        self.host.ask("kill_client", {"id": target}, self._then(answer))
        return True

    def _cmd_reload(self, cmd):
        if cmd.arg:
            raise syntax_error(cmd.text)

        def answer(reply):
            if not reply.get("ok"):
                raise ConsoleError(CONFIG_FILE_ERROR, "RELOAD failed, see logs for additional details",
                                   detail=reply.get("error"))
            self.host.send(command_complete("RELOAD"))
        self.host.ask("reload", {}, self._then(answer))
        return True

    def _cmd_shutdown(self, cmd):
        mode = SHUTDOWN_MODES.get(cmd.arg.lower())
        if mode is None:
            raise syntax_error(cmd.text)

        def answer(reply):
            self._data(reply)
            self.host.send(command_complete("SHUTDOWN"))
        self.host.ask("stop", {"mode": mode}, self._then(answer))
        return True

    def _cmd_set(self, cmd):
        try:
            value = configmod.value_from_text(cmd.arg, cmd.value)
        except configmod.ConfigError as exc:
            raise ConsoleError(INVALID_PARAMETER_VALUE, "SET failed", detail=str(exc)) from None

        def answer(reply):
            if not reply.get("ok"):
                raise ConsoleError(INVALID_PARAMETER_VALUE, "SET failed", detail=reply.get("error"))
            self.host.send(command_complete(f"SET {cmd.arg}={cmd.value}"))
        self.host.ask("set", {"key": cmd.arg, "value": value}, self._then(answer))
        return True

    def _cmd_suspend(self, cmd):
        raise ConsoleError(FEATURE_NOT_SUPPORTED, "SUSPEND is not supported by pgmp",
                           detail="PgBouncer suspends to hand its sockets to a new process; pgmp's workers hand "
                                  "over by themselves",
                           hint="use pgmp restart (or SIGUSR2) for a restart without downtime")


# ---------------------------------------------------------------- a worker's rows

def _addr(sock, peer: bool, unix_port: int):
    """(address, port) of one end of a socket; ("unix", the listen port) for a unix socket."""
    try:
        name = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None, None
    if isinstance(name, tuple):
        return name[0], name[1]
    return "unix", unix_port


def _tls_text(ep) -> str:
    obj = ep.tls.obj if ep.tls is not None else None
    if obj is None:
        return ""
    cipher = obj.cipher()
    return f"{obj.version()}/{cipher[0] if cipher else ''}"


def client_state(client) -> str:
    """A client's state in SHOW CLIENTS terms: active, idle, waiting or login."""
    name = client.state.name
    if name == "ACTIVE":
        return "idle" if client.server is not None and client.server.held else "active"
    if name == "IDLE":
        return "idle"
    if name == "CONSOLE":
        return "active" if client.console is not None and client.console.busy else "idle"
    if name in ("WAITING", "LOGIN_WAIT"):
        return "waiting"
    return "login"


def server_state(srv, cfg, now: float) -> str:
    """A server's state in SHOW SERVERS terms: active, idle, used, tested, new or being_canceled."""
    name = srv.state.name
    if name == "ACTIVE" and not srv.held:      # (held: idle, linked to its client until another needs it)
        return "active"
    if name == "RESET":
        return "tested"
    if name in ("CONNECTING", "LOGIN"):
        return "new"
    if srv.parked:
        return "being_canceled"
    if cfg.server_check_query and now - srv.last_used > cfg.server_check_delay:
        return "used"
    return "idle"


def client_row(client, wall, now: float, port: int) -> dict:
    """One client, for SHOW CLIENTS, SOCKETS and FDS; ``wall(t)`` turns a loop time into epoch seconds."""
    addr, rport = ("unix", port) if client.peer == "unix" else _addr(client.sock, True, port)
    laddr, lport = _addr(client.sock, False, port)
    link = client.link
    srv = client.server
    if srv is not None and srv.held:
        srv = None                          # held for it between transactions: idle to the pool
    state = client_state(client)
    pl = getattr(link, "pipeline", None)
    waiting = state == "waiting" and client.wait_started
    return {"type": "C", "id": client.conn_id, "ptr": f"0x{client.conn_id:x}", "user": client.user or None,
            "database": client.database or None, "state": state, "addr": addr, "port": rport, "local_addr": laddr,
            "local_port": lport, "connect_time": wall(client.connected_at),
            "request_time": wall(link.t_query or client.connected_at),
            "wait_us": int((now - client.wait_started) * 1e6) if waiting else 0,
            "link": f"0x{srv.conn_id:x}" if srv is not None else "",
            "remote_pid": client.peer_cred[0] if client.peer_cred else 0, "tls": _tls_text(client),
            "application_name": link.settings.get("application_name", ""),
            "prepared_statements": len(pl.statements) if pl is not None else 0,
            "pkt_remain": client.skip, "pkt_avail": len(client.leftover or b""), "send_avail": client.unsent,
            "fd": client.fd, "link_fd": srv.fd if srv is not None else 0, "params": dict(client.reported)}


def server_row(srv, cfg, wall, now: float, port: int) -> dict:
    """One server connection, for SHOW SERVERS, SOCKETS and FDS."""
    pool = srv.pool
    client = None if srv.held else srv.client
    addr, rport = _addr(srv.sock, True, srv.host.port)
    if addr == "unix":
        addr, rport = srv.host.host, srv.host.port
    laddr, lport = _addr(srv.sock, False, port)
    expired = (cfg.server_lifetime > 0 and now - srv.created > cfg.server_lifetime) or \
        srv.created < pool.reconnect_before
    return {"type": "S", "id": srv.conn_id, "ptr": f"0x{srv.conn_id:x}", "user": pool.server_user,
            "database": pool.db.name, "state": server_state(srv, cfg, now), "addr": addr, "port": rport,
            "local_addr": laddr, "local_port": lport, "connect_time": wall(srv.created),
            "request_time": wall(srv.last_used), "wait_us": 0, "close_needed": int(expired),
            "link": f"0x{client.conn_id:x}" if client is not None else "", "remote_pid": srv.backend_pid,
            "tls": _tls_text(srv),
            "application_name": client.link.settings.get("application_name", "") if client is not None else "",
            "prepared_statements": len(srv.session.statements.names), "pkt_remain": srv.skip,
            "pkt_avail": len(srv.leftover or b""), "send_avail": srv.unsent, "fd": srv.fd,
            "link_fd": client.fd if client is not None else 0, "params": dict(srv.params or {})}


def worker_rows(worker) -> dict:
    """Every client, server and listening socket of ``worker`` (the "sockets" detail of its report)."""
    now = worker.loop.clock()
    offset = time.time() - now
    wall = lambda t: t + offset          # noqa: E731
    port = worker.config.listen_port
    cfg = worker.config
    listeners = []
    for lst in worker.listeners:
        addr, lport = _addr(lst.sock, False, port)
        listeners.append((lst.fd, addr, lport))
    return {"client_rows": [client_row(c, wall, now, port) for c in worker.clients],
            "server_rows": [server_row(s, cfg, wall, now, port) for p in worker.pools.values() for s in p.servers],
            "listener_rows": listeners}
