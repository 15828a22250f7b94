"""Host names resolved off the loop (pgmp.resolve): the TTL cache fed times, and both lookup backends run."""
from __future__ import annotations

import socket
import time

import pytest

from pgmp.loop import Loop
from pgmp.resolve import DnsCache, ResolveError, Resolver, numeric

A = [(socket.AF_INET, ("10.0.0.5", 0))]
B = [(socket.AF_INET, ("10.0.0.6", 0)), (socket.AF_INET6, ("fd00::6", 0, 0, 0))]


def test_a_first_lookup_waits_then_the_answer_holds_for_its_ttl():
    c = DnsCache(max_ttl=15, nxdomain_ttl=5)
    assert c.answer("db1", now=0.0) == (None, True)          # nothing known: look it up
    c.entry("db1").looking = True
    assert c.answer("db1", now=0.1) == (None, False)         # asked already: wait for it
    c.store("db1", A, "", now=1.0)
    assert c.answer("db1", now=15.9) == (A, False)
    # expired: the old answer serves while a new lookup runs (only the very first lookup ever waits)
    assert c.answer("db1", now=16.0) == (A, True)
    c.entry("db1").looking = True
    assert c.answer("db1", now=16.1) == (A, False)
    c.store("db1", B, "", now=16.5)
    assert c.answer("db1", now=17.0) == (B, False)


def test_a_failed_lookup_is_remembered_for_dns_nxdomain_ttl():
    c = DnsCache(max_ttl=15, nxdomain_ttl=5)
    c.store("nope", None, "Name or service not known", now=0.0)
    result, start = c.answer("nope", now=4.9)
    assert isinstance(result, ResolveError) and str(result) == "Name or service not known" and not start
    assert c.answer("nope", now=5.0) == (None, True)


def test_show_dns_hosts_rows():
    c = DnsCache(max_ttl=15, nxdomain_ttl=5)
    c.store("db1", B, "", now=0.0)
    c.store("nope", None, "no", now=0.0)
    c.entry("pending")
    assert c.rows(now=3.5) == [{"hostname": "db1", "ttl": 11, "addrs": "10.0.0.6,fd00::6"},
                               {"hostname": "nope", "ttl": 1, "addrs": ""}]


def test_ip_literals_need_no_lookup():
    assert numeric("127.0.0.1") == [(socket.AF_INET, ("127.0.0.1", 0))]
    assert numeric("::1")[0][0] == socket.AF_INET6
    assert numeric("localhost") is None and numeric("db1.internal") is None


def run_until(loop: Loop, done: list, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done:
        assert time.monotonic() < deadline, "no answer from the resolver"
        loop.run_once(0.05)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_name_resolves_off_the_loop_and_is_cached(backend):
    loop = Loop()
    resolver = Resolver(loop, max_ttl=15, nxdomain_ttl=5, backend=backend)
    try:
        assert resolver.lookup("127.0.0.1", 5432, None) == [(socket.AF_INET, ("127.0.0.1", 5432))]
        got: list = []
        assert resolver.lookup("localhost", 5432, got.append) is None       # never blocks the caller
        run_until(loop, got)
        addrs = got[0]
        assert addrs and all(sa[1] == 5432 for _, sa in addrs)
        assert "127.0.0.1" in {sa[0] for _, sa in addrs}
        # cached now, with the port of each caller
        again = resolver.lookup("localhost", 6000, None)
        assert again and all(sa[1] == 6000 for _, sa in again)
        assert [r["hostname"] for r in resolver.rows()] == ["localhost"]
        failed: list = []
        assert resolver.lookup("no-such-host.invalid", 5432, failed.append) is None
        run_until(loop, failed)
        assert isinstance(failed[0], ResolveError)
        assert isinstance(resolver.lookup("no-such-host.invalid", 5432, None), ResolveError)   # remembered
    finally:
        resolver.close()
        loop.close()


def test_the_helper_process_goes_away_with_its_socket():
    loop = Loop()
    resolver = Resolver(loop, max_ttl=15, nxdomain_ttl=5, backend="process")
    got: list = []
    resolver.lookup("localhost", 1, got.append)
    run_until(loop, got)
    proc = resolver._helper.proc
    resolver.close()
    loop.close()
    assert proc.wait(timeout=10) == 0
