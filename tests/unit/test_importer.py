"""pgmp config import: PgBouncer's ini read as PgBouncer reads it, and mapped onto pgmp's settings.

Most tests run the sans-IO core over a dict of files; the result is always
checked with pgmp's own config loader (what `pgmp config check` runs first):
an import that exits 0 must load, one that exits 1 must not. The CLI tests at
the end run `python -m pgmp config import` and `config check` on real files.
"""
from __future__ import annotations

import os
import stat
import sys
import tomllib

import pytest

from pgmp import config, importer
from tests.support import run

DIR = "/cfg"
INI = f"{DIR}/pgbouncer.ini"


def fake_resolve(name: str) -> list[str]:
    if name == "db.example":
        return ["10.0.0.1", "fd00::1"]
    raise OSError("Name or service not known")


def convert(text: str, files: dict[str, str] | None = None, relative_to: str | None = None):
    """Import INI = text (plus other files, by absolute path) without touching the disk."""
    files = {INI: text, **(files or {})}

    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return files[path]

    ini = importer.parse_ini(INI, read, relative_to)
    return importer.convert(ini, read, fake_resolve)


def imported(text: str, **kw) -> tuple[dict, importer.Converted]:
    """(the [pgmp] table, the result) of an import that must carry everything over."""
    result = convert(text, **kw)
    assert not result.unsafe, "\n".join(map(str, result.unsafe))
    config.loads(result.toml)                      # what pgmp config check loads
    return tomllib.loads(result.toml), result


def refused(text: str, **kw) -> tuple[importer.Converted, str]:
    """(result, the unsafe notes as text) of an import that must exit 1 with a file pgmp refuses."""
    result = convert(text, **kw)
    assert result.unsafe, f"expected something not carried over:\n{result.toml}"
    doc = tomllib.loads(result.toml)
    assert doc["pgmp"][importer.BLOCKER] == len(result.unsafe)
    with pytest.raises(config.ConfigError, match=importer.BLOCKER):
        config.loads(result.toml)
    return result, "\n".join(map(str, result.unsafe))


def invalid(text: str, **kw) -> str:
    with pytest.raises(importer.InvalidIni) as exc:
        convert(text, **kw)
    return str(exc.value)


def main(lines: str) -> str:
    return f"[databases]\nappdb = host=127.0.0.1\n[pgbouncer]\nauth_file = users.txt\n{lines}\n"


# ----------------------------------------------------------------- [pgbouncer] settings carried over

