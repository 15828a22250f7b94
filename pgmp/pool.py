"""The pool: server connections for one (database, user) in this worker, and the clients queued for them.

A pool never opens more servers than its share of the configured size. A
released server that is clean is reset (``server_reset_query``) and handed to
the first waiting client, or kept idle (most recently used first). The
pool caches the parameters its first server reported, so later logins need
no server round trip.

Of a database's hosts, each new server goes to the one pgmp.hosts chooses
(target_session_attrs, load_balance_hosts, what is known of each host). A
server whose host no longer fits (its role changed, it is banned, a standby
fell behind max_replica_lag) is closed when it is next released or found
idle; one that answered 25006 (read-only transaction) where the pool needs
a writable host is closed too and its host's role checked again. While no
host fits, clients wait (query_wait_timeout) rather than fail.
"""
import collections
import logging
import os

from pgmp import errors
from pgmp.errors import PgmpError
from pgmp.hosts import fits_pool
from pgmp.link import CLOSE, RESET
from pgmp.protocol import messages
from pgmp.server import ServerState
from pgmp.session import ClientState
from pgmp.stats import PoolStats, observe

# The role of a server that reported neither in_hot_standby nor default_transaction_read_only
# (PostgreSQL 13 and older), asked before it serves a pool whose target needs it.
ROLE_QUERY = "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')"
WRITABLE_TARGETS = ("read-write", "primary")
# A server is held (Pool.hold) only if server_check_query is not due sooner than this after its last
# use: the janitor, once a second, hands a held server over to that check.
HOLD_CHECK_DELAY = 2.0
WAIT = "wait"               # open_server: the host's address is being looked up
BANNED, NEXT_ADDRESS = "banned", "next address"     # what a failed connect did to its host

log = logging.getLogger("pgmp")
# the C relay's hand-off of servers to queued clients (Server.handed_off); PGMP_RELAY_HANDOFF=0: Python's
HANDOFF = os.environ.get("PGMP_RELAY_HANDOFF", "1") != "0"
HANDOFF_TAGS = 64


def note_pause(holder, action: str, database: str | None) -> None:
    """Record PAUSE (database None = all) or RESUME in ``holder.paused_all`` / ``holder.paused_dbs``
    (a worker's own state, and the master's copy for the workers that start later)."""
    if action == "pause":
        if database is None:
            holder.paused_all = True
        else:
            holder.paused_dbs.add(database)
    elif action == "resume":
        if database is None:
            holder.paused_all = False
            holder.paused_dbs.clear()
        else:
            holder.paused_dbs.discard(database)


def worker_share(total: int, workers: int, slot: int) -> int:
    """This worker's part of an instance-wide limit: N workers never exceed ``total`` together."""
    if total <= 0:
        return 0
    base, extra = divmod(total, workers)
    return base + (1 if slot < extra else 0)


def effects_in_flight(batches) -> bool:
    """A request in flight may change the session (Link.requests: its effects, or None when
    pgmp could not read them) beyond starting or ending a transaction."""
    for batch in batches:
        effects = batch[1]
        if effects is None:
            return True
        for e in effects:
            if e.kind not in CONTROL_KINDS:
                return True
    return False


CONTROL_KINDS = frozenset({"begin", "commit", "rollback"})


class WaitQueue(collections.deque):
    """Pool.waiting: the clients queued for a server, first come first served. In transaction
    mode with the C relay, kept in step with a queue in C (crelay.CQueue, ``c``), every client in
    its place, so that C may hand a server over at a transaction's end to the first of them
    (Server.handed_off) and never passes over one that only Python may serve. A client C handed
    a server in the batch being applied is no longer in C's queue: popleft passes over it (its
    records, still to come, take it out of this one)."""
    __slots__ = ("c", "loop")

    def __init__(self, c=None, loop=None):
        super().__init__()
        self.c = c
        self.loop = loop                    # (its handed_clients: the batch's HANDED records)

    def append(self, client, data=None, tag: int = 0) -> None:
        """``client`` joins the end; ``data``: the request it waits with, which C may send to a
        server of settings ``tag`` (Pool.settings_tag)."""
        super().append(client)
        c = self.c
        if c is not None:
            c.push(client.fd, data, client.scanner, tag)

    def popleft(self):
        c = self.c
        if c is None:
            return super().popleft()
        handed = self.loop.handed_clients
        lost = None
        for client in self:
            if client in handed:            # C handed it a server in this batch: its records are to come
                continue
            if not self._take_back(client):     # (gone from C: never serve it without its request)
                lost = client
                break
            c.remove(client.fd)             # (not there: C had no memory for it, Python's to serve)
            break
        else:
            raise IndexError("every queued client has a server from the C relay already")
        if lost is not None:
            lost.request_lost()
            return self.popleft()
        if self[0] is client:
            super().popleft()
        else:
            super().remove(client)
        return client

    def remove(self, client) -> None:
        if self.c is not None:
            self.c.remove(client.fd)        # (first: C may have queued it before Python did)
        super().remove(client)

    def clear(self) -> None:
        c = self.c
        if c is not None:                   # (only these: C may have queued others in this batch,
            for client in self:             # their records still to come)
                c.remove(client.fd)
        super().clear()

    def block(self, client) -> bool:
        """What ``client`` waits with is about to change: only Python may hand it a server now
        (and a request C kept for it is Python's again, in its leftover); False if that request
        is gone from C (it cannot be: then the client must not be served)."""
        if self.c is None:
            return True
        if not self._take_back(client):
            return False
        self.c.block(client.fd)
        return True

    def _take_back(self, client) -> bool:
        """A request C kept for ``client`` (ClientConnection.queued_by_c) into its leftover;
        False if C has none for it after all."""
        if client.c_queued:
            client.c_queued = 0
            data = self.c.data(client.fd)
            if data is None:
                return False
            client.leftover = data
        return True

    def appended_by_c(self, client) -> None:
        """The C relay queued ``client`` (it is at the end of C's queue already)."""
        super().append(client)

    def handed(self, client) -> bool:
        """C handed ``client`` a server: out of this queue too (False if it was not in it)."""
        try:
            super().remove(client)
        except ValueError:
            return False
        return True


