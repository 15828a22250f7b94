"""auth_query: the secret of a user missing from auth_file, fetched from PostgreSQL and cached per worker.

With ``auth_user`` set, a client whose user is not in auth_file waits (in
ClientState.AUTH_LOOKUP) while its worker asks PostgreSQL for the user's
secret, then authenticates against that secret exactly as against an
auth_file line: SCRAM with the stored SCRAM secret (and pgmp logs in to the
server later with the ClientKey recovered from the client's proof), md5 with
an md5 hash. What can go wrong, and what the client sees:

- no row (no such login role): the mock exchange, then 28P01 like a wrong
  password; the log says "no such user";
- a NULL secret (the default query returns NULL once VALID UNTIL has passed,
  or for a role without a password): the same, the log says "password expired";
- the lookup itself fails (server down, auth_user cannot log in, the query
  errors or gets no answer within server_connect_timeout): 08006
  "authentication could not be completed", and the log says why.

The lookup runs over a connection of its own, per worker and per database
section, logged in as ``auth_user`` to the section ``auth_dbname`` names, or
else to the database the client asked for (PgBouncer does the same). It is
never handed to a client, and its StartupMessage carries only user,
database, application_name=pgmp-auth and ``options=-c
search_path=pg_catalog,pg_temp``: nothing the client sent (options,
search_path, …) ever reaches it (CVE-2025-12819), and neither does the
search_path a database's owner set with ALTER DATABASE, under which an
unqualified operator in auth_query would call the owner's function as
auth_user. A "*" section requires auth_dbname (config.py), so a client can
never make auth_user log in to a database of its choosing. The user name is a bound parameter ($1) of an unnamed
extended-protocol statement, never spliced into the SQL. Lookups for one
database run one at a time on that connection, which stays open for
server_idle_timeout after the last one; logins of the same user that arrive
while its lookup runs wait for that lookup instead of starting their own.

Answers are cached per worker for auth_cache_ttl, "no usable secret" answers
exactly as long as secrets: a lookup repeated sooner for a user that does not
exist would tell it from a real one by the login's timing. So a role created
or given a password in PostgreSQL can log in through pgmp once auth_cache_ttl
has passed, or at once after a reload, which empties the cache.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

from pgmp import errors
from pgmp.auth.authfile import AuthFileError, Secret, check_iterations, parse_secret, to_bytes
from pgmp.auth.client import _printable
from pgmp.errors import PgmpError, ServerProtocolError
from pgmp.pool import WAIT, Pool
from pgmp.protocol import messages
from pgmp.server import ServerState

log = logging.getLogger("pgmp")

APPLICATION_NAME = "pgmp-auth"
# a database owner's ALTER DATABASE ... SET search_path must not reach the lookup (startup options win)
LOOKUP_OPTIONS = "-c search_path=pg_catalog,pg_temp"
MAX_CACHED = 10_000         # answers kept per worker; the oldest go first beyond this


@dataclasses.dataclass(frozen=True, repr=False)
class Found:
    """What auth_query said about one user: a secret, or None and why (for the log)."""

    secret: Secret | None
    reason: str | None
    expires: float

    def __repr__(self):
        return f"Found({self.secret!r}, {self.reason!r})"


def interpret(user: str, rows: list[bytes], max_iterations: int | None = None) -> Found:
    """The answer in the DataRows of auth_query (expires left 0); ValueError if it is unusable."""
    who = f'user "{_printable(user)}"'
    if not rows:
        return Found(None, f"no such user: auth_query returned no row for {who}", 0.0)
    values = messages.parse_data_row(rows[0])
    if len(values) < 2:
        raise ValueError(f"auth_query must return two columns (user name, password), it returned {len(values)}")
    value = values[1]
    if value is None:
        return Found(None, f"password expired or not set: auth_query returned NULL for {who}", 0.0)
    try:
        secret = parse_secret(value.decode("utf-8", "surrogateescape"))
    except AuthFileError as exc:
        return Found(None, f"auth_query returned an unusable secret for {who}: {exc}", 0.0)
    costly = check_iterations(secret, max_iterations)
    if costly:
        return Found(None, f"auth_query returned an unusable secret for {who}: {costly}", 0.0)
    return Found(secret, None, 0.0)


class FirstRows:
    """Where an internal query puts its DataRows: only the first is kept (interpret reads no other),
    so an auth_query that returns a whole table costs no memory."""
    __slots__ = ("rows",)

    def __init__(self, rows: list):
        self.rows = rows

    def append(self, row: bytes) -> None:
        if not self.rows:
            self.rows.append(row)


class AuthQuery:
    """A worker's auth_query service: the cache, the lookups in flight, a lookup connection per database."""

    def __init__(self, worker):
        self.worker = worker
        self.cache: dict[tuple[str, str], Found] = {}
        self.waiters: dict[tuple[str, str], list] = {}     # lookups in flight: the clients waiting
        self.pools: dict[str, LookupPool] = {}              # by database section name
        self.lookups = 0                                    # queries run, for tests and stats

    def target(self, db):
        """The database section auth_query runs in for clients of ``db`` (None: a database pgmp does
        not know, and no auth_dbname to ask in)."""
        cfg = self.worker.config
        name = db.auth_dbname if db is not None else cfg.auth_dbname
        if name:
            return cfg.databases.get(name)
        return db

    def lookup(self, client, db, user: str) -> Found | None:
        """The cached answer for ``user``, asked in section ``db`` (see target()), or None: ``client``
        then waits for a lookup.

        A waiting client gets ``client.auth_query_done(found)``, or ``client.fail(error)`` when the
        lookup fails; either may come before this returns.
        """
        key = (db.name, user)
        found = self.cache.get(key)
        if found is not None:
            if self.worker.loop.clock() < found.expires:
                return found
            del self.cache[key]
        waiting = self.waiters.get(key)
        if waiting is not None:
            waiting.append(client)
            return None
        self.waiters[key] = [client]
        pool = self.pools.get(db.name)
        if pool is None or pool.source != db:
            if pool is not None:
                pool.retire("database settings changed")
            pool = self.pools[db.name] = LookupPool(self, db)
        pool.submit(user, key)
        return None

    def answered(self, key: tuple[str, str], found: Found, cache: bool) -> None:
        cfg = self.worker.config
        ttl = cfg.auth_cache_ttl            # the same for "no such user": see the module docstring
        found = dataclasses.replace(found, expires=self.worker.loop.clock() + ttl)
        if cache and ttl > 0:
            self._remember(key, found)
        for client in self.waiters.pop(key, ()):
            self._deliver(client, client.auth_query_done, found)

    def failed(self, key: tuple[str, str], why: str) -> None:
        database, user = key
        log.warning('auth_query: could not look up user "%s" in database %s: %s', _printable(user), database, why)
        error = PgmpError(errors.CONNECTION_FAILURE,
                          f'authentication could not be completed for user "{user}"',
                          detail="pgmp could not look up the user's password (auth_query); its log says why")
        for client in self.waiters.pop(key, ()):
            self._deliver(client, client.fail, error)

    @staticmethod
    def _deliver(client, fn, arg) -> None:
        if client.closed:
            return
        try:
            fn(arg)
        except Exception as exc:            # one client's bug must not keep the others waiting
            log.exception("internal error while %r finished its auth_query wait", client)
            client.fail(exc)

    def _remember(self, key, found: Found) -> None:
        cache = self.cache
        cache.pop(key, None)
        cache[key] = found
        if len(cache) > MAX_CACHED:
            now = self.worker.loop.clock()
            for k in [k for k, f in cache.items() if f.expires <= now]:
                del cache[k]
            while len(cache) > MAX_CACHED:
                del cache[next(iter(cache))]

    def reset(self, reason: str) -> None:
        """Reload or drain: forget every answer; lookup connections close once their work is done."""
        self.cache.clear()
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:              # retiring may close a connection, and its pool leaves the dict
            pool.retire(reason)


