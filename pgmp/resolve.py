"""Host names to addresses without blocking the event loop: a TTL cache, lookups off the loop.

getaddrinfo() blocks, for as long as the DNS server takes to answer (or
not). pgmp never calls it in an event loop: a socket directory or an IP
address needs no lookup, a name is looked up once and its addresses kept
for ``dns_max_ttl`` (a failed lookup for ``dns_nxdomain_ttl``). An expired
name keeps being used while its new lookup runs, so that only the first
connection to a name ever waits.

Where the lookup runs:

- in a worker, in threads (the Deriver of pgmp/derive.py: ``fn`` in a
  thread, its callback in the loop through a socketpair);
- in the master, in a helper process (``python -m pgmp.resolve``, "pgmp:
  resolver") that it talks to over a socketpair, one JSON line per
  question and answer. The master forks workers at any time; a fork while
  a thread of its own was inside getaddrinfo could leave the child a
  locked resolver lock, so the master starts no thread. The helper exits
  when the master closes its end (or dies), and is started again at the
  next lookup if it went away.

:class:`DnsCache` is the sans-IO cache; :class:`Resolver` puts it and a
lookup backend together. SHOW DNS_HOSTS lists the cache (hostname, ttl left,
addresses), as PgBouncer does.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
import sys
import threading

from pgmp.loop import Endpoint

log = logging.getLogger("pgmp")

MAX_ANSWER = 1 << 16          # one answer line of the helper, at most (a few dozen addresses)


class ResolveError(Exception):
    """A host name that has no address (or whose lookup failed); the message says why."""


class Entry:
    __slots__ = ("name", "addrs", "error", "expires", "waiters", "looking")

    def __init__(self, name: str):
        self.name = name
        self.addrs: list[tuple[int, tuple]] = []     # (family, sockaddr with port 0)
        self.error = ""
        self.expires = 0.0
        self.waiters: list = []                      # callbacks of the connections waiting for a first answer
        self.looking = False


def numeric(host: str) -> list[tuple[int, tuple]] | None:
    """The address of an IP literal (no lookup, no blocking), or None for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    flags = socket.AI_NUMERICHOST
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [(fam, sa) for fam, _, _, _, sa in socket.getaddrinfo(host, 0, family, socket.SOCK_STREAM, 0, flags)]


def with_port(sockaddr: tuple, port: int) -> tuple:
    return (sockaddr[0], port, *sockaddr[2:])


def lookup_blocking(name: str) -> list[tuple[int, tuple]]:
    """getaddrinfo for TCP, addresses in the resolver's order without duplicates (runs off the loop)."""
    try:
        infos = socket.getaddrinfo(name, 0, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(exc.strerror or str(exc)) from None
    out: list[tuple[int, tuple]] = []
    for family, _, _, _, sa in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sa) not in out:
            out.append((family, tuple(sa)))
    if not out:
        raise ResolveError("no IPv4 or IPv6 address")
    return out


