"""The admin console through real clients: psql and psycopg against the virtual database pgmp (alias pgbouncer).

Column lists are PgBouncer 1.25's (its doc/usage.md and src/admin.c), written out
here so that a change of pgmp's tables shows up as a failure. Values are checked
against pg_stat_activity and against what real clients see.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.integration.rawpg import refused_login
from tests.support import PASSWORDS, wait_for

ADMIN, STATS, NOBODY = "scram_user", "md5_user", "plain_user"

SOCKET_COLUMNS = ["type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
                  "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid",
                  "tls", "application_name", "prepared_statements", "id"]
STAT_NAMES = ["server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time",
              "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
              "client_login_count"]
TOTALS = ["server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
          "query_time", "wait_time"]
COLUMNS = {
    "VERSION": ["version"],
    "POOLS": ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
              "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
              "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts"],
    "STATS": ["database"] + [f"total_{n}" for n in STAT_NAMES] +
             [f"avg_{n}" for n in ["server_assignment_count", "xact_count", "query_count", "recv", "sent",
                                   "xact_time", "query_time", "wait_time", "client_parse_count",
                                   "server_parse_count", "bind_count", "client_login_count"]],
    "STATS_TOTALS": ["database"] + TOTALS + ["client_parse_count", "server_parse_count", "bind_count",
                                              "client_login_count"],
    "STATS_AVERAGES": ["database"] + TOTALS + ["avg_client_parse_count", "avg_server_parse_count",
                                                "avg_bind_count", "avg_client_login_count"],
    "TOTALS": ["name", "value"],
    "DATABASES": ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
                  "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections",
                  "current_connections", "max_client_connections", "current_client_connections", "paused",
                  "disabled"],
    "USERS": ["name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
              "current_connections", "max_user_client_connections", "current_client_connections"],
    "CLIENTS": SOCKET_COLUMNS,
    "SERVERS": SOCKET_COLUMNS,
    "SOCKETS": SOCKET_COLUMNS + ["recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail",
                                 "send_avail"],
    "WORKERS": ["pid", "generation", "slot", "clients", "servers", "rss", "cpu", "state"],
    "CONFIG": ["key", "value", "default", "changeable"],
    "LISTS": ["list", "items"],
    "STATE": ["key", "value"],
    "MEM": ["name", "size", "used", "free", "memtotal"],
    "FDS": ["fd", "task", "user", "database", "addr", "port", "cancel", "link", "client_encoding", "std_strings",
            "datestyle", "timezone", "password", "scram_client_key", "scram_server_key"],
}
LISTS = ["databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients", "login_clients",
         "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending"]
TOTALS_ROWS = [f"{kind}_{n}" for kind in ("total", "avg") for n in
               ["server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes", "xact_time",
                "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count", "ps_bind_count",
                "client_login_count"]]
INT4, INT8, NUMERIC, TEXT = 23, 20, 1700, 25


def start(pgmp, workers: int = 2, pool_mode: str = "session", auth_type: str = "scram-sha-256", **config):
    settings = {"admin_users": [ADMIN], "stats_users": [STATS], "default_pool_size": 60, "pool_mode": pool_mode,
                "log_connections": False, "log_disconnections": False, **config}
    return pgmp.start(config=settings, workers=workers, auth_type=auth_type)


def console(proxy, user: str = ADMIN, dbname: str = "pgmp", **kw) -> psycopg.Connection:
    # psycopg prepares a query it has run prepare_threshold times (then it uses the extended protocol,
    # which the console refuses): never, here
    return psycopg.connect(proxy.dsn(user=user, dbname=dbname, **kw), autocommit=True, prepare_threshold=None)


def client(proxy, user: str = ADMIN, **kw) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user, **kw), autocommit=True)


def show(conn, what: str) -> list[dict]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def psql(pg, proxy, sql: str, user: str = ADMIN, dbname: str = "pgmp", host: str | None = None,
         password: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": password if password is not None else PASSWORDS.get(user, ""),
           "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run([Path(pg.bin_dir) / "psql", "-X", "-A", "-F", "|", "-P", "footer=off",
                           "-h", host or proxy.host, "-p", str(proxy.port), "-U", user, "-d", dbname, "-c", sql],
                          capture_output=True, text=True, env=env, timeout=30)


def stat_activity(pg) -> dict[int, tuple[str, str, str]]:
    """pid -> (database, user, application_name) of PostgreSQL's client backends now."""
    out = pg.psql("SELECT pid, datname, usename, application_name FROM pg_stat_activity "
                  "WHERE backend_type = 'client backend'")
    rows = [line.split("|") for line in out.splitlines() if line]
    return {int(r[0]): (r[1], r[2], r[3]) for r in rows}


