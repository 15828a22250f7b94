"""The sans-IO session rules (pgmp.session): transaction tracking, session parameters, state transitions."""
from __future__ import annotations

import itertools
import re

import pytest

from pgmp import errors
from pgmp.errors import ClientProtocolError
from pgmp.protocol.messages import query
from pgmp.protocol.startup import StartupPacket
from pgmp.session import (TRANSITIONS, ClientState, IllegalTransition, check_transition,
                          SHARED_PARAMETERS, SharedDict, Sharing, client_settings, login_parameters, normalize,
                          quote_literal, settings_query)

# ---- quoting and normalization -------------------------------------------------------

@pytest.mark.parametrize("value, literal", [
    ("plain", "'plain'"),
    ("it's", "'it''s'"),
    ("a\\b", "E'a\\\\b'"),
    ("it's a \\ test", "E'it''s a \\\\ test'"),
    ("", "''"),
    ("Europe/Paris", "'Europe/Paris'"),
])
def test_quote_literal(value, literal):
    assert quote_literal(value) == literal


def test_quote_literal_refuses_nul():
    with pytest.raises(ValueError):
        quote_literal("a\0b")


@pytest.mark.parametrize("name, a, b", [
    ("client_encoding", "utf-8", "UTF8"),
    ("client_encoding", "utf_8", "UTF8"),
    ("DateStyle", "iso, mdy", "ISO,MDY"),
    ("datestyle", "ISO,  DMY", "iso, dmy"),
])
def test_normalize_makes_equivalent_spellings_equal(name, a, b):
    assert normalize(name, a) == normalize(name, b)


def test_normalize_leaves_other_settings_alone():
    assert normalize("application_name", "A b") == "A b"
    assert normalize("TimeZone", "utc") != normalize("TimeZone", "UTC")


# ---- settings_query ------------------------------------------------------------------

def sql_of(q: bytes | None) -> str | None:
    if q is None:
        return None
    assert q[:1] == b"Q" and q.endswith(b"\0")
    assert int.from_bytes(q[1:5], "big") == len(q) - 1
    return q[5:-1].decode()


_CALL = re.compile(r"pg_catalog\.set_config\((E?)'((?:[^']|'')*)', (E?)'((?:[^']|'')*)', false\)")


def _unquote(escape: str, body: str) -> str:
    body = body.replace("''", "'")
    return body.replace("\\\\", "\\") if escape else body


def assignments(q: bytes | None) -> list[tuple[str, str]] | None:
    """The (name, value) pairs a settings query sets, in order, decoded from its SQL literals.

    The query must be one SELECT of set_config(name, value, false) calls and nothing else:
    set_config takes a value the way a startup option does (search_path 'a,b' stays a list).
    """
    sql = sql_of(q)
    if sql is None:
        return None
    assert sql.startswith("SELECT "), sql
    out, pos = [], len("SELECT ")
    while True:
        m = _CALL.match(sql, pos)
        assert m, f"not a set_config call at {sql[pos:]!r} in {sql!r}"
        out.append((_unquote(m[1], m[2]), _unquote(m[3], m[4])))
        pos = m.end()
        if pos == len(sql):
            return out
        assert sql.startswith(", ", pos), sql
        pos += 2


def test_settings_query_none_when_nothing_is_wanted():
    assert settings_query({}, {}, {"application_name": "x"}) is None


def test_settings_query_resets_what_an_earlier_client_set_and_this_one_did_not_ask_for():
    applied = {"a": "1", "search_path": "s"}
    q = settings_query({"search_path": "s"}, applied, {})
    assert q.endswith(b"RESET a\0") and b"set_config" not in q
    assert applied == {"search_path": "s"}


