"""Tests of the config schema, loader, validator and the documentation rendered from the schema."""
import dataclasses
import math
import os
import shutil
import subprocess

import pytest

from pgmp import config
from pgmp.config import ConfigError, database_for, diff, loads, load

TRUST = '[pgmp]\nauth_type = "trust"\n'


def cfg_with(extra: str = "", sections: str = ""):
    """A valid config with extra [pgmp] lines and extra sections."""
    return loads(TRUST + extra + "\n" + sections)


def error_of(text: str, path: str = "<string>") -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, path)
    return str(info.value)


def pgmp_error(extra: str) -> str:
    return error_of(TRUST + extra)


# ---------------------------------------------------------------- defaults

def test_defaults():
    cfg = cfg_with()
    assert cfg.path == "<string>"
    assert cfg.listen_addr == ("127.0.0.1",)
    assert cfg.listen_port == 6432
    assert cfg.unix_socket_dir == "/tmp"
    assert cfg.unix_socket_mode == 0o777
    assert cfg.unix_socket_path == "/tmp/.s.PGSQL.6432"
    assert cfg.auth_file == "" and cfg.hba_file == "" and cfg.auth_user == ""
    assert "pg_catalog.pg_authid" in cfg.auth_query and "$1" in cfg.auth_query
    assert cfg.pool_mode == "session"
    assert (cfg.default_pool_size, cfg.min_pool_size, cfg.reserve_pool_size) == (20, 0, 0)
    assert cfg.reserve_pool_timeout == 5.0
    assert cfg.max_client_conn == 1000
    assert cfg.max_db_connections == 0 and cfg.max_user_connections == 0
    assert cfg.max_message_size == 1024 ** 3
    assert cfg.buffer_size == 65536 and cfg.max_unsent == 262144
    assert cfg.workers == 0
    assert cfg.shutdown_timeout == 30.0 and isinstance(cfg.shutdown_timeout, float)
    assert cfg.client_login_timeout == 60.0
    assert cfg.server_connect_timeout == 15.0 and cfg.server_login_retry == 15.0
    assert cfg.server_idle_timeout == 600.0 and cfg.server_lifetime == 3600.0
    assert cfg.server_check_delay == 30.0 and cfg.server_check_query == "select 1"
    assert cfg.server_reset_query == "DISCARD ALL" and cfg.server_reset_query_always is False
    assert cfg.query_timeout == 0.0 and cfg.query_wait_timeout == 120.0
    assert cfg.idle_transaction_timeout == 0.0 and cfg.client_idle_timeout == 0.0
    assert cfg.cancel_wait_timeout == 10.0
    assert cfg.max_prepared_statements == 200
    assert cfg.track_extra_parameters == ("IntervalStyle",)
    assert cfg.application_name_add_host is False and cfg.tcp_keepalive is True
    assert cfg.logfile == "" and cfg.log_level == "info"
    assert cfg.log_connections is True and cfg.log_disconnections is True
    assert cfg.pidfile == ""
    assert cfg.control_socket == "/tmp/.pgmp.6432.ctl"
    assert cfg.client_tls_mode == "disable" and cfg.client_tls_min_version == "TLSv1.2"
    assert cfg.server_tls_mode == "disable"
    assert cfg.databases == {} and cfg.users == {}


def test_default_auth_type_needs_auth_file():
    assert error_of("") == (
        '<string>: [pgmp] auth_file: auth_type = "scram-sha-256" needs an auth_file '
        '(lines of "user" "password"); set auth_file, or auth_type = "trust"')
    cfg = loads('[pgmp]\nauth_file = "/etc/pgmp/userlist.txt"\n')
    assert cfg.auth_type == "scram-sha-256" and cfg.auth_file == "/etc/pgmp/userlist.txt"


RUNTIME_TYPES = {"str": str, "path": str, "host": str, "enum": str, "int": int, "size": int, "mode": int,
                 "bool": bool, "duration": float, "strlist": tuple, "addrs": tuple, "methods": tuple, "hostport": str}


