"""Tests of the pg_hba.conf-style rule parser and matcher (pgmp.hba)."""
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from pgmp.hba import HbaError, HbaRule, HbaRules, load_hba, no_match_message, parse_hba


def first(text: str, **conn):
    """The rule of ``text`` that a connection matches (defaults: TCP from 10.0.0.1, no TLS)."""
    args = dict(conn_type="host", database="db", user="alice", addr="10.0.0.1", tls=False)
    args.update(conn)
    if args["conn_type"] == "local" and "addr" not in conn:
        args["addr"] = None
    return parse_hba(text).match(**args)


def lineno(text: str, **conn) -> int | None:
    rule = first(text, **conn)
    return None if rule is None else rule.lineno


def error_of(text: str, path: str = "/etc/pgmp/hba.conf") -> str:
    with pytest.raises(HbaError) as info:
        parse_hba(text, path)
    return str(info.value)


# ---------------------------------------------------------------- connection types and TLS

CONN_TABLE = """\
local all all trust
host all all 0.0.0.0/0 md5
"""


@pytest.mark.parametrize("rule_type, conn_type, tls, matches", [
    ("local", "local", False, True),
    ("local", "host", False, False),
    ("local", "host", True, False),
    ("host", "host", False, True),
    ("host", "host", True, True),
    ("host", "local", False, False),
    ("hostssl", "host", True, True),
    ("hostssl", "host", False, False),
    ("hostssl", "local", False, False),
    ("hostnossl", "host", False, True),
    ("hostnossl", "host", True, False),
    ("hostnossl", "local", False, False),
])
def test_conn_type_and_tls(rule_type, conn_type, tls, matches):
    address = "" if rule_type == "local" else "all"
    text = f"{rule_type} all all {address} trust\n"
    addr = None if conn_type == "local" else "192.0.2.7"
    rule = first(text, conn_type=conn_type, addr=addr, tls=tls)
    assert (rule is not None) == matches
    if matches:
        assert rule.conn_type == rule_type


def test_local_tls_flag_is_irrelevant():
    assert lineno("local all all trust", conn_type="local", tls=True) == 1


def test_rule_fields():
    rules = parse_hba("# comment\n\nhostssl db1,db2 alice,bob 10.1.0.0/16 scram-sha-256 clientcert=verify-ca\n")
    assert isinstance(rules, HbaRules)
    (rule,) = rules.rules
    assert rule == HbaRule(lineno=3, conn_type="hostssl", databases=frozenset({"db1", "db2"}),
                           users=frozenset({"alice", "bob"}), network=ipaddress.ip_network("10.1.0.0/16"),
                           method="scram-sha-256", options={"clientcert": "verify-ca"})
    assert rule.sameuser is False


def test_all_is_none():
    (rule,) = parse_hba("host all all all trust").rules
    assert rule.databases is None and rule.users is None and rule.network is None
    (rule,) = parse_hba("local all all trust").rules
    assert rule.network is None


@pytest.mark.parametrize("method", ["trust", "reject", "password", "md5", "scram-sha-256"])
def test_methods(method):
    assert first(f"host all all all {method}").method == method


def test_cert_method():
    rule = first("hostssl all all all cert", tls=True)
    assert rule.method == "cert" and rule.options == {}


# ---------------------------------------------------------------- databases and users

def test_lists():
    text = "host db1,db2 alice,bob all trust"
    for db in ("db1", "db2"):
        for user in ("alice", "bob"):
            assert lineno(text, database=db, user=user) == 1
    assert lineno(text, database="db3", user="alice") is None
    assert lineno(text, database="db1", user="carol") is None


def test_list_with_spaces_after_commas():
    assert parse_hba("host db1,  db2 alice all trust").rules[0].databases == frozenset({"db1", "db2"})
    # a blank before a comma ends the field: ",db3" would be a field starting with an empty item
    assert "empty item" in error_of("host db1, db2 ,db3 alice all trust")