def worker_of(conn) -> int:
    """The slot of the worker holding the console ``conn`` (the low bits of its SHOW CLIENTS id)."""
    me = next(r for r in show(conn, "CLIENTS") if r["database"] == "pgmp" and r["state"] == "active")
    return me["id"] & 1023


# ---------------------------------------------------------------- every SHOW

def test_every_show_answers_with_pgbouncers_columns_in_psql(pg, pgmp):
    proxy = start(pgmp)
    with client(proxy) as c:
        c.execute("SELECT 1")
        for what, names in COLUMNS.items():
            r = psql(pg, proxy, f"SHOW {what}")
            assert r.returncode == 0, f"SHOW {what}: {r.stderr}\n{proxy.log()}"
            header = r.stdout.splitlines()[0].split("|")
            assert header == names, what
        r = psql(pg, proxy, "show lists")
        assert [line.split("|")[0] for line in r.stdout.splitlines()[1:]] == LISTS
        r = psql(pg, proxy, "SHOW TOTALS")
        assert [line.split("|")[0] for line in r.stdout.splitlines()[1:]] == TOTALS_ROWS


def test_column_types_and_values(pg, pgmp):
    proxy = start(pgmp)
    with client(proxy, application_name="typed") as c, console(proxy) as adm:
        c.execute("SELECT 1")
        cur = adm.execute("SHOW POOLS")
        assert [d.type_code for d in cur.description][:3] == [TEXT, TEXT, INT4]
        pools = [dict(zip([d.name for d in cur.description], r)) for r in cur.fetchall()]
        (pool,) = [p for p in pools if (p["database"], p["user"]) == ("appdb", ADMIN)]
        assert pool["cl_active"] == 1 and pool["sv_active"] == 1 and pool["pool_mode"] == "session"
        cur = adm.execute("SHOW STATS")
        assert all(d.type_code == NUMERIC for d in cur.description[1:])
        stats = {r[0]: dict(zip([d.name for d in cur.description], r)) for r in cur.fetchall()}
        assert stats["appdb"]["total_query_count"] >= 1 and stats["appdb"]["total_client_login_count"] >= 1
        assert stats["appdb"]["total_received"] > 0 and stats["appdb"]["total_sent"] > 0
        cur = adm.execute("SHOW CLIENTS")
        assert cur.description[-1].type_code == INT8 and cur.description[9].type_code == TEXT
        (version,) = show(adm, "VERSION")
        assert version["version"].startswith("pgmp ")
        config = {r["key"]: r for r in show(adm, "CONFIG")}
        assert config["admin_users"]["value"] == ADMIN and config["listen_port"]["changeable"] == "no"
        assert config["default_pool_size"] == {"key": "default_pool_size", "value": "60", "default": "20",
                                               "changeable": "yes"}
        dbs = {r["name"]: r for r in show(adm, "DATABASES")}
        assert dbs["appdb"]["port"] == pg.port and dbs["appdb"]["pool_size"] == 60
        assert dbs["appdb"]["current_client_connections"] == 1 and dbs["appdb"]["paused"] == 0
        assert [r["value"] for r in show(adm, "STATE")] == ["yes", "no", "no"]
        fds = show(adm, "FDS")
        assert {r["task"] for r in fds} == {"pooler", "client", "server"}
        assert all(r["password"] is None and r["scram_client_key"] is None for r in fds)


def test_servers_and_clients_agree_with_pg_stat_activity(pg, pgmp):
    proxy = start(pgmp)
    clients = [client(proxy, application_name=f"agree{i}") for i in range(4)]
    try:
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0]: f"agree{i}" for i, c in enumerate(clients)}
        with console(proxy) as adm:
            servers = {r["remote_pid"]: r for r in show(adm, "SERVERS")}
            activity = stat_activity(pg)
            for pid, app in pids.items():
                row = servers[pid]
                assert (row["database"], row["user"], row["state"]) == ("appdb", ADMIN, "active")
                assert row["application_name"] == app == activity[pid][2]
            for pid, row in servers.items():
                assert pid in activity and activity[pid][:2] == (row["database"], row["user"])
            listed = {r["application_name"]: r for r in show(adm, "CLIENTS")}
            by_ptr = {r["ptr"]: r for r in servers.values()}
            for pid, app in pids.items():
                assert listed[app]["state"] == "active"
                assert by_ptr[listed[app]["link"]]["remote_pid"] == pid
            me = [r for r in listed.values() if r["database"] == "pgmp"]
            assert len(me) == 1 and me[0]["user"] == ADMIN
    finally:
        for c in clients:
            c.close()