def test_every_pgmp_setting_is_an_attribute_of_the_declared_type():
    cfg = cfg_with()
    for s in config.describe_settings():
        if s.section == "pgmp":
            assert type(getattr(cfg, s.name)) is RUNTIME_TYPES[s.kind], s.name


def test_reloadable_settings_are_those_that_need_no_new_sockets():
    restart = {s.name for s in config.describe_settings() if not s.reloadable}
    assert restart == {"listen_addr", "listen_port", "unix_socket_dir", "unix_socket_mode",
                       "workers", "pidfile", "control_socket"}


def test_schema_rows_are_complete():
    seen = set()
    for s in config.describe_settings():
        assert (s.section, s.name) not in seen
        seen.add((s.section, s.name))
        assert s.section in config.SECTIONS
        assert s.doc and "\n" not in s.doc, s.name
        assert s.kind in config._PARSERS, s.name
        assert bool(s.choices) == (s.kind == "enum"), s.name
        if s.inherit:
            assert ("pgmp", s.inherit) in seen


# ---------------------------------------------------------------- type conversions

@pytest.mark.parametrize("toml, expected", [
    ('"*"', ("0.0.0.0", "::")),
    ('"::1"', ("::1",)),
    ('["127.0.0.1", "::1"]', ("127.0.0.1", "::1")),
    ('"127.0.0.1, 10.0.0.1"', ("127.0.0.1", "10.0.0.1")),
    ('["*", "0.0.0.0"]', ("0.0.0.0", "::")),
    ('""', ()),
])
def test_listen_addr(toml, expected):
    assert cfg_with(f"listen_addr = {toml}").listen_addr == expected


@pytest.mark.parametrize("toml, seconds", [
    ("30", 30.0), ("2.5", 2.5), ("0", 0.0), ('"500ms"', 0.5), ('"30s"', 30.0), ('"5min"', 300.0),
    ('"1h"', 3600.0), ('"1d"', 86400.0), ('"1.5s"', 1.5), ('"250us"', 0.00025), ('"45"', 45.0),
    ('" 10 s "', 10.0),
])
def test_durations(toml, seconds):
    value = cfg_with(f"query_timeout = {toml}").query_timeout
    assert isinstance(value, float) and math.isclose(value, seconds)


@pytest.mark.parametrize("toml", ['"5 sec"', '"abc"', "-1", "true", "nan", "inf", '"-5s"', "[1]"])
def test_bad_durations(toml):
    message = pgmp_error(f"query_timeout = {toml}")
    assert message.startswith("<string>: [pgmp] query_timeout: expected a duration in seconds >= 0")
    assert '"500ms", "30s", "5min", "1h"' in message


@pytest.mark.parametrize("toml, size", [
    ("8192", 8192), ('"64kB"', 65536), ('"64KB"', 65536), ('"1MB"', 1024 ** 2), ('"1GB"', 1024 ** 3),
    ('"4096B"', 4096), ('"1.5MB"', 1572864), ('"100000"', 100000),
])
def test_sizes(toml, size):
    assert cfg_with(f"buffer_size = {toml}").buffer_size == size


def test_size_bounds():
    assert cfg_with("max_message_size = 1024").max_message_size == 1024
    assert cfg_with('max_message_size = "1GB"').max_message_size == 1024 ** 3
    for bad in ("1023", '"2GB"', '"1TB"', '"1 parsec"', "1.5"):
        assert pgmp_error(f"max_message_size = {bad}").startswith(
            '<string>: [pgmp] max_message_size: expected a size in bytes 1kB..1GB (an integer, or a string like')
    assert pgmp_error('buffer_size = "1kB"') == (
        '<string>: [pgmp] buffer_size: expected a size in bytes 4kB..1GB (an integer, or a string like'
        ' "64kB", "1MB", "1GB"), got \'1kB\'')


