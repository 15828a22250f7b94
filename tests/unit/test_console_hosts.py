"""SHOW HOSTS and SHOW DNS_HOSTS made from gathered reports (the master's host table, each worker's)."""
from pgmp import config as configmod
from pgmp import console

CFG = configmod.loads("""
[pgmp]
auth_type = "trust"

[databases.appdb]
host = ["10.0.0.1", "10.0.0.2"]
max_replica_lag = 1

[databases.solo]
host = "/run/pg"
""")


def master_row(host, role, up=True, lag=None, banned=False):
    return {"host": host, "port": 5432, "role": role, "up": up, "lag": lag, "banned": banned,
            "banned_until_epoch": 2000.0 if banned else None, "last_check": 1000.0}


def test_show_hosts_merges_the_checks_and_the_workers():
    report = {
        "hosts": [master_row("10.0.0.1", "primary"), master_row("10.0.0.2", "standby", lag=2.5)],
        "workers": [
            {"hosts": [{"host": "10.0.0.1", "port": 5432, "role": "primary", "role_at": 5.0, "banned": True,
                        "banned_until_epoch": 1500.0}]},
            {"hosts": [{"host": "/run/pg", "port": 5432, "role": "primary", "role_at": 3.0, "banned": False,
                        "banned_until_epoch": None}]},
        ],
    }
    columns, rows = console.show_hosts(CFG, report)
    assert [c for c, _ in columns] == ["database", "host", "port", "role", "state", "lag", "banned_until",
                                       "last_check"]
    assert rows == [
        ("appdb", "10.0.0.1", 5432, "primary", "banned", None, 1500.0, 1000.0),   # a worker banned it
        ("appdb", "10.0.0.2", 5432, "standby", "lagging", "2.500", None, 1000.0),
        ("solo", "/run/pg", 5432, "primary", "up", None, None, None),            # not checked: workers know
    ]


def test_show_hosts_down_and_unknown():
    report = {"hosts": [master_row("10.0.0.1", "unknown", up=False, banned=True)], "workers": []}
    rows = console.show_hosts(CFG, report)[1]
    assert rows[0][3:5] == ("unknown", "down") and rows[0][6] == 2000.0
    assert rows[1][3:5] == ("unknown", "unknown")
    assert rows[2][3:5] == ("unknown", "unknown")


def test_show_dns_hosts_keeps_the_longest_lived_answer():
    report = {"dns": [{"hostname": "db1", "ttl": 3, "addrs": "10.0.0.1"}],
              "workers": [{"dns": [{"hostname": "db1", "ttl": 9, "addrs": "10.0.0.9"},
                                   {"hostname": "db0", "ttl": 1, "addrs": ""}]}]}
    columns, rows = console.show_dns_hosts(report)
    assert columns == [("hostname", "s"), ("ttl", "q"), ("addrs", "s")]
    assert rows == [("db0", 1, ""), ("db1", 9, "10.0.0.9")]
    assert dict(console.show_lists(CFG, report)[1])["dns_names"] == 2


def test_show_databases_lists_the_hosts():
    rows = {r[0]: r for r in console.show_databases(CFG, {"workers": []})[1]}
    assert rows["appdb"][1:3] == ("10.0.0.1,10.0.0.2", 5432) and rows["appdb"][10] == "disable"
    assert rows["solo"][1] == "/run/pg" and rows["solo"][10] is None
