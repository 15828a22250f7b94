"""The table renderer (pgmp.tables) and the views `pgmp status`, `stats` and `top` build with it, sans-IO."""
import re

import pytest

from pgmp import stats, tables
from pgmp.tables import Column

ESCAPE = re.compile(r"\x1b")


TEXT = {"name", "note", "database", "user", "mode", "process", "state"}      # the left-aligned columns


def cell(line: str, header: str, title: str) -> str:
    """The cell of ``line`` under the column titled ``title`` (two spaces separate columns)."""
    m = re.search(rf"(?<!\S){re.escape(title)}(?!\S)", header)
    assert m, f"no column {title!r} in {header!r}"
    if title in TEXT:
        return line[m.start():].split("  ")[0].strip()          # left-aligned: starts under the title
    return line[:m.end()].rstrip().split("  ")[-1].strip()        # right-aligned: ends under the title


COLUMNS = [Column("name", shrink=True), Column("count", numeric=True),
           Column("bytes", numeric=True, drop=1), Column("note", drop=2, short="n")]
ROWS = [["appdb", "7", "12.3 MB", "x"], ["a_much_longer_database_name", "12345", "0 B", "paused"]]


# ---------------------------------------------------------------- alignment

def test_numbers_right_text_left():
    lines = tables.render(COLUMNS, ROWS).splitlines()
    assert lines[0] == "name                         count    bytes  note"
    assert lines[1] == "appdb                            7  12.3 MB  x"
    assert lines[2] == "a_much_longer_database_name  12345      0 B  paused"
    for title in ("count", "bytes"):
        ends = {line.index(cell(line, lines[0], title)) + len(cell(line, lines[0], title)) for line in lines}
        assert len(ends) == 1, (title, lines)                     # right edges line up


def test_no_trailing_spaces_and_empty_cells():
    text = tables.render([Column("a"), Column("b")], [["x", ""], ["", "y"], ["long", None]])
    assert text.splitlines() == ["a     b", "x", "      y", "long"]


def test_no_rows_is_just_the_header():
    assert tables.render(COLUMNS, []) == "name  count  bytes  note"


def test_wide_characters_count_twice():
    text = tables.render([Column("db"), Column("n", numeric=True)], [["日本", "1"], ["ab", "22"]])
    assert text.splitlines() == ["db     n", "日本   1", "ab    22"]


def test_pairs_block():
    assert tables.render_pairs([("pid", 12), ("config", "/etc/pgmp/pgmp.toml")]) == \
        "pid     12\nconfig  /etc/pgmp/pgmp.toml"


# ---------------------------------------------------------------- units

@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 kB"), (1536, "1.5 kB"), (12.3 * 1024 ** 2, "12.3 MB"),
    (1024 ** 2 - 1, "1.0 MB"), (5 * 1024 ** 3, "5.0 GB"), (3 * 1024 ** 4, "3.0 TB"), (2 * 1024 ** 6, "2048.0 PB"),
])
def test_human_bytes(n, text):
    assert tables.human_bytes(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1.0k"), (1234, "1.2k"), (12_345, "12.3k"), (123_456, "123k"),
    (999_499, "999k"), (999_600, "1.0M"), (2_500_000, "2.5M"), (7 * 10 ** 9, "7.0G"), (-1500, "-1.5k"),
])
def test_human_count(n, text):
    assert tables.human_count(n) == text


@pytest.mark.parametrize("x, text", [(0, "0"), (0.5, "0.5"), (12.34, "12.3"), (99.9, "99.9"), (1234.0, "1.2k")])
def test_human_rate(x, text):
    assert tables.human_rate(x) == text


@pytest.mark.parametrize("us, text", [
    (None, "-"), (0, "0 us"), (850, "850 us"), (1500, "1.5 ms"), (12_340, "12.3 ms"), (2_500_000, "2.5 s"),
    (90e6, "1m 30s"),
])
def test_human_us(us, text):
    assert tables.human_us(us) == text


@pytest.mark.parametrize("s, text", [
    (0, "0s"), (59.4, "59s"), (61, "1m 01s"), (3600 * 3 + 120, "3h 02m"), (86400 * 5 + 3 * 3600, "5d 03h"),
])
def test_human_seconds(s, text):
    assert tables.human_seconds(s) == text