@pytest.mark.parametrize("toml, mode", [
    ("0o700", 0o700), ('"0700"', 0o700), ('"700"', 0o700), ('"0o660"', 0o660), ("0", 0),
])
def test_unix_socket_mode(toml, mode):
    assert cfg_with(f"unix_socket_mode = {toml}").unix_socket_mode == mode


def test_unix_socket_mode_errors():
    assert pgmp_error("unix_socket_mode = 777") == (
        '<string>: [pgmp] unix_socket_mode: expected an octal file mode 0..0777 (0o777 or "0777"),'
        ' got 777 (a decimal number: write 0o777)')
    for bad in ('"0778"', '"rwx"', '"07777"', "true"):
        assert "expected an octal file mode" in pgmp_error(f"unix_socket_mode = {bad}")


def test_string_lists():
    assert cfg_with('track_extra_parameters = ["IntervalStyle", "search_path"]'
                    ).track_extra_parameters == ("IntervalStyle", "search_path")
    assert cfg_with('track_extra_parameters = "IntervalStyle, search_path"'
                    ).track_extra_parameters == ("IntervalStyle", "search_path")
    assert cfg_with("track_extra_parameters = []").track_extra_parameters == ()
    assert pgmp_error("track_extra_parameters = [1, 2]") == (
        "<string>: [pgmp] track_extra_parameters: expected a list of strings, got [1, 2]")
    assert "is not a name" in pgmp_error('track_extra_parameters = ["search path"]')


def test_booleans():
    assert cfg_with("tcp_keepalive = false").tcp_keepalive is False
    assert pgmp_error("tcp_keepalive = 1") == "<string>: [pgmp] tcp_keepalive: expected true or false, got 1"
    assert pgmp_error('tcp_keepalive = "yes"') == (
        "<string>: [pgmp] tcp_keepalive: expected true or false, got 'yes'")


def test_integers():
    assert cfg_with("listen_port = 1").listen_port == 1
    assert cfg_with("listen_port = 65535").listen_port == 65535
    assert pgmp_error('listen_port = "abc"') == (
        "<string>: [pgmp] listen_port: expected an integer 1..65535, got 'abc'")
    assert pgmp_error("listen_port = 70000") == (
        "<string>: [pgmp] listen_port: expected an integer 1..65535, got 70000")
    assert pgmp_error("listen_port = 0").endswith("got 0")
    assert pgmp_error("listen_port = 6432.0").endswith("got 6432.0")
    assert pgmp_error("listen_port = true").endswith("got true")
    assert pgmp_error("default_pool_size = -1") == (
        "<string>: [pgmp] default_pool_size: expected an integer >= 0, got -1")
    assert pgmp_error("max_client_conn = 0") == (
        "<string>: [pgmp] max_client_conn: expected an integer >= 1, got 0")
    assert pgmp_error("workers = 100000") == "<string>: [pgmp] workers: expected an integer 0..1024, got 100000"


def test_enums_list_the_allowed_values():
    assert pgmp_error('pool_mode = "transactions"') == (
        "<string>: [pgmp] pool_mode: expected one of session, transaction, statement; got 'transactions'")
    assert error_of('[pgmp]\nauth_type = "md4"\n') == (
        "<string>: [pgmp] auth_type: expected one of trust, password, md5, scram-sha-256; got 'md4'")
    assert "disable, prefer, require, verify-ca, verify-full" in pgmp_error('server_tls_mode = "allow"')


def test_strings():
    assert cfg_with('server_reset_query = ""').server_reset_query == ""
    assert pgmp_error('server_check_query = "a\\u0000b"') == (
        "<string>: [pgmp] server_check_query: must not contain a NUL character")
    assert pgmp_error("server_check_query = 1") == (
        "<string>: [pgmp] server_check_query: expected a string, got 1")


# ---------------------------------------------------------------- paths