CARRIED = [
    ("listen_port = 7000", {"listen_port": 7000}),
    ("listen_addr = *", {"listen_addr": "*"}),
    ("listen_addr = 127.0.0.1, ::1", {"listen_addr": ["127.0.0.1", "::1"]}),
    ("listen_addr = db.example", {"listen_addr": ["10.0.0.1", "fd00::1"]}),
    ("listen_addr =", {"listen_addr": ""}),
    ("unix_socket_dir = /var/run/postgresql", {"unix_socket_dir": "/var/run/postgresql"}),
    ("unix_socket_dir = run", {"unix_socket_dir": "/cfg/run"}),
    ("unix_socket_dir =\nlisten_addr = 127.0.0.1", {"unix_socket_dir": ""}),
    ("unix_socket_mode = 0770", {"unix_socket_mode": "0770"}),
    ("unix_socket_mode = 511", {"unix_socket_mode": "0777"}),          # strtol: decimal 511
    ("unix_socket_mode = 0x1c0", {"unix_socket_mode": "0700"}),
    ("pool_mode = Transaction", {"pool_mode": "transaction"}),
    ("max_client_conn = 0x200", {"max_client_conn": 512}),
    ("default_pool_size = 010", {"default_pool_size": 8}),             # strtol: octal
    ("min_pool_size = 5", {"min_pool_size": 5}),
    ("min_pool_size = 50", {"min_pool_size": 20}),                     # capped at default_pool_size
    ("reserve_pool_size = 3", {"reserve_pool_size": 3}),
    ("reserve_pool_size = 3\nreserve_pool_timeout = 0", {"reserve_pool_size": 0, "reserve_pool_timeout": 0}),
    ("reserve_pool_timeout = 2.5", {"reserve_pool_timeout": 2.5}),
    ("max_db_connections = 40", {"max_db_connections": 40}),
    ("max_user_connections = 30", {"max_user_connections": 30}),
    ("auth_type = trust", {"auth_type": "trust"}),
    ("auth_type = plain", {"auth_type": "password"}),
    ("auth_type = MD5", {"auth_type": "md5"}),
    ("auth_type = scram-sha-256", {"auth_type": "scram-sha-256"}),
    ("auth_user = pgb_auth", {"auth_user": "pgb_auth"}),
    ("auth_query = SELECT usename, passwd FROM pgbouncer.get_auth($1)",
     {"auth_query": "SELECT usename, passwd FROM pgbouncer.get_auth($1)"}),
    ("auth_user = pgb_auth\nauth_dbname = appdb", {"auth_user": "pgb_auth", "auth_dbname": "appdb"}),
    ("server_reset_query = DEALLOCATE ALL", {"server_reset_query": "DEALLOCATE ALL"}),
    ("server_reset_query_always = 1", {"server_reset_query_always": True}),
    ("server_check_query = select 1", {"server_check_query": "select 1"}),
    ("server_check_query = <empty>", {"server_check_query": ";"}),
    ("server_check_query =", {"server_check_query": ""}),
    ("server_check_delay = 10", {"server_check_delay": 10}),
    ("server_lifetime = 1800", {"server_lifetime": 1800}),
    ("server_lifetime = 0", {"server_lifetime": 0.001}),               # PgBouncer's 0: use once
    ("server_idle_timeout = 0.5", {"server_idle_timeout": 0.5}),
    ("server_connect_timeout = 3", {"server_connect_timeout": 3}),
    ("server_login_retry = 1", {"server_login_retry": 1}),
    ("client_login_timeout = 20", {"client_login_timeout": 20}),
    ("query_timeout = 30", {"query_timeout": 30}),
    ("query_wait_timeout = 0", {"query_wait_timeout": 0}),
    ("client_idle_timeout = 300", {"client_idle_timeout": 300}),
    ("idle_transaction_timeout = 60", {"idle_transaction_timeout": 60}),
    ("cancel_wait_timeout = 5", {"cancel_wait_timeout": 5}),
    ("max_prepared_statements = 0", {"max_prepared_statements": 0}),
    ("application_name_add_host = 1", {"application_name_add_host": True}),
    ("track_extra_parameters = IntervalStyle, search_path", {"track_extra_parameters": ["IntervalStyle", "search_path"]}),
    ("tcp_keepalive = 0", {"tcp_keepalive": False}),
    ("log_connections = 0", {"log_connections": False}),
    ("log_disconnections = 0", {"log_disconnections": False}),
    ("verbose = 2", {"log_level": "debug"}),
    ("verbose = 0", {"log_level": "info"}),
    ("logfile = pgbouncer.log", {"logfile": "/cfg/pgbouncer.log"}),
    ("pidfile = /run/pgbouncer/pgbouncer.pid", {"pidfile": "/run/pgbouncer/pgbouncer.pid"}),
    ("max_packet_size = 1048576", {"max_message_size": 1048576}),
    ("server_tls_sslmode = verify-full\nserver_tls_ca_file = ca.pem",
     {"server_tls_mode": "verify-full", "server_tls_ca_file": "/cfg/ca.pem"}),
    ("server_tls_sslmode = allow", {"server_tls_mode": "prefer"}),
    ("server_tls_sslmode = disable", {"server_tls_mode": "disable"}),
    ("server_tls_cert_file = /etc/c.pem\nserver_tls_key_file = k.pem",
     {"server_tls_cert_file": "/etc/c.pem", "server_tls_key_file": "/cfg/k.pem"}),
    ("client_tls_sslmode = require\nclient_tls_key_file = k.pem\nclient_tls_cert_file = c.pem",
     {"client_tls_mode": "require", "client_tls_key_file": "/cfg/k.pem", "client_tls_cert_file": "/cfg/c.pem"}),
    ("client_tls_sslmode = verify-ca\nclient_tls_cert_file = c.pem\nclient_tls_ca_file = ca.pem",
     {"client_tls_mode": "verify-ca", "client_tls_ca_file": "/cfg/ca.pem"}),
    ("client_tls_protocols = tlsv1.3", {"client_tls_min_version": "TLSv1.3"}),
    ("client_tls_protocols = secure", {"client_tls_min_version": "TLSv1.2"}),
    ("client_tls_protocols = all", {"client_tls_min_version": "TLSv1.2"}),     # stricter: a note
    ("client_tls_protocols = all,!tlsv1.0,!tlsv1.1", {"client_tls_min_version": "TLSv1.2"}),
    ("client_tls_ciphers = fast", {"client_tls_ciphers": ""}),
    ("client_tls_ciphers = HIGH:!aNULL", {"client_tls_ciphers": "HIGH:!aNULL"}),
]


@pytest.mark.parametrize("lines, expected", CARRIED, ids=[c[0] for c in CARRIED])
def test_setting_is_carried_over(lines, expected):
    doc, _ = imported(main(lines))
    got = {k: doc["pgmp"].get(k) for k in expected}
    assert got == expected


def test_defaults_that_differ_are_written():
    """Unset in the ini: PgBouncer's default where pgmp's differs."""
    doc, _ = imported("[pgbouncer]\nauth_file = users.txt\n")
    g = doc["pgmp"]
    assert (g["listen_addr"], g["max_client_conn"], g["server_tls_mode"], g["auth_type"]) == ("", 100, "prefer", "md5")
    cfg = config.loads(importer.convert(importer.parse_ini(INI, lambda p: "[pgbouncer]\n"),
                                        lambda p: "", fake_resolve).toml)
    assert cfg.auth_file == "/dev/null"                      # no auth_file: no user gets in, as in PgBouncer


