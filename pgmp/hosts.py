"""Which host a database's next server connection goes to: what is known of each host, and the choice (sans-IO).

A database lists one or more hosts (config.HostSpec). What pgmp knows of
each host (a name or address and its port; two databases listing the same
host share what is known of it) is a :class:`HostState`: whether it is up,
its role (in recovery or not, read-only or not), a standby's replay lag,
and until when it is banned. Two sources fill it in:

- the master's health checks (pgmp.health), broadcast to every worker as
  ``host_state`` control messages: up or down, role, lag, bans after failed
  checks;
- the worker's own servers: ``in_hot_standby`` and
  ``default_transaction_read_only`` (ParameterStatus, PostgreSQL 14+) at
  login and whenever they change, a failed connect or login (a local ban),
  and a 25006 (read_only_sql_transaction), after which the role is unknown
  until a login or a check tells it again.

The newer of the two wins for the role. A host is banned for host_ban_time
after a failure, by whichever process saw it.

:func:`choose` picks a host for a pool as libpq picks one for a connection,
by ``target_session_attrs`` and ``load_balance_hosts``: hosts known to fit
first, then hosts of unknown role (the login tells, and a server that does
not fit is closed at once); a standby further behind than max_replica_lag
does not fit read-only, standby or prefer-standby. Banned and down hosts are
left out while another host can serve; when none can, a banned host that a
health check found up after its ban started serves again. A database with a
single host ignores bans altogether (server_login_retry paces it, as
before several hosts existed). No host at all: the clients wait
(query_wait_timeout) until host state changes.
"""
from __future__ import annotations

import random

from pgmp.config import HostSpec

ANY_FRESH = "any (not a lagging standby)"        # prefer-standby's second choice
# SQLSTATE classes of a failed connect or login that say the host cannot serve now (a ban moves
# on to another host): connection exceptions, too many connections, shutting down or starting
# up, system errors. A refused password or an unknown database would fail on every host alike.
HOST_FAILURE_CLASSES = ("08", "53", "57", "58", "XX")


def host_failure(sqlstate: str) -> bool:
    return sqlstate[:2] in HOST_FAILURE_CLASSES


class HostState:
    """What this process knows of one host (times are the loop's monotonic clock, shared by all processes)."""
    __slots__ = ("spec", "up", "in_recovery", "read_only", "lag", "role_at", "checked_at", "banned_until",
                 "banned_at", "error", "connect_failures", "address")

    def __init__(self, spec: HostSpec):
        self.spec = spec
        self.up: bool | None = None           # the latest health check: answered (True) or failed (False)
        self.in_recovery: bool | None = None  # a standby (True), a primary (False), unknown (None)
        self.read_only: bool | None = None    # transaction_read_only of a new session
        self.lag: float | None = None         # a standby's replay lag in seconds, from the health checks
        self.role_at = 0.0                    # when in_recovery/read_only were learned
        self.checked_at = 0.0                 # when the master's latest check of it ended
        self.banned_until = 0.0
        self.banned_at = 0.0                  # when the latest ban started
        self.error = ""                       # why it failed last, for SHOW HOSTS and the log
        self.connect_failures = 0             # failed connects in a row (a name may have several addresses)
        self.address = 0                      # which of a name's addresses connects go to (the last that worked)

    def __repr__(self):
        return f"<host {self.spec} {self.role} {'up' if self.up else 'down' if self.up is False else '?'}>"

    @property
    def role(self) -> str:
        if self.in_recovery is None:
            return "unknown"
        return "standby" if self.in_recovery else "primary"

    def banned(self, now: float) -> bool:
        return now < self.banned_until

    def ban(self, now: float, seconds: float, why: str) -> None:
        self.banned_until = max(self.banned_until, now + seconds)
        self.banned_at = now
        self.error = why

    def set_role(self, in_recovery: bool | None, read_only: bool | None, at: float) -> bool:
        """Record a role learned at ``at``, unless something newer is known; True if it changed."""
        if at < self.role_at:
            return False
        if in_recovery:
            read_only = True                  # a standby runs read-only transactions only
        changed = (in_recovery, read_only) != (self.in_recovery, self.read_only)
        self.in_recovery, self.read_only, self.role_at = in_recovery, read_only, at
        return changed

    def lagging(self, max_lag: float) -> bool:
        return bool(self.in_recovery and max_lag > 0 and self.lag is not None and self.lag > max_lag)

    def as_message(self) -> dict:
        """This state as the master broadcasts it (control message host_state)."""
        return {"host": self.spec.host, "port": self.spec.port, "up": self.up, "in_recovery": self.in_recovery,
                "read_only": self.read_only, "lag": self.lag, "checked_at": self.checked_at,
                "banned_until": self.banned_until, "banned_at": self.banned_at, "error": self.error}