def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    conf = tmp_path / "etc" / "pgmp.toml"
    conf.parent.mkdir()
    conf.write_text('[pgmp]\nauth_file = "userlist.txt"\nhba_file = "../hba.conf"\n'
                    'logfile = "/var/log/pgmp.log"\npidfile = "run/pgmp.pid"\n'
                    'client_tls_cert_file = "tls/server.crt"\n')
    cfg = load(str(conf))
    assert cfg.path == str(conf)
    assert cfg.auth_file == str(tmp_path / "etc" / "userlist.txt")
    assert cfg.hba_file == str(tmp_path / "hba.conf")
    assert cfg.logfile == "/var/log/pgmp.log"
    assert cfg.pidfile == str(tmp_path / "etc" / "run" / "pgmp.pid")
    assert cfg.control_socket == str(tmp_path / "etc" / "run" / ".pgmp.6432.ctl")
    assert cfg.client_tls_cert_file == str(tmp_path / "etc" / "tls" / "server.crt")
    assert cfg.client_tls_key_file == ""


def test_relative_paths_of_loads(tmp_path, monkeypatch):
    text = '[pgmp]\nauth_file = "userlist.txt"\n'
    assert loads(text, "/etc/pgmp/pgmp.toml").auth_file == "/etc/pgmp/userlist.txt"
    monkeypatch.chdir(tmp_path)
    assert loads(text).auth_file == str(tmp_path / "userlist.txt")
    rel = loads(text, "conf/pgmp.toml")
    assert rel.path == str(tmp_path / "conf" / "pgmp.toml")
    assert rel.auth_file == str(tmp_path / "conf" / "userlist.txt")


def test_control_socket():
    assert cfg_with("listen_port = 7000").control_socket == "/tmp/.pgmp.7000.ctl"
    assert cfg_with('pidfile = "/run/pgmp/pgmp.pid"').control_socket == "/run/pgmp/.pgmp.6432.ctl"
    assert cfg_with('control_socket = "/run/pgmp/ctl"').control_socket == "/run/pgmp/ctl"


def test_unix_socket_disabled():
    cfg = cfg_with('unix_socket_dir = ""')
    assert cfg.unix_socket_dir == "" and cfg.unix_socket_path == ""


# ---------------------------------------------------------------- errors

def test_error_names_the_file(tmp_path):
    conf = tmp_path / "pgmp.toml"
    conf.write_text(TRUST + 'listen_port = "abc"\n')
    with pytest.raises(ConfigError) as info:
        load(str(conf))
    assert str(info.value) == f"{conf}: [pgmp] listen_port: expected an integer 1..65535, got 'abc'"
    assert info.value.errors == [str(info.value)]


def test_toml_syntax_error_has_line_and_column(tmp_path):
    conf = tmp_path / "pgmp.toml"
    conf.write_text('[pgmp]\nlisten_port 6432\n')
    with pytest.raises(ConfigError) as info:
        load(str(conf))
    message = str(info.value)
    assert message.startswith(f"{conf}: invalid TOML: ")
    assert "line 2, column" in message


