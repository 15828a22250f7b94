"""The link between one client and the server it is bound to: the sans-IO state machine that decides about their traffic.

A :class:`Link` lives as long as a client's session. ClientConnection and
ServerConnection feed it the frames they must look at and carry out what it
answers; they decide nothing about the protocol themselves. It owns:

- transaction tracking: requests in flight (Query, Sync, FunctionCall) against
  ReadyForQuery, the server's transaction status, COPY IN state, extended-protocol
  messages not yet followed by a Sync, and the query/transaction timings;
- in transaction and statement mode, the client's :class:`~pgmp.prepared.Pipeline`
  (response queue, prepared-statement mapping);
- the client's session settings (startup settings, then every session-level SET,
  RESET, SET ROLE, SET SESSION AUTHORIZATION it runs, recorded when its transaction
  commits) and the query that brings any server to them;
- pinning: session state that cannot move to another server (LISTEN, SQL PREPARE,
  WITH HOLD cursors, temporary objects, session advisory locks, set_config(..., false),
  savepoints around SETs) keeps the client on its server;
- when the server may be released, and whether it is clean when the client leaves.

:class:`ServerSession` is what pgmp knows of one server connection's session:
the settings applied on it, its reported parameters, its prepared statements.
"""
import functools
import logging
import sys

from pgmp import errors
from pgmp.errors import PgmpError, ServerProtocolError
from pgmp.prepared import (BATCH_BIND, BATCH_CONTROL, BATCH_KIND, BATCH_NAMED, KIND_STMT_SHIFT, Pipeline,
                           ServerStatements)
from pgmp.protocol import frontend
from pgmp.protocol.sql import session_effects as _session_effects
from pgmp.session import SHARED_STARTUPS, settings_query
from pgmp.stats import BUCKETS_US, bucket_of, error_sqlstate

log = logging.getLogger("pgmp")

# The same statements come again and again (prepared ones at every Bind): classify each short
# text once (bounded: 4096 texts of at most 2 kB).
_cached_effects = functools.lru_cache(maxsize=4096)(_session_effects)


def _c_trigger():
    """The C helper's prefilter (pgmp_sql_trigger, the same test as sql.py's _TRIGGER), or None
    when the Python implementation is picked."""
    from pgmp.protocol import scanner
    if scanner.IMPL != "c":
        return None
    from pgmp._scan import lib
    return lib.pgmp_sql_trigger


_trigger = _c_trigger()