def test_all_inside_a_list_means_all():
    rule = parse_hba("host foo,all bar,all all trust").rules[0]
    assert rule.databases is None and rule.users is None


def test_quoted_all_is_a_literal_name():
    text = 'host "all" "all" all trust'
    rule = parse_hba(text).rules[0]
    assert rule.databases == frozenset({"all"}) and rule.users == frozenset({"all"})
    assert lineno(text, database="all", user="all") == 1
    assert lineno(text, database="db", user="all") is None
    assert lineno(text, database="all", user="alice") is None


def test_quoted_keywords_are_literal():
    rule = parse_hba('host "sameuser","replication","samerole" "+admins","@file" all trust').rules[0]
    assert rule.databases == frozenset({"sameuser", "replication", "samerole"})
    assert rule.users == frozenset({"+admins", "@file"})
    assert rule.sameuser is False


def test_quoted_names_with_spaces_commas_hashes_and_quotes():
    rule = parse_hba('host "my db","a,b" "we""ird #user" all trust # real comment').rules[0]
    assert rule.databases == frozenset({"my db", "a,b"})
    assert rule.users == frozenset({'we"ird #user'})


def test_partly_quoted_token():
    rule = parse_hba('host ab"c d"e all all trust').rules[0]
    assert rule.databases == frozenset({"abc de"})


def test_empty_quoted_name():
    assert parse_hba('host "" all all trust').rules[0].databases == frozenset({""})


def test_names_are_case_sensitive():
    text = "host MyDb Alice all trust"
    assert lineno(text, database="MyDb", user="Alice") == 1
    assert lineno(text, database="mydb", user="Alice") is None
    assert lineno(text, database="MyDb", user="alice") is None


def test_sameuser():
    text = "host sameuser all all trust"
    assert lineno(text, database="alice", user="alice") == 1
    assert lineno(text, database="bob", user="alice") is None
    rule = parse_hba(text).rules[0]
    assert rule.sameuser is True and rule.databases == frozenset()


def test_sameuser_in_a_list():
    text = "host sameuser,shared all all trust"
    assert lineno(text, database="alice", user="alice") == 1
    assert lineno(text, database="shared", user="alice") == 1
    assert lineno(text, database="other", user="alice") is None


def test_replication_matches_nothing():
    text = "host replication all all trust\nhost replication,db all all md5\n"
    assert first(text, database="replication") is None
    assert lineno(text, database="db") == 2
    assert parse_hba(text).rules[0].databases == frozenset()


# ---------------------------------------------------------------- addresses

@pytest.mark.parametrize("address, inside, outside", [
    ("10.0.0.0/8", ["10.0.0.1", "10.255.255.255"], ["11.0.0.1", "9.255.255.255"]),
    ("192.168.1.5/32", ["192.168.1.5"], ["192.168.1.6"]),
    ("192.168.1.77/24", ["192.168.1.1"], ["192.168.2.1"]),  # host bits are ignored, as in PostgreSQL
    ("0.0.0.0/0", ["1.2.3.4", "255.255.255.255"], ["::1"]),
    ("192.168.1.0 255.255.255.0", ["192.168.1.200"], ["192.168.0.1"]),
    ("127.0.0.1 255.255.255.255", ["127.0.0.1"], ["127.0.0.2"]),
    ("10.0.0.0 0.0.0.0", ["203.0.113.9"], ["2001:db8::1"]),
    ("::1/128", ["::1"], ["::2", "127.0.0.1"]),
    ("2001:db8::/32", ["2001:db8::1", "2001:db8:ffff::1"], ["2001:db9::1", "10.0.0.1"]),
    ("fe80:: ffff:ffff:ffff:ffff::", ["fe80::1234"], ["fe81::1"]),
    ("::/0", ["::1", "2001:db8::5"], ["10.0.0.1"]),
    ("all", ["10.0.0.1", "::1", "::ffff:1.2.3.4"], []),
])
def test_addresses(address, inside, outside):
    text = f"host all all {address} trust"
    for addr in inside:
        assert lineno(text, addr=addr) == 1, addr
    for addr in outside:
        assert lineno(text, addr=addr) is None, addr