def test_unreadable_and_non_utf8_files(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load(str(missing))
    assert str(info.value) == f"{missing}: cannot read the config file: No such file or directory"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[pgmp]\nauth_type = "trust"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        load(str(latin1))
    assert str(info.value).startswith(f"{latin1}: invalid TOML: not UTF-8 (at line 3")


def test_unknown_key_suggests_the_closest():
    assert pgmp_error("listen_prot = 6432") == (
        "<string>: [pgmp] listen_prot: unknown setting; did you mean listen_port?")
    assert pgmp_error("frobnicate = 1") == "<string>: [pgmp] frobnicate: unknown setting"
    assert error_of(TRUST + '[databases.appdb]\nhots = "db1"\n') == (
        "<string>: [databases.appdb] hots: unknown setting; did you mean host?")
    assert error_of(TRUST + '[users.alice]\npool_mod = "session"\n') == (
        "<string>: [users.alice] pool_mod: unknown setting; did you mean pool_mode?")


def test_key_in_the_wrong_section():
    assert error_of(TRUST + "[databases.appdb]\nserver_lifetime = 10\n") == (
        "<string>: [databases.appdb] server_lifetime: unknown setting here; it belongs in [pgmp]")
    assert pgmp_error("pool_size = 5").startswith(
        "<string>: [pgmp] pool_size: unknown setting here; it belongs in [databases.<name>]")
    assert error_of('listen_port = 6432\n' + TRUST) == (
        "<string>: listen_port is outside any section; put it under [pgmp]")


def test_unknown_section():
    assert error_of(TRUST + "[pgbouncer]\n") == (
        "<string>: unknown section [pgbouncer] (sections: [pgmp], [databases.<name>], [users.<name>])")
    assert error_of(TRUST + "[pgmq]\n") == (
        "<string>: unknown section [pgmq]; did you mean [pgmp]? "
        "(sections: [pgmp], [databases.<name>], [users.<name>])")
    assert error_of(TRUST + "[database.appdb]\n").startswith(
        "<string>: unknown section [database]; did you mean [databases]?")


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        loads(TRUST + 'listen_port = "abc"\nworkers = -1\nlisten_prot = 1\n')
    assert len(info.value.errors) == 3
    assert str(info.value) == "\n".join(info.value.errors)


def test_database_section_errors():
    assert error_of(TRUST + '[databases.""]\n') == (
        '<string>: [databases.""]: a database name must be non-empty and contain no NUL')
    assert error_of(TRUST + '[databases."a\\u0000b"]\n') == (
        '<string>: [databases."a\\u0000b"]: a database name must be non-empty and contain no NUL')
    assert error_of(TRUST + '[databases]\nappdb = "host=127.0.0.1 port=5432"\n') == (
        "<string>: [databases] appdb: expected a table [databases.appdb] with settings such as host, port,"
        " dbname, got 'host=127.0.0.1 port=5432' (pgmp does not read PgBouncer connect strings)")
    assert error_of("databases = 1\n" + TRUST) == (
        "<string>: databases must be tables like [databases.<name>], got 1")
    assert error_of(TRUST + '[databases.appdb]\ndbname = ""\n') == (
        "<string>: [databases.appdb] dbname: must not be empty (leave it out to use the section name)")
    assert error_of(TRUST + '[databases.appdb]\nport = 99999\n') == (
        "<string>: [databases.appdb] port: expected an integer 1..65535, got 99999")
    assert error_of(TRUST + '[databases.appdb]\nhost = ""\n') == (
        "<string>: [databases.appdb] host: expected a host name, IP address or socket directory, got ''")
    assert error_of(TRUST + '[databases."my db"]\npool_mode = "x"\n').startswith(
        '<string>: [databases."my db"] pool_mode: expected one of session, transaction, statement')
    assert error_of(TRUST + '[users.bob]\nmax_user_connections = -2\n') == (
        "<string>: [users.bob] max_user_connections: expected an integer >= 0, got -2")


def test_pool_size_consistency():
    assert pgmp_error("min_pool_size = 30") == (
        "<string>: [pgmp] min_pool_size: 30 is larger than default_pool_size 20")
    assert error_of(TRUST + "[databases.a]\npool_size = 5\nmin_pool_size = 6\n") == (
        "<string>: [databases.a] min_pool_size: 6 is larger than pool_size 5")
    assert cfg_with("min_pool_size = 2", "[databases.a]\npool_size = 2\n").databases["a"].min_pool_size == 2


def test_nothing_to_listen_on():
    assert pgmp_error('listen_addr = ""\nunix_socket_dir = ""') == (
        '<string>: [pgmp] listen_addr: nothing to listen on: listen_addr and unix_socket_dir are both ""')
    assert cfg_with('listen_addr = ""').listen_addr == ()


def test_tls_files_required_by_mode():
    assert pgmp_error('client_tls_mode = "require"') == (
        '<string>: [pgmp] client_tls_cert_file: client_tls_mode = "require" needs a certificate')
    assert pgmp_error('client_tls_mode = "verify-ca"\nclient_tls_cert_file = "/c.pem"') == (
        '<string>: [pgmp] client_tls_ca_file: client_tls_mode = "verify-ca" needs the CA that signs'
        ' client certificates')
    cfg = cfg_with('client_tls_mode = "prefer"\nclient_tls_cert_file = "/c.pem"\nserver_tls_mode = "verify-full"')
    assert cfg.client_tls_key_file == "" and cfg.server_tls_ca_file == ""


def test_socket_path_length():
    long_dir = "/" + "d" * 100
    assert pgmp_error(f'unix_socket_dir = "{long_dir}"') == (
        f"<string>: [pgmp] unix_socket_dir: socket path '{long_dir}/.s.PGSQL.6432' is longer than 107 bytes")
    assert "[pgmp] control_socket: socket path" in pgmp_error(f'pidfile = "{long_dir}/pgmp.pid"')


# ---------------------------------------------------------------- databases and users

SECTIONS = """
[databases.appdb]
host = "db1.internal"
port = 5433
user = "app"
password = "s3cret"
pool_mode = "transaction"
connect_query = "SET search_path TO app"

[databases.reports]
dbname = "warehouse"
pool_size = 5
host = "/var/run/postgresql"

[databases."*"]
host = "10.0.0.9"

[users.alice]
pool_mode = "statement"
max_user_connections = 10

[users.bob]
"""


def test_databases_inherit_from_pgmp():
    cfg = cfg_with('default_pool_size = 7\nreserve_pool_size = 2\nmax_db_connections = 50', SECTIONS)
    appdb = cfg.databases["appdb"]
    assert appdb == config.DatabaseConfig(
        name="appdb", host=("db1.internal",), port=5433, dbname="appdb", user="app", password="s3cret",
        pool_size=7, min_pool_size=0, reserve_pool_size=2, pool_mode="transaction",
        max_db_connections=50, connect_query="SET search_path TO app", auth_dbname="", application_name="",
        server_require_auth=(), target_session_attrs="any", load_balance_hosts="disable", max_replica_lag=0.0)
    reports = cfg.databases["reports"]
    assert (reports.dbname, reports.pool_size, reports.pool_mode, reports.host) == (
        "warehouse", 5, "session", ("/var/run/postgresql",))
    assert cfg.databases["*"].dbname == ""
    assert "s3cret" not in repr(appdb) and "s3cret" not in repr(cfg)


def test_database_defaults():
    db = cfg_with("", "[databases.appdb]\n").databases["appdb"]
    assert (db.host, db.port, db.dbname, db.user, db.password) == (("127.0.0.1",), 5432, "appdb", "", "")
    assert db.hosts == (config.HostSpec("127.0.0.1", 5432),)
    assert dataclasses.is_dataclass(db)
    with pytest.raises(dataclasses.FrozenInstanceError):
        db.port = 1


def test_users():
    cfg = cfg_with("max_user_connections = 3", SECTIONS)
    assert cfg.users["alice"] == config.UserConfig(name="alice", pool_mode="statement", max_user_connections=10)
    assert cfg.users["bob"] == config.UserConfig(name="bob", pool_mode=None, max_user_connections=3)
    appdb = cfg.databases["appdb"]
    assert config.pool_mode_for(appdb, cfg.users["alice"]) == "statement"
    assert config.pool_mode_for(appdb, cfg.users["bob"]) == "transaction"
    assert config.pool_mode_for(appdb, None) == "transaction"


def test_database_for():
    cfg = cfg_with("", SECTIONS)
    assert database_for(cfg, "appdb") is cfg.databases["appdb"]
    other = database_for(cfg, "sales")
    assert (other.name, other.dbname, other.host) == ("sales", "sales", ("10.0.0.9",))
    assert database_for(cfg_with("", "[databases.appdb]\n"), "sales") is None
    fixed = cfg_with("", '[databases."*"]\ndbname = "shared"\n')
    assert database_for(fixed, "sales").dbname == "shared"


def test_no_databases_is_valid():
    assert cfg_with().databases == {}
    assert database_for(cfg_with(), "appdb") is None


# ---------------------------------------------------------------- diff

def test_diff():
    old = cfg_with("", SECTIONS)
    assert diff(old, cfg_with("", SECTIONS)) == ([], [])
    new = cfg_with('query_timeout = "5s"\nlisten_port = 6433\nlog_level = "debug"\nworkers = 4',
                   SECTIONS.replace("port = 5433", "port = 5434").replace("[users.bob]", "[users.carol]"))
    reload, restart = diff(old, new)
    assert reload == ["query_timeout", "log_level", "databases.appdb", "users.bob", "users.carol"]
    assert restart == ["listen_port", "workers", "control_socket"]


def test_diff_of_pool_defaults_reaches_databases():
    old = cfg_with("", "[databases.a]\n[databases.b]\npool_size = 3\n")
    new = cfg_with("default_pool_size = 30", "[databases.a]\n[databases.b]\npool_size = 3\n")
    assert diff(old, new) == (["default_pool_size", "databases.a"], [])


# ---------------------------------------------------------------- documentation

def test_settings_table_lists_every_setting():
    table = config.render_settings_table()
    for s in config.describe_settings():
        section = "[pgmp]" if s.section == "pgmp" else f"[{s.section}.<name>]"
        assert f"{section} {s.name}\n" in table, s.name
    assert table.count("\n    reload: ") == len(config.describe_settings())
    block = table.split("[pgmp] listen_port\n", 1)[1].split("\n\n", 1)[0]
    assert block.splitlines()[:3] == ["    type: integer 1..65535", "    default: 6432", "    reload: no (restart)"]
    assert "default: inherited from [pgmp] default_pool_size" in table
    assert 'default: 1073741824 (1GB)' in table


def test_man_settings_cover_every_setting():
    roff = config.render_man_settings()
    names = [line[3:] for line in roff.splitlines() if line.startswith(".B ")]
    assert names == [s.name for s in config.describe_settings()]
    assert roff.count(".TP\n") == len(names)
    assert not any(line.startswith(("'", ".")) and not line.startswith((".TP", ".B ", ".br", ".SS"))
                   for line in roff.splitlines())


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_settings_pass_groff(tmp_path):
    page = tmp_path / "pgmp.toml.5"
    page.write_text('.TH PGMP.TOML 5 "" "pgmp" "File Formats"\n.SH NAME\npgmp.toml \\- pgmp settings\n'
                    ".SH SETTINGS\n" + config.render_man_settings())
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True,
                            env={**os.environ, "LC_ALL": "C"})
    assert result.returncode == 0 and result.stderr == "", result.stderr