def test_settings_query_session_user_then_role_reset_first_then_set():
    """Resetting or setting the session user resets the role: both go before the role."""
    applied = {"role": "r1", "session_authorization": "u1", "a": "1"}
    q = settings_query({"role": "r2", "session_authorization": "u2", "b": "2"}, applied, {})
    assert q[5:].startswith(b"RESET a;SELECT ")
    assert assignments(query(q[5:-1].decode().removeprefix("RESET a;"))) == [
        ("session_authorization", "u2"), ("role", "r2"), ("b", "2")]
    applied = {"b": "2", "role": "r1", "session_authorization": "u1"}
    assert settings_query({"b": "2"}, applied, {}) == query("RESET session_authorization;RESET role")
    assert applied == {"b": "2"}


def test_settings_query_sends_only_differences():
    wanted = {"application_name": "app", "search_path": "s1", "statement_timeout": "5s"}
    applied = {"search_path": "s1"}
    reported = {"application_name": "app"}
    assert assignments(settings_query(wanted, applied, reported)) == [("statement_timeout", "5s")]


def test_settings_query_several_settings_in_one_query():
    q = settings_query({"application_name": "a", "search_path": "x, public"}, {}, {"application_name": "b"})
    assert assignments(q) == [("application_name", "a"), ("search_path", "x, public")]


@pytest.mark.parametrize("value", ["it's", "a\\b", "it's a \\ 'test' \\\\", "", "x'); drop table t; --"])
def test_settings_query_quotes_values(value):
    assert assignments(settings_query({"application_name": value}, {}, {})) == [("application_name", value)]


def test_settings_query_normalizes_encoding_and_datestyle():
    # names are lower case here: client_settings lower-cases them, servers keep reported_lc
    wanted = {"client_encoding": "utf-8", "datestyle": "iso, mdy"}
    assert settings_query(wanted, {}, {"client_encoding": "UTF8", "datestyle": "ISO, MDY"}) is None
    q = settings_query(wanted, {}, {"client_encoding": "LATIN1", "datestyle": "German, DMY"})
    assert assignments(q) == [("client_encoding", "utf-8"), ("datestyle", "iso, mdy")]


def test_settings_query_trusts_what_pgmp_applied():
    assert settings_query({"search_path": "s"}, {"search_path": "s"}, {}) is None
    assert assignments(settings_query({"search_path": "s"}, {"search_path": "other"}, {})) == [("search_path", "s")]


def test_settings_query_setting_names_are_case_insensitive():
    """GUC names are case-insensitive: PGOPTIONS='-c timezone=UTC' asks for the TimeZone the server
    reports as "TimeZone". A value reported under the server's spelling must count, and must win
    over what pgmp applied earlier under the client's spelling (server.py drops applied[name] by
    the reported spelling only, so a stale applied["timezone"] would hide another client's SET)."""
    sp = StartupPacket("startup", params={"user": "u", "TimeZone": "UTC", "options": "-c DateStyle=ISO"})
    assert client_settings(sp) == {"timezone": "UTC", "datestyle": "ISO"}
    reported_lc = {k.lower(): v for k, v in {"TimeZone": "UTC"}.items()}     # as ServerConnection keeps it
    assert settings_query({"timezone": "UTC"}, {}, reported_lc) is None


# ---- login_parameters ----------------------------------------------------------------

SERVER_PARAMS = {
    "application_name": "", "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "TimeZone": "UTC",
    "server_version": "15.6", "integer_datetimes": "on", "standard_conforming_strings": "on",
}


def test_login_parameters_are_the_pools_when_the_client_asks_nothing():
    out = login_parameters(SERVER_PARAMS, {})
    assert out == SERVER_PARAMS
    assert out is not SERVER_PARAMS