def test_netmask_column_becomes_a_network():
    rule = parse_hba("host all all 192.168.1.0 255.255.255.0 md5 # netmask").rules[0]
    assert rule.network == ipaddress.ip_network("192.168.1.0/24")
    assert rule.method == "md5"


@pytest.mark.parametrize("address", ["1.2.3.0/24", "1.2.3.4/32", "0.0.0.0/0", "1.2.3.4 255.255.255.255"])
def test_ipv4_mapped_ipv6_client_matches_ipv4_rules(address):
    text = f"host all all {address} trust"
    assert lineno(text, addr="::ffff:1.2.3.4") == 1
    assert lineno(text, addr="::ffff:9.9.9.9") == (1 if address == "0.0.0.0/0" else None)


def test_ipv4_mapped_ipv6_client():
    text = "host all all 1.2.3.0/24 trust\nhost all all ::ffff:0:0/96 md5\nhost all all ::/0 password\n"
    assert first(text, addr="::ffff:1.2.3.4").method == "trust"
    assert first(text, addr="::ffff:9.9.9.9").method == "md5"  # an IPv6 rule covering mapped addresses
    assert first(text, addr="2001:db8::1").method == "password"
    assert lineno("host all all 1.2.3.0/24 trust", addr="::ffff:1.2.4.1") is None
    assert lineno("host all all 1.2.3.0/24 trust", addr="::1.2.3.4") is None  # IPv4-compatible is not mapped


def test_ipv6_client_with_zone_id():
    assert lineno("host all all fe80::/10 trust", addr="fe80::1%eth0") == 1


def test_match_argument_errors():
    rules = parse_hba("host all all all trust")
    with pytest.raises(ValueError):
        rules.match(conn_type="tcp", database="d", user="u", addr="1.2.3.4", tls=False)
    with pytest.raises(ValueError):
        rules.match(conn_type="host", database="d", user="u", addr=None, tls=False)
    with pytest.raises(ValueError):
        rules.match(conn_type="host", database="d", user="u", addr="not-an-ip", tls=False)


# ---------------------------------------------------------------- ordering, reject, no match

def test_first_match_wins():
    text = """\
host  db    alice 10.0.0.0/8   reject
host  all   alice 10.0.0.0/8   md5
host  all   all   all          scram-sha-256
local all   all                trust
"""
    assert first(text, database="db").method == "reject"
    assert first(text, database="other").method == "md5"
    assert first(text, database="db", addr="192.0.2.1").method == "scram-sha-256"
    assert first(text, database="db", user="bob").method == "scram-sha-256"
    assert first(text, conn_type="local").method == "trust"
    assert [r.lineno for r in parse_hba(text).rules] == [1, 2, 3, 4]


def test_reject_rule_is_returned_not_skipped():
    text = "hostnossl all all all reject\nhost all all all trust\n"
    assert first(text, tls=False).method == "reject"
    assert first(text, tls=True).method == "trust"


def test_no_match_is_none():
    text = "hostssl all all all md5\nlocal db all trust\n"
    assert first(text, tls=False) is None
    assert first(text, conn_type="local", database="other") is None


def test_no_match_message_tcp():
    assert no_match_message(addr="1.2.3.4", user="u", database="d", tls=True) == \
        'no pg_hba.conf entry for host "1.2.3.4", user "u", database "d", SSL encryption'
    assert no_match_message(addr="::ffff:1.2.3.4", user="u", database="d", tls=False) == \
        'no pg_hba.conf entry for host "::ffff:1.2.3.4", user "u", database "d", no encryption'