# ---------------------------------------------------------------- auth_dbname

AUTH = TRUST + 'auth_user = "pgmp_auth"\n'


def test_default_auth_query_qualifies_every_operator():
    query = cfg_with().auth_query
    assert "OPERATOR(pg_catalog.=)" in query and "OPERATOR(pg_catalog.<)" in query
    assert " = " not in query and " < " not in query


def test_auth_dbname_is_inherited_and_overridden():
    cfg = loads(AUTH + 'auth_dbname = "authdb"\n[databases.authdb]\n[databases.app]\n'
                       '[databases.other]\nauth_dbname = "app"\n')
    assert cfg.databases["app"].auth_dbname == "authdb"
    assert cfg.databases["other"].auth_dbname == "app"
    assert cfg.databases["authdb"].auth_dbname == "authdb"


def test_wildcard_with_auth_user_needs_auth_dbname():
    message = error_of(AUTH + '[databases."*"]\n')
    assert '[databases."*"] auth_dbname: a "*" section lets a client pick any database' in message
    assert "set auth_dbname" in message
    # in the wildcard's own section, or inherited from [pgmp]
    assert loads(AUTH + '[databases."*"]\nauth_dbname = "authdb"\n[databases.authdb]\n')
    assert loads(AUTH + 'auth_dbname = "authdb"\n[databases."*"]\n[databases.authdb]\n')
    # no auth_user: no lookups, nothing to protect
    assert loads(TRUST + '[databases."*"]\n')


