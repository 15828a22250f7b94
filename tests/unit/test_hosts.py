"""The choice of a host (pgmp.hosts), fed states and checked: roles, balancing, bans, lag, what wins."""
import random

import pytest

from pgmp.config import HostSpec
from pgmp.hosts import ANY_FRESH, HostState, HostTable, fits, fits_pool, host_failure

P, S1, S2 = HostSpec("10.0.0.1", 5432), HostSpec("10.0.0.2", 5432), HostSpec("10.0.0.3", 5433)
HOSTS = (S1, P, S2)


def table(**roles) -> HostTable:
    """A table where each host named by keyword (p, s1, s2) has the role given: "primary", "standby",
    "unknown", or (role, lag)."""
    t = HostTable(random.Random(7))
    for name, role in roles.items():
        spec = {"p": P, "s1": S1, "s2": S2}[name]
        lag = None
        if isinstance(role, tuple):
            role, lag = role
        st = t.get(spec)
        if role != "unknown":
            st.set_role(role == "standby", role == "read-only-primary", 1.0)
        st.up, st.lag, st.checked_at = True, lag, 1.0
    return t


def state(role, read_only=None, lag=None) -> HostState:
    st = HostState(P)
    if role is not None:
        st.set_role(role == "standby", read_only, 1.0)
    st.lag = lag
    return st


@pytest.mark.parametrize("target, primary, standby, unknown", [
    ("any", True, True, True),
    ("read-write", True, False, None),
    ("primary", True, False, None),
    ("read-only", False, True, None),
    ("standby", False, True, None),
])
def test_fits_by_role(target, primary, standby, unknown):
    assert fits(target, state("primary", read_only=False)) is primary
    assert fits(target, state("standby")) is standby
    assert fits(target, state(None)) is unknown


def test_read_only_primary_is_read_only_but_not_a_standby():
    st = state("primary", read_only=True)          # default_transaction_read_only = on
    assert fits("read-write", st) is False and fits("read-only", st) is True
    assert fits("primary", st) is True and fits("standby", st) is False


def test_a_lagging_standby_leaves_the_read_targets_only():
    st = state("standby", lag=5.0)
    assert fits("standby", st, max_lag=2.0) is False and fits("read-only", st, max_lag=2.0) is False
    assert fits("any", st, max_lag=2.0) is True            # libpq's "any" knows nothing of lag
    assert fits(ANY_FRESH, st, max_lag=2.0) is False
    assert fits("standby", st, max_lag=0) is True           # 0 = no limit
    assert fits("standby", st, max_lag=10.0) is True
    assert fits("standby", state("standby", lag=None), max_lag=1.0) is True   # unknown lag is not lag


def test_prefer_standby_fits_a_pool_either_way():
    assert fits_pool("prefer-standby", state("standby"), 0) is True
    assert fits_pool("prefer-standby", state("primary", read_only=False), 0) is True
    assert fits_pool("prefer-standby", state("standby", lag=9.0), 1.0) is False
    assert fits_pool("standby", state(None), 0) is None


def test_read_write_goes_to_the_primary_wherever_it_is_listed():
    t = table(p="primary", s1="standby", s2="standby")
    for balance in ("disable", "random", "round-robin"):
        assert {t.choose(HOSTS, "read-write", balance, 0, 2.0, turn) for turn in range(10)} == {P}


def test_disable_takes_the_first_fitting_host_in_list_order():
    t = table(p="primary", s1="standby", s2="standby")
    assert t.choose(HOSTS, "any", "disable", 0, 2.0) == S1
    assert t.choose(HOSTS, "standby", "disable", 0, 2.0) == S1
    assert t.choose((P, S2, S1), "standby", "disable", 0, 2.0) == S2


def test_round_robin_takes_turns_among_the_fitting_hosts():
    t = table(p="primary", s1="standby", s2="standby")
    assert [t.choose(HOSTS, "standby", "round-robin", 0, 2.0, turn) for turn in range(4)] == [S1, S2, S1, S2]
    assert [t.choose(HOSTS, "any", "round-robin", 0, 2.0, turn) for turn in range(3)] == [S1, P, S2]


