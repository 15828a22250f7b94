"""The admin console without sockets: parsing, the bytes of its answers, the tables, the session."""
import struct

import pytest

from pgmp import config as configmod
from pgmp import console
from pgmp.console import Command, Console, ConsoleError
from pgmp.protocol import messages


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        kind = data[pos:pos + 1]
        (n,) = struct.unpack_from("!I", data, pos + 1)
        out.append((kind, data[pos + 5:pos + 1 + n]))
        pos += 1 + n
    assert pos == len(data)
    return out


def kinds(data: bytes) -> bytes:
    return b"".join(k for k, _ in frames(data))


def columns(payload: bytes) -> list[tuple[str, int]]:
    (n,) = struct.unpack_from("!h", payload, 0)
    pos, out = 2, []
    for _ in range(n):
        end = payload.index(b"\0", pos)
        name = payload[pos:end].decode()
        _, _, oid, _, _, fmt = struct.unpack_from("!IhIhih", payload, end + 1)
        assert fmt == 0
        out.append((name, oid))
        pos = end + 1 + 18
    return out


CFG = configmod.loads('[pgmp]\nauth_type = "trust"\nadmin_users = ["admin"]\nstats_users = ["watcher"]\n'
                      '[databases.appdb]\nport = 5432\n[databases.otherdb]\npool_mode = "transaction"\n'
                      '[users.alice]\npool_mode = "statement"\n')


# ---------------------------------------------------------------- parsing

def test_keywords_in_any_case_and_several_statements_in_one_query():
    assert console.parse("show POOLS; Show Stats ;") == [
        Command("show", "pools", None, "show POOLS"), Command("show", "stats", None, " Show Stats ")]


def test_arguments_quoted_and_unquoted():
    assert console.parse('PAUSE "my db"')[0].arg == "my db"
    assert console.parse("kill_client 1048577")[0] == Command("kill_client", "1048577", None, "kill_client 1048577")
    assert console.parse("RESUME appdb")[0].arg == "appdb"


@pytest.mark.parametrize("text, key, value", [
    ("SET log_level = 'debug'", "log_level", "debug"),
    ("set LOG_LEVEL to debug", "log_level", "debug"),
    ("SET server_check_query = 'select ''2'''", "server_check_query", "select '2'"),
    ("SET query_timeout = 1.5", "query_timeout", "1.5"),
    ("SET server_check_query = 'a;b'", "server_check_query", "a;b"),
])
def test_set(text, key, value):
    (cmd,) = console.parse(text)
    assert (cmd.verb, cmd.arg, cmd.value) == ("set", key, value)


@pytest.mark.parametrize("text", ["SHOW POOLS EXTRA WORDS", "select 1 + 1", "SET x", "SHOW 'pools'", "PAUSE db;x y z"])
def test_not_a_console_command(text):
    with pytest.raises(ConsoleError) as e:
        console.parse(text)
    assert e.value.sqlstate == "42601"
    assert e.value.message.startswith("invalid command '") and e.value.message.endswith("', use SHOW HELP;")


def test_empty_statements_are_dropped():
    assert console.parse(" ;; ") == []


# ---------------------------------------------------------------- encoding

def test_row_description_data_row_command_complete_bytes():
    data = console.result([("name", "s"), ("n", "i"), ("big", "q"), ("x", "N")], [("a", 1, 2, None)])
    assert data == (
        b"T\x00\x00\x00\x5b\x00\x04"
        b"name\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00"
        b"n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
        b"big\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x14\x00\x08\xff\xff\xff\xff\x00\x00"
        b"x\x00\x00\x00\x00\x00\x00\x00\x00\x00\x06\xa4\xff\xff\xff\xff\xff\xff\x00\x00"
        b"D\x00\x00\x00\x19\x00\x04\x00\x00\x00\x01a\x00\x00\x00\x011\x00\x00\x00\x012\xff\xff\xff\xff"
        b"C\x00\x00\x00\x09SHOW\x00")