def test_clients_with_the_same_login_parameters_share_one_dict_and_copy_it_to_change_it():
    """SHARED_PARAMETERS (memory per idle client) and ClientConnection.report: a ParameterStatus
    one client records never reaches another that logged in with the same values."""
    from types import SimpleNamespace

    from pgmp.client import ClientConnection
    values = login_parameters(SERVER_PARAMS, {"application_name": "shared-app"})
    a = SimpleNamespace(reported=SHARED_PARAMETERS.get(values), pool=None)
    b = SimpleNamespace(reported=SHARED_PARAMETERS.get(dict(values)), pool=None)
    assert a.reported is b.reported and type(a.reported) is SharedDict
    assert ClientConnection.report(a, "application_name", "mine") is True
    assert a.reported["application_name"] == "mine" and type(a.reported) is dict
    assert b.reported["application_name"] == "shared-app" and b.reported == values
    assert ClientConnection.report(b, "application_name", "shared-app") is False   # it has it already
    assert SHARED_PARAMETERS.get(dict(values)) is b.reported


def test_a_shared_dict_lives_only_as_long_as_a_client_holds_it():
    """Sharing is a weak cache: the values of clients that left are not kept (no growth with
    the clients that ever logged in, e.g. each with its own application_name)."""
    sharing = Sharing()
    held = [sharing.get({"application_name": f"app-{i}"}) for i in range(100)]
    assert len(sharing) == 100
    del held[10:]
    assert len(sharing) == 10
    assert sharing.get({"application_name": "app-3"}) is held[3]


def test_login_parameters_take_the_clients_requests():
    before = dict(SERVER_PARAMS)
    out = login_parameters(SERVER_PARAMS, {"application_name": "psql", "datestyle": "German",
                                           "timezone": "Europe/Paris", "search_path": "x"})
    assert SERVER_PARAMS == before                       # not modified
    assert out["application_name"] == "psql"
    assert out["DateStyle"] == "German"
    assert out["TimeZone"] == "Europe/Paris"
    assert "search_path" not in out                      # the server does not report it
    assert out["server_version"] == "15.6"


@pytest.mark.parametrize("asked, reported", [
    ("utf-8", "UTF8"), ("utf8", "UTF8"), ("UNICODE", "UTF8"), ("latin1", "LATIN1"),
    ("ISO-8859-1", "LATIN1"), ("sql_ascii", "SQL_ASCII"), ("euc-jp", "EUC_JP"), ("win1252", "WIN1252"),
])
def test_login_parameters_report_the_canonical_encoding(asked, reported):
    assert login_parameters(SERVER_PARAMS, {"client_encoding": asked})["client_encoding"] == reported


def test_login_parameters_application_name_even_if_the_server_did_not_report_it():
    params = {k: v for k, v in SERVER_PARAMS.items() if k != "application_name"}
    assert login_parameters(params, {"application_name": "app"})["application_name"] == "app"


# ---- client_settings -----------------------------------------------------------------

def startup(**params: str) -> StartupPacket:
    return StartupPacket("startup", params={"user": "u", "database": "d", **params})


def test_client_settings_from_options_and_parameters():
    sp = startup(options="-c a=b --c-d=e -cstatement_timeout=5s", application_name="app",
                 client_encoding="UTF8")
    assert client_settings(sp) == {"a": "b", "c_d": "e", "statement_timeout": "5s",
                                   "application_name": "app", "client_encoding": "UTF8"}


def test_client_settings_leave_out_user_database_and_options():
    assert client_settings(startup()) == {}
    assert client_settings(startup(options="")) == {}


def test_client_settings_escaped_spaces_in_options():
    sp = startup(options=r"-c search_path=my\ schema,public  -c application_name=a\\b\ c")
    assert client_settings(sp) == {"search_path": "my schema,public", "application_name": "a\\b c"}


def test_client_settings_a_parameter_wins_over_the_same_option():
    # PostgreSQL applies the options first, then the other startup parameters
    sp = startup(options="-c application_name=from_options", application_name="from_parameter")
    assert client_settings(sp)["application_name"] == "from_parameter"