def test_random_spreads_over_every_fitting_host():
    t = table(p="primary", s1="standby", s2="standby")
    picks = [t.choose(HOSTS, "read-only", "random", 0, 2.0) for _ in range(200)]
    assert set(picks) == {S1, S2}
    assert 60 < picks.count(S1) < 140


def test_known_hosts_come_before_hosts_of_unknown_role():
    t = table(p="unknown", s1="standby", s2="unknown")
    assert t.choose(HOSTS, "standby", "round-robin", 0, 2.0, 1) == S1
    # no known primary: the hosts of unknown role are tried (the login tells), never a known standby
    assert {t.choose(HOSTS, "read-write", "round-robin", 0, 2.0, turn) for turn in range(4)} == {P, S2}


def test_prefer_standby_falls_back_to_the_primary_when_every_standby_lags():
    t = table(p="primary", s1=("standby", 0.0), s2=("standby", 0.2))
    assert t.choose(HOSTS, "prefer-standby", "disable", 1.0, 2.0) == S1
    t.get(S1).lag = 3.0
    assert t.choose(HOSTS, "prefer-standby", "disable", 1.0, 2.0) == S2
    t.get(S2).lag = 3.0
    assert t.choose(HOSTS, "prefer-standby", "disable", 1.0, 2.0) == P
    assert t.choose(HOSTS, "standby", "disable", 1.0, 2.0) is None
    assert "10.0.0.2:5432 standby 3.0s behind" in t.why_none(HOSTS, "standby", 1.0, 2.0)
    t.get(S1).lag = 0.0                                     # caught up: back in the read pool
    assert t.choose(HOSTS, "prefer-standby", "disable", 1.0, 2.0) == S1


def test_a_banned_host_is_left_out_until_its_ban_ends():
    t = table(p="primary", s1="standby", s2="standby")
    assert t.failed(S1, now=10.0, ban_time=30.0, why="connection refused") is True
    assert t.choose(HOSTS, "standby", "disable", 0, 11.0) == S2
    assert t.choose(HOSTS, "standby", "disable", 0, 39.9) == S2
    assert t.choose(HOSTS, "standby", "disable", 0, 40.0) == S1          # host_ban_time is over
    assert "banned for 19.0s (connection refused)" in t.why_none((S1,) * 2, "standby", 0, 21.0)


def test_every_candidate_banned_then_one_checked_up_after_its_ban_serves():
    t = table(p="primary", s1="standby")
    hosts = (P, S1)
    t.failed(P, now=10.0, ban_time=30.0, why="connection refused")
    assert t.choose(hosts, "read-write", "disable", 0, 11.0) is None       # nothing else fits: wait
    t.get(P).checked_at = 10.5                                             # a health check after the ban: up
    assert t.choose(hosts, "read-write", "disable", 0, 11.0) == P
    t.get(P).up = False                                                    # ... or down: still nothing
    assert t.choose(hosts, "read-write", "disable", 0, 11.0) is None


def test_a_host_the_checks_find_down_is_left_out_even_unbanned():
    t = table(p="primary", s1="standby", s2="standby")
    t.get(S1).up = False
    assert t.choose(HOSTS, "standby", "disable", 0, 2.0) == S2


def test_a_single_host_ignores_bans():
    t = table(p="primary")
    t.failed(P, now=10.0, ban_time=30.0, why="refused")
    t.get(P).up = False
    assert t.choose((P,), "any", "disable", 0, 11.0) == P                # server_login_retry paces it


def test_a_name_with_several_addresses_is_banned_once_each_failed():
    t = HostTable()
    assert t.failed(S1, now=1.0, ban_time=5.0, why="refused", addresses=2) is False
    assert not t.get(S1).banned(1.0) and t.get(S1).connect_failures == 1     # the next address is tried
    assert t.get(S1).address == 1
    t.succeeded(S1)                                        # the second address works: it stays the one used
    assert t.get(S1).address == 1 and t.get(S1).connect_failures == 0
    t.failed(S1, now=1.1, ban_time=5.0, why="refused", addresses=2)
    assert t.failed(S1, now=1.1, ban_time=5.0, why="refused", addresses=2) is True
    assert t.get(S1).banned(1.2) and t.get(S1).connect_failures == 0