def _batch_text(kind: int) -> bytes:
    """The unnamed statement's text after an unnamed batch of ``kind`` the C relay passed: every
    such batch starts with its Parse, of a text with the same effects as the batch's."""
    control = _BATCH_CONTROL_KINDS[(kind & (BATCH_CONTROL * 4 - 1)) // BATCH_CONTROL]
    return _CONTROL_TEXT[control] if control else _PLAIN_TEXT


def session_effects(text: bytes):
    if _trigger is not None and type(text) is bytes and not _trigger(text, len(text)):
        return ()                               # an ordinary query: no parse, no cache entry
    return _cached_effects(text) if len(text) <= 2048 else _session_effects(text)

# after_ready(): what to do with the server once a ReadyForQuery has been relayed
KEEP, RELEASE, REFUSE_BLOCK = 0, 1, 2
# leave(): what to do with the server when the client goes away
REUSE, RESET, CLOSE = 0, 1, 2

_Q, _S, _F, _P, _B, _E = 81, 83, 70, 80, 66, 69
# The C relay's kinds of a bare transaction command (pgmp_sql_control) and their effects, as
# session_effects() finds them in such a text.
_CONTROL_TEXT = {98: b"begin", 99: b"commit", 114: b"rollback"}
_CONTROL_EFFECTS = {kind: _session_effects(text) for kind, text in _CONTROL_TEXT.items()}
# The same kinds by a batch's PGMP_BATCH_CONTROL bits (1, 2, 3: its unnamed Parse's text).
_BATCH_CONTROL_KINDS = (0, 98, 99, 114)
_IDLE = 73

# The unnamed statement's text after a batch the C relay passed: C found in it no word that may
# change session state (or it is one INSERT, UPDATE or DELETE), so a later Bind of it has no
# effects, as for the empty text.
_PLAIN_TEXT = b""
# CommandComplete tags that change session state: if one comes for a request whose text
# pgmp could not read (streamed through), the client is pinned rather than guessed about.
_SESSION_TAGS = (b"SET\0", b"RESET\0", b"DISCARD", b"LISTEN\0", b"PREPARE\0", b"LOAD\0")
# Effects that say "this session holds state no other server has".
_PIN_KINDS = ("pin", "unknown")
# RESET ALL leaves these alone (PostgreSQL's GUC_NO_RESET_ALL).
NOT_RESET_BY_ALL = ("role", "session_authorization")
READ_ONLY_SQL_TRANSACTION = errors.READ_ONLY_SQL_TRANSACTION.encode()


class ServerSession:
    """pgmp's knowledge of one server connection's session state."""
    __slots__ = ("applied", "reported", "statements", "read_only_seen")

    def __init__(self, max_prepared: int):
        self.applied: dict[str, str] = {}      # settings known to be set on it, beyond its login defaults
        self.reported: dict[str, str] = {}     # ParameterStatus values, keys in lower case
        self.statements = ServerStatements(max_prepared)
        self.read_only_seen = False            # it answered 25006: the pool checks its host's role (pgmp.hosts)

    def after_reset(self, query: str) -> None:
        """The reset or check query ``query`` ran: forget what it cleared, and only that.

        DISCARD ALL clears everything; RESET ALL every setting but the role and session
        user; DEALLOCATE ALL the prepared statements. A check query clears nothing, so
        what the last client left is still undone for the next one."""
        text = query.upper()
        if "DISCARD ALL" in text:
            self.discarded()
            return
        if "RESET ALL" in text:
            self.reset_all()
        if "DEALLOCATE ALL" in text:
            self.statements.clear()

    def reset_all(self) -> None:
        """RESET ALL ran: every setting is back to its default, but the role and session user."""
        for name in [n for n in self.applied if n not in NOT_RESET_BY_ALL]:
            del self.applied[name]

    def discarded(self) -> None:
        """DISCARD ALL ran: nothing of any client's session is left."""
        self.applied.clear()
        self.statements.clear()


class Link:
    """One client's requests and session state, and the server it is bound to (if any)."""
    __slots__ = ("name", "pooled", "statement_mode", "pipeline", "outstanding", "status", "copy_in", "unsynced",
                 "batches", "stats", "clock", "t_query", "t_xact", "t_ready", "settings", "startup", "tracked",
                 "overlay", "open_effects", "open_failed", "unnamed_text", "pinned", "server", "savepoint",
                 "ended")

    def __init__(self, settings: dict[str, str] | None = None, tracked: frozenset = frozenset(),
                 pipeline: Pipeline | None = None, clock=None, stats=None, name: str = "client",
                 statement_mode: bool = False):
        self.name = name                         # user@database, for the log
        self.pooled = pipeline is not None       # transaction or statement mode
        self.statement_mode = statement_mode
        self.pipeline = pipeline
        self.outstanding = 0
        self.status = _IDLE
        self.copy_in = False
        self.unsynced = False                    # Parse/Bind/Execute sent since the last Sync
        # per request in flight, oldest first: [kind, session effects or None (unread), error seen]
        # (a list: rarely more than a few entries, and an idle client's deque would cost 760 bytes;
        # () between transactions, not even a list: requests())
        self.batches: list | tuple = ()
        self.stats = stats
        self.clock = clock
        self.t_query = 0.0
        self.t_xact = 0.0
        self.t_ready = 0.0                       # when the server last finished all outstanding requests
        self.startup = dict(settings or {})      # what the client asked for at login (RESET goes back to it)
        self.settings = self.startup             # what the client's session holds now (a copy once it changes)
        self.tracked = tracked                   # reported parameters whose ParameterStatus updates settings
        # (an empty tuple, not a list, while there is nothing in them: memory per idle client)
        self.overlay: list | tuple = ()          # SETs of the open transaction, applied if it commits
        self.open_effects: list | tuple | None = () if self.pooled else None   # the extended-protocol batch's, until its Sync
        self.open_failed = False                 # an error answered that batch before its Sync was sent
        self.unnamed_text: bytes | None = None   # text of the unnamed statement (None: streamed, unread)
        self.pinned = ""                         # why the client keeps its server ("" = it does not)
        self.server: ServerSession | None = None
        self.savepoint = False                   # the open transaction used savepoints
        self.ended = False                       # the client has seen the server's FATAL error

    def logged_in(self, clock, stats, pipeline: Pipeline | None = None, statement_mode: bool = False) -> None:
        """The client's login ended: start timing; in transaction/statement mode, follow the extended protocol."""
        self.clock = clock
        self.stats = stats
        self.t_ready = clock()
        # the same login settings as other clients: one dict for all (never changed: see settings)
        shared = SHARED_STARTUPS.get(self.startup)
        if self.settings is self.startup:
            self.settings = shared
        self.startup = shared
        self.name = sys.intern(self.name)
        if pipeline is not None:
            self.pipeline = pipeline
            self.pooled = True
            self.statement_mode = statement_mode
            self.open_effects = ()

    # -- the requests the client sends ------------------------------------------------------
    def client_frame(self, kind: int, payload=None) -> bytes | None:
        """A frame from the client (``payload``: its body, when pgmp has it whole).

        Returns None to forward the frame as it is, or the bytes to send in its place.
        """
        if kind == _Q or kind == _F or (kind == _S and not self.copy_in):
            self._request(kind, payload)
        elif kind == _P or kind == _B or kind == _E:
            self.unsynced = True
        elif kind == 99 or kind == 102:          # 'c' CopyDone, 'f' CopyFail
            self.copy_in = False
        pl = self.pipeline
        if pl is None:
            return None
        if payload is not None and kind in b"PBCDE":
            frontend.check_message(kind, payload)
            if kind == _B:
                self._bind_effects(payload)
            elif kind == _P and payload[0] == 0:        # effects are read when the statement is bound
                self.unnamed_text = payload[1:payload.index(b"\0", 1)]
        return pl.client_frame(kind, payload if payload is not None else b"",
                               self.server.statements)

    def queries_relayed(self, count: int, kind: int = _Q, bound: list | None = None) -> None:
        """``count`` Query frames the C relay passed (pgmp.crelay), each whole, well formed and, in
        pooled mode, free of the words that may change session state (``kind`` "Q") or one bare
        BEGIN, COMMIT or ROLLBACK ("b", "c", "r"): as client_frame for each. In pooled mode
        ``kind`` BATCH_KIND + shape: ``count`` extended batches, each whole through its Sync:
        unnamed ones, their Parse text free of those words too or one such command
        (BATCH_CONTROL), or Binds of one named statement, entry ``kind >> KIND_STMT_SHIFT`` of
        ``bound`` (bound_statements), rewritten to its server name."""
        self._stamp()
        self.outstanding += count
        if kind >= BATCH_KIND:
            # as client_frame for each message: the Sync is the request; the batch's effects are
            # those of the statement its Bind binds
            request = _S
            shape = kind & (BATCH_CONTROL * 4 - 1)
            if shape & BATCH_NAMED:
                _name, sname, key, effects = bound[kind >> KIND_STMT_SHIFT]
                self.pipeline.named_batches_sent(count, shape, sname, key, self.server.statements)
            else:
                control = _BATCH_CONTROL_KINDS[shape // BATCH_CONTROL]
                effects = _CONTROL_EFFECTS[control] if control and shape & BATCH_BIND else ()
                self.unnamed_text = _batch_text(kind)
                self.pipeline.batches_sent(count, shape & (BATCH_NAMED - 1))
        else:
            request = _Q
            effects = _CONTROL_EFFECTS[kind] if kind != _Q else ()
            if self.pipeline is not None:
                self.pipeline.queries_sent(count)
        batches = self.requests()
        for _ in range(count):
            batches.append([request, effects, False])

    def quiet_ok(self) -> bool:
        """Nothing in flight and no session state being followed: the C relay may keep this
        Link's bookkeeping of plain round trips itself (crelay.Quiet) until rounds_relayed."""
        if self.outstanding or self.batches or self.unsynced or self.copy_in or self.statement_mode \
                or self.status not in (_IDLE, 84):
            return False
        if not self.pooled:
            return True
        pl = self.pipeline
        return (not self.overlay and not self.savepoint and not self.pinned
                and self.open_effects is not None and not self.open_effects
                and not self.open_failed and pl.idle and not pl.skipping)

    def rounds_relayed(self, kinds: list, last_batch: int, status: int, t_query: float, t_xact: float,
                       t_ready: float, readies: int, query_us: int, query_hist, xacts: int, xact_us: int,
                       xact_hist, used: list = (), bound: list | None = None) -> None:
        """What the C relay kept of a quiet pair (crelay.Quiet, started when quiet_ok()): as
        the records of its reads would have left it. ``readies`` ReadyForQuery frames answered
        requests, the last with ``status``; ``kinds``: the record kinds of the requests still
        outstanding, oldest first (session mode 'Q' or 'S', pooled mode 'Q', 'b', 'c', 'r' or
        an unnamed batch's); ``last_batch``: the kind of the last unnamed batch passed, or 0;
        the clocks as _stamp and server_ready leave them; the query time and histogram over the
        rounds that ended (outstanding back to 0), the transaction time and histogram over the
        transactions; ``used``: the entries of ``bound`` (bound_statements) whose statements
        named batches bound, oldest last use first: their statements are used again, in that
        order, in the worker's cache and on the server, as Pipeline.named_batches_sent does."""
        if used:
            pl, srv = self.pipeline, self.server.statements
            for _name, sname, key, _effects in used:
                pl.cache.touch(key, sname)
                srv.has(sname)
        if last_batch:
            self.unnamed_text = _batch_text(last_batch)
        for k in kinds:                     # the requests still owed an answer, as their records
            if self.pooled:
                self.queries_relayed(1, k, bound)
            else:
                self.client_frame(k)
        self.status = status
        self.t_query = t_query
        self.t_xact = t_xact
        self.t_ready = t_ready
        st = self.stats
        if st is not None and readies:
            st.query_count += readies
            st.query_time_us += query_us
            st.xact_count += xacts
            st.xact_time_us += xact_us
            for hist, counts in ((st.query_hist, query_hist), (st.xact_hist, xact_hist)):
                for i in range(len(hist)):
                    if counts[i]:
                        hist[i] += counts[i]

    def ready_relayed(self, count: int, status: int) -> int:
        """``count`` ReadyForQuery frames the C relay passed: as server_frame for each (pooled mode,
        where only simple Queries were in flight); returns after_ready()'s verdict."""
        self.pipeline.answered(count)
        self.server_ready(count, status)
        return self.after_ready()

    def bound_statements(self) -> list:
        """Pooled mode: the client's named statements it bound lately (Pipeline.bound) that its
        server has, so that a Bind of one needs no Parse first (ServerStatements.usable):
        (client name, server name, key, session effects) each, for the C relay's binds table
        (crelay.Binds). The C relay binds them only while no simple Query is unanswered
        (Pipeline.query_unanswered)."""
        pl = self.pipeline
        if not pl.bound or not pl.enabled:
            return []
        usable = self.server.statements.usable
        names = pl.cache.names
        statements = pl.statements
        out = []
        for name in pl.bound:
            key = statements.get(name)
            if key is None:
                continue
            sname = names.get(key)
            if sname is not None and usable(sname):
                out.append((name, sname, key, tuple(session_effects(key[:key.index(b"\0")]))))
        return out

    def c_relay_ok(self) -> bool:
        """Pooled mode: only whole requests whose answers need no rewriting are in flight (simple
        Queries, unnamed extended batches) and nothing of the extended protocol is open, so the C
        relay may carry the pair (statement mode is left to Python: it refuses transaction blocks at
        their ReadyForQuery)."""
        return (not self.statement_mode and not self.unsynced and not self.copy_in and not self.open_failed
                and self.open_effects is not None and not self.open_effects and self.pipeline.c_relay_ok())

    def client_head(self, kind: int, head: bytes, length: int):
        """The head of a Bind or Parse too large to assemble (pooled mode): see Pipeline.bind_head."""
        frontend.check_head(kind, head)
        self.unsynced = True
        pl = self.pipeline
        if kind == _P:
            self.unnamed_text = None
            pl.client_frame(kind, head, self.server.statements)
            return None
        self._bind_effects(head)
        return pl.bind_head(head, length, self.server.statements)

    def _request(self, kind: int, payload) -> None:
        """A Query, Sync or FunctionCall: a request the server answers with one ReadyForQuery."""
        self._stamp()
        failed = False
        if kind == _S:
            self.unsynced = False
            effects = self.open_effects             # the batch this Sync ends
            if self.pooled:
                self.open_effects = ()
                failed, self.open_failed = self.open_failed, False
        elif kind == _Q and self.pooled:
            if payload is None:
                effects = None                      # streamed through: unread
            else:
                frontend.check_message(kind, payload)
                effects = session_effects(payload)
        else:
            effects = ()
        self.outstanding += 1
        self.requests().append([kind, effects, failed])

    def _stamp(self) -> None:
        """A request is about to be counted: the first of a round starts the query clock, and the
        transaction clock too when the session is idle."""
        if self.outstanding == 0 and self.clock is not None:
            self.t_query = now = self.clock()
            if self.status == _IDLE:
                self.t_xact = now

    def _bind_effects(self, payload) -> None:
        """A Bind: the session effects of the statement it binds join the batch its Sync ends.

        A statement whose text pgmp never saw (an unnamed Parse streamed through) makes the
        batch unread: a session command's CommandComplete in it then pins the client."""
        if self.open_effects is None:
            return
        portal_end = payload.index(b"\0")
        name = bytes(payload[portal_end + 1:payload.index(b"\0", portal_end + 1)])
        if name:
            key = self.pipeline.statements.get(name)
            text = key[:key.index(b"\0")] if key is not None else None
        else:
            text = self.unnamed_text
        if text is None:
            self.open_effects = None
            return
        effects = session_effects(text)
        if effects:
            self.open_effects = [*self.open_effects, *effects]

    # -- the server's answers ---------------------------------------------------------------
    def server_ready(self, count: int, status: int) -> None:
        """``count`` ReadyForQuery frames, the last with transaction status ``status``."""
        self.outstanding -= count
        if self.outstanding < 0:
            self.outstanding = 0
        batches = self.batches
        before = self.status
        for _ in range(min(count, len(batches))):
            batch = batches.pop(0)
            if self.pooled:
                self._end_batch(batch, before, status)
        self.status = status
        self.copy_in = False
        st = self.stats
        if st is not None:
            st.query_count += count
            if self.outstanding == 0:
                self.t_ready = now = self.clock()
                us = int((now - self.t_query) * 1e6)
                st.query_time_us += us
                st.query_hist[bucket_of(BUCKETS_US, us)] += 1
                if status == _IDLE:
                    us = int((now - self.t_xact) * 1e6)
                    st.xact_count += 1
                    st.xact_time_us += us
                    st.xact_hist[bucket_of(BUCKETS_US, us)] += 1

    def server_copy_in(self) -> None:
        """CopyInResponse: requests sent after the statement that started the COPY are swallowed.

        A COPY started by a Query is answered by that Query's ReadyForQuery; one started by an
        extended-protocol Execute ends at a Sync the client sends after CopyDone, so every Sync
        already counted was (or will be) ignored by the server in copy mode.
        """
        self.copy_in = True
        batches = self.batches
        if batches and batches[0][0] != _S:    # the Query (or FunctionCall) that started the COPY
            first = batches[0]
            batches.clear()
            batches.append(first)
        else:
            effects = [e for b in batches if b[1] for e in b[1]]
            batches = self.batches = ()
            if self.open_effects is not None and self.pooled and effects:
                self.open_effects = [*effects, *self.open_effects]
        self.outstanding = len(batches)

    def server_frame(self, kind: int, frame) -> bytes | None:
        """A response-type frame from the server in pooled mode (``frame``: the whole frame).

        Returns what Pipeline.server_frame returns: None to forward it, b"" to drop it,
        or the bytes to send in its place. After a ReadyForQuery, after_ready() says
        what becomes of the server."""
        if kind == 90 and len(frame) != 6:
            raise ServerProtocolError(f"server sent a ReadyForQuery of length {len(frame) - 1} (expected 5)")
        if kind == 69:                                   # ErrorResponse
            self.server_error_frame(frame)
        r = self.pipeline.server_frame(kind, frame, self.server.statements)
        if kind == 90:                                   # ReadyForQuery
            self.server_ready(1, frame[5])
        elif kind == 71:                                 # CopyInResponse
            self.server_copy_in()                        # drops the Syncs copy mode swallows
        elif kind == 67:                                 # CommandComplete
            self.command_complete(bytes(frame[5:13]))
        return r

    def server_error_frame(self, frame) -> None:
        """An ErrorResponse frame: a FATAL (or PANIC) one means the server ends the session, and the
        client, which has seen it, needs no second error from pgmp when the connection closes."""
        body = bytes(frame[5:])
        if b"\0VFATAL\0" in b"\0" + body or b"\0VPANIC\0" in b"\0" + body:
            self.ended = True
        sqlstate = error_sqlstate(body)
        if self.stats is not None:
            self.stats.count_error(sqlstate, relayed=True)
        if sqlstate == READ_ONLY_SQL_TRANSACTION and self.server is not None:
            self.server.read_only_seen = True
        self.server_error()

    def server_error(self) -> None:
        """An ErrorResponse: the request being answered failed (its transaction, if implicit, too)."""
        if self.batches:
            self.batches[0][2] = True
        else:
            self.open_failed = True

    def command_complete(self, tag: bytes) -> None:
        """A CommandComplete (pooled mode): a session command pgmp could not read pins the client."""
        if tag.startswith(_SESSION_TAGS):
            batches = self.batches
            if (batches[0][1] if batches else self.open_effects) is None:
                self.pin("a session command pgmp could not read (" + tag.rstrip(b"\0").decode("ascii", "replace")
                         + ")")

    def parameter_status(self, name: str, value: str) -> None:
        """A ParameterStatus from the server: a reported setting's new value follows the client."""
        srv = self.server
        lc = name.lower()
        if srv is not None:
            srv.reported[lc] = value
            if lc in self.tracked:
                if self.settings is self.startup:
                    self.settings = dict(self.startup)
                self.settings[lc] = value
                srv.applied[lc] = value

    def after_ready(self, mid_message: bool = False) -> int:
        """After a ReadyForQuery was relayed (pooled mode): RELEASE the server, KEEP it, or
        REFUSE_BLOCK (statement mode: a transaction block is open). ``mid_message``: the
        server has part of a client message, the rest still to come."""
        if self.outstanding or self.copy_in or self.unsynced or not self.pipeline.idle or self.pinned \
                or mid_message:
            return KEEP
        if self.status == _IDLE:
            return RELEASE
        return REFUSE_BLOCK if self.statement_mode else KEEP

    # -- session effects --------------------------------------------------------------------
    def _end_batch(self, batch, before: int, after: int) -> None:
        """A request was answered: follow what its statements did to the session."""
        _kind, effects, failed = batch
        if effects:
            control = False
            for e in effects:
                if e.kind in _PIN_KINDS:
                    self.pin(_PIN_REASONS.get(e.name, "a session command pgmp cannot follow"))
                elif e.kind in ("begin", "commit", "rollback", "savepoint"):
                    control = True
            if failed:
                if control:
                    self.pin("an error in a request that also ends or starts transactions")
                self.overlay = ()
                return
            for e in effects:
                k = e.kind
                if k == "commit":
                    if before == 69:                 # COMMIT of a failed transaction rolls back
                        self.overlay = ()
                    else:
                        self._commit()
                    before = _IDLE
                elif k == "rollback":
                    self.overlay = ()
                    self.savepoint = False
                    before = _IDLE
                elif k == "savepoint":
                    self.savepoint = True
                elif k in ("set", "reset", "reset_all", "discard_all"):
                    self.overlay = [*self.overlay, e]
        elif failed:
            self.overlay = ()
        if after == _IDLE:
            if failed:
                self.overlay = ()
            self._commit()
        elif after == 69:                            # the open transaction failed: it will roll back
            self.overlay = ()

    def _commit(self) -> None:
        """The transaction holding the recorded SETs committed: they are the session's now."""
        overlay = self.overlay
        if overlay and self.savepoint:
            self.pin("SET inside a transaction that used savepoints")
        self.savepoint = False
        if not overlay:
            return
        settings = self.settings
        if settings is self.startup:
            settings = self.settings = dict(settings)
        srv = self.server if self.server is not None else ServerSession(0)
        applied = srv.applied
        for e in overlay:
            k = e.kind
            if k == "set":
                settings[e.name] = e.value
                applied[e.name] = e.value
            elif k == "reset":
                applied.pop(e.name, None)
                if e.name in self.startup:
                    settings[e.name] = self.startup[e.name]
                else:
                    settings.pop(e.name, None)
            elif k == "reset_all":                  # RESET ALL leaves the role and session user alone
                kept = {n: v for n, v in settings.items() if n in NOT_RESET_BY_ALL}
                settings.clear()
                settings.update(self.startup)
                settings.update(kept)
                srv.reset_all()
            else:                                   # DISCARD ALL (its statements: Pipeline, by the tag)
                settings.clear()
                settings.update(self.startup)
                applied.clear()
        self.overlay = ()

    def pin(self, reason: str) -> None:
        if not self.pinned:
            self.pinned = reason
            log.info("client %s pinned to its server: %s (session state that cannot move to another server)",
                     self.name, reason)

    # -- binding to servers -----------------------------------------------------------------
    def attach(self, srv: ServerSession) -> bytes | None:
        """The client got ``srv``: the query that brings it to the client's settings, or None."""
        self.server = srv
        return settings_query(self.settings, srv.applied, srv.reported)

    def detach(self) -> None:
        self.server = None
        if not self.batches:
            self.batches = ()
        if self.pipeline is not None:
            self.pipeline.rest()

    def requests(self) -> list:
        """The requests in flight (batches), to add to (a list made on first use)."""
        batches = self.batches
        if batches.__class__ is not list:
            batches = self.batches = []
        return batches

    @property
    def idle(self) -> bool:
        """No request in flight and no open transaction."""
        return self.outstanding == 0 and self.status == _IDLE and not self.copy_in

    @property
    def between_requests(self) -> bool:
        """No request in flight (a transaction may be open)."""
        return self.outstanding == 0 and not self.copy_in

    def leave(self, mid_message: bool, internal: bool) -> tuple[int, str]:
        """The client went away: REUSE its server, RESET it first, or CLOSE it; and why.

        ``mid_message``: part of a client message was relayed and the rest never will be;
        ``internal``: a query of pgmp's own is still unanswered. Anything pgmp cannot prove
        clean is closed: a half message, extended-protocol messages without their Sync, COPY,
        an open transaction, an unanswered request.
        """
        if mid_message:
            return CLOSE, "client left in the middle of a message"
        if internal:
            return CLOSE, "client left before pgmp's own query on the server was answered"
        if self.copy_in:
            return CLOSE, "client left during COPY"
        if self.outstanding or (self.pipeline is not None and not self.pipeline.idle):
            return CLOSE, "client left with requests unanswered"
        if self.unsynced:
            return CLOSE, "client left with extended-protocol messages not followed by Sync"
        if self.status != _IDLE:
            return CLOSE, "client left inside a transaction"
        if self.pinned:
            return RESET, f"client left; its server held {self.pinned}"
        return REUSE, "client left"

    def statement_mode_error(self) -> PgmpError:
        return PgmpError(errors.FEATURE_NOT_SUPPORTED, "transaction blocks not allowed in statement mode",
                         hint='use pool_mode = "transaction" for this database or user')


_PIN_REASONS = {
    "listen": "LISTEN", "prepare": "SQL PREPARE", "hold_cursor": "a WITH HOLD cursor",
    "temp": "a temporary object", "advisory_lock": "a session advisory lock",
    "set_config": "set_config(..., false)", "load": "LOAD",
}