def test_counts_cover_both_workers(pg, pgmp):
    proxy = start(pgmp)
    clients = []
    try:
        with console(proxy) as adm:
            def both_busy():
                clients.append(client(proxy, application_name="spread"))
                clients[-1].execute("SELECT 1")
                workers = show(adm, "WORKERS")
                return len(clients) >= 8 and all(w["clients"] >= 2 for w in workers) and workers
            workers = wait_for(both_busy, timeout=30, interval=0)
            assert len(workers) == 2 and all(w["state"] == "running" and w["rss"] > 0 for w in workers)
            n = len(clients)
            assert sum(w["clients"] for w in workers) == n + 1            # and the console
            (pool,) = [p for p in show(adm, "POOLS") if (p["database"], p["user"]) == ("appdb", ADMIN)]
            assert pool["cl_active"] == n and pool["sv_active"] == n
            rows = [r for r in show(adm, "CLIENTS") if r["application_name"] == "spread"]
            assert len(rows) == n and len({r["id"] for r in rows}) == n
            assert {r["id"] & 1023 for r in rows} == {0, 1}
            lists = {r["list"]: r["items"] for r in show(adm, "LISTS")}
            assert lists["used_clients"] == n + 1 and lists["used_servers"] >= n
            (db,) = [d for d in show(adm, "DATABASES") if d["name"] == "appdb"]
            assert db["current_client_connections"] == n and db["current_connections"] >= n
            (user,) = [u for u in show(adm, "USERS") if u["name"] == ADMIN]
            assert user["current_client_connections"] == n
    finally:
        for c in clients:
            c.close()