def test_no_match_message_unix():
    assert no_match_message(addr=None, user="u", database="d", tls=False) == \
        'no pg_hba.conf entry for host "[local]", user "u", database "d", no encryption'


# ---------------------------------------------------------------- lexical details

def test_comments_and_blank_lines():
    text = "# header\n\n   \t\n  # indented comment\nhost all all all trust # trailing\n#host all all all reject\n"
    rules = parse_hba(text).rules
    assert len(rules) == 1 and rules[0].lineno == 5


def test_comment_glued_to_a_field():
    assert parse_hba("host all all all md5#no space").rules[0].method == "md5"


def test_hash_inside_quotes_is_not_a_comment():
    assert parse_hba('host "db#1" all all trust').rules[0].databases == frozenset({"db#1"})


def test_crlf_line_endings():
    rules = parse_hba("host all all all trust\r\nlocal all all md5\r\n").rules
    assert [(r.lineno, r.method) for r in rules] == [(1, "trust"), (2, "md5")]


def test_continuation_lines():
    text = "# x\nhost db1,\\\n  db2 alice \\\n  10.0.0.0/8 \\\n  md5\nlocal all all trust\n"
    rules = parse_hba(text).rules
    assert rules[0].lineno == 2
    assert rules[0].databases == frozenset({"db1", "db2"})
    assert rules[0].network == ipaddress.ip_network("10.0.0.0/8")
    assert rules[1].lineno == 6


def test_continuation_inside_quotes_and_comments():
    rule = parse_hba('host "my\\\ndb" all all trust\n').rules[0]
    assert rule.databases == frozenset({"mydb"})
    # a comment ending in a backslash swallows the next line, as in PostgreSQL
    rules = parse_hba("local all all trust # comment \\\nhost all all all reject\n").rules
    assert [r.method for r in rules] == ["trust"]


def test_continuation_at_end_of_file():
    assert parse_hba("local all all trust\\").rules[0].method == "trust"


def test_backslash_elsewhere_is_literal():
    assert parse_hba("local a\\b all trust").rules[0].databases == frozenset({"a\\b"})


def test_tabs_separate_fields():
    assert parse_hba("host\tall\tall\t::1/128\ttrust").rules[0].network == ipaddress.ip_network("::1/128")


# ---------------------------------------------------------------- options

def test_options():
    text = ("hostssl all all all cert map=mymap\n"
            "hostssl all all all md5 clientcert=verify-full\n"
            "hostssl all all all cert clientcert=verify-full,map=m2\n")
    rules = parse_hba(text).rules
    assert rules[0].options == {"map": "mymap"}
    assert rules[1].options == {"clientcert": "verify-full"}
    assert rules[2].options == {"clientcert": "verify-full", "map": "m2"}


def test_quoted_option_value():
    assert parse_hba('hostssl all all all cert "map=my map"').rules[0].options == {"map": "my map"}


