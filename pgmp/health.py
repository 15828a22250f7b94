"""Health checks of every database host, in the master: the sans-IO probe, its connection, and the checker.

Every ``health_check_period`` the master checks each host of the databases
that choose among hosts or by role (several hosts, or target_session_attrs
other than any; a database with one host and "any" has nothing to choose,
and its failures are handled as they happen), each (host, port) once
however many databases list it: it
connects, logs in with pgmp's own server login (ServerLogin and
ServerAuthenticator, the code the workers use), and runs

    SELECT pg_is_in_recovery(), current_setting('transaction_read_only'),
           <replay lag of a standby>

The replay lag is now() - pg_last_xact_replay_timestamp(), and 0 while the
standby has replayed everything it received (pg_last_wal_receive_lsn() =
pg_last_wal_replay_lsn()): an idle primary sends nothing, and its standby is
not behind. The first write after the primary was idle makes that
difference jump to the idle time for the few milliseconds before it is
replayed; so the lag reported is the smaller of the last two checks', and a
standby leaves the read pool only when two checks in a row find it behind. Which user and password (see health_check_user in
pgmp.toml(5)): health_check_user / health_check_password if set, else, per
host, the user of the first database section that lists the host and sets
one, with that section's password or the user's auth_file secret. A host no
credential reaches gets a TCP connect only (up or down, role unknown: the
workers learn it from their own logins); so does a host that refused the
credential once (logged as an error), until the next reload, so that
PostgreSQL's log does not fill with failed logins.

A failed check (connect, TLS, login other than a refused credential, the
query, or no answer within health_check_timeout) marks the host down and
bans it for host_ban_time. The results go to every worker as one
``host_state`` control message (pgmp.control) whenever something a choice
depends on changed, and after every check a worker asked for (a worker
reports a failed connect or a 25006 with ``host_report``, and the host is
checked again at once); a worker that starts later gets the table when it
is forked. So N workers never each probe every host.

Nothing here blocks the master's loop: the probe is a non-blocking
connection in that loop (:class:`ProbeConnection`), and host names resolve
in the resolver helper process (pgmp.resolve). SCRAM's key derivation for a
password runs once per (password, salt) and is then cached
(scram_keys_cached).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time

from pgmp import errors, tls
from pgmp.auth.authfile import load_auth_file
from pgmp.auth.server import ServerAuthenticator
from pgmp.config import HostSpec
from pgmp.errors import PgmpError, ServerProtocolError
from pgmp.hosts import HostState
from pgmp.loop import EVENT_WRITE, Endpoint
from pgmp.protocol import messages
from pgmp.resolve import ResolveError, Resolver
from pgmp.server import INTERNAL_LIMITS, ServerError, ServerLogin, message_name, violation

log = logging.getLogger("pgmp")

APPLICATION_NAME = "pgmp-health"
# names schema-qualified and search_path pinned: nothing a database owner created can run as the check's user
STARTUP_OPTIONS = {"application_name": APPLICATION_NAME, "options": "-c search_path=pg_catalog,pg_temp"}
ROLE_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only'), "
    "CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN NULL "
    "WHEN pg_catalog.pg_last_wal_receive_lsn() OPERATOR(pg_catalog.=) pg_catalog.pg_last_wal_replay_lsn() THEN 0 "
    "ELSE EXTRACT(EPOCH FROM pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.pg_last_xact_replay_timestamp()) END")
MAX_BUFFERED = 1 << 20        # bytes a check holds before its answer is complete, at most
NOT_HOST_FAILURES = {errors.INVALID_PASSWORD, errors.INVALID_AUTHORIZATION, errors.INVALID_CATALOG_NAME}


@dataclasses.dataclass
class ProbeResult:
    """What one check found: the server answered (``up``) or not, and its role and lag when it logged in."""

    up: bool
    in_recovery: bool | None = None
    read_only: bool | None = None
    lag: float | None = None
    error: PgmpError | None = None
    params: dict = dataclasses.field(default_factory=dict)


class Probe:
    """One check over one connection, sans-IO: ``start()`` and ``feed(bytes)`` return what to send.

    With a ServerLogin it logs in and runs ROLE_QUERY; ``result`` is set once done. A
    broken answer raises a PgmpError; an ErrorResponse ends the check with the server's
    error in ``result.error`` (a refused credential means the server is up: see
    NOT_HOST_FAILURES).
    """

    def __init__(self, login: ServerLogin):
        self.login = login
        self.buf = bytearray()
        self.querying = False
        self.row: list[bytes | None] | None = None
        self.error: ServerError | None = None
        self.result: ProbeResult | None = None

    def start(self) -> bytes:
        return self.login.startup()

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        if len(self.buf) > MAX_BUFFERED:
            raise violation(f"server sent more than {MAX_BUFFERED} bytes in answer to a health check")
        out = []
        while self.result is None and len(self.buf) >= 5:
            kind = self.buf[0]
            length = int.from_bytes(self.buf[1:5], "big")
            if length < 4 or length > INTERNAL_LIMITS[kind] + 4:
                raise violation(f"server sent a {message_name(kind)} of {length} bytes to a health check")
            if len(self.buf) < 1 + length:
                break
            payload = bytes(self.buf[5:1 + length])
            del self.buf[:1 + length]
            out.append(self._frame(kind, payload))
        return b"".join(out)

    def _frame(self, kind: int, payload: bytes) -> bytes:
        if not self.querying:
            try:
                reply = self.login.feed(kind, payload)
            except PgmpError as exc:
                # the server's ErrorResponse, or pgmp's own refusal (no credential, a method not allowed)
                self.result = ProbeResult(up=exc.sqlstate in NOT_HOST_FAILURES, error=exc)
                return b""
            if self.login.done:
                self.querying = True
                return reply + messages.query(ROLE_QUERY)
            return reply
        if kind == 68 and self.row is None:              # DataRow
            self.row = messages.parse_data_row(payload)
        elif kind == 69 and self.error is None:          # ErrorResponse
            self.error = ServerError(messages.parse_fields(payload))
        elif kind == 90:                                 # ReadyForQuery
            self.result = self._answer()
        return b""

    def _answer(self) -> ProbeResult:
        params = dict(self.login.params)
        if self.error is not None:
            return ProbeResult(up=False, error=self.error, params=params)
        row = self.row or []
        if len(row) != 3 or row[0] not in (b"t", b"f"):
            return ProbeResult(up=False, params=params, error=ServerProtocolError(
                f"the health check query returned {row!r}, not (in recovery, read only, lag)"))
        lag = None
        if row[2] is not None:
            try:
                lag = max(0.0, float(row[2]))
            except ValueError:
                lag = None
        return ProbeResult(up=True, in_recovery=row[0] == b"t", read_only=row[1] == b"on", lag=lag, params=params)


@dataclasses.dataclass(frozen=True)
class Target:
    """A host to check, and how to log in to it (user None: a TCP connect only)."""

    spec: HostSpec
    user: str | None = None
    password: str | None = None
    secret: object = None
    dbname: str = "postgres"
    require_auth: tuple = ()
    source: str = ""                 # where the credentials come from, for the log
    max_lag: float = 0.0             # the smallest max_replica_lag of the databases listing the host


def checked(db) -> bool:
    """Does pgmp choose among this database's hosts, or by their role? Then its hosts are checked."""
    return len(db.hosts) > 1 or db.target_session_attrs != "any"