def test_a_show_answers_while_200_clients_run_pgbench(pg, pgmp, tmp_path):
    proxy = start(pgmp, pool_mode="transaction", default_pool_size=20, auth_type="md5")
    script = tmp_path / "select.sql"
    script.write_text("SELECT 1;\n")
    env = {**os.environ, "PGPASSWORD": PASSWORDS[ADMIN]}
    bench = subprocess.Popen([Path(pg.bin_dir) / "pgbench", "-n", "-f", str(script), "-c", "200", "-j", "2",
                              "-T", "5", "-M", "simple", "-h", proxy.host, "-p", str(proxy.port), "-U", ADMIN,
                              "appdb"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with console(proxy) as adm:
            seen, slowest = 0, 0.0
            while bench.poll() is None:
                t = time.monotonic()
                pools = show(adm, "POOLS")
                slowest = max(slowest, time.monotonic() - t)
                seen = max(seen, sum(p["cl_active"] + p["cl_waiting"] for p in pools if p["database"] == "appdb"))
            out, err = bench.communicate(timeout=30)
            assert bench.returncode == 0, err
            assert seen >= 150, f"SHOW POOLS saw at most {seen} pgbench clients"
            assert slowest < 3.0, f"a SHOW POOLS took {slowest:.2f}s under load"
            (stats,) = [s for s in show(adm, "STATS") if s["database"] == "appdb"]
            done = int(next(line for line in out.splitlines() if "transactions actually processed" in line)
                       .split(":")[1].split("/")[0])
            assert stats["total_xact_count"] >= done
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


# ---------------------------------------------------------------- who may log in

def test_access_control(pg, pgmp):
    proxy = start(pgmp)
    for dbname in ("pgmp", "pgbouncer"):
        fields = refused_login(proxy.host, proxy.port, NOBODY, PASSWORDS[NOBODY], database=dbname)
        assert (fields["S"], fields["C"]) == ("FATAL", "28000")
        assert fields["M"] == 'user "plain_user" is not allowed to use the admin console'
    r = psql(pg, proxy, "SHOW VERSION", user=NOBODY)
    assert r.returncode != 0 and "not allowed" in r.stderr
    assert refused_login(proxy.host, proxy.port, ADMIN, "wrong", database="pgmp")["C"] == "28P01"
    with console(proxy, user=STATS, dbname="pgbouncer") as watcher:
        assert show(watcher, "POOLS") is not None
        for command in ("PAUSE", "RESUME appdb", "KILL_CLIENT 1", "RELOAD", "SET log_level = debug", "SHOW FDS"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                watcher.execute(command)
            assert e.value.sqlstate == "42501" and e.value.diag.message_primary == "admin access needed"
        assert show(watcher, "STATE")[1]["value"] == "no"          # the session went on; nothing paused
    with console(proxy) as adm:
        with pytest.raises(psycopg.errors.SyntaxError) as e:
            adm.execute("SELECT * FROM pg_class")
        assert e.value.sqlstate == "42601"
        with pytest.raises(psycopg.errors.ProtocolViolation, match="extended query protocol not supported"):
            adm.execute("SHOW %s", ["POOLS"])                        # extended protocol: refused, closed
        assert _closed(adm)


def _closed(conn) -> bool:
    try:
        conn.execute("SHOW VERSION")
    except psycopg.OperationalError:
        return True
    return False


def test_pgmps_own_user_over_the_unix_socket(pg, pgmp):
    proxy = start(pgmp)
    for user in ("pgbouncer", "pgmp"):
        r = psql(pg, proxy, "SHOW VERSION; PAUSE otherdb; RESUME otherdb", user=user, dbname="pgbouncer",
                 host=proxy.unix_socket_dir, password="")
        assert r.returncode == 0, r.stderr
        assert "pgmp" in r.stdout and "PAUSE" in r.stdout and "RESUME" in r.stdout
    r = psql(pg, proxy, "SHOW VERSION", user="pgbouncer", password="")          # over TCP: no such shortcut
    assert r.returncode != 0


def test_several_commands_in_one_query_and_errors(pg, pgmp):
    proxy = start(pgmp)
    r = psql(pg, proxy, "show version; SHOW STATE;")
    assert r.returncode == 0 and "pgmp" in r.stdout and "suspended|no" in r.stdout
    r = psql(pg, proxy, "SHOW NOTHING")
    assert r.returncode != 0 and "invalid command 'SHOW NOTHING', use SHOW HELP;" in r.stderr
    r = psql(pg, proxy, "SUSPEND")
    assert r.returncode != 0 and "SUSPEND is not supported" in r.stderr and "pgmp restart" in r.stderr
    r = psql(pg, proxy, "SHOW HELP")
    assert r.returncode == 0 and "KILL_CLIENT" in r.stderr and "SUSPEND" not in r.stderr


# ---------------------------------------------------------------- commands, seen by clients

def test_pause_and_resume(pg, pgmp):
    proxy = start(pgmp, workers=1, pool_mode="transaction")
    with client(proxy) as c, console(proxy) as adm:
        c.execute("SELECT 1")
        adm.execute("PAUSE appdb")
        assert [d["paused"] for d in show(adm, "DATABASES") if d["name"] == "appdb"] == [1]
        result = []
        t = threading.Thread(target=lambda: result.append(c.execute("SELECT 42").fetchone()[0]))
        t.start()
        try:
            wait_for(lambda: [p["cl_waiting"] for p in show(adm, "POOLS") if p["database"] == "appdb"] == [1],
                     message="the query did not wait while appdb was paused")
            assert not result
            adm.execute("RESUME appdb")
        finally:
            t.join(10)
        assert result == [42]


def test_pause_waits_for_the_transaction_in_progress(pg, pgmp):
    proxy = start(pgmp, workers=1, pool_mode="transaction")
    with client(proxy) as c, console(proxy) as adm, console(proxy) as watcher:
        c.execute("BEGIN")
        c.execute("SELECT 1")
        answered = []
        t = threading.Thread(target=lambda: answered.append(adm.execute("PAUSE")))
        t.start()
        try:
            # Once the pause is in force with the transaction's server still in use, PAUSE cannot have
            # answered: it answers only after it has seen no server in use.
            wait_for(lambda: show(watcher, "STATE")[1]["value"] == "yes")
            assert [p["sv_active"] for p in show(watcher, "POOLS") if p["database"] == "appdb"] == [1]
            assert not answered
            c.execute("COMMIT")
            t.join(10)
            assert answered
        finally:
            t.join(10)
            adm.execute("RESUME")


def test_kill_client(pg, pgmp):
    proxy = start(pgmp)
    clients = [client(proxy, application_name=f"victim{i}") for i in range(6)]
    try:
        with console(proxy) as adm:
            ids = {r["application_name"]: r["id"] for r in show(adm, "CLIENTS")}
            for i, c in enumerate(clients[:3]):
                adm.execute(f"KILL_CLIENT {ids[f'victim{i}']}")
                with pytest.raises(psycopg.OperationalError) as e:
                    c.execute("SELECT 1")
                assert "admin forced disconnect" in str(e.value)
            for c in clients[3:]:
                assert c.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="client not found"):
                adm.execute(f"KILL_CLIENT {ids['victim0']}")
            assert not [r for r in show(adm, "CLIENTS") if r["application_name"] in ("victim0", "victim1")]
    finally:
        for c in clients:
            c.close()


def test_disable_and_enable(pg, pgmp):
    proxy = start(pgmp)
    with client(proxy) as c, console(proxy) as adm:
        adm.execute("DISABLE appdb")
        assert [d["disabled"] for d in show(adm, "DATABASES") if d["name"] == "appdb"] == [1]
        for _ in range(4):                                  # whichever worker takes the login
            fields = refused_login(proxy.host, proxy.port, ADMIN, PASSWORDS[ADMIN])
            assert (fields["C"], fields["M"]) == ("55000", 'database "appdb" is disabled')
        assert c.execute("SELECT 1").fetchone() == (1,)     # a client already in goes on
        client(proxy, dbname="otherdb").close()
        adm.execute("ENABLE appdb")
        for _ in range(4):
            client(proxy).close()


def test_kill_database(pg, pgmp):
    proxy = start(pgmp, workers=1)
    with client(proxy) as c, client(proxy, dbname="otherdb") as other, console(proxy) as adm:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        adm.execute("KILL appdb")
        with pytest.raises(psycopg.OperationalError) as e:
            c.execute("SELECT 1")
        assert "terminating connection due to administrator command" in str(e.value)
        wait_for(lambda: pid not in stat_activity(pg), message="KILL left the server connection open")
        assert other.execute("SELECT 1").fetchone() == (1,)
        assert [d["paused"] for d in show(adm, "DATABASES") if d["name"] == "appdb"] == [1]
        adm.execute("RESUME appdb")
        with client(proxy) as again:
            assert again.execute("SELECT 1").fetchone() == (1,)


def test_reload_and_set(pg, pgmp):
    proxy = start(pgmp)
    with console(proxy) as adm:
        with pytest.raises(psycopg.OperationalError):
            console(proxy, user=NOBODY)
        adm.execute("SET stats_users = 'md5_user,plain_user'")
        assert [r["value"] for r in show(adm, "CONFIG") if r["key"] == "stats_users"] == ["md5_user,plain_user"]
        for _ in range(4):                          # on every worker
            try:
                with console(proxy, user=NOBODY) as watcher:
                    show(watcher, "POOLS")
            except psycopg.OperationalError as exc:
                raise AssertionError(f"a worker refused the new stats_users: {exc}\n{proxy.log()}") from None
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="SET failed"):
            adm.execute("SET listen_port = 7000")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="SET failed"):
            adm.execute("SET default_pool_size = 'many'")
        assert "stats_users = [" in proxy.config_path.read_text()      # the file is untouched
        assert "plain_user" not in proxy.config_path.read_text()
        adm.execute("RELOAD")                                          # the file wins again
        with pytest.raises(psycopg.OperationalError):
            console(proxy, user=NOBODY)
        proxy.rewrite_config(config={"stats_users": [STATS, NOBODY]})
        adm.execute("RELOAD")
        with console(proxy, user=NOBODY) as watcher:
            show(watcher, "VERSION")
        proxy.config_path.write_text(proxy.config_path.read_text() + "\n[broken\n")
        with pytest.raises(psycopg.errors.ConfigFileError, match="RELOAD failed"):
            adm.execute("RELOAD")


def test_a_stopped_worker_gives_a_partial_answer_with_a_warning(pg, pgmp):
    proxy = start(pgmp)
    with console(proxy) as adm:
        notices = []
        adm.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        mine = worker_of(adm)
        workers = wait_for(lambda: len(w := show(adm, "WORKERS")) == 2 and w, message="both workers ready")
        (other,) = [w["pid"] for w in workers if w["slot"] != mine]
        os.kill(other, signal.SIGSTOP)
        try:
            t = time.monotonic()
            workers = show(adm, "WORKERS")
            took = time.monotonic() - t
            assert took < 6.0, f"the partial answer took {took:.1f}s"
            assert {w["pid"]: w["state"] for w in workers}[other] == "not answering"
            assert notices and notices[-1][0] == "WARNING" and str(other) in notices[-1][1]
            show(adm, "POOLS")
            assert len(notices) == 2
        finally:
            os.kill(other, signal.SIGCONT)
        notices.clear()
        wait_for(lambda: len(show(adm, "WORKERS")) == 2 and not notices, timeout=10)


def test_shutdown(pg, pgmp):
    proxy = start(pgmp)
    with console(proxy) as adm:
        adm.execute("SHUTDOWN")
    assert proxy.process.wait(15) == 0