def test_welcome_is_what_pgbouncer_tells_console_clients():
    out = frames(console.welcome(7, 9))
    assert [k for k, _ in out] == [b"R", *[b"S"] * 7, b"K", b"Z"]
    params = dict(messages.parse_parameter_status(p) for k, p in out if k == b"S")
    assert params["server_version"].endswith("/pgmp") and params["client_encoding"] == "UTF8"
    assert params["is_superuser"] == "on" and params["standard_conforming_strings"] == "on"
    assert out[-2][1] == struct.pack("!II", 7, 9)


def test_time_columns_are_text_with_the_zone():
    (_, payload), _, _ = frames(console.result([("t", "T")], [(0.0,)]))
    assert columns(payload) == [("t", 25)]


# ---------------------------------------------------------------- the tables

def pool(db, user, **kw):
    row = {"database": db, "user": user, "mode": "session", "cl_active": 0, "cl_idle": 0, "cl_waiting": 0,
           "cl_login": 0, "sv_active": 0, "sv_idle": 0, "sv_used": 0, "sv_reset": 0, "sv_login": 0,
           "sv_being_canceled": 0, "maxwait_us": 0, "clients": 0, "servers": 0, "server_user": user,
           "period_s": 10.0, "prev": {}}
    row.update(kw)
    return row


REPORT = {"master": {"pid": 1, "rss": 1000},
          "workers": [{"slot": 0, "pid": 10, "generation": 0, "clients": 3, "servers": 2, "rss": 5, "cpu": 0.5,
                       "pools": [pool("appdb", "alice", cl_active=1, cl_idle=1, sv_active=1, sv_idle=1,
                                      xact_count=30, query_count=40, xact_time_us=3000, query_time_us=4000,
                                      assign_count=10, wait_time_us=500, bytes_in=100, bytes_out=1000,
                                      login_count=2, clients=2, servers=2, maxwait_us=2_500_000,
                                      prev={"xact_count": 10, "query_count": 20, "xact_time_us": 1000,
                                            "query_time_us": 2000, "assign_count": 5, "wait_time_us": 0,
                                            "bytes_in": 0, "bytes_out": 0, "login_count": 0})],
                       "paused_dbs": ["appdb"], "disabled_dbs": []},
                      {"slot": 1, "pid": 11, "generation": 0, "clients": 1, "servers": 1, "rss": 6, "cpu": 1.25,
                       "pools": [pool("appdb", "alice", cl_waiting=1, sv_login=1, maxwait_us=1_000_000,
                                      xact_count=10, query_count=10, clients=1, servers=1)],
                       "paused_dbs": ["appdb"], "disabled_dbs": ["otherdb"]}],
          "missing": [12], "missing_workers": [{"pid": 12, "slot": 2, "generation": 0, "clients": 4, "servers": 0}]}


def test_pools_cover_every_worker():
    cols, rows = console.show_pools(REPORT)
    assert [c for c, _ in cols][:4] == ["database", "user", "cl_active", "cl_waiting"]
    (row,) = rows
    named = dict(zip([c for c, _ in cols], row))
    assert named["cl_active"] == 2 and named["cl_waiting"] == 1 and named["sv_active"] == 1
    assert named["sv_idle"] == 1 and named["sv_login"] == 1
    assert (named["maxwait"], named["maxwait_us"]) == (2, 500_000)
    assert named["pool_mode"] == "session" and named["load_balance_hosts"] is None


def test_stats_totals_and_averages():
    cols, rows = console.show_stats(REPORT)
    assert len(cols) == 25 and [c for c, _ in cols][1] == "total_server_assignment_count"
    assert all(t == "N" for _, t in cols[1:])
    named = dict(zip([c for c, _ in cols], rows[0]))
    assert named["total_xact_count"] == 40 and named["total_query_count"] == 50
    assert named["total_received"] == 100 and named["total_sent"] == 1000
    # worker 0: 20 transactions in 10 s, 2000 us over them; worker 1 (no previous figures) 10 in 10 s
    assert named["avg_xact_count"] == 3 and named["avg_xact_time"] == 2000 // 30
    assert named["avg_wait_time"] == 500 // 5
    assert named["total_client_parse_count"] == 0
    _, totals = console.show_totals(REPORT)
    assert totals[0] == ("total_server_assignment_count", 10) and totals[3] == ("total_client_bytes", 100)
    assert len(totals) == 24 and totals[12][0] == "avg_server_assignment_count"
    cols, _ = console.show_stats_averages(REPORT)
    assert [c for c, _ in cols][-1] == "avg_client_login_count"