def test_rules_are_hashable_and_comparable():
    a = parse_hba("hostssl all all all cert map=x").rules[0]
    b = parse_hba("hostssl all all all cert map=x").rules[0]
    assert a == b and hash(a) == hash(b)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("line, message", [
    ("hostgssenc all all all trust", 'connection type "hostgssenc" is not supported: pgmp has no GSSAPI'),
    ("hostnogssenc all all all trust", 'connection type "hostnogssenc" is not supported: pgmp has no GSSAPI'),
    ("hots all all all trust", 'invalid connection type "hots"'),
    ("host,local all all all trust", "multiple values given for the connection type"),
    ("include other.conf", '"include" directives are not supported by pgmp'),
    ("include_if_exists other.conf", '"include_if_exists" directives are not supported by pgmp'),
    ("include_dir conf.d", '"include_dir" directives are not supported by pgmp'),
    ("host @dbs.txt all all trust", "database file inclusion (@dbs.txt) is not supported by pgmp"),
    ("host all @users.txt all trust", "user file inclusion (@users.txt) is not supported by pgmp"),
    ("host all +admins all trust", "group membership (+admins) is not supported by pgmp"),
    ("host all alice,+admins all trust", "group membership (+admins) is not supported by pgmp"),
    ("host samerole all all trust", 'database keyword "samerole" is not supported by pgmp'),
    ("host samegroup all all trust", 'database keyword "samegroup" is not supported by pgmp'),
    ("host /^db all all trust", "database regular expressions (/^db) are not supported by pgmp"),
    ("host all all samehost trust", 'address keyword "samehost" is not supported by pgmp'),
    ("host all all samenet trust", 'address keyword "samenet" is not supported by pgmp'),
    ("host all all db.example.com trust", '"db.example.com" is not an IP address; host names are not supported'),
    ("host all all .example.com trust", "pgmp does not resolve them"),
    ('host all all "all" trust', '"all" is not an IP address; host names are not supported'),
    ("host all all 10.0.0.0/33 trust", 'invalid CIDR mask in address "10.0.0.0/33"'),
    ("host all all ::1/129 trust", 'invalid CIDR mask in address "::1/129"'),
    ("host all all 10.0.0.0/x trust", "invalid CIDR mask"),
    ("host all all 10.0.0.0/ trust", "invalid CIDR mask"),
    ("host all all 10.0.0.300/8 trust", 'invalid IP address "10.0.0.300"'),
    ("host all all example.com/24 trust", 'invalid IP address "example.com"'),
    ("host all all 10.0.0.0 255.0.255.0 trust", 'invalid IP mask "255.0.255.0": not a contiguous netmask'),
    ("host all all 10.0.0.0 0.0.0.255 trust", "not a contiguous netmask"),
    ("host all all 10.0.0.0 ffff:: trust", 'invalid IP mask "ffff::" for address 10.0.0.0'),
    ("host all all 10.0.0.0 trust", 'invalid IP mask "trust"'),
    ("host all all 10.0.0.0", "end of line before the netmask"),
    ("host all all 10.0.0.0/8,::1/128 trust", "multiple values given for the address"),
    ("host all all all peer", 'authentication method "peer" is not supported by pgmp'),
    ("host all all all ident", 'authentication method "ident" is not supported by pgmp'),
    ("host all all all ldap ldapserver=x", 'authentication method "ldap" is not supported by pgmp'),
    ("host all all all radius", 'authentication method "radius" is not supported by pgmp'),
    ("host all all all pam", 'authentication method "pam" is not supported by pgmp'),
    ("host all all all gss", 'authentication method "gss" is not supported by pgmp'),
    ("host all all all sspi", 'authentication method "sspi" is not supported by pgmp'),
    ("host all all all bsd", 'authentication method "bsd" is not supported by pgmp'),
    ("local all all peer", 'authentication method "peer" is not supported by pgmp'),
    ("host all all all krb5", 'invalid authentication method "krb5"'),
    ("host all all all md5,trust", "multiple values given for the authentication method"),
    ("host all all all cert", 'authentication method "cert" is only supported on "hostssl" rows'),
    ("host all all all md5 clientcert=verify-full", 'clientcert can only be configured for "hostssl" rows'),
    ("hostssl all all all md5 clientcert=1", 'invalid value for clientcert: "1"'),
    ("hostssl all all all cert clientcert=verify-ca",
     'clientcert only accepts "verify-full" when using "cert" authentication'),
    ("hostssl all all all md5 map=m", 'authentication option "map" is only valid for authentication method "cert"'),
    ("hostssl all all all cert map=", 'authentication option "map" needs a map name'),
    ("hostssl all all all cert map=a map=b", 'authentication option "map" given twice'),
    ("hostssl all all all md5 pamservice=x", 'unrecognized authentication option name: "pamservice"'),
    ("hostssl all all all md5 clientcert", 'authentication option not in name=value format: "clientcert"'),
    ("local", "end of line before the database"),
    ("local all", "end of line before the user"),
    ("local all all", "end of line before the authentication method"),
    ("host all all", "end of line before the address"),
    ("host all all all", "end of line before the authentication method"),
    ('host "unterminated all all trust', "unterminated quoted string"),
    ("host db1,,db2 all all trust", "empty item in a comma-separated list"),
    ("host db1, db2 all all trust", None),  # "db1, db2" is one list
    ("host db1,# all all trust", "empty item in a comma-separated list"),
])
def test_errors_name_path_and_line(line, message):
    text = "# leading comment\nlocal all all trust\n" + line + "\n"
    if message is None:
        parse_hba(text)
        return
    assert error_of(text).startswith("/etc/pgmp/hba.conf:3: ")
    assert message in error_of(text)