class DnsCache:
    """Names, their addresses and how long those hold (sans-IO: the caller gives the time)."""

    def __init__(self, max_ttl: float, nxdomain_ttl: float):
        self.max_ttl = max_ttl
        self.nxdomain_ttl = nxdomain_ttl
        self.entries: dict[str, Entry] = {}

    def entry(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = Entry(name)
        return e

    def answer(self, name: str, now: float):
        """(addresses or ResolveError or None, whether a lookup should start)."""
        e = self.entry(name)
        fresh = now < e.expires
        if e.addrs:
            return e.addrs, not fresh and not e.looking        # an expired name serves while it is refreshed
        if e.error and fresh:
            return ResolveError(e.error), False
        return None, not e.looking

    def store(self, name: str, addrs: list | None, error: str, now: float) -> Entry:
        e = self.entry(name)
        e.looking = False
        if addrs:
            e.addrs, e.error, e.expires = addrs, "", now + self.max_ttl
        else:
            e.addrs, e.error, e.expires = [], error or "no address", now + self.nxdomain_ttl
        return e

    def rows(self, now: float) -> list[dict]:
        """SHOW DNS_HOSTS: hostname, seconds its answer still holds, its addresses."""
        return [{"hostname": e.name, "ttl": max(0, int(e.expires - now)),
                 "addrs": ",".join(sa[0] for _, sa in e.addrs)}
                for e in self.entries.values() if e.expires]


class Resolver:
    """``lookup(host, port, done)``: the addresses now, or None and ``done(result)`` later in the loop.

    A result is a list of (family, sockaddr) or a ResolveError. ``backend`` is "thread"
    (workers) or "process" (the master; see the module docstring).
    """

    def __init__(self, loop, max_ttl: float, nxdomain_ttl: float, backend: str = "thread"):
        self.loop = loop
        self.cache = DnsCache(max_ttl, nxdomain_ttl)
        self.backend = backend
        self._threads = None
        self._helper: _Helper | None = None

    def configure(self, max_ttl: float, nxdomain_ttl: float) -> None:
        self.cache.max_ttl, self.cache.nxdomain_ttl = max_ttl, nxdomain_ttl

    def lookup(self, host: str, port: int, done):
        addrs = numeric(host)
        if addrs is not None:
            return [(fam, with_port(sa, port)) for fam, sa in addrs]
        result, start = self.cache.answer(host, self.loop.clock())
        if start:
            self._start(host)
        if result is None:
            self.cache.entry(host).waiters.append(lambda r: done(_ported(r, port)))
            return None
        return _ported(result, port)

    def _start(self, name: str) -> None:
        self.cache.entry(name).looking = True
        if self.backend == "thread":
            if self._threads is None:
                from pgmp.derive import Deriver
                self._threads = Deriver(self.loop)
            self._threads.submit(lookup_blocking, (name,), lambda addrs, error: self._answered(name, addrs, error))
            return
        if self._helper is None or self._helper.closed:
            try:
                self._helper = _Helper(self)
            except OSError as exc:
                self.loop.call_later(0, self._answered, name, None, ResolveError(f"cannot start the resolver: {exc}"))
                return
        self._helper.ask(name)

    def _answered(self, name: str, addrs, error) -> None:
        if error is not None and not isinstance(error, ResolveError):
            error = ResolveError(str(error))
        e = self.cache.store(name, addrs, str(error) if error else "", self.loop.clock())
        if error is not None:
            log.warning("host name %s: lookup failed: %s (tried again in %gs)", name, error, self.cache.nxdomain_ttl)
        waiters, e.waiters = e.waiters, []
        result = e.addrs if e.addrs else ResolveError(e.error)
        for done in waiters:
            try:
                done(result)
            except Exception:
                log.exception("internal error in a host name lookup's callback")

    def rows(self) -> list[dict]:
        return self.cache.rows(self.loop.clock())

    def close(self) -> None:
        if self._threads is not None:
            self._threads.close()
            self._threads = None
        self.close_sockets()

    def close_sockets(self) -> None:
        """Also in a child forked from this process: the helper must see its master's EOF, not a child's copy."""
        if self._helper is not None:
            self._helper.close_socket()
            self._helper = None


def _ported(result, port: int):
    if isinstance(result, ResolveError):
        return result
    return [(fam, with_port(sa, port)) for fam, sa in result]


class _Helper(Endpoint):
    """The master's end of the resolver helper process: one JSON line per question and answer."""
    __slots__ = ("resolver", "buf", "asked", "proc")

    def __init__(self, resolver: Resolver):
        parent, child = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pgmp.resolve"], stdin=child, stdout=child,
                                         close_fds=True)
        finally:
            child.close()
        super().__init__(resolver.loop, parent)
        self.resolver = resolver
        self.buf = b""
        self.asked: set[str] = set()

    def ask(self, name: str) -> None:
        self.asked.add(name)
        self.send(json.dumps({"name": name}).encode() + b"\n")

    def on_data(self, view, n):
        self.buf += bytes(view[:n])
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > MAX_ANSWER:
            self.on_eof("answer too long")
            return
        for line in lines:
            try:
                msg = json.loads(line)
                name = msg["name"]
                addrs = [(int(f), tuple(sa)) for f, sa in msg.get("addrs") or []]
            except (ValueError, KeyError, TypeError):
                log.error("resolver helper: unreadable answer %r", line[:200])
                continue
            self.asked.discard(name)
            self.resolver._answered(name, addrs or None, ResolveError(msg["error"]) if msg.get("error") else None)

    def on_eof(self, reason):
        self.close_socket()
        for name in sorted(self.asked):
            self.resolver._answered(name, None, ResolveError(f"the resolver helper exited ({reason})"))
        self.asked.clear()


def _helper_main() -> None:
    """The helper: answer each name on stdin with its addresses on stdout, several lookups at once."""
    import concurrent.futures
    try:
        import setproctitle
        setproctitle.setproctitle("pgmp: resolver")
    except Exception:
        pass
    out = sys.stdout.buffer
    lock = threading.Lock()

    def answer(name: str) -> None:
        try:
            reply = {"name": name, "addrs": [[f, list(sa)] for f, sa in lookup_blocking(name)]}
        except ResolveError as exc:
            reply = {"name": name, "error": str(exc)}
        except Exception as exc:                     # a name getaddrinfo refuses outright (NUL, too long)
            reply = {"name": name, "error": str(exc)}
        with lock:
            out.write(json.dumps(reply).encode() + b"\n")
            out.flush()

    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        for line in sys.stdin.buffer:
            try:
                name = json.loads(line)["name"]
            except (ValueError, KeyError, TypeError):
                continue
            threads.submit(answer, str(name))


if __name__ == "__main__":
    try:
        _helper_main()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
