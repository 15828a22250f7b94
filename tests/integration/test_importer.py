"""pgmp config import on real files: the examples Debian's pgbouncer package ships, and a
pgbouncer.ini for the test cluster whose import a real pgmp then serves clients with."""
from __future__ import annotations

import os
import pwd
import shutil
import struct
import subprocess
import tempfile
import tomllib
from pathlib import Path

import psycopg
import pytest

from pgmp import importer
from tests.integration.rawpg import RawPG, data_row, refused_login
from tests.support import PASSWORDS, free_port, pgmp_cli, port_accepts, wait_for
from tests.support.proxy import userlist
from tests.support.waiting import RUN_DIR_ENV

# Where Debian's pgbouncer package puts its example configurations (the first is where older
# packages kept it), and the one it installs as the default configuration.
DEBIAN_FILES = [
    "/usr/share/doc/pgbouncer/pgbouncer.ini",
    "/usr/share/doc/pgbouncer/examples/pgbouncer.ini",
    "/usr/share/doc/pgbouncer/pgbouncer-minimal.ini",
    "/etc/pgbouncer/pgbouncer.ini",
]


@pytest.mark.parametrize("path", DEBIAN_FILES)
def test_debian_example(path, tmp_path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not on this machine (Debian's pgbouncer package installs it)")
    if not os.access(path, os.R_OK):
        pytest.skip(f"{path} is not readable by this user")
    out = tmp_path / "pgmp.toml"
    result = pgmp_cli("config", "import", path, "-o", out)
    ini = importer.parse_ini(path, importer.read_text)
    auth_file = ini.sections["pgbouncer"].get("auth_file")
    if auth_file is not None and not os.access(auth_file.value, os.R_OK):
        # the example names /etc/pgbouncer/userlist.txt: pgmp config check would refuse it here
        assert result.returncode == 1, result.stderr
        assert f"pgmp config check: {auth_file.value}: cannot read auth_file" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    check = pgmp_cli("config", "check", "-c", out)
    assert check.returncode == 0, f"{check.stderr}\n--- {out}:\n{out.read_text()}"
    doc = tomllib.loads(out.read_text())["pgmp"]
    settings = ini.sections["pgbouncer"]
    assert doc["auth_type"] == settings["auth_type"].value if "auth_type" in settings else "md5"
    if "listen_port" in settings:
        assert doc["listen_port"] == int(settings["listen_port"].value)
    if "unix_socket_dir" in settings:
        assert doc["unix_socket_dir"] == settings["unix_socket_dir"].value


def test_imported_config_serves_clients(pg, pgmp, tmp_path):
    """A pgbouncer.ini for the test cluster, with every section pgmp has, imported and run by pgmp."""
    port = free_port()
    sock_dir = tempfile.mkdtemp(prefix="pgmp-s-", dir=os.environ.get(RUN_DIR_ENV))
    # the users as PgBouncer operators keep them: a SCRAM secret from pg_authid, an md5 hash, a password
    users = {"scram_user": pg.secrets["scram_user"], "md5_user": pg.secrets["md5_user"],
             "plain_user": PASSWORDS["plain_user"]}
    (tmp_path / "userlist.txt").write_text(userlist(users))
    (tmp_path / "databases.ini").write_text(f"appdb = host={pg.host} port={pg.port}\n"
                                            f"* = host={pg.host} port={pg.port}\n")
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"""\
;; written by the test: every section pgmp has, and settings it maps in several ways
[databases]
%include databases.ini

[users]
plain_user = pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {sock_dir}
auth_type = md5
auth_file = userlist.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 50
server_check_query = <empty>
server_check_delay = 0
application_name_add_host = 1
ignore_startup_parameters = extra_float_digits
stats_period = 60
log_stats = 0
""")
    out = tmp_path / "pgmp.toml"
    imported = pgmp_cli("config", "import", ini, "-o", out, "--relative-to", tmp_path, cwd="/")
    assert imported.returncode == 0, imported.stderr
    assert "stats_period = 60: no pgmp equivalent" in imported.stderr
    check = pgmp_cli("config", "check", "-c", out)
    assert check.returncode == 0, check.stderr
    assert f"{tmp_path}/userlist.txt: 3 users" in check.stdout

    proc = pgmp.start_file(out, "127.0.0.1", port, sock_dir)
    for user in users:
        for dbname in ("appdb", "otherdb"):                  # otherdb: through the "*" fallback
            with psycopg.connect(host="127.0.0.1", port=port, user=user, password=PASSWORDS[user],
                                 dbname=dbname, application_name="importer-test", connect_timeout=10) as conn:
                row = conn.execute("SELECT current_user, current_database(), "
                                   "current_setting('application_name')").fetchone()
                assert row[:2] == (user, dbname)
                assert row[2].startswith("importer-test - 127.0.0.1:")     # application_name_add_host
                assert conn.execute("SELECT 1").fetchone() == (1,)         # after a ";" server check
    with psycopg.connect(host=sock_dir, port=port, user="md5_user", password=PASSWORDS["md5_user"],
                         dbname="appdb", connect_timeout=10) as conn:      # the unix socket
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert refused_login("127.0.0.1", port, "md5_user", "wrong")["C"] == "28P01"
    assert refused_login("127.0.0.1", port, "postgres", "x")["C"] == "28P01"      # only auth_file's users
    assert proc.alive


def test_imported_pool_modes_apply(pg, pgmp, tmp_path):
    """[users] pool_mode over [pgbouncer]'s: plain_user keeps its server (session), md5_user need not."""
    port = free_port()
    (tmp_path / "userlist.txt").write_text(userlist(PASSWORDS))
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"[databases]\nappdb = host={pg.host} port={pg.port} pool_size=1\n"
                   "[users]\nplain_user = pool_mode=session\n"
                   f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                   "auth_file = userlist.txt\npool_mode = transaction\n")
    out = tmp_path / "pgmp.toml"
    assert pgmp_cli("config", "import", ini, "-o", out).returncode == 0
    pgmp.start_file(out, "127.0.0.1", port)

    def connect(user):
        return psycopg.connect(host="127.0.0.1", port=port, user=user, password=PASSWORDS[user],
                               dbname="appdb", autocommit=True, connect_timeout=10)

    # transaction mode, pool_size=1: two md5_user clients share the one server between transactions
    with connect("md5_user") as a, connect("md5_user") as b:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a
    # session mode for plain_user: a SET stays with its session across transactions
    with connect("plain_user") as c:
        c.execute("SET application_name = 'kept'")
        assert c.execute("SELECT current_setting('application_name')").fetchone() == ("kept",)
        assert c.execute("SELECT pg_backend_pid()").fetchone() == c.execute("SELECT pg_backend_pid()").fetchone()
    assert Path(out).exists()