def test_role_learned_at_login_and_the_newer_source_wins():
    t = HostTable()
    assert t.learned(P, {"in_hot_standby": "on", "default_transaction_read_only": "off"}, now=5.0) is True
    st = t.get(P)
    assert (st.role, st.read_only) == ("standby", True)
    assert t.learned(P, {"in_hot_standby": "on"}, now=6.0) is False          # nothing new
    assert t.learned(P, {"server_version": "13.2"}, now=6.5) is False        # PostgreSQL 13: says nothing
    # an older health check does not undo what a login learned since
    t.from_master([{"host": P.host, "port": P.port, "up": True, "in_recovery": False, "read_only": False,
                    "checked_at": 4.0}])
    assert st.role == "standby"
    # a newer one does: the standby was promoted
    t.from_master([{"host": P.host, "port": P.port, "up": True, "in_recovery": False, "read_only": False,
                    "checked_at": 7.0}])
    assert (st.role, st.read_only) == ("primary", False)
    assert t.learned(P, {"in_hot_standby": "off", "default_transaction_read_only": "on"}, now=8.0) is True
    assert fits("read-write", st) is False and fits("primary", st) is True


def test_master_bans_and_lag_arrive_and_a_ban_never_shrinks():
    t = HostTable()
    t.failed(S1, now=10.0, ban_time=30.0, why="local failure")
    changed = t.from_master([{"host": S1.host, "port": S1.port, "up": False, "checked_at": 12.0,
                              "banned_until": 20.0, "banned_at": 12.0, "error": "no answer", "lag": None}])
    st = t.get(S1)
    assert changed and st.banned_until == 40.0 and st.up is False and st.error == "no answer"
    t.from_master([{"host": S1.host, "port": S1.port, "up": True, "in_recovery": True, "read_only": True,
                    "lag": 2.5, "checked_at": 13.0, "banned_until": 50.0, "banned_at": 13.0}])
    assert (st.up, st.role, st.lag, st.banned_until) == (True, "standby", 2.5, 50.0)
    assert t.from_master([{"host": "bad"}, {"port": 1}]) is False        # rows it cannot read are skipped


def test_25006_makes_the_role_unknown_until_told_again():
    t = table(p="primary", s1="standby")
    t.forget_role(P, now=3.0)
    assert t.get(P).role == "unknown"
    assert t.choose((S1, P), "read-write", "disable", 0, 3.0) == P      # unknown: tried, the login tells
    t.learned(P, {"in_hot_standby": "on"}, now=4.0)
    assert t.choose((S1, P), "read-write", "disable", 0, 4.0) is None


@pytest.mark.parametrize("sqlstate, banned", [
    ("08006", True), ("08001", True), ("57P03", True), ("57P01", True), ("53300", True), ("XX000", True),
    ("28P01", False), ("28000", False), ("3D000", False), ("42501", False),
])
def test_which_failures_ban_a_host(sqlstate, banned):
    assert host_failure(sqlstate) is banned


def test_rows_for_show_hosts():
    t = table(p="primary", s1=("standby", 1.5))
    t.failed(S1, now=1.0, ban_time=2.0, why="refused")
    rows = {(r["host"], r["port"]): r for r in t.rows(now=2.0)}
    assert rows[(P.host, P.port)]["role"] == "primary" and rows[(P.host, P.port)]["banned"] is False
    assert rows[(S1.host, S1.port)]["banned"] is True and rows[(S1.host, S1.port)]["lag"] == 1.5
    assert rows[(S1.host, S1.port)]["banned_until"] == 3.0 and rows[(S1.host, S1.port)]["error"] == "refused"
