"""A worker: one selectors loop serving its own listening sockets, client sessions and server pools.

Workers share nothing: everything that crosses processes is a control
message on the link to the master (pgmp.control). A Worker can also run
alone in one process (the tests of the data path do that).
"""
import errno
import logging
import os
import secrets as _secrets
import signal
import socket
import struct
import time

from pgmp import config as configmod
from pgmp import console, control, errors, tls
from pgmp.auth.authfile import load_auth_file
from pgmp.auth.client import mock_profile
from pgmp.auth.query import AuthQuery
from pgmp.auth.server import ServerAuthenticator
from pgmp.derive import Deriver
from pgmp.files import read_mock_secret
from pgmp.hba import load_hba
from pgmp.hosts import HostTable, host_failure
from pgmp.client import ClientConnection
from pgmp.logs import reopen_log_files
from pgmp.loop import EVENT_WRITE, Endpoint, Loop
from pgmp.pool import BANNED, NEXT_ADDRESS, WAIT, Pool, note_pause, worker_share
from pgmp.prepared import StatementCache
from pgmp.protocol import messages
from pgmp.resolve import ResolveError, Resolver
from pgmp.server import ServerConnection, ServerLogin, ServerState
from pgmp.session import TRACKED, ClientState

log = logging.getLogger("pgmp")

# BackendKeyData in transaction/statement mode: a per-worker sequence as the pid (a positive
# int32, never 0, as clients expect of a backend pid). Session mode gives the server's real pid.
KEY_SEQ_MASK = (1 << 30) - 1
HEARTBEAT_INTERVAL = 1.0
REFUSAL_LOG_INTERVAL = 10.0
CONSOLE_TIMEOUT = 10.0      # the master answers within its own 3 s; this covers a master that does not
STATS_PERIOD = 60.0         # SHOW STATS' averages cover the last period (PgBouncer's stats_period default)
_PEERCRED = struct.Struct("3i")


def tracked_parameters(config) -> frozenset[str]:
    """Reported parameters whose runtime SET follows a client to its next server."""
    return TRACKED | {p.lower() for p in config.track_extra_parameters}


# accept() errors that say the process or the host is out of descriptors or memory: the pending
# connection stays queued and an immediate retry fails again.
ACCEPT_EXHAUSTED = {
    errno.EMFILE: ("too many open files", "raise LimitNOFILE / ulimit -n or lower max_client_conn"),
    errno.ENFILE: ("too many open files in the system", "raise the kernel's fs.file-max or lower max_client_conn"),
    errno.ENOBUFS: ("no buffer space", "the host is short of memory"),
    errno.ENOMEM: ("out of memory", "the host is short of memory"),
}
# Errors of one connection that Linux reports from accept() itself (accept(2), "Error handling"):
# that connection is gone, the next one may be fine.
ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
                         errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM})
ACCEPT_BACKOFF_FIRST = 0.1
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_REMIND = 60.0            # a long episode is logged again this often


class Listener(Endpoint):
    """A listening socket: accepts in batches and makes client sessions."""
    __slots__ = ("worker", "kind", "name")

    def __init__(self, worker, sock: socket.socket):
        super().__init__(worker.loop, sock)
        self.worker = worker
        self.kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
        name = sock.getsockname()
        self.name = name if isinstance(name, str) else f"{name[0]}:{name[1]}"

    def read(self):
        pause = self.worker.accept_pause
        for _ in range(64):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP:
                    log.debug("accept on %s: a connection failed before it was accepted: %s",
                              self.name, exc.strerror or exc)
                    continue
                pause.failed(self, exc)
                return
            if pause.failures:
                pause.recovered()
            self.worker.accepted(sock, addr, self.kind)

    def on_eof(self, reason):
        pass