class LookupPool(Pool):
    """The lookup connection of one database in this worker, and the lookups queued for it.

    A Pool so that ServerConnection can connect it (TLS, login, server_connect_timeout,
    server_login_retry) like any other, but no client ever gets a server from it: its one
    connection runs auth_query, one lookup at a time.
    """
    __slots__ = ("service", "source", "queue", "current", "rows", "srv", "timer", "retired")
    startup_options = {"options": LOOKUP_OPTIONS}

    def __init__(self, service: AuthQuery, db):
        worker = service.worker
        auth_user = worker.config.auth_user
        super().__init__(worker, dataclasses.replace(db, application_name=APPLICATION_NAME), auth_user, 1, "session")
        self.service = service
        self.source = db
        self.name = f"{db.name}/{auth_user} (auth_query)"
        self.server_user = auth_user
        self.queue: collections.deque = collections.deque()     # (user, key) not asked yet
        self.current: tuple[str, tuple[str, str]] | None = None
        self.rows: list | None = None
        self.srv = None
        self.timer = None
        self.retired: str | None = None          # why no new lookups come here any more

    def __repr__(self):
        return f"<auth_query pool {self.name} queued={len(self.queue)}>"

    def submit(self, user: str, key: tuple[str, str]) -> None:
        self.queue.append((user, key))
        self._pump()

    def retire(self, reason: str) -> None:
        """No new lookups come here; close the connection now if it is idle, else after its work."""
        self.retired = reason
        if self.srv is not None and self.current is None and not self.queue and not self.opening:
            self.srv.close(reason)

    # -- running lookups ---------------------------------------------------------------
    def _pump(self) -> None:
        if self.current is not None or self.opening or self.resolving:
            return
        if not self.queue:
            self._idle()
            return
        if self.srv is not None and self.worker.server_expired(self.srv):
            self.srv.close("server_lifetime reached")      # server_closed pumps again: a new one
            return
        if self.srv is None:
            self._connect()
            return
        self._cancel_timer()
        user, key = self.queue.popleft()
        self.current = (user, key)
        self.rows = []
        cfg = self.worker.config
        self.service.lookups += 1
        log.debug('auth_query for user "%s" in database %s', _printable(user), self.db.name)
        srv = self.srv
        srv.internal_query(messages.extended_query(cfg.auth_query, [to_bytes(user)]), self._answered,
                           FirstRows(self.rows))
        if cfg.server_connect_timeout > 0:
            self.timer = self.worker.loop.call_later(cfg.server_connect_timeout, self._no_answer, srv)

    def _answered(self, srv, error) -> None:
        self._cancel_timer()
        user, key = self.current
        rows = self.rows
        self.current = None
        self.rows = None
        if error is not None:
            self.service.failed(key, f"the query failed: {error.sqlstate} {error.message}")
        else:
            try:
                found = interpret(user, rows, self.worker.config.auth_max_iterations)
            except ValueError as exc:
                self.service.failed(key, str(exc))
            else:
                self.service.answered(key, found, cache=self.retired is None)
        self._pump()

    def _no_answer(self, srv) -> None:
        self.timer = None
        srv.abort(ServerProtocolError(
            f"auth_query got no answer within server_connect_timeout ({self.worker.config.server_connect_timeout:g}s)"))

    def _idle(self) -> None:
        self._cancel_timer()
        srv = self.srv
        if srv is None:
            return
        if self.retired:
            srv.close(self.retired)
            return
        wait = self.worker.config.server_idle_timeout
        if wait > 0:
            self.timer = self.worker.loop.call_later(wait, self._idle_timeout, srv)

    def _idle_timeout(self, srv) -> None:
        self.timer = None
        if srv is self.srv and self.current is None and not self.queue:
            srv.close("server_idle_timeout")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the connection ----------------------------------------------------------------
    def _credentials(self) -> None:
        """auth_user's own: a password in its database section, its auth_file line, or the SCRAM
        keys its pool learned from a client that logged in as auth_user."""
        worker = self.worker
        user, db = self.server_user, self.source
        self.password = db.password if db.password and db.user == user else None
        self.secret = worker.secrets.get(user)
        self.scram_keys = None
        pool = worker.pools.get((db.name, user))
        if pool is not None and pool.server_user == user and pool.scram_keys is not None \
                and pool.secret == self.secret:
            self.scram_keys = pool.scram_keys

    def _connect(self) -> None:
        if self._login_retry_pending():
            self._fail_all(self.last_error.message if self.last_error else "the last login failed",
                           " (server_login_retry: not trying again yet)")
            return
        self._credentials()
        srv = self.worker.open_server(self, self._pump)
        if srv is WAIT:
            return                          # the host's address is being looked up: _pump runs again then
        if srv is None:
            self.login_failed_at = self.worker.loop.clock()
            self._fail_all(self.last_error.message if self.last_error else "could not connect")
            return
        self.servers.add(srv)
        self.opening.add(srv)
        self.srv = srv

    def _fail_all(self, why: str, note: str = "") -> None:
        queued = list(self.queue)
        self.queue.clear()
        for _, key in queued:
            self.service.failed(key, f"cannot log in to the server as auth_user {self.server_user!r}: {why}{note}")

    def server_logged_in(self, srv) -> None:
        self.server_ready(srv)              # never the database's connect_query: this is pgmp's own

    def server_ready(self, srv) -> None:
        if srv.timer:                       # server_connect_timeout
            srv.timer.cancel()
            srv.timer = None
        self.opening.discard(srv)
        self.last_error = None
        self.login_failed_at = 0.0
        srv.state = ServerState.IDLE
        self._pump()

    def server_closed(self, srv, exc: PgmpError | None, was) -> None:
        self.servers.discard(srv)
        if self.srv is srv:
            self.srv = None
        self._cancel_timer()
        if srv in self.opening:
            self.opening.discard(srv)
            exc = exc or ServerProtocolError("the server closed the connection during login")
            self.last_error = exc
            self.login_failed_at = self.worker.loop.clock()
            self._fail_all(exc.message)
            return
        if self.current is not None:
            _, key = self.current
            self.current = None
            self.rows = None
            self.service.failed(key, "lost the lookup connection: " + (exc.message if exc else "closed"))
        if self.queue:
            self._pump()
        elif self.service.pools.get(self.source.name) is self:
            del self.service.pools[self.source.name]     # idle and closed: made again when needed

    def close_all(self, reason: str) -> None:
        self.retire(reason)