# ----------------------------------------------------------------- against PgBouncer itself

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)


def show(port: int, what: str) -> list[dict[str, str]]:
    """SHOW <what> on PgBouncer's admin console, as dicts by column name (simple query protocol)."""
    with RawPG.connect("127.0.0.1", port) as conn:
        conn.login("admin", None, "pgbouncer")
        names, rows = [], []
        for m in conn.query(f"SHOW {what}"):
            if m.type == b"T":
                names = row_names(m.payload)
            elif m.type == b"D":
                rows.append(dict(zip(names, data_row(m.payload))))
        return rows


def row_names(payload: bytes) -> list[str]:
    (n,), pos, names = struct.unpack_from("!h", payload), 2, []
    for _ in range(n):
        end = payload.index(b"\0", pos)
        names.append(payload[pos:end].decode())
        pos = end + 1 + 18                         # table oid, column, type oid, size, modifier, format
    return names


@pytest.fixture
def shared_dir():
    """A directory the user pgbouncer -u switches to can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pgb-import-", dir=os.environ.get(RUN_DIR_ENV)))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_read_as_pgbouncer_reads_it(shared_dir):
    """The importer's reading of a tricky ini agrees with what PgBouncer itself loads from it."""
    if PGBOUNCER is None:
        pytest.skip("the pgbouncer binary is not installed (Debian: apt-get install pgbouncer)")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no user postgres for pgbouncer -u")
    work = shared_dir
    port = free_port()
    (work / "users.txt").write_text('"admin" ""\n')
    (work / "conf.d").mkdir()
    (work / "conf.d" / "more.ini").write_text("included = host=127.0.0.1 port=5434\n")
    ini = work / "pgbouncer.ini"
    ini.write_text(f"""\
;; comments at the start of a line only
   # also indented
[databases]
quoted = host=127.0.0.1 dbname='a b' user=u password='it''s'
tail = host=127.0.0.1 dbname='abc'x port=5433
pool.x-y = host=127.0.0.1 pool_size=012 pool_mode=Transaction
star*db = host=127.0.0.1 dbname=x\\y
%include conf.d/more.ini
[users]
alice = pool_mode=transaction
[pgbouncer]
max_client_conn = 7
default_pool_size = 3
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = users.txt
admin_users = admin
max_client_conn = 0x40
pool_mode = session
""")
    for path in work.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cmd = [PGBOUNCER, *(["-u", "postgres"] if as_root else []), str(ini)]
    # Run from `work`: PgBouncer takes the relative %include and auth_file from its working directory.
    proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: port_accepts("127.0.0.1", port, timeout=0.2) or proc.poll() is not None, timeout=10,
                 message="pgbouncer did not start")
        assert proc.poll() is None, proc.stdout.read().decode()
        databases = {row["name"]: row for row in show(port, "DATABASES")}
        users = {row["name"]: row for row in show(port, "USERS")}
        settings = {row["key"]: row["value"] for row in show(port, "CONFIG")}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result = importer.convert(importer.parse_ini(str(ini), importer.read_text, str(work)),
                              importer.read_text, importer.resolve_listen)
    doc = tomllib.loads(result.toml)
    g = doc["pgmp"]
    assert int(settings["max_client_conn"]) == g["max_client_conn"] == 64
    assert int(settings["default_pool_size"]) == 20 and "default_pool_size" not in g   # reset by the header
    assert int(settings["listen_port"]) == g["listen_port"]
    assert settings["auth_type"] == g["auth_type"] == "trust"
    assert g["auth_file"] == str(work / "users.txt")
    ours = doc["databases"]
    assert set(databases) - {"pgbouncer"} == set(ours)
    for name, row in databases.items():
        if name == "pgbouncer":
            continue
        db = ours[name]
        assert (row["host"], int(row["port"]), row["database"], row["force_user"] or "") == \
            (db["host"], db.get("port", 5432), db.get("dbname", name), db.get("user", "")), name
        assert int(row["pool_size"]) == db.get("pool_size", 20), name
        assert (row["pool_mode"] or "") == db.get("pool_mode", ""), name
    assert ours["quoted"]["password"] == "it's"
    assert ours["star*db"]["dbname"] == "x\\y"
    assert users["alice"]["pool_mode"] == doc["users"]["alice"]["pool_mode"] == "transaction"