def targets(cfg, secrets: dict) -> dict[tuple[str, int], Target]:
    """Every host of the database sections that are checked, once, with the credentials its checks use."""
    out: dict[tuple[str, int], Target] = {}
    lags: dict[tuple[str, int], float] = {}
    for name, db in cfg.databases.items():
        if not checked(db):
            continue
        for spec in db.hosts:
            if db.max_replica_lag > 0:
                lags[spec.key] = min(lags.get(spec.key, db.max_replica_lag), db.max_replica_lag)
            dbname = cfg.health_check_dbname or db.dbname or "postgres"
            have = out.get(spec.key)
            if cfg.health_check_user:
                if have is None:
                    user = cfg.health_check_user
                    out[spec.key] = Target(spec, user, cfg.health_check_password or None, secrets.get(user),
                                           dbname, db.server_require_auth, "health_check_user")
                continue
            if have is not None and have.user is not None:
                continue
            if db.user:
                out[spec.key] = Target(spec, db.user, db.password or None, secrets.get(db.user), dbname,
                                       db.server_require_auth, f"user of [databases.{name}]")
            elif have is None:
                out[spec.key] = Target(spec)
    return {key: dataclasses.replace(t, max_lag=lags.get(key, 0.0)) for key, t in out.items()}


class ProbeConnection(Endpoint):
    """One check's connection in the master's loop: connect, SSLRequest if server TLS is on, the Probe."""
    __slots__ = ("checker", "target", "probe", "state", "timer", "context", "rest")

    def __init__(self, checker, target: Target, family: int, sockaddr, probe: Probe | None, context, rest=()):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in (0, 115, 11):                   # EINPROGRESS, EAGAIN (unix)
            sock.close()
            raise OSError(err, os.strerror(err))
        super().__init__(checker.loop, sock, EVENT_WRITE)
        self.checker = checker
        self.target = target
        self.probe = probe
        self.context = context if family != socket.AF_UNIX else None
        self.state = "connecting"
        self.rest = list(rest)                        # the name's other addresses, tried if this one fails
        self.reading = False
        self.timer = checker.loop.call_later(checker.config.health_check_timeout, self._timed_out)

    def handle_event(self, mask):
        if self.state == "connecting":
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err and self.rest:
                self.timer.cancel()
                self.close_socket()
                self.checker.connect(self.target, self.rest, self.probe)
                return
            if err:
                self._end(ProbeResult(up=False, error=ServerProtocolError(
                    f"could not connect to server {self.target.spec}: {os.strerror(err)}")))
                return
            self.reading = True
            self._update_mask()
            if self.probe is None:
                self._end(ProbeResult(up=True))
            elif self.context is not None:
                self.state = "ssl"
                self.send(messages.ssl_request())
            else:
                self.state = "login"
                self.send(self.probe.start())
            return
        super().handle_event(mask)

    def on_data(self, view, n):
        data = bytes(view[:n])
        if self.state == "ssl":
            self._ssl_answer(data)
            return
        try:
            out = self.probe.feed(data)
        except PgmpError as exc:
            self._end(ProbeResult(up=False, error=exc))
            return
        except ValueError as exc:                        # a malformed message (messages.py)
            self._end(ProbeResult(up=False, error=ServerProtocolError(f"server sent a malformed message: {exc}")))
            return
        if out:
            self.send(out)
        if self.probe.result is not None:
            self._end(self.probe.result)

    def _ssl_answer(self, data: bytes) -> None:
        mode = self.checker.config.server_tls_mode
        if data == b"S":
            self.state = "login"
            self.start_tls(self.context, server_side=False, server_hostname=self.target.spec.host)
        elif data == b"N" and mode == "prefer":
            self.state = "login"
            self.send(self.probe.start())
        else:
            why = ("sent unencrypted data after its answer to SSLRequest (CVE-2021-23222)" if len(data) > 1
                   else f'does not support TLS, but server_tls_mode is "{mode}"' if data == b"N"
                   else f"answered SSLRequest with {data[:1]!r}")
            self._end(ProbeResult(up=False, error=ServerProtocolError(f"server {self.target.spec} {why}")))

    def on_tls_ready(self):
        self.send(self.probe.start())

    def on_tls_failed(self, exc):
        self._end(ProbeResult(up=False, error=ServerProtocolError(
            f"TLS handshake with server {self.target.spec} failed: {tls.describe(exc)}")))

    def on_eof(self, reason):
        self._end(ProbeResult(up=False, error=ServerProtocolError(
            f"server {self.target.spec} closed the connection during a health check: {reason}")))

    def _timed_out(self):
        self._end(ProbeResult(up=False, error=ServerProtocolError(
            f"no answer from {self.target.spec} within health_check_timeout "
            f"({self.checker.config.health_check_timeout:g}s)")))

    def _end(self, result: ProbeResult) -> None:
        if self.closed:
            return
        self.timer.cancel()
        if self.state == "login" and result.error is None and self.probe is not None:
            self.send(messages.terminate())
        self.close_socket()
        self.checker.probe_done(self.target, result)