class AcceptPause:
    """Stops watching a worker's listen sockets for a while when accept() fails for want of resources.

    The listen sockets are level-triggered: a queued connection that cannot be accepted
    would wake the loop again at once, spinning it and flooding the log. So the worker
    stops watching them for a back-off (0.1 s, doubling up to 1 s, reset once an accept
    works) and goes on serving the sessions it has. An episode is logged when it starts
    and when accepting works again, with the count of failures in between.
    """
    __slots__ = ("worker", "failures", "delay", "errno", "started", "reminded", "timer")

    def __init__(self, worker):
        self.worker = worker
        self.failures = 0
        self.delay = 0.0
        self.errno = 0
        self.started = self.reminded = 0.0
        self.timer = None

    def failed(self, listener: Listener, exc: OSError) -> None:
        worker = self.worker
        now = worker.loop.clock()
        self.failures += 1
        if self.failures == 1:
            self.errno = exc.errno or 0
            self.started = self.reminded = now
            self.delay = ACCEPT_BACKOFF_FIRST
            what, advice = self.explain()
            log.error("accept() failed on %s: %s; worker %d pauses accepting new connections (%gs, doubling "
                      "up to %gs) until it works again, open sessions go on — %s", listener.name,
                      exc.strerror or exc, worker.slot, self.delay, ACCEPT_BACKOFF_MAX, advice)
        else:
            self.delay = min(2 * self.delay, ACCEPT_BACKOFF_MAX)
            if now - self.reminded >= ACCEPT_REMIND:
                self.reminded = now
                log.error("accept() still failing on worker %d: %d failures in %.0fs: %s — %s", worker.slot,
                          self.failures, now - self.started, *self.explain())
        for lst in worker.listeners:
            lst.pause_reading()
        if self.timer is None:
            self.timer = worker.loop.call_later(self.delay, self._retry)

    def _retry(self) -> None:
        self.timer = None
        for lst in self.worker.listeners:
            lst.resume_reading()             # level-triggered: a queued connection wakes the loop at once

    def recovered(self) -> None:
        what, advice = self.explain()
        log.warning("accept resumed after %d failures: %s — %s", self.failures, what, advice)
        self.failures = 0
        self.delay = 0.0

    def explain(self) -> tuple[str, str]:
        return ACCEPT_EXHAUSTED.get(self.errno, (os.strerror(self.errno).lower() if self.errno else "unknown error",
                                                 "see the first accept() error above"))


class CancelConnection(Endpoint):
    """A short connection that delivers one CancelRequest to a server and waits for it to hang up."""
    __slots__ = ("packet", "connecting", "timer", "on_done")

    def __init__(self, loop, sock, packet: bytes, timeout: float, on_done=None):
        super().__init__(loop, sock, EVENT_WRITE)
        self.packet = packet
        self.connecting = True
        self.on_done = on_done
        self.timer = loop.call_later(timeout, self.on_eof, "cancel_wait_timeout")

    def handle_event(self, mask):
        if self.connecting:
            self.connecting = False
            if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.on_eof("connect failed")
                return
            self.reading = True
            self._update_mask()
            self.send(self.packet)
            return
        super().handle_event(mask)

    def on_data(self, view, n):
        pass

    def on_eof(self, reason):
        if self.closed:
            return
        self.timer.cancel()
        self.close_socket()
        if self.on_done:
            self.on_done()


def mock_profile_for(cfg, secrets, instance_seed: bytes):
    """How this instance answers users without a secret (see auth/client.py): the same in every worker
    and after a restart, from auth_mock_secret_file, else auth_file's bytes, else the master's seed."""
    if cfg.auth_mock_secret_file:
        material = read_mock_secret(cfg.auth_mock_secret_file)
    elif cfg.auth_file:
        with open(cfg.auth_file, "rb") as f:
            material = f.read()
    else:
        material = instance_seed
    return mock_profile(secrets, material)