@pytest.mark.parametrize("options, sqlstate", [
    ("-d 5", errors.FEATURE_NOT_SUPPORTED),          # a backend switch pgmp cannot apply on pooled servers
    ("-c novalue", errors.PROTOCOL_VIOLATION),
    ("-c =x", errors.PROTOCOL_VIOLATION),
    ("-c bad;name=1", errors.PROTOCOL_VIOLATION),
    ("--x y=1", errors.FEATURE_NOT_SUPPORTED),
])
def test_client_settings_refuse_bad_options(options, sqlstate):
    with pytest.raises(ClientProtocolError) as info:
        client_settings(startup(options=options))
    assert info.value.sqlstate == sqlstate


@pytest.mark.parametrize("name", ["bad name", "x;drop table t", "1abc", "a'b", ""])
def test_client_settings_refuse_names_that_are_not_identifiers(name):
    sp = StartupPacket("startup", params={"user": "u", name: "v"})
    with pytest.raises(ClientProtocolError) as info:
        client_settings(sp)
    assert info.value.sqlstate == errors.PROTOCOL_VIOLATION


def test_client_settings_reach_the_settings_query_as_asked():
    settings = client_settings(startup(options=r"-c my.custom_opt=1 -c search_path=a,\ b", geqo="off"))
    assert assignments(settings_query(settings, {}, {})) == [
        ("my.custom_opt", "1"), ("search_path", "a, b"), ("geqo", "off")]


# ---- state transitions ---------------------------------------------------------------

S_ = ClientState
LEGAL = {
    (S_.STARTUP, S_.STARTUP), (S_.STARTUP, S_.AUTH), (S_.STARTUP, S_.CLOSED),
    (S_.STARTUP, S_.AUTH_LOOKUP), (S_.AUTH_LOOKUP, S_.AUTH), (S_.AUTH_LOOKUP, S_.CLOSED),
    (S_.AUTH, S_.LOGIN_WAIT), (S_.AUTH, S_.IDLE), (S_.AUTH, S_.CLOSED),
    (S_.LOGIN_WAIT, S_.IDLE), (S_.LOGIN_WAIT, S_.ACTIVE), (S_.LOGIN_WAIT, S_.CLOSED),
    (S_.IDLE, S_.WAITING), (S_.IDLE, S_.ACTIVE), (S_.IDLE, S_.CLOSED),
    (S_.WAITING, S_.ACTIVE), (S_.WAITING, S_.CLOSED),
    (S_.ACTIVE, S_.IDLE), (S_.ACTIVE, S_.CLOSED),
    (S_.STARTUP, S_.CONSOLE), (S_.AUTH, S_.CONSOLE), (S_.CONSOLE, S_.CLOSED),
}


@pytest.mark.parametrize("old, new", sorted(LEGAL, key=lambda p: (p[0].value, p[1].value)),
                         ids=lambda s: s.value)
def test_legal_transitions(old, new):
    check_transition(old, new)


@pytest.mark.parametrize("old, new", sorted(set(itertools.product(ClientState, repeat=2)) - LEGAL,
                                            key=lambda p: (p[0].value, p[1].value)), ids=lambda s: s.value)
def test_every_other_transition_raises(old, new):
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert old.value in str(info.value) and new.value in str(info.value)


def test_transition_table_covers_every_state():
    assert set(TRANSITIONS) == set(ClientState)
    assert TRANSITIONS[ClientState.CLOSED] == frozenset()


def test_settings_query_sends_a_value_as_the_bytes_the_client_sent():
    """A SET whose text is not UTF-8 (a LATIN1 client, a SQL_ASCII database) is read with
    surrogateescape; replaying it on the next server sends the client's own bytes back, not a
    UnicodeEncodeError (found by the link fuzz harness: tests/fuzz/crashes/link-37409b1eab428e9d)."""
    from pgmp.protocol.sql import session_effects
    (effect,) = session_effects(b"SET application_name = 'caf\xe9'\0")
    q = settings_query({effect.name: effect.value}, {}, {})
    assert b"'caf\xe9'" in q