def test_workers_is_one_like_pgbouncer():
    """pgmp splits pool sizes across workers: a pool of 1 would have no server in all workers but one."""
    doc, result = imported("[databases]\nappdb = pool_size=3\n[users]\nbob = max_user_connections=2\n"
                           "[pgbouncer]\nauth_file = u\n")
    assert doc["pgmp"]["workers"] == 1
    assert any("the smallest here is 2 ([users] bob max_user_connections), so up to workers = 2" in str(n)
               for n in result.notes)
    _, result = imported("[databases]\nappdb = pool_size=1\n[pgbouncer]\nauth_file = u\n")
    assert any("[databases] appdb pool_size is 1, so more workers would leave that pool without servers"
               in str(n) for n in result.notes)


@pytest.mark.parametrize("auth_type", ["trust", "md5"])
def test_no_auth_file_lets_no_one_in(auth_type):
    """PgBouncer without auth_file refuses every user, also with trust; pgmp's trust without one would not."""
    doc, _ = imported(f"[pgbouncer]\nauth_type = {auth_type}\n")
    assert doc["pgmp"]["auth_file"] == "/dev/null"
    doc, _ = imported(f"[pgbouncer]\nauth_type = {auth_type}\nauth_file =\n")
    assert doc["pgmp"]["auth_file"] == "/dev/null"


def test_auth_query_default_is_left_to_pgmp():
    doc, result = imported(main("auth_user = pgb_auth"))
    assert "auth_query" not in doc["pgmp"]
    assert config.loads(result.toml).auth_query == config.AUTH_QUERY


def test_auth_hba_file():
    hba = "local all all trust\nhost all all 127.0.0.1/32 md5\nhostssl all all ::/0 cert\n"
    doc, _ = imported(main("auth_type = hba\nauth_hba_file = hba.conf"), files={"/cfg/hba.conf": hba})
    assert doc["pgmp"]["hba_file"] == "/cfg/hba.conf"
    assert doc["pgmp"]["auth_type"] == "md5"                 # unused with hba_file; needs the auth_file


def test_auth_hba_file_without_auth_type_hba_is_ignored_as_in_pgbouncer():
    doc, result = imported(main("auth_hba_file = hba.conf"))
    assert "hba_file" not in doc["pgmp"]
    assert "PgBouncer ignores it unless auth_type = hba" in result.toml


# ----------------------------------------------------------------- [pgbouncer] settings pgmp needs not

@pytest.mark.parametrize("key", sorted(importer._HARMLESS))
def test_harmless_setting_becomes_a_comment(key):
    kind = importer.PGBOUNCER_SETTINGS[key][0]
    value = {"int": "7", "bool": "1", "time": "7", "list": "a,b"}.get(kind, "x")
    doc, result = imported(main(f"{key} = {value}"))
    assert key not in doc["pgmp"]
    shown = "(not shown)" if key == "auth_ldap_options" else value
    assert f"# pgbouncer: {key} = {shown} — no pgmp equivalent: " in result.toml
    assert any(n.subject == f"{key} = {shown}" for n in result.notes)


def test_harmless_comment_sits_where_the_setting_was():
    _, result = imported(main("listen_port = 7000\nstats_period = 60\nmax_client_conn = 50"))
    lines = result.toml.splitlines()
    at = lines.index("listen_port = 7000")
    assert lines[at + 1].startswith("# pgbouncer: stats_period = 60 — no pgmp equivalent: ")
    assert lines[at + 2] == "max_client_conn = 50"


@pytest.mark.parametrize("key", ["admin_users", "stats_users"])
def test_console_users(key):
    doc, result = imported(main(f"{key} = alice, bob"))
    assert doc["pgmp"][key] == ["alice", "bob"]


@pytest.mark.parametrize("lines", ["disable_pqexec = 0", "transaction_timeout = 0", "user =",
                                   "client_tls13_ciphers =", "max_db_client_connections = 0"])
def test_unsafe_setting_at_its_default_is_harmless(lines):
    _, result = imported(main(lines))
    assert "not set: nothing to carry over" in result.toml


# ----------------------------------------------------------------- [pgbouncer] settings not carried over

UNSAFE = [
    ("disable_pqexec = 1", "pgmp cannot refuse the simple query protocol"),
    ("transaction_timeout = 30", "pgmp has no transaction_timeout"),
    ("max_db_client_connections = 10", "no per-database limit on client connections"),
    ("max_user_client_connections = 10", "no per-user limit on client connections"),
    ("unix_socket_group = postgres", "cannot set the unix socket's group"),
    ("user = postgres", "pgmp does not switch users"),
    ("resolv_conf = /etc/pgb-resolv.conf", "system's resolver"),
    ("client_tls13_ciphers = TLS_AES_256_GCM_SHA384", "cannot restrict the TLS 1.3 cipher suites"),
    ("server_tls13_ciphers = TLS_AES_256_GCM_SHA384", "cannot restrict the TLS 1.3 cipher suites"),
    ("server_tls_ciphers = HIGH:!aNULL", "cannot restrict the ciphers it accepts from servers"),
    ("server_tls_protocols = tlsv1.3", "cannot be limited to tlsv1.3"),
    ("client_tls_protocols = tlsv1.0,tlsv1.1", "pgmp accepts TLS 1.2 and 1.3"),
    ("client_tls_protocols = tlsv1.2,sslv3", "'sslv3' is not a TLS protocol PgBouncer knows"),
    ("auth_type = cert", "pgmp has no auth_type cert"),
    ("auth_type = any", "pgmp has no auth_type any"),
    ("auth_type = ldap", "pgmp does not authenticate with LDAP"),
    ("auth_type = pam", "pgmp does not authenticate with PAM"),
    ("auth_type = hba", "without auth_hba_file PgBouncer lets no one in"),
    ("unix_socket_dir = @pgbouncer", "no abstract-namespace unix sockets"),
    ("unix_socket_mode = 777", "PgBouncer reads this as 0o1411"),
    ("max_packet_size = 100", "at least 1 kB"),
    ("listen_addr = nosuch.invalid", "cannot resolve 'nosuch.invalid'"),
    ("listen_prot = 10", "unknown to this importer (did you mean listen_port?)"),
]