@pytest.mark.parametrize("value, expected", [
    ('"*"', 'auth_dbname: must name a database section, not "*"'),
    ('"nosuch"', "auth_dbname: no [databases.nosuch] section"),
])
def test_auth_dbname_must_name_a_section(value, expected):
    assert expected in error_of(AUTH + f"auth_dbname = {value}\n[databases.app]\n")
    assert f"[databases.app] {expected}" in error_of(AUTH + f"[databases.app]\nauth_dbname = {value}\n")


# ---------------------------------------------------------------- several hosts

@pytest.mark.parametrize("toml, expected", [
    ('"db1"', [("db1", 6000)]),
    ('"db1:5433"', [("db1", 5433)]),
    ('"db1, db2:7"', [("db1", 6000), ("db2", 7)]),
    ('["10.0.0.5", "10.0.0.6:5433", "[fd00::7]:5434", "::1", "/var/run/postgresql/"]',
     [("10.0.0.5", 6000), ("10.0.0.6", 5433), ("fd00::7", 5434), ("::1", 6000), ("/var/run/postgresql", 6000)]),
])
def test_host_lists(toml, expected):
    db = cfg_with("", f"[databases.appdb]\nport = 6000\nhost = {toml}\n").databases["appdb"]
    assert [(h.host, h.port) for h in db.hosts] == expected
    assert str(db.hosts[0]) in ("db1:6000", "db1:5433", "10.0.0.5:6000")