def test_databases_users_lists_state():
    cols, rows = console.show_databases(CFG, REPORT)
    named = {r[0]: dict(zip([c for c, _ in cols], r)) for r in rows}
    assert named["appdb"]["current_connections"] == 3 and named["appdb"]["current_client_connections"] == 3
    assert named["appdb"]["paused"] == 1 and named["otherdb"]["disabled"] == 1
    assert named["appdb"]["pool_mode"] is None and named["otherdb"]["pool_mode"] == "transaction"
    cols, rows = console.show_users(CFG, REPORT, ["bob"])
    assert [r[0] for r in rows] == ["alice", "bob"]
    assert rows[0][3] == "statement" and rows[0][5] == 3 and rows[1][3] is None
    _, lists = console.show_lists(CFG, REPORT)
    assert dict(lists)["used_clients"] == 4 and dict(lists)["pools"] == 1
    assert console.show_state(REPORT)[1][0] == ("active", "yes")


def test_workers_include_the_silent_ones():
    _, rows = console.show_workers(REPORT)
    assert [(r[0], r[-1]) for r in rows] == [(10, "running"), (11, "running"), (12, "not answering")]
    assert rows[1][6] == "1.25"


def test_config_lists_every_setting_with_its_default():
    cols, rows = console.show_config(CFG)
    assert [c for c, _ in cols] == ["key", "value", "default", "changeable"]
    named = {r[0]: r for r in rows}
    assert set(named) == {s.name for s in configmod.SCHEMA if s.section == "pgmp"}
    assert named["admin_users"][1:] == ("admin", "", "yes")
    assert named["listen_port"][3] == "no" and named["log_connections"][1] == "1"


def test_missing_workers_give_a_warning():
    (kind, payload), = frames(console.missing_notice(REPORT))
    fields = messages.parse_fields(payload)
    assert kind == b"N" and "12" in fields["M"] and fields["S"] == "WARNING"
    assert console.missing_notice({"missing": []}) == b""


# ---------------------------------------------------------------- the session

class Host:
    def __init__(self):
        self.config = CFG
        self.closed = False
        self.out = b""
        self.asked = []
        self.timers = []
        self.finished = 0

    def auth_users(self):
        return ["bob"]

    def send(self, data):
        self.out += data

    def ask(self, command, args, callback):
        self.asked.append((command, args, callback))

    def later(self, seconds, fn):
        self.timers.append(fn)

    def done(self):
        self.finished += 1

    def answer(self, reply):
        _, _, callback = self.asked.pop(0)
        callback(reply)


def session(admin=True):
    host = Host()
    return host, Console(host, admin)


def error_of(data: bytes) -> dict:
    return next(messages.parse_fields(p) for k, p in frames(data) if k == b"E")


def test_local_show_answers_at_once():
    host, con = session()
    con.query("SHOW VERSION")
    assert kinds(host.out) == b"TDCZ" and not con.busy and host.finished == 1


def test_gathered_show_waits_for_the_master():
    host, con = session(admin=False)
    con.query("show pools; show state")
    assert con.busy and host.out == b"" and host.asked[0][:2] == ("stats", {"detail": None})
    host.answer({"ok": True, "data": REPORT})
    host.answer({"ok": True, "data": REPORT})
    assert kinds(host.out) == b"NTDC" + b"NTDDDC" + b"Z" and host.finished == 1


def test_stats_users_cannot_run_commands():
    host, con = session(admin=False)
    con.query("PAUSE; SHOW VERSION")
    fields = error_of(host.out)
    assert kinds(host.out) == b"EZ" and fields["C"] == "42501" and fields["M"] == "admin access needed"
    assert fields["S"] == "ERROR" and not host.asked