@pytest.mark.parametrize("lines, message", UNSAFE, ids=[c[0] for c in UNSAFE])
def test_unsafe_setting_is_not_carried_over(lines, message):
    result, notes = refused(main(lines))
    assert message in notes
    assert message in result.toml                            # the comment at its place says it too
    assert "# NOT CARRIED OVER: pgbouncer: " in result.toml


@pytest.mark.parametrize("hba, message", [
    ("local all all peer\n", 'authentication method "peer" is not supported by pgmp'),
    ("host all @admins 10.0.0.0/8 md5\n", "file inclusion (@admins) is not supported by pgmp"),
    ("hostssl all all 0.0.0.0/0 cert map=certmap\n", "map= (auth_ident_file's user name maps) is not supported"),
    (None, "cannot read /cfg/hba.conf"),
])
def test_hba_file_pgmp_cannot_use(hba, message):
    files = {} if hba is None else {"/cfg/hba.conf": hba}
    result, notes = refused(main("auth_type = hba\nauth_hba_file = hba.conf"), files=files)
    assert message in notes
    assert tomllib.loads(result.toml)["pgmp"]["hba_file"] == "/cfg/hba.conf"   # still refused by pgmp


def test_peers_are_not_carried_over():
    _, notes = refused(main("peer_id = 1") + "[peers]\n1 = host=/tmp/pgb1\n2 = host=/tmp/pgb2 port=6433\n")
    assert "[peers] 2 = host=/tmp/pgb2 port=6433" in notes
    assert "a cancel that reaches another host is lost" in notes


# ----------------------------------------------------------------- values PgBouncer refuses: exit 2

@pytest.mark.parametrize("lines, message", [
    ("listen_port = 6432x", "invalid value '6432x' for listen_port: expected an integer"),
    ("default_pool_size = 08", "invalid value '08' for default_pool_size"),
    ("pool_mode = session ; a comment", "invalid value 'session ; a comment' for pool_mode"),
    ("auth_type = kerberos", "invalid value 'kerberos' for auth_type"),
    ("server_lifetime = -1", "invalid value '-1' for server_lifetime: expected a number of seconds"),
    ("server_tls_sslmode = on", "invalid value 'on' for server_tls_sslmode"),
])
def test_invalid_value(lines, message):
    assert message in invalid(main(lines))


# ----------------------------------------------------------------- the ini format

def test_comments_and_blank_lines():
    doc, _ = imported("; a comment\n  # another\n\n[pgbouncer]\n\t;indented\nlisten_port = 7001\n")
    assert doc["pgmp"]["listen_port"] == 7001


def test_crlf_line_ends():
    doc, _ = imported("[databases]\r\nappdb = host=db port=5433\r\n[pgbouncer]\r\nlisten_port = 7001\r\n")
    assert doc["pgmp"]["listen_port"] == 7001
    assert doc["databases"]["appdb"] == {"host": "db", "port": 5433}


def test_setting_on_the_header_line():
    """PgBouncer reads on after the ]."""
    doc, _ = imported("[pgbouncer] listen_port = 7002\n")
    assert doc["pgmp"]["listen_port"] == 7002


def test_each_pgbouncer_header_resets_the_settings_before_it():
    doc, result = imported("[pgbouncer]\nlisten_port = 7003\nmax_client_conn = 5\n"
                           "[databases]\nappdb = host=db\n[pgbouncer]\nmax_client_conn = 7\n")
    assert doc["pgmp"]["max_client_conn"] == 7
    assert "listen_port" not in doc["pgmp"]
    assert any("reset to PgBouncer's default by the [pgbouncer] header at /cfg/pgbouncer.ini:6" in str(n)
               for n in result.notes)


def test_the_later_value_wins():
    doc, result = imported("[pgbouncer]\nlisten_port = 7004\nlisten_port = 7005\n")
    assert doc["pgmp"]["listen_port"] == 7005
    assert any("set again at /cfg/pgbouncer.ini:3" in str(n) for n in result.notes)


def test_values_are_not_unquoted():
    doc, result = imported(main('logfile = "pgb.log"'))
    assert doc["pgmp"]["logfile"] == '/cfg/"pgb.log"'
    assert any("PgBouncer takes the quotes as part of the file name" in str(n) for n in result.notes)