def test_every_bad_line_is_reported():
    with pytest.raises(HbaError) as info:
        parse_hba("host all all all peer\nlocal all all trust\nhost all all samenet md5\n", "hba.conf")
    assert info.value.errors == [
        'hba.conf:1: authentication method "peer" is not supported by pgmp'
        ' (supported: trust, reject, password, md5, scram-sha-256, cert)',
        'hba.conf:3: address keyword "samenet" is not supported by pgmp; write the addresses as CIDR',
    ]
    assert str(info.value) == "\n".join(info.value.errors)


def test_error_in_a_continued_record_names_its_first_line():
    assert error_of("local all all trust\nhost all \\\n all \\\n all peer\n").startswith(
        "/etc/pgmp/hba.conf:2: ")


def test_default_path_in_errors():
    with pytest.raises(HbaError, match=r"^<string>:1: invalid connection type"):
        parse_hba("bogus all all trust")


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n   \n"])
def test_no_rules_is_an_error(text):
    assert "contains no rules" in error_of(text)


# ---------------------------------------------------------------- load_hba

def test_load_hba(tmp_path):
    path = tmp_path / "hba.conf"
    path.write_text("local all all trust\nhost all all ::1/128 md5\n")
    rules = load_hba(str(path))
    assert [r.method for r in rules.rules] == ["trust", "md5"]
    assert load_hba(path).rules == rules.rules  # PathLike works too


def test_load_hba_errors_name_the_file(tmp_path):
    path = tmp_path / "hba.conf"
    path.write_text("local all all trust\nhost all all all ident\n")
    with pytest.raises(HbaError, match=rf"^{path}:2: authentication method \"ident\""):
        load_hba(str(path))


def test_load_hba_missing_file(tmp_path):
    with pytest.raises(HbaError, match="cannot read the hba file"):
        load_hba(str(tmp_path / "missing.conf"))


def test_load_hba_not_utf8(tmp_path):
    path = tmp_path / "hba.conf"
    path.write_bytes(b"local all all trust\nhost caf\xe9 all all trust\n")
    with pytest.raises(HbaError, match=rf"^{path}:2: not valid UTF-8"):
        load_hba(str(path))


# ---------------------------------------------------------------- robustness

_ALPHABET = st.sampled_from(list('abclhost al/.:0123456789,"#\\\n\t =+@-ffff') + [
    "host", "local", "hostssl", "hostnossl", "all", "sameuser", "replication", "samenet",
    "trust", "md5", "cert", "scram-sha-256", "10.0.0.0", "/24", "255.255.0.0", "::1",
    "clientcert=", "verify-full", "map=", "\r", "\x00", "é", "\u2028",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_parse_never_raises_anything_but_hba_error(text):
    try:
        rules = parse_hba(text)
    except HbaError as e:
        assert str(e)
        return
    for rule in rules.rules:  # a parsed file can always be matched against
        rules.match(conn_type="host", database="d", user="u", addr="::ffff:10.0.0.1", tls=True)
        assert rule.method in ("trust", "reject", "password", "md5", "scram-sha-256", "cert")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises_anything_but_hba_error_on_any_text(text):
    try:
        parse_hba(text)
    except HbaError:
        pass