class HealthChecker:
    """The master's checks of every host, and the host table it broadcasts (see the module docstring)."""

    def __init__(self, master):
        self.master = master
        self.loop = master.loop
        self.config = master.config
        self.hosts: dict[tuple[str, int], HostState] = {}
        self.targets: dict[tuple[str, int], Target] = {}
        self.running: dict[tuple[str, int], ProbeConnection | None] = {}   # None: its name is being resolved
        self.asked: set[tuple[str, int]] = set()          # checks a worker asked for: broadcast after them
        self.complaints: dict[tuple[str, int], str] = {}  # the last problem logged per host (not repeated)
        self.refused: set[tuple[str, int]] = set()        # hosts that refused the credential: connect only
        self.measured: dict[tuple[str, int], float | None] = {}   # each standby's lag at its last check
        self.resolver = Resolver(self.loop, self.config.dns_max_ttl, self.config.dns_nxdomain_ttl, "process")
        self.tls = None
        self.timer = None
        self.closed = False

    # -- configuration -------------------------------------------------------------------
    def configure(self, cfg) -> None:
        """Start or follow a configuration: the hosts to check, how, and how often."""
        self.config = cfg
        self.refused.clear()
        self.resolver.configure(cfg.dns_max_ttl, cfg.dns_nxdomain_ttl)
        try:
            secrets = load_auth_file(cfg.auth_file, cfg.auth_max_iterations) if cfg.auth_file else {}
            self.tls = tls.for_servers(cfg)
        except Exception as exc:                           # checked by the reload already; keep checking
            log.error("health checks: %s", exc)
            secrets = {}
        self.targets = targets(cfg, secrets) if cfg.health_check_period > 0 else {}
        for key in list(self.hosts):
            if key not in self.targets:
                del self.hosts[key]
        for key, target in self.targets.items():
            self.hosts.setdefault(key, HostState(target.spec))
            if target.user is None:
                self._complain(key, f"health checks of {target.spec}: no credential to log in with, so a TCP "
                                    "connect only (set health_check_user, or user in a database section that "
                                    "lists the host); its role is learned by the workers' logins", log.info)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.targets and not self.closed:
            self.timer = self.loop.call_later(0, self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.closed or not self.targets:
            return
        for key in self.targets:
            self.check(key)
        self.timer = self.loop.call_later(self.config.health_check_period, self._tick)

    # -- checks ----------------------------------------------------------------------------
    def check(self, key: tuple[str, int]) -> None:
        """Check one host now, unless a check of it is running."""
        target = self.targets.get(key)
        if target is None or key in self.running or self.closed:
            return
        spec = target.spec
        if spec.unix:
            self.connect(target, [(socket.AF_UNIX, f"{spec.host}/.s.PGSQL.{spec.port}")])
            return
        self.running[key] = None
        addrs = self.resolver.lookup(spec.host, spec.port, lambda result: self._resolved(target, result))
        if addrs is not None:
            self._resolved(target, addrs)

    def _resolved(self, target: Target, result) -> None:
        key = target.spec.key
        if self.running.get(key, False) is not None or self.closed:
            return
        del self.running[key]
        if isinstance(result, ResolveError):
            self.probe_done(target, ProbeResult(up=False, error=PgmpError(
                errors.CONNECTION_FAILURE, f"could not resolve server host {target.spec.host!r}: {result}")))
            return
        self.connect(target, result)

    def connect(self, target: Target, addrs: list, probe: Probe | None = None) -> None:
        """Check ``target`` at the first of ``addrs`` (the others if it cannot connect)."""
        family, sockaddr = addrs[0]
        if probe is None and target.user is not None and target.spec.key not in self.refused:
            auth = ServerAuthenticator(target.user, password=target.password, secret=target.secret,
                                       database=target.dbname, require_auth=target.require_auth,
                                       max_iterations=self.config.auth_max_iterations)
            probe = Probe(ServerLogin(target.user, target.dbname, auth, STARTUP_OPTIONS))
        try:
            self.running[target.spec.key] = ProbeConnection(self, target, family, sockaddr, probe, self.tls,
                                                            addrs[1:])
        except OSError as exc:
            self.running.pop(target.spec.key, None)
            if addrs[1:]:
                self.connect(target, addrs[1:], probe)
                return
            self.probe_done(target, ProbeResult(up=False, error=ServerProtocolError(
                f"could not connect to server {target.spec}: {exc.strerror or exc}")))

    def report(self, host: str, port: int, event: str, error: str) -> None:
        """A worker saw a failed connect or login, or a 25006, on this host: check it at once."""
        key = (host, int(port))
        if key not in self.targets:
            return
        log.debug("worker report on %s: %s %s", key, event, error)
        self.asked.add(key)
        self.check(key)

    def probe_done(self, target: Target, result: ProbeResult) -> None:
        key = target.spec.key
        self.running.pop(key, None)
        log.debug("health check of %s: %s", target.spec, result)
        st = self.hosts.get(key)
        if st is None or self.closed:
            return
        now = self.loop.clock()
        before = (st.up, st.in_recovery, st.read_only, st.banned_until, st.lagging(target.max_lag))
        before_lag = st.lag
        st.checked_at = now
        st.up = result.up
        if result.up:
            if result.in_recovery is not None:
                st.set_role(result.in_recovery, result.read_only, now)
            last, self.measured[key] = self.measured.get(key), result.lag
            st.lag = None if result.lag is None else result.lag if last is None else min(last, result.lag)
            if result.error is not None:
                self.refused.add(key)
                self._complain(key, f"health check of {target.spec} cannot log in as {target.user} "
                                    f"({target.source}): {result.error.message}; until the next reload it "
                                    "checks that the server answers, not its role", log.error)
            else:
                st.error = ""
                self.complaints.pop(key, None)
        else:
            why = result.error.message if result.error is not None else "failed"
            st.ban(now, self.config.host_ban_time, why)
            st.lag = self.measured[key] = None
        after = (st.up, st.in_recovery, st.read_only, st.banned_until, st.lagging(target.max_lag))
        if after != before:
            self._log_change(target, st, before)
        if after != before or st.lag != before_lag or key in self.asked:
            self.asked.discard(key)
            self.master.broadcast_hosts()

    def _log_change(self, target: Target, st: HostState, before) -> None:
        up, in_recovery, _, _, lagging = before
        spec = target.spec
        if st.up is False and up is not False:
            log.warning("host %s is down: %s; banned for %gs", spec, st.error, self.config.host_ban_time)
        elif st.up and up is False:
            log.info("host %s answers again (%s)%s", spec, st.role,
                     "; banned until its host_ban_time is over" if st.banned(self.loop.clock()) else "")
        if st.in_recovery is not None and in_recovery is not None and st.in_recovery != in_recovery:
            log.warning("host %s is now a %s (was a %s)", spec, st.role, "standby" if in_recovery else "primary")
        elif st.in_recovery is not None and in_recovery is None:
            log.info("host %s is a %s", spec, st.role)
        if st.lagging(target.max_lag) and not lagging:
            log.warning("host %s: replay lag %.1fs is over max_replica_lag (%gs): out of the read pool",
                        spec, st.lag, target.max_lag)
        elif lagging and not st.lagging(target.max_lag) and st.up:
            log.info("host %s caught up (replay lag %.1fs): back in the read pool", spec, st.lag or 0.0)

    def _complain(self, key, message: str, level) -> None:
        if self.complaints.get(key) != message:
            self.complaints[key] = message
            level("%s", message)

    # -- what the others see -------------------------------------------------------------
    def message_rows(self) -> list[dict]:
        """The host table as the host_state control message carries it."""
        return [st.as_message() for st in self.hosts.values()]

    def rows(self) -> list[dict]:
        """The host table for the admin console (times as epoch seconds)."""
        now, wall = self.loop.clock(), time.time()
        out = []
        for st in self.hosts.values():
            row = st.as_message()
            row["role"] = st.role
            row["banned"] = st.banned(now)
            row["last_check"] = wall - (now - st.checked_at) if st.checked_at else None
            row["banned_until_epoch"] = wall + (st.banned_until - now) if st.banned(now) else None
            out.append(row)
        return out

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.close_sockets()

    def close_sockets(self) -> None:
        """Every socket of the checks and the resolver (also in a child forked from the master)."""
        for conn in list(self.running.values()):
            if conn is not None:
                conn.timer.cancel()
                conn.close_socket()
        self.running.clear()
        self.resolver.close_sockets()