@pytest.mark.parametrize("text, message", [
    ("listen_port = 1\n[pgbouncer]\n", "listen_port = ... before any [section]"),
    ("[pgbouncr]\n", "invalid section [pgbouncr] (PgBouncer knows [pgbouncer], [databases], [users] and "
                     "[peers]); did you mean [pgbouncer]?"),
    ("[databases]\nappdb = host=db\n", "no [pgbouncer] section"),
    ("[pgbouncer\n", "/cfg/pgbouncer.ini:1: syntax error: no ] after ["),
    ("[pgbouncer]\nlisten port = 1\n", "/cfg/pgbouncer.ini:2: syntax error: expected name = value, got "
                                       "'listen port = 1'"),
    ("[pgbouncer]\n[databases]\nmy db = host=x\n", "(names with other characters go in single quotes)"),
    ("[pgbouncer]\n= 1\n", "syntax error"),
    ("[pgbouncer]\nlisten_port\n", "syntax error"),
])
def test_ini_syntax(text, message):
    assert message in invalid(text)


def test_quoted_database_name():
    doc, _ = imported("[databases]\n'my db' = host=db\n'*' = host=other\n[pgbouncer]\nauth_file = u\n")
    assert doc["databases"]["my db"]["host"] == "db"
    assert doc["databases"]["*"]["host"] == "other"


def test_not_utf8():
    def read(path):
        b"\xff".decode("utf-8")
    assert "not UTF-8" in str(pytest.raises(importer.InvalidIni, importer.parse_ini, INI, read).value)


# ----------------------------------------------------------------- %include

def test_include_relative_to_the_base_directory():
    files = {"/cfg/dbs.ini": "appdb = host=db\n", "/cfg/sub/more.ini": "[pgbouncer]\nlisten_port = 7010\n"}
    doc, result = imported("[databases]\n%include dbs.ini\n%include\tsub/more.ini  \n", files=files)
    assert doc["databases"]["appdb"]["host"] == "db"            # in the including file's section
    assert doc["pgmp"]["listen_port"] == 7010
    assert any("PgBouncer takes a relative file from its working directory" in str(n) for n in result.notes)
    assert "#   included: /cfg/dbs.ini" in result.toml


def test_include_from_an_included_file_is_also_relative_to_the_base():
    files = {"/cfg/sub/a.ini": "%include b.ini\n", "/cfg/b.ini": "[pgbouncer]\nlisten_port = 7011\n"}
    doc, _ = imported("%include sub/a.ini\n", files=files)
    assert doc["pgmp"]["listen_port"] == 7011


def test_relative_to():
    files = {"/srv/pgb/dbs.ini": "[pgbouncer]\nauth_file = users.txt\n"}
    doc, _ = imported("%include dbs.ini\n", files=files, relative_to="/srv/pgb")
    assert doc["pgmp"]["auth_file"] == "/srv/pgb/users.txt"


def test_include_absolute():
    doc, _ = imported("%include /etc/pgb/main.ini\n", files={"/etc/pgb/main.ini": "[pgbouncer]\nlisten_port = 7012\n"})
    assert doc["pgmp"]["listen_port"] == 7012


@pytest.mark.parametrize("files, message", [
    ({"/cfg/a.ini": "%include b.ini\n", "/cfg/b.ini": "%include a.ini\n"},
     "/cfg/b.ini:1: %include loop: /cfg/pgbouncer.ini -> /cfg/a.ini -> /cfg/b.ini -> /cfg/a.ini"),
    ({"/cfg/a.ini": "%include ./a.ini\n"}, "%include loop"),
    ({"/cfg/a.ini": "[pgbouncer]\n"}, None),
    ({}, "/cfg/pgbouncer.ini:1: cannot read the included file /cfg/a.ini: No such file or directory"),
])
def test_include_problems(files, message):
    text = "%include a.ini\n[pgbouncer]\n"
    if message is None:
        imported(text, files=files)
    else:
        assert message in invalid(text, files=files)


def test_include_self():
    assert "%include loop: /cfg/pgbouncer.ini -> /cfg/pgbouncer.ini" in invalid("%include pgbouncer.ini\n")


def test_include_depth_limit():
    chain = {f"/cfg/{i}.ini": f"%include {i + 1}.ini\n" for i in range(1, 11)}
    chain["/cfg/11.ini"] = "[pgbouncer]\n"
    assert "nested more than 10 deep" in invalid("%include 1.ini\n", files=chain)
    chain["/cfg/10.ini"] = "[pgbouncer]\n"                     # 10 levels: PgBouncer's limit
    imported("%include 1.ini\n", files=chain)


def test_percent_without_blank_is_not_an_include():
    assert "syntax error" in invalid("%includefile\n[pgbouncer]\n")


# ----------------------------------------------------------------- connection strings