class Worker:
    def __init__(self, config, slot: int = 0, nworkers: int = 1, generation: int = 0,
                 instance_seed: bytes | None = None):
        self.config = config
        # the master's random seed, for a mock salt without auth_mock_secret_file or auth_file
        self.instance_seed = instance_seed if instance_seed is not None else os.urandom(32)
        self.slot = slot
        self.nworkers = nworkers
        self.generation = generation
        self.master = None
        self.draining: str | None = None
        self._title = ""
        self.loop = Loop(config.buffer_size)
        self.loop.max_unsent = config.max_unsent
        self.secrets = load_auth_file(config.auth_file, config.auth_max_iterations) if config.auth_file else {}
        self.hba = load_hba(config.hba_file) if config.hba_file else None
        # TLS contexts towards clients and towards servers (None: TLS off on that side)
        self.client_tls = tls.for_clients(config)
        self.server_tls = tls.for_servers(config)
        self.mock = mock_profile_for(config, self.secrets, self.instance_seed)
        self.auth_query = AuthQuery(self)       # secrets of users missing from auth_file (auth_user)
        self.deriver = Deriver(self.loop)       # PBKDF2 of logins, in threads (derive.py)
        self.hosts = HostTable()                # what is known of the databases' hosts (pgmp.hosts)
        self.resolver = Resolver(self.loop, config.dns_max_ttl, config.dns_nxdomain_ttl)
        self.pools: dict[tuple[str, str], Pool] = {}
        self.statement_cache = StatementCache()
        if self.loop.crelay is not None:        # an evicted name makes every binds table stale
            self.statement_cache.on_evict = self.loop.crelay.retire
        self.tracked_parameters = tracked_parameters(config)
        self.paused_dbs: set[str] = set()
        self.paused_all = False
        self.disabled_dbs: set[str] = set()     # DISABLE on the admin console: new logins refused
        self._conn_seq = 0
        self._console_seq = 0
        self.console_waits: dict[int, tuple] = {}   # console request id -> (callback, timer)
        self.stats_stamps = (self.loop.clock() - 1.0, self.loop.clock())   # (older, newer): STATS_PERIOD
        self.keys: dict[int, ClientConnection] = {}
        self.clients: dict[ClientConnection, None] = {}   # (a dict: smaller per entry than a set)
        self._seq = 0
        self.listeners: list[Listener] = []
        self.accept_pause = AcceptPause(self)
        self.refusing = 0                   # clients being refused (over max_client_conn), among self.clients
        self._refusals = [0.0, 0]           # when the last refusal was logged, refusals since
        self._signal_ep = None
        self.stopping = False

    # -- sockets -----------------------------------------------------------------
    def listen_on(self, socks: list[socket.socket]):
        for s in socks:
            self.listeners.append(Listener(self, s))

    def accepted(self, sock: socket.socket, addr, kind: str):
        if kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = "unix"
        cred = None
        if kind == "unix":
            try:
                cred = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError:
                pass
        # Clients being refused do not hold a slot: a slot freed meanwhile goes to the next client.
        limit = worker_share(self.config.max_client_conn, self.nworkers, self.slot)
        over = len(self.clients) - self.refusing >= limit
        if over:
            self.refusing += 1
            self._log_refusal(limit)
        self.clients[ClientConnection(self, sock, peer, over_limit=over, peer_cred=cred)] = None

    def next_conn_id(self) -> int:
        """An id for a client or server connection, unique in the instance (SHOW CLIENTS, KILL_CLIENT):
        a sequence of this worker, its generation (10 bits) and slot (10 bits)."""
        self._conn_seq += 1
        return (self._conn_seq << 20) | ((self.generation & 1023) << 10) | self.slot

    def _log_refusal(self, limit: int):
        """At most one line per REFUSAL_LOG_INTERVAL: a connection storm must not flood the log too."""
        now = self.loop.clock()
        last, count = self._refusals
        count += 1
        if now - last >= REFUSAL_LOG_INTERVAL or not last:
            log.warning("max_client_conn reached: worker %d has its %d clients; refused %d new connection%s "
                        "with 53300 since the last report", self.slot, limit, count, "" if count == 1 else "s")
            last, count = now, 0
        self._refusals = [last, count]

    def client_closed(self, client):
        if client in self.clients:
            del self.clients[client]
            if client.over_limit:
                self.refusing -= 1
        if self.draining and not self.clients:
            self._drained()         # now: a timer would first wait out the poll
        key = (client.key_pid, client.key_secret)
        if client.key_pid and self.keys.get(key) is client:
            del self.keys[key]

    # -- pools ---------------------------------------------------------------------
    def database_for(self, name: str):
        return configmod.database_for(self.config, name)

    def get_pool(self, db, user: str) -> Pool:
        key = (db.name, user)
        pool = self.pools.get(key)
        if pool is None or pool.db != db:
            mode = configmod.pool_mode_for(db, self.config.users.get(user))
            share = lambda n: worker_share(n, self.nworkers, self.slot)   # noqa: E731
            old = pool
            if old is not None:                       # the database section changed on reload
                old.close_all("database settings changed")
            pool = self.pools[key] = Pool(self, db, user, share(db.pool_size), mode,
                                          min_size=share(db.min_pool_size), reserve=share(db.reserve_pool_size))
            if old is not None:
                pool.stats = old.stats                # counters never go back (the old clients count on)
            pool.paused = self.paused_all or db.name in self.paused_dbs
        return pool

    def may_open_server(self, pool: Pool, evict: bool = True) -> bool:
        """max_db_connections and max_user_connections, this worker's share of them."""
        db_max = worker_share(pool.db.max_db_connections, self.nworkers, self.slot) \
            if pool.db.max_db_connections else 0
        user_cfg = self.config.users.get(pool.client_user)
        user_limit = user_cfg.max_user_connections if user_cfg else self.config.max_user_connections
        user_max = worker_share(user_limit, self.nworkers, self.slot) if user_limit else 0
        if db_max and not self._room(pool, db_max, lambda p: p.db.name == pool.db.name, evict):
            return False
        if user_max and not self._room(pool, user_max, lambda p: p.server_user == pool.server_user, evict):
            return False
        return True

    def _room(self, pool: Pool, limit: int, same, evict: bool) -> bool:
        """Under ``limit`` servers among the pools ``same`` selects; at the limit, an idle server of
        another of those pools is closed to make room (idle servers must not starve a waiting pool)."""
        pools = [p for p in self.pools.values() if same(p)]
        if sum(len(p.servers) + p.resolving for p in pools) < limit:
            return True
        if not evict:
            return False
        for other in pools:
            if other is not pool and other.evict(f"making room for pool {pool.name} (connection limit)"):
                return True
        return False

    def _janitor(self):
        """Once a second: pool maintenance, client timeouts, the freeing of servers other pools wait for."""
        now = self.loop.clock()
        self.loop.handoff_end_all()         # (server_lifetime and the like: asked again within a second)
        for pool in list(self.pools.values()):
            pool.janitor(now)
        if now - self.stats_stamps[1] >= STATS_PERIOD:
            self.stats_stamps = (self.stats_stamps[1], now)
            for pool in self.pools.values():
                pool.stats_older, pool.stats_newer = pool.stats_newer, pool.totals()
        cfg = self.config
        qt, itt, cit = cfg.query_timeout, cfg.idle_transaction_timeout, cfg.client_idle_timeout
        if qt or itt or cit:
            for client in list(self.clients):
                self._client_timeouts(client, now, qt, itt, cit)
        self.loop.call_later(1.0, self._janitor)

    def _client_timeouts(self, client, now, qt, itt, cit):
        tx = client.link
        if client.state is ClientState.ACTIVE:
            if tx.outstanding:
                if qt and now - tx.t_query > qt and client.server is not None \
                        and client.server.cancel_pending == 0 and tx.t_query != client.cancelled_at:
                    client.cancelled_at = tx.t_query
                    log.warning("query_timeout: cancelling the query of %s@%s after %.1fs",
                                client.user, client.database, now - tx.t_query)
                    self.cancel_server(client)
                return
            if tx.status != 73:
                if itt and now - tx.t_ready > itt:
                    client.fail(errors.PgmpError(errors.PROTOCOL_VIOLATION, "idle_transaction_timeout",
                                                 detail=f"idle in a transaction for more than {itt:g}s"))
                return
        if cit and client.state in (ClientState.IDLE, ClientState.ACTIVE) and \
                now - max(tx.t_ready, client.connected_at) > cit:
            client.fail(errors.PgmpError(errors.PROTOCOL_VIOLATION, "client_idle_timeout",
                                         detail=f"idle for more than {cit:g}s"))

    def pool_command(self, action: str, database: str | None, client_id: int = 0) -> dict:
        """pause / resume / reconnect / kill the pools of ``database`` (all when None); disable / enable
        logins to ``database``; kill_client the client whose SHOW CLIENTS id is ``client_id``."""
        if action in ("disable", "enable"):
            (self.disabled_dbs.add if action == "disable" else self.disabled_dbs.discard)(database)
            return {"pools": 0, "busy_servers": 0}
        if action == "kill_client":
            return {"killed": self.kill_client(client_id)}
        pools = [p for p in self.pools.values() if database is None or p.db.name == database]
        busy = 0
        if action == "kill":
            self._kill(pools)
            action = "pause"                    # new clients of a killed database wait for RESUME
        for pool in pools:
            if action == "pause":
                busy += pool.pause()
            elif action == "resume":
                pool.resume()
            elif action == "reconnect":
                pool.reconnect()
        note_pause(self, action, database)
        return {"pools": len(pools), "busy_servers": busy}

    def _kill(self, pools) -> None:
        """KILL: close the clients and every server of ``pools`` now."""
        shutdown = errors.PgmpError(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command",
                                    detail="an administrator ran KILL on the admin console")
        for client in [c for c in self.clients if c.pool in pools]:
            client.fail(shutdown)
        for pool in pools:
            for srv in list(pool.servers):
                srv.close("KILL on the admin console")

    def kill_client(self, client_id: int) -> int:
        """KILL_CLIENT: close the client with this id and its server, if it is here; 1 if it was."""
        for client in self.clients:
            if client.conn_id == client_id:
                srv = client.server
                client.fail(errors.PgmpError(errors.ADMIN_SHUTDOWN, "admin forced disconnect",
                                             detail="an administrator ran KILL_CLIENT on the admin console"))
                if srv is not None and not srv.closed:
                    srv.close("KILL_CLIENT on the admin console")
                return 1
        return 0
    # -- server connections ----------------------------------------------------------
    def open_server(self, pool: Pool, then=None):
        """A new server connection for ``pool``, to the host pgmp.hosts chooses among its database's.

        Returns the ServerConnection (connecting); WAIT while the host's address is looked up
        (``then()`` runs once it is known, pool.resolving counts it); or None, with
        pool.last_error saying why (pool.no_host: no host fits now; the clients wait). A host
        that fails at once (no address, connect refused on a unix socket) is banned and, with
        several hosts, another is tried.
        """
        db = pool.db
        for _ in range(len(db.hosts) + 8):         # (each host once, and a few more addresses of names)
            now = self.loop.clock()
            spec = self.hosts.choose(db.hosts, db.target_session_attrs, db.load_balance_hosts,
                                     db.max_replica_lag, now, pool.turn)
            if spec is None:
                why = self.hosts.why_none(db.hosts, db.target_session_attrs, db.max_replica_lag, now)
                if not pool.no_host:                  # once per episode, not at every retry
                    log.warning("pool %s: %s; clients wait (query_wait_timeout) for a host", pool.name, why)
                pool.no_host = why
                pool.last_error = errors.PgmpError(errors.CONNECTION_FAILURE, f"no server available for "
                                                   f"{pool.name}: {why}")
                return None
            pool.no_host = ""
            pool.turn += 1
            addrs = self._addresses(pool, spec, then)
            if addrs is WAIT:
                return WAIT
            if isinstance(addrs, errors.PgmpError):
                failure = addrs
            else:
                family, sockaddr = addrs[self.hosts.get(spec).address % len(addrs)]
                result = self._connect(pool, spec, family, sockaddr)
                if not isinstance(result, errors.PgmpError):
                    return result
                failure = result
            pool.last_error = failure
            if self.host_failed(pool, None, failure, ServerState.CONNECTING, spec) != NEXT_ADDRESS \
                    and len(db.hosts) == 1:
                return None
        return None

    def _addresses(self, pool: Pool, spec, then):
        """(family, sockaddr) list of ``spec``, WAIT (a lookup runs), or the PgmpError of a failed lookup."""
        if spec.unix:
            return [(socket.AF_UNIX, f"{spec.host}/.s.PGSQL.{spec.port}")]

        def resolved(result, pool=pool):
            pool.resolving -= 1
            if then is not None:
                then()
        addrs = self.resolver.lookup(spec.host, spec.port, resolved)
        if addrs is None:
            pool.resolving += 1
            return WAIT
        if isinstance(addrs, ResolveError):
            return errors.PgmpError(errors.CONNECTION_FAILURE, f"could not resolve server host {spec.host!r}: {addrs}")
        return addrs

    def _connect(self, pool: Pool, spec, family: int, sockaddr):
        """Start connecting to one address: the ServerConnection, a PgmpError, or None (no socket)."""
        text = str(spec)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:              # out of descriptors: the client waits, as for a full pool
            pool.last_error = errors.PgmpError(errors.CONNECTION_FAILURE,
                                               f"could not connect to server {text}: {exc.strerror or exc}")
            return None
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        err = sock.connect_ex(sockaddr)
        if err not in (0, 115, 11):                  # EINPROGRESS, EAGAIN (unix)
            sock.close()
            return errors.PgmpError(errors.CONNECTION_FAILURE, f"could not connect to server {text}: {os.strerror(err)}")
        auth = ServerAuthenticator(pool.server_user, password=pool.password, scram_keys=pool.scram_keys,
                                   secret=pool.secret, database=pool.db.name,
                                   require_auth=pool.db.server_require_auth,
                                   max_iterations=self.config.auth_max_iterations)
        extra = dict(pool.startup_options)
        if pool.db.application_name:
            extra["application_name"] = pool.db.application_name
        login = ServerLogin(pool.server_user, pool.dbname, auth, extra)
        srv = ServerConnection(self.loop, pool, sock, text, login, host=spec, address=(family, sockaddr))
        srv.conn_id = self.next_conn_id()
        timeout = self.config.server_connect_timeout
        if timeout > 0:
            srv.timer = self.loop.call_later(timeout, self._server_login_timeout, srv)
        return srv

    def host_failed(self, pool: Pool, srv, exc: errors.PgmpError, was, spec=None) -> str:
        """A connect or login to a host failed: ban it and ask the master to check it now.

        Returns BANNED; NEXT_ADDRESS when the host is a name with an address not tried yet
        (the next connect takes it, nothing is banned); or "" when the failure is not the
        host's fault (a refused password, an unknown database)."""
        spec = spec or srv.host
        if not host_failure(exc.sqlstate):
            return ""
        addresses = 1
        if was is ServerState.CONNECTING and not spec.unix:
            entry = self.resolver.cache.entries.get(spec.host)
            addresses = len(entry.addrs) if entry is not None and entry.addrs else 1
        st = self.hosts.get(spec)
        already = st.banned(self.loop.clock())
        if not self.hosts.failed(spec, self.loop.clock(), self.config.host_ban_time, exc.message, addresses):
            return NEXT_ADDRESS
        if len(pool.db.hosts) > 1 and not already:
            log.warning("host %s banned for %gs: %s", spec, self.config.host_ban_time, exc.message)
        if self.master is not None:
            self.master.post("host_report", host=spec.host, port=spec.port, event="failed", error=exc.message)
        return BANNED

    def host_read_only(self, spec) -> None:
        """A server of ``spec`` answered 25006 where it was thought writable: learn its role again."""
        log.warning("host %s answered 25006 (read-only transaction) to a client that needs a writable host: "
                    "checking its role again", spec)
        self.hosts.forget_role(spec, self.loop.clock())
        if self.master is not None:
            self.master.post("host_report", host=spec.host, port=spec.port, event="read_only",
                             error="25006 read-only transaction")

    def hosts_changed(self) -> None:
        for pool in list(self.pools.values()):
            pool.hosts_changed()

    def _server_login_timeout(self, srv):
        srv.timer = None
        from pgmp.server import ServerState
        if srv.state in (ServerState.CONNECTING, ServerState.LOGIN):
            srv.abort(errors.ServerProtocolError(
                f"server_connect_timeout: no login to {srv.addr_text} within {self.config.server_connect_timeout:g}s"))

    def server_expired(self, srv) -> bool:
        life = self.config.server_lifetime
        return life > 0 and self.loop.clock() - srv.created > life

    # -- cancel keys ---------------------------------------------------------------
    def new_cancel_key(self, client, pid: int = 0) -> tuple[int, int]:
        """The client's BackendKeyData: ``pid`` (session mode: its server's) or a made-up one, and
        a random secret of pgmp's own, so that cancels come through pgmp."""
        while True:
            if not pid:
                self._seq = (self._seq + 1) & KEY_SEQ_MASK
                if self._seq == 0:
                    continue
            key = (pid or self._seq, _secrets.randbits(32))
            if key not in self.keys:
                break
        self.keys[key] = client
        return key

    def cancel_request(self, pid: int, secret: int, forwarded: bool = False, done=None):
        """A CancelRequest with pgmp's key: cancel the query on the client's server, if any.

        ``done()`` runs once the server has taken the cancel (it closed pgmp's cancel
        connection), so that the client's cancel connection, like PostgreSQL's, ends only
        after the signal went out: a client that then sends its next query cannot have that
        one cancelled. A key this worker did not hand out goes to the master, which asks
        the other workers (then ``done`` runs at once).
        """
        client = self.keys.get((pid, secret))
        srv = client.server if client is not None else None
        loop = self.loop
        if loop.handing and client is not None:
            # the C relay's hand-offs in the batch being applied (Server.handed_off): a server handed
            # over after its client's last answer runs another client's request now; a client
            # handed a server runs its request there already
            if srv is not None and loop.handing.get(srv.fd, (None,))[0] is srv:
                srv = None
            elif srv is None:
                srv = loop.handed_clients.get(client)
        # (held: the client is between transactions)
        if srv is None or not srv.backend_pid or srv.held:
            if client is None and not forwarded and self.master is not None:
                self.master.post("cancel", pid=pid, secret=secret)
            elif client is None:
                log.debug("cancel request with unknown key ignored")
            if done is not None:
                done()
            return
        self.cancel_server(client, done, srv)
        log.info("cancel: user=%s db=%s server pid=%d", client.user, client.database, srv.backend_pid)

    def cancel_server(self, client, on_done=None, srv=None):
        """Cancel the query running on ``client``'s server (``srv``, if not yet its server); the
        server is held until it is done."""
        srv = srv or client.server
        family, sockaddr = srv.address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot cancel the query of %s@%s: %s", client.user, client.database, exc.strerror or exc)
            if on_done is not None:
                on_done()
            return
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in (0, 115, 11):
            sock.close()
            if on_done is not None:
                on_done()
            return
        srv.cancel_pending += 1
        self.loop.handoff_end_all()         # not handed over until the cancel is done (Pool.release)

        def done(srv=srv):
            srv.cancel_pending -= 1
            srv.pool.cancel_done(srv)
            if on_done is not None:
                on_done()

        CancelConnection(self.loop, sock, messages.cancel_request(srv.backend_pid, srv.backend_secret),
                         self.config.cancel_wait_timeout or 10, done)

    # -- running ---------------------------------------------------------------------
    def run(self):
        self._install_signals()
        self.loop.call_later(0, self._heartbeat)
        self.loop.call_later(1.0, self._janitor)
        profile_dir = os.environ.get("PGMP_PROFILE")
        if profile_dir:
            # for developers: the worker's loop under cProfile, written out when it stops
            import cProfile
            profiler = cProfile.Profile()
            profiler.runcall(self.loop.run)
            path = os.path.join(profile_dir, f"worker-{self.slot}-{os.getpid()}.prof")
            try:
                profiler.dump_stats(path)
            except OSError as exc:
                log.warning("PGMP_PROFILE: cannot write %s: %s", path, exc)
        else:
            self.loop.run()
        if self.master is not None and self.config.metrics_listen and not self.master.closed:
            from pgmp.metrics import worker_figures
            self.master.post("metrics", id=0, data=worker_figures(self))   # the last figures, for the totals
        for pool in self.pools.values():
            pool.close_all("pgmp worker exiting")
        for srv in [s for p in self.pools.values() for s in p.servers]:
            srv.flush()
        self.deriver.close()
        self.resolver.close()

    def attach_master(self, sock: socket.socket):
        self.master = MasterLink(self, sock)
        self.master.post("ready", slot=self.slot, generation=self.generation, pid=os.getpid())

    def _heartbeat(self):
        nservers = sum(len(p.servers) for p in self.pools.values())
        if self.master is not None:
            self.master.post("heartbeat", clients=len(self.clients), servers=nservers)
        title = f"pgmp: worker {self.slot} [clients={len(self.clients)} servers={nservers}]"
        if self.draining:
            title += " draining"
        if title != self._title:
            self._title = title
            try:
                import setproctitle
                setproctitle.setproctitle(title)
            except Exception:
                pass
        self.loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    def _install_signals(self):
        rsock, wsock = socket.socketpair()
        wsock.setblocking(False)
        self._signal_ep = _SignalPipe(self, rsock)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self._wsock = wsock
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, lambda s, f: None)

    def handle_signal(self, signum: int):
        if signum == signal.SIGHUP:
            if self.master is None:
                self.reload_from(self.config.path)
            return
        if signum == signal.SIGQUIT:
            os._exit(0)
        # Under a master, a signal sent to the whole process group reaches workers too.
        self.drain("graceful" if signum == signal.SIGTERM else "fast")

    # -- control messages ----------------------------------------------------------------
    def on_control(self, msg: dict):
        kind = msg["type"]
        if kind == "reload":
            error = self.reload_from(msg.get("path", self.config.path), msg.get("text"), msg.get("overrides"))
            self.master.post("reload_result", id=msg.get("id"), ok=error is None, error=error)
        elif kind == "drain":
            self.drain(msg.get("mode", "graceful"))
        elif kind == "stop":
            os._exit(0)
        elif kind == "stats_request":
            self.master.post("stats", id=msg.get("id"), data=self.snapshot(msg.get("detail")))
        elif kind == "metrics_request":
            from pgmp.metrics import worker_figures
            self.master.post("metrics", id=msg.get("id"), data=worker_figures(self))
        elif kind == "cancel":
            self.cancel_request(int(msg.get("pid", 0)), int(msg.get("secret", 0)), forwarded=True)
        elif kind == "pool_command":
            data = self.pool_command(msg.get("action", ""), msg.get("database"), int(msg.get("client_id") or 0))
            self.master.post("pool_result", id=msg.get("id"), ok=True, data=data)
        elif kind == "console_result":
            self._console_answered(msg)
        elif kind == "host_state":
            self.hosts.from_master(msg.get("hosts") or [])
            self.hosts_changed()                # (also unchanged: a host checked again may serve again)

    def reload_from(self, path: str, text: str | None = None, overrides: dict | None = None) -> str | None:
        """Apply a new configuration to new logins and released servers; the error text, or None.

        ``overrides``: [pgmp] values that win over the file's (the admin console's SET)."""
        reopen_log_files()
        try:
            new = configmod.loads(text, path, overrides) if text is not None else configmod.load(path)
            secrets = load_auth_file(new.auth_file, new.auth_max_iterations) if new.auth_file else {}
            rules = load_hba(new.hba_file) if new.hba_file else None
            client_tls, server_tls = tls.for_clients(new), tls.for_servers(new)    # certificates re-read
            mock = mock_profile_for(new, secrets, self.instance_seed)
        except Exception as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return str(exc)
        self.config = new
        self.tracked_parameters = tracked_parameters(new)
        self.secrets = secrets
        self.mock = mock
        self.hba = rules
        self.client_tls, self.server_tls = client_tls, server_tls
        self.loop.max_unsent = new.max_unsent
        self.loop.handoff_end_all()
        for pool in self.pools.values():
            pool.wait_reconfigured()
        self.resolver.configure(new.dns_max_ttl, new.dns_nxdomain_ttl)
        self.auth_query.reset("configuration reloaded")
        log.debug("worker %d: configuration reloaded", self.slot)
        return None

    def snapshot(self, detail: str | None = None) -> dict:
        """This worker now, for ``pgmp stats`` and the admin console; detail "sockets" adds a row
        per client, server and listening socket."""
        period = self.loop.clock() - self.stats_stamps[0]
        pools = []
        for p in self.pools.values():
            row = p.snapshot()
            row["period_s"] = period
            pools.append(row)
        data = {
            "slot": self.slot, "generation": self.generation, "pid": os.getpid(),
            "clients": len(self.clients), "servers": sum(len(p.servers) for p in self.pools.values()),
            "draining": self.draining, "pools": pools,
            "login_clients": sum(1 for c in self.clients if console.client_state(c) == "login"),
            "paused_all": self.paused_all, "paused_dbs": sorted(self.paused_dbs),
            "disabled_dbs": sorted(self.disabled_dbs),
            "hosts": self._host_rows(), "dns": self.resolver.rows(),
            # reads the C relay carried with no record for Python (quiet pairs, pgmp.crelay.Quiet)
            "relay_quiet_reads": self.loop.crelay.quiet_reads() if self.loop.crelay is not None else 0,
            "relay_handoffs": self.loop.crelay.handoffs() if self.loop.crelay is not None else 0,
        }
        if detail == "sockets":
            data.update(console.worker_rows(self))
        return data

    def _host_rows(self) -> list[dict]:
        """What this worker knows of each host, with its ban's end as epoch seconds (SHOW HOSTS)."""
        now = self.loop.clock()
        wall = time.time() - now
        rows = self.hosts.rows(now)
        for row in rows:
            row["banned_until_epoch"] = row["banned_until"] + wall if row["banned"] else None
        return rows

    # -- the admin console ---------------------------------------------------------------
    def console_ask(self, command: str, args: dict, callback) -> None:
        """Run a master command for the admin console; ``callback(reply)`` gets {ok, error, data}.

        Never blocks: the master answers within its gather timeout; CONSOLE_TIMEOUT covers a master
        that does not answer at all. A worker without a master answers for itself.
        """
        if self.master is None:
            self.loop.call_later(0, callback, self._console_alone(command, args))
            return
        self._console_seq += 1
        rid = self._console_seq
        timer = self.loop.call_later(CONSOLE_TIMEOUT, self._console_timeout, rid)
        self.console_waits[rid] = (callback, timer)
        self.master.post("console", id=rid, command=command, args=args)

    def _console_answered(self, msg: dict) -> None:
        entry = self.console_waits.pop(msg.get("id"), None)
        if entry is not None:
            entry[1].cancel()
            entry[0](msg)

    def _console_timeout(self, rid: int) -> None:
        entry = self.console_waits.pop(rid, None)
        if entry is not None:
            entry[0]({"ok": False, "error": f"the master did not answer within {CONSOLE_TIMEOUT:g}s"})

    def _console_alone(self, command: str, args: dict) -> dict:
        if command == "stats":
            return {"ok": True, "data": {"workers": [self.snapshot(args.get("detail"))], "missing": []}}
        if command in ("pause", "resume", "reconnect", "kill", "disable", "enable", "kill_client"):
            return {"ok": True, "data": self.pool_command(command, args.get("database"), int(args.get("id") or 0))}
        return {"ok": False, "error": f"{command} needs the pgmp master (this worker runs alone)"}

    # -- stopping ------------------------------------------------------------------------
    def drain(self, mode: str):
        """Stop accepting; close clients now ("fast") or at their next transaction boundary ("graceful")."""
        if self.draining == "fast" or self.draining == mode:
            return
        self.draining = mode
        for lst in self.listeners:
            if mode == "graceful":
                lst.read()                  # connections the kernel already completed are served, not reset
            lst.close_socket()
        self.listeners = []
        log.info("worker %d: draining (%s), %d clients connected", self.slot, mode, len(self.clients))
        shutdown = errors.PgmpError(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        for client in list(self.clients):
            if mode == "fast" or not self._may_finish(client):
                client.fail(shutdown)
            else:
                client.close_at_boundary = True
        for pool in self.pools.values():
            pool.close_all("pgmp is stopping")
        self.auth_query.reset("pgmp is stopping")
        if not self.clients:
            self._drained()         # now: a timer would first wait out the poll

    @staticmethod
    def _may_finish(client) -> bool:
        """Graceful drain: does this client get to reach its next transaction boundary?

        Yes for a transaction or request in flight, and for a client that connected just before
        the drain: still logging in, or logged in without having sent a request yet (it came to
        run something; during `pgmp restart` it is the one the old master accepted last).
        An idle client between transactions is closed at once.
        """
        st = client.state
        if st is ClientState.CONSOLE:
            return False                              # the admin console has no transaction to finish
        if st is ClientState.ACTIVE:
            return not client.link.idle or client.link.t_query == 0.0   # (session mode: linked at login)
        if st is ClientState.IDLE:
            return client.link.t_query == 0.0         # no request since login
        return st is not ClientState.CLOSED         # STARTUP, AUTH, LOGIN_WAIT, WAITING

    def _drained(self):
        if self.draining and not self.clients and self.loop.running:
            log.info("worker %d: no clients left, exiting", self.slot)
            self.loop.stop()

    def shutdown(self):
        self.drain("fast")


class MasterLink(Endpoint):
    """The worker's end of its control channel."""
    __slots__ = ("worker", "decoder")

    def __init__(self, worker, sock):
        super().__init__(worker.loop, sock)
        self.worker = worker
        self.decoder = control.Decoder()

    def post(self, msg_type: str, **fields):
        self.send(control.encode(msg_type, **fields))

    def on_data(self, view, n):
        try:
            msgs = self.decoder.feed(bytes(view[:n]))
        except control.ControlError as exc:
            log.error("worker %d: bad control message: %s", self.worker.slot, exc)
            return
        for msg in msgs:
            self.worker.on_control(msg)

    def on_eof(self, reason):
        # the master is gone: nobody will tell us to stop, so stop now, gracefully
        self.close_socket()
        log.error("worker %d: lost the master (%s); draining", self.worker.slot, reason)
        self.worker.drain("graceful")


class _SignalPipe(Endpoint):
    __slots__ = ("worker",)

    def __init__(self, worker, sock):
        super().__init__(worker.loop, sock)
        self.worker = worker

    def on_data(self, view, n):
        for b in bytes(view[:n]):
            self.worker.handle_signal(b)

    def on_eof(self, reason):
        pass