def fits(target: str, st: HostState, max_lag: float = 0.0) -> bool | None:
    """Does the host serve connections of ``target`` (a target_session_attrs value)? None: not known yet."""
    if target == "any":
        return True
    if target == ANY_FRESH:
        return not st.lagging(max_lag)
    if target in ("read-write", "read-only"):
        if st.read_only is None:
            return None
        ok = st.read_only if target == "read-only" else not st.read_only
    elif target in ("primary", "standby"):
        if st.in_recovery is None:
            return None
        ok = st.in_recovery if target == "standby" else not st.in_recovery
    else:
        raise ValueError(f"unknown target_session_attrs {target!r}")
    if ok and target in ("read-only", "standby") and st.lagging(max_lag):
        return False
    return ok


def passes(target: str) -> tuple[str, ...]:
    """The targets tried in turn: prefer-standby is a standby, else any host but a lagging standby."""
    return ("standby", ANY_FRESH) if target == "prefer-standby" else (target,)


def fits_pool(target: str, st: HostState, max_lag: float) -> bool | None:
    """Whether a server to this host may keep serving a pool of ``target`` (prefer-standby: either pass)."""
    results = [fits(t, st, max_lag) for t in passes(target)]
    if True in results:
        return True
    return None if None in results else False


class HostTable:
    """The hosts one process knows, by (host, port)."""

    def __init__(self, rng: random.Random | None = None):
        self.hosts: dict[tuple[str, int], HostState] = {}
        self.rng = rng or random.Random()
        self.version = 0                      # bumped at every change a choice depends on (pools cache by it)

    def get(self, spec: HostSpec) -> HostState:
        st = self.hosts.get(spec.key)
        if st is None:
            st = self.hosts[spec.key] = HostState(spec)
        return st

    # -- what is learned ---------------------------------------------------------------
    def from_master(self, rows: list[dict]) -> bool:
        """The master's host_state broadcast; True if anything that matters to a choice changed."""
        changed = False
        for row in rows:
            try:
                st = self.get(HostSpec(str(row["host"]), int(row["port"])))
            except (KeyError, TypeError, ValueError):
                continue
            before = (st.up, st.in_recovery, st.read_only, st.lag, st.banned_until, st.checked_at)
            st.up = row.get("up")
            st.lag = row.get("lag")
            st.checked_at = max(st.checked_at, float(row.get("checked_at") or 0.0))
            if row.get("error"):
                st.error = str(row["error"])
            until = float(row.get("banned_until") or 0.0)
            if until > st.banned_until:
                st.banned_until = until
                st.banned_at = max(st.banned_at, float(row.get("banned_at") or 0.0))
            if row.get("in_recovery") is not None or row.get("read_only") is not None:
                st.set_role(row.get("in_recovery"), row.get("read_only"), st.checked_at)
            changed |= before != (st.up, st.in_recovery, st.read_only, st.lag, st.banned_until, st.checked_at)
        if changed:
            self.version += 1
        return changed

    def learned(self, spec: HostSpec, params: dict[str, str], now: float) -> bool:
        """A server's reported in_hot_standby / default_transaction_read_only; True if the role changed."""
        hot = params.get("in_hot_standby")
        ro = params.get("default_transaction_read_only")
        if hot is None and ro is None:
            return False
        st = self.get(spec)
        in_recovery = (hot == "on") if hot is not None else st.in_recovery
        read_only = (ro == "on") if ro is not None else st.read_only
        return self.set_role(spec, in_recovery, read_only, now)

    def set_role(self, spec: HostSpec, in_recovery: bool | None, read_only: bool | None, now: float) -> bool:
        if self.get(spec).set_role(in_recovery, read_only, now):
            self.version += 1
            return True
        return False

    def forget_role(self, spec: HostSpec, now: float) -> None:
        """A server said 25006 where it was thought writable: its role is unknown until told again."""
        self.set_role(spec, None, None, now)

    def failed(self, spec: HostSpec, now: float, ban_time: float, why: str, addresses: int = 1) -> bool:
        """A connect or login failed; True if the host is banned for it (False: another address is left)."""
        st = self.get(spec)
        st.connect_failures += 1
        st.address += 1
        if st.connect_failures < addresses:
            return False
        st.connect_failures = 0
        st.ban(now, ban_time, why)
        self.version += 1
        return True

    def succeeded(self, spec: HostSpec) -> None:
        self.get(spec).connect_failures = 0

    # -- the choice ----------------------------------------------------------------------
    def candidates(self, hosts: tuple[HostSpec, ...], target: str, max_lag: float, now: float) -> list[HostSpec]:
        """The hosts a new server connection of ``target`` may go to now, in list order (see choose)."""
        several = len(hosts) > 1
        second_chance: list[HostSpec] = []
        for t in passes(target):
            known, unknown = [], []
            for spec in hosts:
                st = self.get(spec)
                ok = fits(t, st, max_lag)
                if ok is False:
                    continue
                if several and (st.banned(now) or st.up is False):
                    if ok and st.up and st.checked_at > st.banned_at:
                        second_chance.append(spec)
                    continue
                (known if ok else unknown).append(spec)
            if known or unknown:
                return known or unknown
        return second_chance

    def valid_until(self, hosts: tuple[HostSpec, ...], now: float) -> float:
        """Until when candidates() stays what it is now, unless ``version`` changes: the next ban's end."""
        ends = [st.banned_until for st in map(self.get, hosts) if st.banned_until > now]
        return min(ends) if ends else float("inf")

    def choose(self, hosts: tuple[HostSpec, ...], target: str, balance: str, max_lag: float, now: float,
               turn: int = 0) -> HostSpec | None:
        """The host for a new server connection, or None when no host can serve ``target`` now."""
        pick = self.candidates(hosts, target, max_lag, now)
        return self._order(pick, balance, turn) if pick else None

    def _order(self, candidates: list[HostSpec], balance: str, turn: int) -> HostSpec:
        if balance == "random":
            return self.rng.choice(candidates)
        if balance == "round-robin":
            return candidates[turn % len(candidates)]
        return candidates[0]

    def why_none(self, hosts: tuple[HostSpec, ...], target: str, max_lag: float, now: float) -> str:
        """Why choose() found nothing, host by host, for the log and the clients' error."""
        parts = []
        for spec in hosts:
            st = self.get(spec)
            if st.banned(now) or st.up is False:
                what = f"banned for {st.banned_until - now:.1f}s" if st.banned(now) else "down"
                parts.append(f"{spec} {what}" + (f" ({st.error})" if st.error else ""))
            elif st.lagging(max_lag):
                parts.append(f"{spec} standby {st.lag:.1f}s behind (max_replica_lag {max_lag:g}s)")
            else:
                parts.append(f"{spec} {st.role}" + (" read-only" if st.read_only and not st.in_recovery else ""))
        return f"no host fits target_session_attrs={target}: " + ", ".join(parts)

    def rows(self, now: float) -> list[dict]:
        """What this process knows, for the admin console's SHOW HOSTS."""
        out = []
        for st in self.hosts.values():
            row = st.as_message()
            row["role"] = st.role
            row["role_at"] = st.role_at
            row["banned"] = st.banned(now)
            out.append(row)
        return out