CONNSTR = [
    ("host=db port=5433", [("host", "db"), ("port", "5433")]),
    ("  host=db   dbname=x  ", [("host", "db"), ("dbname", "x")]),
    ("host = db", [("host", "db")]),
    ("dbname='a b'", [("dbname", "a b")]),
    ("password='it''s'", [("password", "it's")]),
    (r"password='a\b'", [("password", "a\\b")]),               # no backslash escapes
    (r"password=a\'b", [("password", "a\\'b")]),
    ("connect_query='SELECT 1; SELECT ''x'''", [("connect_query", "SELECT 1; SELECT 'x'")]),
    ("dbname='abc'x port=1", [("dbname", "abc"), ("port", "1")]),   # PgBouncer drops the x
    ("host=a\tport=1", [("host", "a\tport=1")]),               # only spaces separate
    ("", []),
]


@pytest.mark.parametrize("text, pairs", CONNSTR, ids=[c[0] or "empty" for c in CONNSTR])
def test_connection_string(text, pairs):
    assert importer.parse_connstr(text)[0] == pairs


def test_connection_string_character_after_quote_is_dropped_with_a_warning():
    assert importer.parse_connstr("dbname='abc'x")[1] == ["dbname: PgBouncer drops the 'x' right after the closing quote"]


@pytest.mark.parametrize("text, message", [
    ("dbname=''", "dbname: empty value"),
    ("host=", "host: empty value"),
    ("dbname='abc", "dbname: no closing quote"),
    ("=x", "expected key=value"),
    ("host", "expected key=value"),
    ("host db", "expected key=value"),
])
def test_connection_string_errors(text, message):
    with pytest.raises(ValueError, match=message):
        importer.parse_connstr(text)


# ----------------------------------------------------------------- [databases]

DATABASES = [
    ("appdb = host=db.example port=5433 dbname=real user=u password=p",
     {"appdb": {"host": "db.example", "port": 5433, "dbname": "real", "user": "u", "password": "p"}}),
    ("appdb =", {"appdb": {"host": "/tmp"}}),                  # the unix socket in unix_socket_dir
    ("appdb = host=/var/run/postgresql", {"appdb": {"host": "/var/run/postgresql"}}),
    ("appdb = pool_size=5 min_pool_size=2 reserve_pool=1 max_db_connections=9 pool_mode=Transaction",
     {"appdb": {"host": "/tmp", "pool_size": 5, "min_pool_size": 2, "reserve_pool_size": 1,
                "max_db_connections": 9, "pool_mode": "transaction"}}),
    ("appdb = reserve_pool_size=4", {"appdb": {"host": "/tmp", "reserve_pool_size": 4}}),
    ("appdb = pool_size=-1 min_pool_size=30", {"appdb": {"host": "/tmp", "min_pool_size": 20}}),
    ("appdb = pool_size=12x", {"appdb": {"host": "/tmp", "pool_size": 12}}),     # atoi
    ("appdb = connect_query='SET x = 1' application_name=app",
     {"appdb": {"host": "/tmp", "connect_query": "SET x = 1", "application_name": "app"}}),
    ("* = host=db", {"*": {"host": "db"}}),
    ("* =", {"*": {"host": "/tmp"}}),
    ("appdb = server_lifetime=60 load_balance_hosts=disable", {"appdb": {"host": "/tmp"}}),
    ("appdb = host=a host=b", {"appdb": {"host": "b"}}),
    ("appdb = host=a,b:5433,/run/pg", {"appdb": {"host": ["a", "b:5433", "/run/pg"],
                                                  "load_balance_hosts": "round-robin"}}),
    ("appdb = host=a,b load_balance_hosts=disable", {"appdb": {"host": ["a", "b"], "load_balance_hosts": "disable"}}),
]


@pytest.mark.parametrize("line, expected", DATABASES, ids=[c[0] for c in DATABASES])
def test_database(line, expected):
    doc, _ = imported(f"[databases]\n{line}\n[pgbouncer]\nauth_file = u\n")
    assert doc["databases"] == expected


def test_database_auth_settings_same_as_global():
    doc, _ = imported("[databases]\nappdb = auth_user=pgb auth_dbname=appdb\n"
                      "[pgbouncer]\nauth_file = u\nauth_user = pgb\n")
    assert doc["databases"]["appdb"] == {"host": "/tmp", "auth_dbname": "appdb"}


def test_database_with_unix_socket_dir():
    doc, _ = imported("[databases]\nappdb =\n[pgbouncer]\nauth_file = u\nunix_socket_dir = /var/run/postgresql\n")
    assert doc["databases"]["appdb"]["host"] == "/var/run/postgresql"


def test_password_is_never_shown_in_notes():
    result, notes = refused("[databases]\nappdb = password=s3cret timezone=UTC\n[pgbouncer]\nauth_file = u\n")
    assert "s3cret" not in notes
    assert tomllib.loads(result.toml)["databases"]["appdb"]["password"] == "s3cret"