@pytest.mark.parametrize("toml, message", [
    ('[]', "expected a host or a list of hosts, got []"),
    ('"db 1"', "expected a host name, IP address or socket directory (starting with /), optionally with :port"),
    ('"db1:0"', "port 0 of 'db1:0' is not in 1..65535"),
    ('"db1:x"', "expected a port number after the colon"),
    ('"[10.0.0.1]:5432"', "brackets are for IPv6 addresses only"),
    ('"fd00::zz"', "is not an IPv6 address"),
    ('["db1", "db1:5432"]', "db1:5432 is listed twice"),
    ('["db1", ""]', "expected a host name, IP address or socket directory"),
    ('5432', "expected a host or a list of hosts, got 5432"),
])
def test_bad_host_lists(toml, message):
    assert message in error_of(TRUST + f"[databases.appdb]\nhost = {toml}\n")


def test_host_choice_settings_inherit_and_are_checked():
    cfg = cfg_with('target_session_attrs = "read-write"\nload_balance_hosts = "random"\nmax_replica_lag = "2s"',
                   '[databases.a]\n[databases.b]\ntarget_session_attrs = "standby"\nload_balance_hosts = '
                   '"round-robin"\nmax_replica_lag = 0\n')
    a, b = cfg.databases["a"], cfg.databases["b"]
    assert (a.target_session_attrs, a.load_balance_hosts, a.max_replica_lag) == ("read-write", "random", 2.0)
    assert (b.target_session_attrs, b.load_balance_hosts, b.max_replica_lag) == ("standby", "round-robin", 0.0)
    assert "expected one of any, read-write, read-only, primary, standby, prefer-standby" in \
        error_of(TRUST + '[databases.a]\ntarget_session_attrs = "master"\n')
    assert "expected one of disable, random, round-robin" in error_of(TRUST + 'load_balance_hosts = "on"\n')
    cfg = cfg_with("")
    assert (cfg.health_check_period, cfg.host_ban_time, cfg.dns_max_ttl, cfg.dns_nxdomain_ttl) == (5.0, 30.0, 15.0, 15.0)