# ---------------------------------------------------------------- width

def width_of(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_full_width_without_a_limit():
    text = tables.render(COLUMNS, ROWS, width=None)
    assert width_of(text) > 40 and "a_much_longer_database_name" in text and "paused" in text


def test_fits_by_short_titles_first():
    full = width_of(tables.render(COLUMNS, ROWS))
    text = tables.render(COLUMNS, ROWS, width=full - 3)         # "note" -> "n" is not enough: note is 6 wide
    assert width_of(text) <= full - 3
    header = text.splitlines()[0]
    assert header.split()[:3] == ["name", "count", "bytes"]


def test_drops_columns_in_their_drop_order():
    rows = [["appdb", "7", "12.3 MB", "a long note here"]]
    full = width_of(tables.render(COLUMNS, rows))
    text = tables.render(COLUMNS, rows, width=full - 1)
    assert text.splitlines()[0].split() == ["name", "count", "bytes"]      # note (drop=2) went first
    text = tables.render(COLUMNS, rows, width=len("appdb  count") + 1)
    assert text.splitlines()[0].split() == ["name", "count"]                # then bytes (drop=1)
    assert width_of(text) <= len("appdb  count") + 1


def test_abbreviates_long_text_instead_of_losing_columns():
    full = width_of(tables.render(COLUMNS[:3], ROWS))
    text = tables.render(COLUMNS[:3], ROWS, width=full - 8)
    lines = text.splitlines()
    assert width_of(text) <= full - 8
    assert lines[0].split() == ["name", "count", "bytes"]                  # nothing dropped
    assert lines[2].startswith("a_much_longer_data…  12345") and "12345" in lines[2]


def test_columns_never_dropped_stay_even_when_too_wide():
    text = tables.render(COLUMNS, ROWS, width=10)
    assert text.splitlines()[0].split() == ["name", "count"]
    assert "12345" in text


def test_ascii_ellipsis_on_request():
    text = tables.render(COLUMNS[:2], ROWS, width=20, ellipsis="~")
    assert "~" in text and "…" not in text


def test_no_escapes_unless_styled():
    assert not ESCAPE.search(tables.render(COLUMNS, ROWS))
    styled = tables.render(COLUMNS, ROWS, style=True)
    assert styled.splitlines()[0].startswith("\x1b[1m") and styled.splitlines()[0].endswith("\x1b[0m")
    assert not any(ESCAPE.search(line) for line in styled.splitlines()[1:])


class FakeStream:
    def __init__(self, tty: bool):
        self.tty = tty
        self.encoding = "utf-8"

    def isatty(self):
        return self.tty


def test_terminal_detection(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "77")
    monkeypatch.setenv("LINES", "20")
    pipe = tables.Terminal.of(FakeStream(tty=False))
    assert (pipe.tty, pipe.width, pipe.height, pipe.style) == (False, None, None, False)
    tty = tables.Terminal.of(FakeStream(tty=True))
    assert (tty.tty, tty.width, tty.height, tty.style) == (True, 77, 20, True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert tables.Terminal.of(FakeStream(tty=True)).style is False
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert tables.Terminal.of(FakeStream(tty=True)).style is False


# ---------------------------------------------------------------- the views

def pool(database, user, **counts):
    row = {"database": database, "user": user, "mode": "transaction", "pool_size": 10, "paused": False}
    row.update({name: 0 for name in stats.COUNTERS + stats.GAUGES})
    row.update(counts)
    return row


def report(xacts=(10, 30), queries=(20, 60), other_xacts=1):
    return {
        "master": {"pid": 100, "rss": 30 * 1024 * 1024, "cpu": 1.25},
        "workers": [
            {"slot": 0, "generation": 0, "pid": 101, "clients": 3, "servers": 2, "draining": None,
             "rss": 40 * 1024 * 1024, "cpu": 2.5,
             "pools": [pool("appdb", "alice", xact_count=xacts[0], query_count=queries[0], bytes_in=1000,
                            bytes_out=5000, xact_time_us=50_000, query_time_us=40_000, wait_time_us=3_000,
                            wait_count=3, cl_active=1, cl_idle=2, sv_active=1, sv_idle=1, maxwait_us=1500),
                       pool("otherdb", "bob", xact_count=other_xacts, query_count=other_xacts)]},
            {"slot": 1, "generation": 0, "pid": 102, "clients": 1, "servers": 1, "draining": None,
             "rss": 41 * 1024 * 1024, "cpu": 0.5,
             "pools": [pool("appdb", "alice", xact_count=xacts[1], query_count=queries[1], bytes_in=3000,
                            bytes_out=2 * 1024 * 1024, xact_time_us=150_000, query_time_us=120_000,
                            cl_waiting=1, sv_idle=1, sv_used=1, maxwait_us=2_500_000)]},
        ],
        "missing": [],
    }


def test_merge_takes_the_longest_wait():
    rows = [p for w in report()["workers"] for p in w["pools"] if p["database"] == "appdb"]
    assert stats.merge(rows)["maxwait_us"] == 2_500_000
    assert stats.merge(rows)["sv_used"] == 1


def test_stats_view_pools_and_processes():
    text = stats.render(report())
    assert not ESCAPE.search(text)
    lines = text.splitlines()
    header = lines[0]
    assert header.split()[:3] == ["database", "user", "mode"]
    assert [line.split()[0] for line in lines[1:4]] == ["appdb", "otherdb", "TOTAL"]
    assert [cell(line, header, "user") for line in lines[1:4]] == ["alice", "bob", ""]
    appdb = next(line for line in lines if line.startswith("appdb "))
    assert cell(appdb, header, "xacts") == "40" and cell(appdb, header, "queries") == "80"
    assert cell(appdb, header, "cl_active") == "1" and cell(appdb, header, "cl_waiting") == "1"
    assert cell(appdb, header, "sv_idle") == "2" and cell(appdb, header, "sv_used") == "1"
    assert cell(appdb, header, "maxwait") == "2.5 s"
    assert cell(appdb, header, "sent") == "2.0 MB" and cell(appdb, header, "recv") == "3.9 kB"
    assert cell(appdb, header, "avg_xact") == "5.0 ms" and cell(appdb, header, "avg_wait") == "1.0 ms"
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert cell(total, header, "xacts") == "41" and cell(total, header, "queries") == "81"
    procs = lines.index(next(line for line in lines if line.startswith("process")))
    pheader = lines[procs]
    master, w0, w1 = lines[procs + 1:procs + 4]
    assert master.startswith("master ") and cell(master, pheader, "pid") == "100"
    assert cell(master, pheader, "rss") == "30.0 MB" and cell(master, pheader, "cpu") == "1.25 s"
    assert w0.startswith("worker 0 ") and cell(w0, pheader, "pid") == "101"
    assert cell(w0, pheader, "clients") == "3" and cell(w0, pheader, "xacts") == "11"
    assert cell(w1, pheader, "state") == "ready" and cell(w1, pheader, "rss") == "41.0 MB"


def test_stats_view_says_which_workers_did_not_answer():
    r = report()
    r["missing"] = [103]
    assert "no answer from worker pid 103" in stats.render(r)


def test_stats_view_empty_report():
    text = stats.render({})
    assert "TOTAL" in text and "master" in text


def test_stats_view_fits_a_narrow_terminal():
    text = stats.render(report(), width=60)
    assert width_of(text) <= 60
    header = text.splitlines()[0].split()
    assert header[:2] == ["database", "user"]
    assert {"cl_waiting", "sv_active"} <= set(header) or {"cl_wait", "sv_act"} <= set(header)


STATUS = {
    "pid": 100, "version": "0.1.0", "config": "/etc/pgmp/pgmp.toml", "uptime": 3725.0, "generation": 1,
    "stopping": None, "summary": "2 workers, 4 clients, 3 servers",
    "workers": [
        {"slot": 0, "pid": 99, "generation": 0, "ready": True, "draining": True, "clients": 0, "servers": 0,
         "uptime": 4000.0},
        {"slot": 0, "pid": 101, "generation": 1, "ready": True, "draining": False, "clients": 3, "servers": 2,
         "uptime": 3700.0},
        {"slot": 1, "pid": 102, "generation": 1, "ready": False, "draining": False, "clients": 1, "servers": 1,
         "uptime": 2.0},
    ],
}


def test_status_view():
    figures = {101: {"rss": 40 << 20, "cpu_percent": 12.25}}
    text = stats.render_status(STATUS, figures)
    assert not ESCAPE.search(text)
    block, table = text.split("\n\n")
    pairs = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in block.splitlines())
    assert pairs == {"state": "running", "pid": "100", "version": "0.1.0", "uptime": "1h 02m",
                     "generation": "1", "config": "/etc/pgmp/pgmp.toml",
                     "workers": "1 ready, 1 starting, 1 draining"}
    lines = table.splitlines()
    header = lines[0]
    assert header.split() == ["slot", "pid", "gen", "state", "clients", "servers", "rss", "cpu%", "uptime"]
    old, w0, w1 = lines[1:]
    assert cell(old, header, "state") == "draining" and cell(old, header, "rss") == "-"
    assert cell(w0, header, "pid") == "101" and cell(w0, header, "cpu%") == "12.2"
    assert cell(w0, header, "rss") == "40.0 MB" and cell(w0, header, "uptime") == "1h 01m"
    assert cell(w1, header, "state") == "starting" and cell(w1, header, "clients") == "1"


def test_status_view_stopping():
    text = stats.render_status({**STATUS, "stopping": "graceful"}, {})
    assert text.splitlines()[0].split() == ["state", "stopping", "(graceful)"]


# ---------------------------------------------------------------- top

def test_rates_from_two_snapshots():
    before, after = report(xacts=(10, 30), queries=(20, 60)), report(xacts=(30, 50), queries=(60, 100), other_xacts=2)
    after["workers"][0]["cpu"] = 3.0
    r = stats.rates(before, after, seconds=2.0)
    assert r["databases"]["appdb"]["tps"] == pytest.approx(20.0)        # (20 + 20) / 2 s
    assert r["databases"]["appdb"]["qps"] == pytest.approx(40.0)
    assert r["databases"]["otherdb"]["tps"] == pytest.approx(0.5)
    assert r["workers"][101]["cpu_percent"] == pytest.approx(25.0)      # 0.5 s of CPU in 2 s
    assert r["workers"][101]["tps"] == pytest.approx(10.5)


def test_rates_ignore_a_worker_that_was_not_there_before():
    before, after = report(), report(xacts=(10, 30))
    after["workers"][1]["pid"] = 999                                    # a respawned worker, counters from 0
    after["workers"][0]["pools"][0]["xact_count"] = 5                   # and one whose counters went back
    r = stats.rates(before, after, seconds=1.0)
    assert r["databases"]["appdb"]["tps"] == 0


def test_top_frame_sorted_by_tps():
    before, after = report(other_xacts=1), report(xacts=(11, 31), other_xacts=101)
    text = stats.render_top(STATUS, before, after, seconds=1.0, now=0)
    lines = text.splitlines()
    assert lines[0].startswith("pgmp 0.1.0  pid 100  up 1h 02m")
    header_at = next(i for i, line in enumerate(lines) if line.startswith("database"))
    header = lines[header_at]
    first, second = lines[header_at + 1:header_at + 3]
    assert first.startswith("otherdb") and cell(first, header, "tps") == "100"
    assert second.startswith("appdb") and cell(second, header, "tps") == "2.0"
    assert cell(second, header, "cl_waiting") == "1" and cell(second, header, "maxwait") == "2.5 s"
    assert not ESCAPE.search(text)


def test_top_frame_fits_the_terminal():
    before = report()
    after = report(xacts=(11, 31))
    for w in after["workers"]:
        w["pools"] += [pool(f"db{i:02d}", "u", xact_count=i) for i in range(40)]
    text = stats.render_top(STATUS, before, after, seconds=1.0, width=50, height=15)
    lines = text.splitlines()
    assert len(lines) <= 15 and max(len(line) for line in lines) <= 50
    # the instance line keeps whole items, the rates before the counts
    assert lines[0] == "pgmp 0.1.0  pid 100  up 1h 02m  1.6k tps  0 qps"
    assert stats.render_top(STATUS, before, after, seconds=1.0, width=100).splitlines()[0].startswith(
        "pgmp 0.1.0  pid 100  up 1h 02m  1.6k tps  0 qps  4 clients  3 servers  2 workers  ")
    assert re.search(r"… \d+ more databases", text)