DATABASES_UNSAFE = [
    ("appdb = client_encoding=UTF8", "ALTER DATABASE ... SET client_encoding"),
    ("appdb = datestyle=ISO", "ALTER DATABASE ... SET datestyle"),
    ("appdb = timezone=UTC", "ALTER DATABASE ... SET timezone"),
    ("appdb = host=a,@pg", "no abstract-namespace unix sockets"),
    ("appdb = host=@pg", "no abstract-namespace unix sockets"),
    ("pgbouncer = host=db", "the name of the admin console"),
    ("appdb = max_db_client_connections=5", "no per-database limit on client connections"),
    ("appdb = auth_user=other", "pgmp has one auth_user for every database"),
    ("appdb = auth_query='SELECT 1'", "pgmp has one auth_query for every database"),
    ("appdb = query_wait_timeout=5", "pgmp has one query_wait_timeout for every database (120s)"),
    ("appdb = sslmode=require", "unknown to this importer"),
]


@pytest.mark.parametrize("line, message", DATABASES_UNSAFE, ids=[c[0] for c in DATABASES_UNSAFE])
def test_database_not_carried_over(line, message):
    _, notes = refused(f"[databases]\n{line}\n[pgbouncer]\nauth_file = u\n")
    assert message in notes


def test_database_left_out_when_pgmp_would_connect_elsewhere():
    result, _ = refused("[databases]\nappdb = host=@pg\nother =\n[pgbouncer]\nauth_file = u\nunix_socket_dir =\n")
    assert "databases" not in tomllib.loads(result.toml)


def test_fallback_database_with_auth_user_needs_auth_dbname():
    _, notes = refused_after_check("[databases]\n* = host=db\n[pgbouncer]\nauth_file = u\nauth_user = pgb\n")
    assert 'a "*" section lets a client pick any database' in notes


def refused_after_check(text: str) -> tuple[importer.Converted, str]:
    """Like refused(), for a problem only pgmp's own check finds (import_ini adds it as a note)."""
    result = convert(text)
    assert not result.unsafe
    with pytest.raises(config.ConfigError) as exc:
        config.loads(result.toml)
    return result, str(exc.value)


@pytest.mark.parametrize("line, message", [
    ("appdb = port=0", "port=0: invalid port"),
    ("appdb = port=x", "port=x: invalid port"),
    ("appdb = pool_mode=bogus", "expected one of session, transaction, statement"),
    ("appdb = host='db", "syntax error in the connection string: host: no closing quote"),
])
def test_database_invalid(line, message):
    assert message in invalid(f"[databases]\n{line}\n[pgbouncer]\n")


# ----------------------------------------------------------------- [users]

@pytest.mark.parametrize("line, expected", [
    ("alice = pool_mode=Transaction max_user_connections=3", {"pool_mode": "transaction", "max_user_connections": 3}),
    ("alice =", {}),
    ("alice = pool_size=20 query_timeout=0 query_wait_timeout=-1 reserve_pool_size=-1", {}),
])
def test_user(line, expected):
    doc, _ = imported(f"[users]\n{line}\n[pgbouncer]\nauth_file = u\n")
    assert doc["users"]["alice"] == expected


def test_user_pool_size_wins_over_a_database_pool_size():
    _, notes = refused("[databases]\nappdb = pool_size=5\n[users]\nalice = pool_size=20\n[pgbouncer]\nauth_file = u\n")
    assert "no per-user pool_size" in notes


@pytest.mark.parametrize("line, expected", [
    ("appdb = max_db_connections=0", {"host": "/tmp"}),          # PgBouncer: 0 is "not set" here
    ("appdb = max_db_connections=-1", {"host": "/tmp"}),
])
def test_database_limit_not_set(line, expected):
    doc, _ = imported(f"[databases]\n{line}\n[pgbouncer]\nauth_file = u\nmax_db_connections = 9\n")
    assert doc["databases"]["appdb"] == expected
    doc, _ = imported("[users]\nalice = max_user_connections=0\n[pgbouncer]\nauth_file = u\n")
    assert doc["users"]["alice"] == {}


@pytest.mark.parametrize("setting, message", [
    ("pool_size=5", "pgmp has no per-user pool_size: this user would get default_pool_size = 20"),
    ("reserve_pool_size=2", "no per-user reserve_pool_size"),
    ("query_timeout=10", "no per-user query_timeout: this user would get query_timeout = 0"),
    ("idle_transaction_timeout=10", "no per-user idle_transaction_timeout"),
    ("transaction_timeout=10", "no per-user transaction_timeout"),
    ("query_wait_timeout=0", "no per-user query_wait_timeout: this user would get query_wait_timeout = 120"),
    ("client_idle_timeout=10", "no per-user client_idle_timeout"),
    ("max_user_client_connections=1", "no per-user limit on client connections"),
    ("foo=1", "unknown to this importer"),
])
def test_user_not_carried_over(setting, message):
    _, notes = refused(f"[users]\nalice = {setting}\n[pgbouncer]\nauth_file = u\n")
    assert message in notes


def test_user_invalid_pool_mode():
    assert "expected one of session, transaction, statement" in invalid("[users]\nalice = pool_mode=x\n[pgbouncer]\n")


# ----------------------------------------------------------------- TOML output