def test_an_error_stops_the_rest_of_the_query():
    host, con = session()
    con.query("SHOW VERSION; SHOW NOTHING; SHOW VERSION")
    assert kinds(host.out) == b"TDCEZ" and error_of(host.out)["C"] == "42601"


def test_empty_query():
    host, con = session()
    con.query("")
    assert kinds(host.out) == b"IZ"


def test_fake_parameters_and_help():
    host, con = session(admin=False)
    con.query("SET client_encoding = 'UTF8'; SHOW client_encoding; SHOW HELP")
    assert kinds(host.out) == b"NC" + b"TDC" + b"NC" + b"Z"


@pytest.mark.parametrize("query, sqlstate, message", [
    ("PAUSE nosuchdb", "3D000", "no such database: nosuchdb"),
    ("PAUSE pgbouncer", "0A000", "cannot pause admin db: pgbouncer"),
    ("DISABLE", "42601", "a database is required"),
    ("KILL_CLIENT abc", "22023", "invalid client pointer supplied"),
    ("SUSPEND", "0A000", "SUSPEND is not supported by pgmp"),
    ("SET listen_port = 1", "22023", "SET failed"),
    ("SET nosuch = 1", "22023", "SET failed"),
    ("SHUTDOWN NOW", "42601", "invalid command 'SHUTDOWN NOW', use SHOW HELP;"),
])
def test_command_errors(query, sqlstate, message):
    host, con = session()
    con.query(query)
    fields = error_of(host.out)
    assert (fields["C"], fields["M"]) == (sqlstate, message) and kinds(host.out) == b"EZ"


def test_commands_go_to_the_master():
    host, con = session()
    con.query("RESUME appdb; DISABLE otherdb; KILL_CLIENT 1048577; SET log_level = debug; SHUTDOWN WAIT_FOR_SERVERS")
    for command, args, tag in [("resume", {"database": "appdb"}, b"RESUME"),
                               ("disable", {"database": "otherdb"}, b"DISABLE"),
                               ("kill_client", {"id": 1048577}, b"KILL_CLIENT"),
                               ("set", {"key": "log_level", "value": "debug"}, b"SET log_level=debug"),
                               ("stop", {"mode": "graceful"}, b"SHUTDOWN")]:
        assert host.asked[0][:2] == (command, args)
        host.answer({"ok": True, "data": {"killed": 1}})
        assert [f for f in frames(host.out) if f[0] == b"C"][-1] == (b"C", tag + b"\0")
    assert kinds(host.out) == b"CCCCCZ"


def test_kill_client_not_found_and_partial_answers():
    host, con = session()
    con.query("KILL_CLIENT 5")
    host.answer({"ok": False, "error": "some workers did not answer", "data": {"killed": 0, "missing": [12]}})
    assert kinds(host.out) == b"NEZ" and error_of(host.out)["M"] == "client not found"


def test_pause_returns_once_no_server_is_in_use():
    host, con = session()
    con.query("PAUSE appdb")
    host.answer({"ok": True, "data": {"busy_servers": 1}})
    assert host.out == b"" and host.timers
    host.timers.pop()()
    host.answer({"ok": True, "data": REPORT})         # appdb still has an active server
    assert host.out == b"" and host.timers
    host.timers.pop()()
    idle = {"workers": [{"pools": [pool("appdb", "alice", sv_idle=1)]}]}
    host.answer({"ok": True, "data": idle})
    assert kinds(host.out) == b"CZ" and frames(host.out)[0] == (b"C", b"PAUSE\0")


def test_reload_failure_is_f0000():
    host, con = session()
    con.query("RELOAD")
    host.answer({"ok": False, "error": "pgmp.toml: bad"})
    fields = error_of(host.out)
    assert (fields["C"], fields["D"]) == ("F0000", "pgmp.toml: bad")


def test_a_closed_session_ignores_late_answers():
    host, con = session()
    con.query("SHOW POOLS")
    host.closed = True
    host.answer({"ok": True, "data": REPORT})
    assert host.out == b""