class Pool:
    __slots__ = ("worker", "db", "client_user", "name", "dbname", "server_user", "size", "mode",
                 "idle", "servers", "opening", "waiting", "login_waiters", "params",
                 "password", "scram_keys", "secret", "last_error", "stats", "clients", "resetting",
                 "min_size", "reserve", "use_reserve", "paused", "reconnect_before", "login_failed_at",
                 "stats_older", "stats_newer", "resolving", "turn", "no_host", "fitting", "fitting_key", "held",
                 "wait_timer", "handoff_tags")

    # StartupMessage parameters of this pool's server connections beyond user and database
    startup_options: dict[str, str] = {}

    def __init__(self, worker, db, client_user: str, size: int, mode: str, min_size: int = 0, reserve: int = 0):
        self.worker = worker
        self.db = db
        self.client_user = client_user
        self.name = f"{db.name}/{client_user}"
        self.dbname = db.dbname
        self.server_user = db.user or client_user
        self.size = size
        self.mode = mode
        self.idle: list = []
        # servers at their client's transaction boundary, still linked to it and armed in the C relay
        # until another client needs one (hold): idle to everyone else, oldest first
        self.held: dict = {}
        self.servers: set = set()
        self.opening: set = set()           # servers connecting or logging in (connect_query included)
        crelay = worker.loop.crelay if mode == "transaction" and HANDOFF else None
        if crelay is not None:
            from pgmp.crelay import CQueue
            self.waiting = WaitQueue(CQueue(), worker.loop)
        else:
            self.waiting = WaitQueue()
        # the login settings of clients the C relay may hand a server: id -> (the dict, its tag)
        self.handoff_tags: dict = {}
        self.wait_timer = None              # query_wait_timeout of the longest-waiting client (wait_expired)
        self.login_waiters: list = []
        self.params: dict[str, str] | None = None
        self.password: str | None = db.password or None
        self.scram_keys = None
        self.secret = None
        self.last_error: PgmpError | None = None
        self.resolving = 0                  # new servers waiting for their host's address (pgmp.resolve)
        self.turn = 0                       # load_balance_hosts = round-robin: whose turn it is
        self.no_host = ""                   # why no host fits now ("": one does); clients wait meanwhile
        # the hosts a server may serve this pool from, cached until the host table changes or a ban ends
        self.fitting: frozenset = frozenset()
        self.fitting_key = (-1, 0.0)        # (HostTable.version, valid until)
        self.stats = PoolStats()
        self.clients: dict = {}             # logged-in clients of this pool (a dict: smaller than a set)
        self.resetting: set = set()         # servers running a reset or check query: idle in a moment
        self.min_size = min(min_size, size)
        self.reserve = reserve
        self.use_reserve = False            # a client waited reserve_pool_timeout: allow the reserve
        self.paused = False                 # pgmp pause: hand out no server
        self.reconnect_before = 0.0         # pgmp reconnect: servers older than this are closed at release
        self.login_failed_at = 0.0          # server_login_retry counts from here
        self.stats_older: dict = {}          # totals() one and two STATS_PERIODs ago (the console's averages)
        self.stats_newer: dict = {}

    def __repr__(self):
        return f"<pool {self.name} servers={len(self.servers)} idle={len(self.idle)} waiting={len(self.waiting)}>"

    # -- credentials -------------------------------------------------------------
    def learn_credentials(self, auth, secret) -> None:
        """Keep what a client's login taught pgmp to log in as that user (when no fixed password is set)."""
        if self.db.password or (self.db.user and self.db.user != self.client_user):
            return
        self.secret = secret
        if getattr(auth, "password", None):
            self.password = auth.password
        elif secret is not None and secret.kind == "plain":
            self.password = secret.value
        key = getattr(auth, "client_key", None)
        if key is not None and secret is not None and secret.kind == "scram":
            self.scram_keys = (key, secret.server_key)

    # -- clients ---------------------------------------------------------------
    def want_params(self, client) -> dict[str, str] | None:
        """The login parameters, or None after queueing ``client`` until a server reports them."""
        if self.params is not None:
            return self.params
        self.login_waiters.append(client)
        if self.idle:
            self.params = self.idle[-1].params
            self._finish_logins()
            return self.params
        if not self.opening and not self.resolving:
            if self._login_retry_pending():
                self.login_waiters.remove(client)
                raise self._no_server_error()
            if not self._open_server() and not self._at_connection_limit() and not self.no_host:
                self.login_waiters.remove(client)
                raise self._no_server_error()
            # at max_db/max_user_connections, or while no host fits, the login waits (the janitor
            # and host state changes retry), bounded by client_login_timeout
        return None

    def _at_connection_limit(self) -> bool:
        return len(self.servers) < self.limit and not self.worker.may_open_server(self, evict=False)

    def _usable_idle(self):
        """Pop an idle server fit to hand out now, or None (checks and closes the others)."""
        worker = self.worker
        cfg = worker.config
        now = worker.loop.clock()
        while self.idle or self.held:
            srv = self.idle.pop() if self.idle else self._take_held()
            if srv is None:
                return None
            if worker.server_expired(srv) or srv.created < self.reconnect_before:
                srv.close("server_lifetime reached" if worker.server_expired(srv) else "pgmp reconnect")
                continue
            if not srv.quiet():
                srv.close("server sent data or closed while idle")
                continue
            why = self.unfit(srv)
            if why:
                srv.close(why)
                continue
            if cfg.server_check_query and now - srv.last_used > cfg.server_check_delay:
                self._check(srv)            # back in the idle list if it answers
                continue
            return srv
        return None

    def link_idle(self, client) -> bool:
        """Link an idle server to ``client`` if one is free right now (no queueing)."""
        if self.waiting or self.paused:
            return False
        srv = self._usable_idle()
        if srv is None:
            return False
        self._link(srv, client)
        return True

    def request(self, client) -> None:
        """``client`` needs a server: link one now, or queue the client (FIFO)."""
        if not self.paused and not self.waiting:
            srv = self._usable_idle()
            if srv is not None:
                self._link(srv, client)
                return
        self.worker.loop.quiet_end_all()      # a quiet pair's server must come back at its boundary
        self.waiting.append(client, *self._handoff_request(client))
        if client.state is ClientState.WAITING:
            self._time_wait()
        self._grow()

    def _time_wait(self) -> None:
        """A client began to wait: query_wait_timeout's timer runs, if it did not already."""
        if self.wait_timer is None:
            wait = self.worker.config.query_wait_timeout
            if wait > 0:
                self.wait_timer = self.worker.loop.call_later(wait, self.wait_expired)

    # -- the C relay's hand-off ----------------------------------------------------
    def _handoff_request(self, client) -> tuple:
        """The request queued ``client`` waits with and its settings' tag, if the C relay may send
        it to a server it hands over (crelay.CQueue); (None, 0) if only Python may hand it one."""
        if self.waiting.c is None or client.state is not ClientState.WAITING or client.tls is not None or client.skip \
                or client.settings_pending or client.terminating or not client.link.c_relay_ok():
            return None, 0
        tag = self.settings_tag(client.link)
        return (client.leftover, tag) if tag else (None, 0)

    def settings_tag(self, link) -> int:
        """A number for ``link``'s settings if they are its login settings, unchanged (clients that
        log in with the same ones share one dict that never changes: Link.logged_in), so that
        the C relay hands a client only a server that has its settings; 0 otherwise. At most
        HANDOFF_TAGS per pool (one per application_name, say)."""
        settings = link.settings
        if settings is not link.startup:
            return 0
        known = self.handoff_tags.get(id(settings))
        if known is not None:
            return known[1]                 # (the dict is kept here: its id is not reused)
        if len(self.handoff_tags) >= HANDOFF_TAGS:
            return 0
        tag = len(self.handoff_tags) + 1
        self.handoff_tags[id(settings)] = (settings, tag)
        return tag

    def may_hand_off(self, srv, client) -> int:
        """Whether the C relay may hand ``srv`` over at ``client``'s transaction end to the first
        client of the queue: the tag of the settings ``srv`` has (a client's of the same tag
        needs nothing brought over, Server.handed_off), or 0 if not. As release() and
        _put_idle() would reuse it: no reset, check or close due. Asked again at every Python
        event of the pair while clients wait; anything else that would change the answer (a
        pause, a reconnect, a host change, a cancel, a reload, time) ends every such permission
        (Loop.handoff_end_all), and the janitor does once a second."""
        worker = self.worker
        cfg = worker.config
        link = client.link
        # (SETs of the open transaction, which its COMMIT, relayed by C, would leave on the server;
        # a request in flight with effects pgmp applies only at its answer, which C may relay)
        binds = client.binds
        if (self.paused or link.pinned or link.statement_mode or link.overlay or link.savepoint
                or link.open_effects or link.open_failed or effects_in_flight(link.batches)
                or (binds is not None and not binds.plain) or srv.cancel_pending or srv.release_reset
                or srv.tls is not None or client.tls is not None or srv.created < self.reconnect_before
                or worker.server_expired(srv) or srv.session.read_only_seen
                or (cfg.server_reset_query and cfg.server_reset_query_always)
                or srv.session.applied != link.settings or self.unfit(srv)):
            return 0
        return self.settings_tag(link)

    def queued_by_c(self, client) -> None:
        """The C relay queued ``client``'s request (ClientConnection.queued_by_c): as request()
        would have, and if a server is free after all, it serves the client now."""
        first = not self.waiting
        self.waiting.appended_by_c(client)
        self._time_wait()
        if first and not self.paused and (self.idle or self.held):
            self.worker.loop.quiet_end_all()
            srv = self._usable_idle()
            if srv is not None:
                self._link(srv, self.waiting.popleft())
                return
        self._grow()

    def handed(self, srv, client, sent: int, count: int, kind: int) -> None:
        """The C relay handed ``srv`` to ``client``, the first of the queue, and sent ``sent``
        bytes of its request (``count`` requests of ``kind``): as _link."""
        self.waiting.handed(client)
        self._assign(srv, client)
        client.handed(srv, sent, count, kind)

    def wait_expired(self) -> None:
        """query_wait_timeout: fail the queued clients that have waited that long, and time the next.

        One timer per pool, not one per wait: the queue is in the order the clients began to
        wait (each is stamped just before it is appended), so the first client still waiting
        is the next to time out. Session-mode logins in the queue are left to client_login_timeout.
        """
        self.wait_timer = None
        wait = self.worker.config.query_wait_timeout
        if wait <= 0:
            return
        now = self.worker.loop.clock()
        expired = []
        for client in self.waiting:
            if client.closed or client.state is not ClientState.WAITING:
                continue
            left = client.wait_started + wait - now
            if left > 0:
                self.wait_timer = self.worker.loop.call_later(left, self.wait_expired)
                break
            expired.append(client)
        for client in expired:
            client.wait_timed_out()

    def wait_reconfigured(self) -> None:
        """query_wait_timeout may have changed (reload): time the queue again from now."""
        if self.wait_timer is not None:
            self.wait_timer.cancel()
        self.wait_expired()

    def _check(self, srv) -> None:
        """server_check_query on a server idle longer than server_check_delay, before reuse."""
        self._reset(srv, self.worker.config.server_check_query)

    def _reset(self, srv, query: str) -> None:
        """Run ``query`` on a released server; it goes idle (or is closed) in _reset_done.

        A server that does not answer within server_reset_timeout is closed and replaced."""
        srv.state = ServerState.RESET
        self.resetting.add(srv)
        srv.internal_query(messages.query(query), lambda srv, error: self._reset_done(srv, error, query))
        timeout = self.worker.config.server_reset_timeout
        if timeout > 0:
            srv.timer = self.worker.loop.call_later(timeout, self._reset_timed_out, srv, query)

    def _reset_timed_out(self, srv, query: str) -> None:
        srv.timer = None
        if srv.state is ServerState.RESET and not srv.closed:
            srv.close(f"no answer to {query!r} within server_reset_timeout")

    # -- held servers ------------------------------------------------------------
    def hold(self, srv, client) -> bool:
        """``client`` reached a transaction boundary with ``srv``: keep them linked (True) while no
        one else needs a server, so that its next Query, like its last answer, crosses the C relay
        without Python (a TLS client's pair, which only Python relays, is spared the release and
        the next link); or False: release it as usual.

        Only what release() would hand straight back to the idle list is held, and only with the
        C relay in use (PGMP_IMPL=python holds nothing) and a server without TLS. A held server is
        idle to everyone else: another client takes it in _usable_idle, and the janitor, pause,
        reconnect, a host change and a stop treat it as idle."""
        worker = self.worker
        cfg = worker.config
        crelay = worker.loop.crelay
        if (crelay is None or self.waiting or self.paused or client.close_at_boundary or srv.cancel_pending
                or srv.release_reset or srv.tls is not None or not self._pair_at_rest(srv, client)
                or srv.created < self.reconnect_before or worker.server_expired(srv)
                or srv.session.read_only_seen or (cfg.server_reset_query and cfg.server_reset_query_always)
                or (cfg.server_check_query and cfg.server_check_delay < HOLD_CHECK_DELAY)
                or self.unfit(srv)):
            return False
        srv.held = True
        srv.last_used = worker.loop.clock()
        self.held[srv] = None
        if client.relay_peer is srv:
            crelay.hold(srv.fd, True)
        return True

    def reuse_held(self, srv, relayed: bool) -> None:
        """The client of held ``srv`` sent a request: in use again (``relayed``: through C, which
        cleared its mark itself)."""
        self._drop_hold(srv)
        srv.last_used = self.worker.loop.clock()
        self.stats.assign_count += 1
        if not relayed and srv.relay_peer is not None:
            self.worker.loop.crelay.hold(srv.fd, False)

    def quiet_held(self, srv, assigns: int, t_used: float, in_use: bool, held_again: bool) -> None:
        """The end of a quiet pair whose held server C reused ``assigns`` times (reuse_held) and
        held again at each transaction's end (hold), last at ``t_used`` (0: never): ``in_use``,
        C passed a request of its client and the server is in a transaction; otherwise, if
        ``held_again``, it is the most recently held, as hold() leaves it (the first taken is
        the one held longest ago). ClientConnection.quiet_end."""
        self.stats.assign_count += assigns
        if t_used:
            srv.last_used = t_used
        if not srv.held:
            return
        if in_use:
            self._drop_hold(srv)
        elif held_again:
            del self.held[srv]
            self.held[srv] = None

    def held_free(self, srv) -> bool:
        """Held ``srv`` may be taken from its client now.

        Not while a batch of the C relay has read bytes of its client that Python has yet to see
        (C cleared its mark: their record is still to come, and may hold a request already sent
        to the server), nor while anything of the pair waits in Python's buffers. Every taking of
        a held server asks this: a control message (PAUSE, RECONNECT, a stop) or a host check can
        arrive in the same batch as such a record, ahead of it."""
        client = srv.client
        if client.relay_peer is srv and not self.worker.loop.crelay.held(srv.fd):
            return False
        return not srv.cancel_pending and self._pair_at_rest(srv, client)

    @staticmethod
    def _pair_at_rest(srv, client) -> bool:
        """Nothing of the pair waits in Python: no client bytes kept to process or pass on, nothing
        still to send to the server, no decrypted bytes in the client's TLS layer. Only then may a
        server be held (hold), or a held one taken (held_free): else the client's next request,
        already begun, would find its server gone."""
        return not (client.leftover is not None or client.skip or srv.skip or srv.unsent
                    or (client.tls is not None and client.tls.buffered()))

    def _take_held(self):
        """A held server another client may have now, unlinked from its client; or None."""
        self.worker.loop.quiet_end_all()      # which are free, and their Links, as they are now
        srv = next((s for s in self.held if self.held_free(s)), None)
        if srv is not None:
            self.unhold(srv)
        return srv

    def unhold(self, srv) -> None:
        """End ``srv``'s hold: its client goes idle, without a server, as at an ordinary release
        (also as a held server closes: its client is not told)."""
        self._drop_hold(srv)
        client = srv.client
        srv.client = None
        client.unlink_held(srv)

    def _drop_hold(self, srv) -> None:
        del self.held[srv]
        srv.held = False

    def evict(self, reason: str) -> bool:
        """Close an idle (or held) server to make room for another pool; False if none is free."""
        srv = self.idle.pop(0) if self.idle else self._take_held() if self.held else None
        if srv is None:
            return False
        srv.close(reason)
        return True

    def release_held(self) -> None:
        """Every held server that is free (held_free) back to the ordinary path (release): pause,
        reconnect, a stop. One that is not is in use already; its transaction's end releases it."""
        self.worker.loop.quiet_end_all()
        for srv in list(self.held):
            if self.held_free(srv):
                self.unhold(srv)
                self.release(srv)

    def forget(self, client) -> None:
        try:
            self.waiting.remove(client)
        except ValueError:
            pass
        try:
            self.login_waiters.remove(client)
        except ValueError:
            pass

    def _link(self, srv, client):
        self._assign(srv, client)
        client.attach(srv)

    def _assign(self, srv, client):
        srv.state = ServerState.ACTIVE
        srv.client = client
        srv.last_used = now = self.worker.loop.clock()
        self.stats.assign_count += 1
        if client.wait_started:
            us = int((now - client.wait_started) * 1e6)
            self.stats.wait_time_us += us
            self.stats.wait_count += 1
            observe(self.stats.wait_hist, us)
            client.wait_started = 0.0

    # -- servers -----------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self.size + (self.reserve if self.use_reserve else 0)

    def _grow(self):
        if self.paused or (self.servers and len(self.servers) + self.resolving >= self.limit > 0):
            return                          # at the limit, with servers: nothing to open (per queued request)
        # A server finishing its reset is free within a round trip; a new one costs a backend fork.
        need = len(self.waiting) + (1 if self.login_waiters else 0) - len(self.resetting)
        if need > len(self.opening) + self.resolving and self._login_retry_pending():
            if not self.servers:
                self._fail_waiters(self._no_server_error())
            return
        while len(self.opening) + self.resolving < need and len(self.servers) + self.resolving < self.limit:
            if not self._open_server():
                break
        if self.limit <= 0 and self.waiting:
            self._fail_waiters(self._no_server_error())

    def _login_retry_pending(self) -> bool:
        """After a failed login, wait server_login_retry before trying again; clients fail fast meanwhile."""
        if not self.login_failed_at:
            return False
        if self.worker.loop.clock() - self.login_failed_at < self.worker.config.server_login_retry:
            return True
        self.login_failed_at = 0.0
        return False

    def _no_server_error(self) -> PgmpError:
        if self.size <= 0:
            return PgmpError(errors.TOO_MANY_CONNECTIONS,
                             f"no server connections allowed for pool {self.name} (pool size is 0 in this worker)")
        return self.last_error or PgmpError(errors.CONNECTION_FAILURE, f"no server available for {self.name}")

    def _open_server(self, evict: bool = True) -> bool:
        """Open a server within the limits; ``evict``: an idle server of another pool may make room.

        True once a server is connecting, or its host's address is being looked up."""
        if len(self.servers) + self.resolving >= self.limit or not self.worker.may_open_server(self, evict):
            return False
        srv = self.worker.open_server(self, self._grow)
        if srv is WAIT:
            return True
        if srv is None:
            return False
        self.servers.add(srv)
        self.opening.add(srv)
        return True

    # -- hosts -------------------------------------------------------------------
    @property
    def target(self) -> str:
        return self.db.target_session_attrs

    def unfit(self, srv) -> str:
        """Why ``srv`` should not serve this pool any more (its host changed), or "" if it may.

        Runs at every release: a database with one host and target "any" has nothing to
        decide, and the others compare with a set cached until the host table changes."""
        db = self.db
        if len(db.hosts) == 1 and db.target_session_attrs == "any":
            return ""
        worker = self.worker
        table = worker.hosts
        spec = srv.host
        now = worker.loop.clock()
        if srv.session.read_only_seen:
            srv.session.read_only_seen = False
            if self.target in WRITABLE_TARGETS:
                worker.host_read_only(spec)
                return f"it answered 25006 (read-only transaction) for {self.name}: its role is checked again"
        table.learned(spec, srv.params, now)            # in_hot_standby changes at a promotion
        version, until = self.fitting_key
        if version != table.version or now >= until:
            self.fitting = frozenset(table.candidates(db.hosts, self.target, db.max_replica_lag, now))
            self.fitting_key = (table.version, table.valid_until(db.hosts, now))
        if spec in self.fitting or not self.fitting:
            if not self.fitting and fits_pool(self.target, table.get(spec), db.max_replica_lag) is False:
                return f"host {spec} no longer fits target_session_attrs={self.target} " \
                       f"({self._describe(table.get(spec))})"
            return ""
        st = table.get(spec)
        if fits_pool(self.target, st, db.max_replica_lag) is False:
            return f"host {spec} no longer fits target_session_attrs={self.target} ({self._describe(st)})"
        if len(db.hosts) > 1 and (st.banned(now) or st.up is False):
            return f"host {spec} is {'banned' if st.banned(now) else 'down'}: {st.error or 'failed'}"
        # of a tier behind another (prefer-standby: a standby is usable again; a known host over one of
        # unknown role)
        return f"host {spec} is a {st.role} and {', '.join(map(str, sorted(self.fitting, key=str)))} " \
               f"serves target_session_attrs={self.target} better"

    def _describe(self, st) -> str:
        if st.lagging(self.db.max_replica_lag):
            return f"standby {st.lag:.1f}s behind, max_replica_lag {self.db.max_replica_lag:g}s"
        return f"now a {st.role}" + (", read-only" if st.read_only and not st.in_recovery else "")

    def hosts_changed(self) -> None:
        """What is known of the hosts changed: close idle servers of hosts that no longer fit, and
        open servers for the clients that waited for a host."""
        self.worker.loop.handoff_end_all()
        for srv in list(self.idle):
            why = self.unfit(srv)
            if why:
                self.idle.remove(srv)
                srv.close(why)
        for srv in list(self.held):
            why = self.held_free(srv) and self.unfit(srv)
            if why:
                self.unhold(srv)
                srv.close(why)
        if self.waiting or self.login_waiters:
            self._grow()

    def server_logged_in(self, srv) -> None:
        """A new server finished its login: check its role against the pool's target, then run
        connect_query, if set, before it serves."""
        worker = self.worker
        worker.hosts.succeeded(srv.host)
        learned = worker.hosts.learned(srv.host, srv.params, worker.loop.clock())
        st = worker.hosts.get(srv.host)
        ok = fits_pool(self.target, st, self.db.max_replica_lag)
        if ok is False:
            if learned:
                log.info("host %s is a %s: servers of %s (target_session_attrs=%s) go elsewhere",
                         srv.host, st.role, self.name, self.target)
            srv.close(f"host {srv.host} does not fit target_session_attrs={self.target} ({self._describe(st)})")
            return
        if ok is None:
            rows: list = []
            srv.internal_query(messages.query(ROLE_QUERY), lambda srv, error: self._role_known(srv, error, rows),
                               rows)
            return
        self._connect_query(srv)

    def _role_known(self, srv, error, rows) -> None:
        """The answer to ROLE_QUERY, for a server of PostgreSQL 13 or older."""
        if error is None and rows:
            values = messages.parse_data_row(rows[0])
            if len(values) == 2:
                self.worker.hosts.set_role(srv.host, values[0] == b"t", values[1] == b"on",
                                           self.worker.loop.clock())
        if error is not None:
            srv.abort(PgmpError(error.sqlstate, f"the role query failed: {error.message}", detail=error.detail))
            return
        if fits_pool(self.target, self.worker.hosts.get(srv.host), self.db.max_replica_lag) is not True:
            srv.close(f"host {srv.host} does not fit target_session_attrs={self.target}")
            return
        self._connect_query(srv)

    def _connect_query(self, srv) -> None:
        query = self.db.connect_query
        if query:
            srv.internal_query(messages.query(query), self._connect_query_done)
            return
        self.server_ready(srv)

    def server_ready(self, srv) -> None:
        """A new server is ready to serve."""
        if srv.timer:                           # server_connect_timeout
            srv.timer.cancel()
            srv.timer = None
        srv.state = ServerState.IDLE
        self.opening.discard(srv)
        self.last_error = None
        if self.params is None:
            self.params = dict(srv.params)
        self._finish_logins()
        self._put_idle(srv)

    def _connect_query_done(self, srv, error) -> None:
        if error is not None:                   # (still LOGIN: counted as a failed login)
            srv.abort(PgmpError(error.sqlstate, f"connect_query failed: {error.message}", detail=error.detail))
            return
        self.server_ready(srv)

    def _finish_logins(self):
        waiters, self.login_waiters = self.login_waiters, []
        for client in waiters:
            client.finish_login(self.params)

    def _put_idle(self, srv) -> None:
        if srv.created < self.reconnect_before:
            srv.close("pgmp reconnect")
            return
        while self.waiting and not self.paused:
            try:
                client = self.waiting.popleft()
            except IndexError:              # the rest got servers from the C relay in this batch
                break
            if not client.closed:
                self._link(srv, client)
                return
        srv.state = ServerState.IDLE
        srv.last_used = self.worker.loop.clock()
        self.idle.append(srv)

    def release(self, srv, verdict: int = 0, why: str = "") -> None:
        """The client is done with ``srv``: reuse it (REUSE), DISCARD ALL first (RESET), or CLOSE it.

        A server with a cancel request in flight is held until the cancel is done, so the
        cancel cannot hit the next client's query. Session mode always runs
        server_reset_query; a pinned client's server (RESET) always gets DISCARD ALL, the
        one command that clears every kind of session state.
        """
        srv.client = None
        if srv.held:                        # its client left between transactions
            self._drop_hold(srv)
        if verdict == CLOSE:
            srv.close(why or "client left with the server busy")
            return
        if verdict == RESET:
            srv.release_reset = True
        if self.worker.server_expired(srv):
            srv.close("server_lifetime reached")
            return
        why = self.unfit(srv)
        if why:
            srv.close(why)
            return
        if srv.cancel_pending:
            srv.parked = True
            srv.state = ServerState.IDLE
            return
        if srv.release_reset:
            srv.release_reset = False
            self._reset(srv, "DISCARD ALL")
            return
        query = self.worker.config.server_reset_query
        if query and (self.mode == "session" or self.worker.config.server_reset_query_always):
            self._reset(srv, query)
            return
        self._put_idle(srv)

    def cancel_done(self, srv) -> None:
        """A cancel for ``srv`` completed: a server held back for it may serve again."""
        if srv.parked and not srv.cancel_pending and not srv.closed:
            srv.parked = False
            self.release(srv)

    def _reset_done(self, srv, error, query: str) -> None:
        self.resetting.discard(srv)
        srv.state = ServerState.IDLE
        if srv.timer:
            srv.timer.cancel()
            srv.timer = None
        if error is not None:
            srv.close(f"reset or check query failed: {error.message}")
            return
        srv.session.after_reset(query)
        self._put_idle(srv)

    def server_closed(self, srv, exc: PgmpError | None, was) -> None:
        self.stats.bytes_out += srv.rx
        self.servers.discard(srv)
        if srv in self.idle:
            self.idle.remove(srv)
        self.resetting.discard(srv)
        if srv in self.opening:
            self.opening.discard(srv)
            verdict = self.worker.host_failed(self, srv, exc, was) if exc is not None else ""
            if verdict == NEXT_ADDRESS or (verdict == BANNED and len(self.db.hosts) > 1):
                # another address of the name, another host, or the clients wait for one (host
                # state changes retry)
                self.last_error = exc
                self._grow()
                return
            if exc is not None and exc.sqlstate == errors.CANNOT_CONNECT_NOW:
                # "the database system is starting up": temporary, try again shortly
                self.worker.loop.call_later(0.5, self._grow)
                return
            if exc is not None:
                self.last_error = exc
                self.login_failed_at = self.worker.loop.clock()
                if not self.opening and not self.idle:
                    # nothing else can serve the queue now: say why instead of letting clients hang
                    self._fail_waiters(exc)
                    return
        self._grow()

    def _fail_waiters(self, exc: PgmpError) -> None:
        waiters = list(self.waiting) + self.login_waiters
        self.waiting.clear()
        self.login_waiters = []
        for client in waiters:
            client.fail(exc)

    def janitor(self, now: float) -> None:
        """Once a second: idle timeouts and lifetimes, min_pool_size, the reserve pool."""
        worker = self.worker
        cfg = worker.config
        if self.held:
            # held past a deadline of the idle list's, or wanted by a queued client: released,
            # release() and the loop below then do what they do for any idle server
            late = min((t for t in (cfg.server_idle_timeout, cfg.server_check_delay if cfg.server_check_query else 0)
                        if t > 0), default=0)
            for srv in list(self.held):
                if (self.waiting or (late and now - srv.last_used > late) or worker.server_expired(srv)) \
                        and self.held_free(srv):
                    self.unhold(srv)
                    self.release(srv)
        for srv in list(self.idle):
            if len(self.servers) <= self.min_size:
                break
            if cfg.server_idle_timeout and now - srv.last_used > cfg.server_idle_timeout:
                self.idle.remove(srv)
                srv.close("server_idle_timeout")
            elif worker.server_expired(srv):
                self.idle.remove(srv)
                srv.close("server_lifetime reached")
        if self.waiting and self.reserve and not self.use_reserve:
            first = next((c for c in self.waiting if not c.closed), None)
            if first is not None and now - first.wait_started >= cfg.reserve_pool_timeout:
                self.use_reserve = True
                log.warning("pool %s: a client waited %.1fs, using the reserve pool (%d more)",
                            self.name, now - first.wait_started, self.reserve)
        elif not self.waiting:
            self.use_reserve = False
        if self.waiting or self.login_waiters:
            self._grow()
        if not self.paused and len(self.servers) < self.min_size and not self._login_retry_pending():
            self._open_server(evict=False)      # min_pool_size never takes room from another pool

    def pause(self) -> int:
        """Hand out no more servers; returns how many are still in use."""
        self.paused = True
        self.worker.loop.handoff_end_all()
        self.release_held()
        return sum(1 for s in self.servers if s.state is ServerState.ACTIVE)

    def resume(self) -> None:
        self.paused = False
        for srv in list(self.idle):
            if not self.waiting:
                break
            self.idle.remove(srv)
            self._put_idle(srv)
        self._grow()

    def reconnect(self) -> None:
        """Close every server as soon as it is not in use (after a failover, for example)."""
        self.reconnect_before = self.worker.loop.clock() + 1e-6
        self.worker.loop.handoff_end_all()
        self.release_held()
        for srv in list(self.idle):
            self.idle.remove(srv)
            srv.close("pgmp reconnect")

    def totals(self) -> dict:
        """The counters, with the bytes of the connections still open."""
        row = self.stats.as_dict()
        row["bytes_in"] += sum(c.rx for c in self.clients)
        row["bytes_out"] += sum(s.rx for s in self.servers)
        return row

    def snapshot(self) -> dict:
        """Counters and gauges of this pool now, for ``pgmp stats`` and the admin console."""
        row = {"database": self.db.name, "user": self.client_user, "mode": self.mode, "pool_size": self.size,
               "paused": self.paused, "server_user": self.server_user}
        row.update(self.totals())
        row["prev"] = self.stats_older
        row["clients"] = len(self.clients) + len(self.login_waiters)
        row["servers"] = len(self.servers)
        held = len(self.held)                   # linked, but idle to the pool (hold)
        states = [c.state for c in self.clients]
        row["cl_active"] = states.count(ClientState.ACTIVE) - held
        row["cl_waiting"] = states.count(ClientState.WAITING)
        row["cl_idle"] = states.count(ClientState.IDLE) + held
        row["cl_login"] = len(self.login_waiters)
        now, cfg = self.worker.loop.clock(), self.worker.config
        sstates = [s.state for s in self.servers]
        row["sv_active"] = sstates.count(ServerState.ACTIVE) - held
        # idle servers that get server_check_query before their next use (PgBouncer's sv_used)
        used = sum(1 for s in self.idle if cfg.server_check_query and now - s.last_used > cfg.server_check_delay)
        parked = sum(1 for s in self.servers if s.parked)
        row["sv_idle"] = sstates.count(ServerState.IDLE) - used - parked + held
        row["sv_used"] = used
        row["sv_being_canceled"] = parked
        row["sv_held"] = held                   # of sv_idle: still linked to their last client
        first = next((c for c in self.waiting if c.wait_started), None)
        row["maxwait_us"] = int((now - first.wait_started) * 1e6) if first is not None else 0
        row["sv_login"] = sstates.count(ServerState.CONNECTING) + sstates.count(ServerState.LOGIN)
        row["sv_reset"] = sstates.count(ServerState.RESET)
        return row

    def close_all(self, reason: str) -> None:
        self.release_held()
        for srv in list(self.servers):
            if srv.state is ServerState.ACTIVE:
                continue
            srv.close(reason)