def test_toml_strings_and_keys():
    assert importer.toml_string('a"b\\c\td\x01é') == '"a\\"b\\\\c\\td\\u0001é"'
    assert importer.toml_key("appdb") == "appdb"
    assert importer.toml_key("my.db") == '"my.db"'
    text = '[databases]\n\'we"ird.db\' = dbname=\'x\\y\' password=\'a b\'\n[pgbouncer]\nauth_file = u\n'
    doc, _ = imported(text)
    assert doc["databases"]['we"ird.db'] == {"host": "/tmp", "dbname": "x\\y", "password": "a b"}


# ----------------------------------------------------------------- the command line

def cli(*args, cwd=None):
    return run([sys.executable, "-m", "pgmp", *map(str, args)], check=False, cwd=cwd,
               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_cli_writes_a_config_that_pgmp_config_check_accepts(tmp_path):
    (tmp_path / "users.txt").write_text('"alice" "secret"\n"bob" "md5' + "0" * 32 + '"\n')
    (tmp_path / "hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 md5\n")
    (tmp_path / "dbs.ini").write_text("appdb = host=127.0.0.1 port=5432 pool_size=5\n* = host=/var/run/postgresql\n")
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\n%include dbs.ini\n[users]\nalice = pool_mode=session\n"
                   "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = 6999\nauth_type = hba\n"
                   "auth_hba_file = hba.conf\nauth_file = users.txt\npool_mode = transaction\nstats_period = 30\n")
    ini.chmod(0o640)
    out = tmp_path / "pgmp.toml"
    result = cli("config", "import", ini, "-o", out, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "stats_period = 30: no pgmp equivalent" in result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 & ~_umask()
    check = cli("config", "check", "-c", out)
    assert check.returncode == 0, check.stderr
    assert f"{tmp_path}/users.txt: 2 users" in check.stdout
    assert f"{tmp_path}/hba.conf: 2 rules" in check.stdout


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_stdout_and_refusing_to_overwrite(tmp_path):
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[pgbouncer]\nlisten_port = 7020\n")
    result = cli("config", "import", ini)
    assert result.returncode == 0, result.stderr
    assert "listen_port = 7020" in result.stdout
    out = tmp_path / "pgmp.toml"
    out.write_text("keep me")
    result = cli("config", "import", ini, "-o", out)
    assert result.returncode == 2
    assert f"{out} exists, nothing written (--force overwrites it)" in result.stderr
    assert out.read_text() == "keep me"
    assert cli("config", "import", ini, "-o", out, "--force").returncode == 0
    assert "listen_port = 7020" in out.read_text()


def test_cli_unsafe_exits_1_and_pgmp_refuses_the_output(tmp_path):
    (tmp_path / "users.txt").write_text('"alice" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[pgbouncer]\nauth_file = users.txt\nauth_type = cert\ndisable_pqexec = 1\n")
    out = tmp_path / "pgmp.toml"
    result = cli("config", "import", ini, "-o", out)
    assert result.returncode == 1, result.stderr
    assert f"{ini}:3: NOT CARRIED OVER: auth_type = cert: pgmp has no auth_type cert" in result.stderr
    assert f"{ini}:4: NOT CARRIED OVER: disable_pqexec = 1: pgmp cannot refuse the simple query" in result.stderr
    assert "2 of the settings could not be carried over safely" in result.stderr
    check = cli("config", "check", "-c", out)
    assert check.returncode == 1
    assert f"[pgmp] {importer.BLOCKER}: unknown setting" in check.stderr


def test_cli_reports_what_pgmp_config_check_would_refuse(tmp_path):
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[pgbouncer]\nauth_file = missing.txt\n")
    result = cli("config", "import", ini)
    assert result.returncode == 1
    problem = f"pgmp config check: {tmp_path}/missing.txt: cannot read auth_file: No such file or directory"
    assert f"NOT CARRIED OVER: {problem}" in result.stderr
    assert f"# NOT CARRIED OVER: {problem}" in result.stdout          # also in the file it wrote


def test_cli_invalid_input_exits_2(tmp_path):
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[pgbouncer]\nlisten_port = many\n")
    result = cli("config", "import", ini, "-o", tmp_path / "out.toml")
    assert result.returncode == 2
    assert f"cannot import {ini}, nothing written:\n{ini}:2: invalid value 'many' for listen_port" in result.stderr
    assert not (tmp_path / "out.toml").exists()
    result = cli("config", "import", tmp_path / "nope.ini")
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_left_out_database_says_so_where_it_was():
    result, _ = refused("[databases]\nappdb = host=@pg\n[pgbouncer]\nauth_file = u\n")
    assert len(result.unsafe) == 1
    assert "# NOT CARRIED OVER: pgbouncer: [databases] appdb host=@pg — pgmp has no abstract-namespace" in result.toml


def test_notes_in_file_order():
    files = {"/cfg/dbs.ini": "appdb = host=db timezone=UTC\n"}
    result = convert("[databases]\n%include dbs.ini\n[pgbouncer]\nstats_period = 1\nauth_file = u\n", files=files)
    assert [n.where for n in result.in_file_order()] == [
        "/cfg/pgbouncer.ini:2", "/cfg/pgbouncer.ini:4", "/cfg/pgbouncer.ini:5", "/cfg/dbs.ini:1", "/cfg/pgbouncer.ini"]
