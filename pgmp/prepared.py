"""Transaction pooling's bookkeeping of the extended protocol: the responses a client is owed, and its prepared statements.

In transaction mode a client's named prepared statements must survive on
whichever server it gets next. :class:`Pipeline` keeps, per client, the
client's statement names (mapped to the statement text and types) and the
queue of responses the client expects, in order. It rewrites the client's
Parse/Bind/Describe/Close to server-side names (``pgmp_<n>``, one name per
distinct statement per worker), prepares a statement lazily on a server that
lacks it (an injected Parse whose ParseComplete the client never sees), and
answers what needs no server work itself (a Parse of a statement the server
already has, a Close of a client statement) with synthetic responses put at
the right place in the response stream.

Server-side statements are an LRU of ``max_prepared_statements`` per server;
an evicted one is closed on the server with a Close whose CloseComplete is
dropped. Sans-IO: frames in, bytes out.
"""
import collections
import types
import struct

from pgmp.errors import CONFIGURATION_LIMIT_EXCEEDED, PgmpError
from pgmp.protocol.messages import frame, read_cstr

_I16 = struct.Struct("!h")
_U32 = struct.Struct("!I")

# What the client is owed, per message it sent (entries of Pipeline.expect).
R_PARSE, R_BIND, R_CLOSE, R_DESC_STMT, R_DESC_PORTAL, R_EXEC, R_SYNC, R_QUERY, R_FUNC = range(9)
DROP_PARSE, DROP_CLOSE = 20, 21        # responses to pgmp's own messages: never forwarded
SYNTHETIC = 30                         # a response pgmp makes up (data = the frame)

PARSE_COMPLETE = frame(b"1")
CLOSE_COMPLETE = frame(b"3")

# Server frames that end (or may end) a response: the only ones the pipeline looks at.
RESPONSE_TYPES = b"123tTnCIsEZGV"

# The shape of a batch the C relay passed (pgmp_relay.h's PGMP_BATCH_* bits): BATCH_NAMED, a
# Bind of a client's named statement first (the entry's index in the client's binds table is
# kind >> KIND_STMT_SHIFT); BATCH_CONTROL times 1, 2, 3: an unnamed Parse's text is a bare
# BEGIN, COMMIT, ROLLBACK.
BATCH_PARSE, BATCH_BIND, BATCH_DESC_PORTAL, BATCH_DESC_STMT, BATCH_EXECUTE = 1, 2, 4, 8, 16
BATCH_NAMED, BATCH_CONTROL, KIND_STMT_SHIFT = 32, 64, 9
BATCH_KIND = 256                       # a record's request kind: BATCH_KIND + shape (+ index)
BOUND_MAX = 64                         # client names in the C relay's binds table, at most
# What such a batch's messages are owed, in the order they come (Parse, Describe statement,
# Bind, Describe portal, Execute, Sync).
_BATCH_ENTRIES = [
    [(code, None, None) for bit, code in ((BATCH_PARSE, R_PARSE), (BATCH_DESC_STMT, R_DESC_STMT),
                                          (BATCH_BIND, R_BIND), (BATCH_DESC_PORTAL, R_DESC_PORTAL),
                                          (BATCH_EXECUTE, R_EXEC)) if shape & bit] + [(R_SYNC, None, None)]
    for shape in range(32)]
# What unnamed messages are owed, popped in turn by a whole answer (Pipeline.answered).
_PLAIN_EXTENDED = frozenset((R_PARSE, R_BIND, R_DESC_STMT, R_DESC_PORTAL, R_EXEC))
# What the C relay may answer (Pipeline.c_relay_ok): those, and the ends of requests.
_C_ANSWERABLE = _PLAIN_EXTENDED | {R_SYNC, R_QUERY}


class StatementCache:
    """Per worker: one server-side name per distinct statement (text and parameter types), least
    recently used first, at most ``max_entries`` statements and ``max_bytes`` of their text.

    An evicted statement gets a new name when it is used again (``seq`` never goes back, so a name
    never stands for two texts): servers that prepared it under the old name drop that one in
    their own LRU, and a client that still has it prepares it again where needed.
    """

    def __init__(self, max_entries: int = 20_000, max_bytes: int = 64 * 1024 * 1024):
        self.names: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self.seq = 0
        self.bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.evictions = 0                     # statements evicted so far
        self.on_evict = None                   # called at each eviction (the C relay's retire)

    def touch(self, key: bytes, name: bytes) -> None:
        """``key`` was used again under ``name`` (the C relay bound it): as name_for. Another
        client's statement may have evicted it since C sent the Bind (earlier in the same epoll
        batch): it is put back under the name the server has (a name never stands for another
        text), and the next new statement trims the cache again."""
        names = self.names
        if key in names:
            names.move_to_end(key)
        else:
            names[key] = name
            self.bytes += len(key)

    def name_for(self, key: bytes) -> bytes:
        names = self.names
        name = names.get(key)
        if name is not None:
            names.move_to_end(key)
            return name
        self.seq += 1
        name = names[key] = b"pgmp_%d" % self.seq
        self.bytes += len(key)
        while len(names) > 1 and (len(names) > self.max_entries or self.bytes > self.max_bytes):
            old, _ = names.popitem(last=False)
            self.bytes -= len(old)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict()
        return name


class ServerStatements:
    """The statements prepared (or being prepared) on one server, least recently used first.

    ``version`` changes whenever a name comes or goes or its plan goes stale (what a client's
    binds table in the C relay is made from: crelay.Binds)."""
    __slots__ = ("names", "limit", "version")

    def __init__(self, limit: int):
        # name -> confirmed (True), being prepared (False), or prepared with a stale plan (None)
        self.names: collections.OrderedDict[bytes, bool | None] = collections.OrderedDict()
        self.limit = limit
        self.version = 0

    def usable(self, name: bytes) -> bool:
        """A Bind of ``name`` needs no Parse first (as _ensure finds it, no Query ahead)."""
        return self.names.get(name, None) is not None

    def has(self, name: bytes) -> bool:
        if name in self.names:
            self.names.move_to_end(name)
            return True
        return False

    def add(self, name: bytes) -> list[bytes]:
        """Mark ``name`` as being prepared; returns the names evicted to stay within the limit."""
        self.version += 1
        self.names[name] = False
        self.names.move_to_end(name)
        evicted = []
        while self.limit > 0 and len(self.names) > self.limit:
            old, _ = self.names.popitem(last=False)
            evicted.append(old)
        return evicted

    def is_stale(self, name: bytes) -> bool:
        return self.names.get(name) is None and name in self.names

    def mark_stale(self, name: bytes) -> None:
        """Its plan no longer fits the tables ("cached plan must not change result type")."""
        if name in self.names:
            self.names[name] = None
            self.version += 1

    def prepare_again(self, name: bytes) -> None:
        """Closed and prepared again (a stale plan, a DISCARD ALL that may be ahead)."""
        self.names[name] = False
        self.version += 1

    def restore(self, name: bytes) -> None:
        """A Close of pgmp's own was skipped by the server (an error before it): still there."""
        self.names[name] = True
        self.names.move_to_end(name, last=False)
        self.version += 1

    def confirm(self, name: bytes) -> None:
        if name in self.names:
            self.names[name] = True

    def forget(self, name: bytes) -> None:
        self.names.pop(name, None)
        self.version += 1

    def clear(self) -> None:
        self.names.clear()
        self.version += 1


def _stale_plan(error_frame) -> bool:
    """An ErrorResponse saying a prepared statement's plan no longer fits (0A000, from Bind)."""
    body = bytes(error_frame[5:])
    return b"\0C0A000\0" in b"\0" + body and b"cached plan must not change result type" in body


def parse_frame(name: bytes, key: bytes) -> bytes:
    return frame(b"P", name + b"\0" + key)


# The statements (and bound names) of a client that has none: one read-only mapping for all
# (memory per idle client); Pipeline.own_statements makes a client's own on first change.
NO_STATEMENTS = types.MappingProxyType({})


class Pipeline:
    """One client's statements and owed responses in transaction or statement mode.

    ``version`` changes whenever ``statements`` does, or a name joins ``bound`` (see
    ServerStatements.version)."""
    __slots__ = ("cache", "statements", "expect", "skipping", "enabled", "max_size", "version", "bound")

    def __init__(self, cache: StatementCache, enabled: bool = True, max_size: int = 0):
        self.cache = cache
        self.enabled = enabled                         # max_prepared_statements = 0: names pass through
        self.max_size = max_size                       # of the statements' text in all (0 = unlimited)
        # client name -> key (text\0 + types); the shared empty mapping until the first (statements())
        self.statements: dict[bytes, bytes] = NO_STATEMENTS
        # what the client is owed: a deque while anything is (ordered), () otherwise; an empty
        # deque costs 760 bytes, so an idle client holds none (owed(), rest())
        self.expect: collections.deque | tuple = ()
        self.skipping = False                          # the server discards until Sync after an error
        self.version = 0
        # the client names Python bound lately, at most BOUND_MAX, oldest first: what the C
        # relay's binds table is made from (Link.bound_statements), so that its cost at each
        # hand-off is that of the statements in use, not of all the client ever prepared
        self.bound: dict[bytes, None] = NO_STATEMENTS

    @property
    def idle(self) -> bool:
        return not self.expect

    def owed(self) -> collections.deque:
        """The queue of what the client is owed, to add to (made on first use)."""
        exp = self.expect
        if exp.__class__ is not collections.deque:
            exp = self.expect = collections.deque()
        return exp

    def rest(self) -> None:
        """Between transactions: an empty queue is let go (see expect)."""
        if not self.expect:
            self.expect = ()

    # -- client to server ----------------------------------------------------------
    def client_frame(self, kind: int, payload: bytes, srv: ServerStatements) -> bytes | None:
        """A frame from the client; returns None to forward it as is, or the bytes to send instead."""
        if self.skipping and kind != 83:
            return None                     # the server ignores it; so do we
        exp = self.owed()
        if kind == 80:                                  # Parse
            name, pos = read_cstr(payload, 0)
            if not name or not self.enabled:
                exp.append((R_PARSE, None, None))
                return None
            if name in self.statements and not self._query_ahead():
                # PostgreSQL refuses this (42P05); answering it inside a pipeline would mean
                # skipping the client's messages up to its Sync, so pgmp ends the session instead.
                raise PgmpError("42P05", f'prepared statement "{name.decode("utf-8", "replace")}" already exists',
                                hint="Close (DEALLOCATE) a prepared statement before preparing another with "
                                     "its name")
            key = payload[pos:]
            if self.max_size and name not in self.statements:
                held = sum(map(len, self.statements.values())) + len(key)
                if held > self.max_size:
                    raise PgmpError(CONFIGURATION_LIMIT_EXCEEDED, f"too many prepared statements: their text would take {held} "
                                    f"bytes, more than max_prepared_size ({self.max_size})",
                                    hint="Close (DEALLOCATE) prepared statements no longer used, or raise "
                                         "max_prepared_size in pgmp's configuration")
            undo = (name, self.statements.get(name), key)
            self.own_statements()[name] = key
            self.version += 1
            sname = self.cache.name_for(key)
            if srv.has(sname):
                if not self._query_ahead():
                    exp.append((SYNTHETIC, PARSE_COMPLETE, undo))
                    return b""
                # a simple Query still unanswered ahead may be a DISCARD ALL / DEALLOCATE ALL
                # that drops the statement: close it (a no-op if it is gone) and prepare it again
                exp.append((DROP_CLOSE, sname, None))
                exp.append((R_PARSE, sname, undo))
                return frame(b"C", b"S" + sname + b"\0") + parse_frame(sname, key)
            out = self._evict(srv.add(sname))
            exp.append((R_PARSE, sname, undo))
            return out + parse_frame(sname, key)
        if kind == 66:                                  # Bind
            portal, pos = read_cstr(payload, 0)
            name, pos2 = read_cstr(payload, pos)
            if not name or name not in self.statements:
                exp.append((R_BIND, None, None))
                return None
            out = self._ensure(name, srv)
            sname = self.cache.name_for(self.statements[name])
            exp.append((R_BIND, sname, None))
            self._note_bound(name)
            body = portal + b"\0" + sname + b"\0" + payload[pos2:]
            return out + frame(b"B", body)
        if kind == 68:                                  # Describe
            what = payload[:1]
            name, _ = read_cstr(payload, 1)
            if what == b"S":
                if name and name in self.statements:
                    out = self._ensure(name, srv)
                    exp.append((R_DESC_STMT, None, None))
                    return out + frame(b"D", b"S" + self.cache.name_for(self.statements[name]) + b"\0")
                exp.append((R_DESC_STMT, None, None))
                return None
            exp.append((R_DESC_PORTAL, None, None))
            return None
        if kind == 67:                                  # Close
            what = payload[:1]
            name, _ = read_cstr(payload, 1)
            if what == b"S" and name and self.enabled:
                # the server keeps the statement for others; the client's name is gone
                undo = (name, self.own_statements().pop(name, None), None)
                self.version += 1
                exp.append((SYNTHETIC, CLOSE_COMPLETE, undo))
                return b""
            exp.append((R_CLOSE, None, None))
            return None
        if kind == 69:                                  # Execute
            exp.append((R_EXEC, None, None))
        elif kind == 83:                                # Sync
            self.skipping = False
            exp.append((R_SYNC, None, None))
        elif kind == 81:                                # Query
            exp.append((R_QUERY, None, None))
        elif kind == 70:                                # FunctionCall
            exp.append((R_FUNC, None, None))
        return None

    def bind_head(self, head: bytes, length: int, srv: ServerStatements) -> tuple[bytes, int] | None:
        """A Bind too large to assemble: (bytes to send instead of its head, how many bytes of the
        frame they replace), or None to forward it as is. ``head`` holds the payload's start with
        both names; ``length`` is the whole frame's size (type byte included)."""
        if self.skipping:
            return None
        portal, pos = read_cstr(head, 0)
        name, pos2 = read_cstr(head, pos)
        if not name or name not in self.statements:
            self.owed().append((R_BIND, None, None))
            return None
        out = self._ensure(name, srv)
        sname = self.cache.name_for(self.statements[name])
        self.owed().append((R_BIND, sname, None))
        self._note_bound(name)
        new_len = length - 1 - len(name) + len(sname)
        return out + b"B" + _U32.pack(new_len) + portal + b"\0" + sname + b"\0", 5 + pos2

    def own_statements(self) -> dict:
        """The client's statements, to change (a dict of its own, made on first use)."""
        st = self.statements
        if st is NO_STATEMENTS:
            st = self.statements = {}
        return st

    def _note_bound(self, name: bytes) -> None:
        bound = self.bound
        if bound is NO_STATEMENTS:
            bound = self.bound = {}
        if name in bound:
            del bound[name]                 # to the end: the most recent
            bound[name] = None
            return
        bound[name] = None
        self.version += 1
        if len(bound) > BOUND_MAX:
            del bound[next(iter(bound))]

    def _ensure(self, name: bytes, srv: ServerStatements) -> bytes:
        """Prepare a client statement on this server if it lacks it (the ParseComplete is pgmp's)."""
        key = self.statements[name]
        sname = self.cache.name_for(key)
        if srv.has(sname):
            if not self._query_ahead(sname) and not srv.is_stale(sname):
                return b""
            # see client_frame's Parse; a stale plan is prepared afresh the same way
            srv.prepare_again(sname)
            self.owed().append((DROP_CLOSE, sname, None))
            self.owed().append((DROP_PARSE, sname, None))
            return frame(b"C", b"S" + sname + b"\0") + parse_frame(sname, key)
        out = self._evict(srv.add(sname))
        self.owed().append((DROP_PARSE, sname, None))
        return out + parse_frame(sname, key)

    def _query_ahead(self, sname: bytes | None = None) -> bool:
        """A simple Query is still unanswered ahead (it might DISCARD ALL), and ``sname`` is not
        prepared again after it."""
        risky = False
        for code, data, _ in self.expect:
            if code == R_QUERY:
                risky = True
            elif risky and data == sname and (code == R_PARSE or code == DROP_PARSE):
                risky = False
        return risky

    def _evict(self, names: list[bytes]) -> bytes:
        out = b""
        for old in names:
            self.owed().append((DROP_CLOSE, old, None))
            out += frame(b"C", b"S" + old + b"\0")
        return out

    def queries_sent(self, count: int) -> None:
        """``count`` simple Queries went to the server unchanged (the C relay): as client_frame."""
        if not self.skipping:
            self.owed().extend([(R_QUERY, None, None)] * count)

    def batches_sent(self, count: int, shape: int) -> None:
        """``count`` unnamed extended batches of one ``shape`` (BATCH_* bits) went to the server
        unchanged (the C relay): as client_frame for each of their messages."""
        if not self.skipping:
            self.owed().extend(_BATCH_ENTRIES[shape] * count)

    def named_batches_sent(self, count: int, shape: int, sname: bytes, key: bytes, srv: ServerStatements) -> None:
        """``count`` batches of one ``shape`` (BATCH_NAMED: a Bind of the client's statement
        ``key``, then optionally Describe of the portal and Execute, and Sync) went to the server
        with the Bind rewritten to ``sname``, which the server has (the C relay, from the client's
        binds table): as client_frame for each of their messages."""
        self.cache.touch(key, sname)
        srv.has(sname)
        entries = [(R_BIND, sname, None)]
        if shape & BATCH_DESC_PORTAL:
            entries.append((R_DESC_PORTAL, None, None))
        if shape & BATCH_EXECUTE:
            entries.append((R_EXEC, None, None))
        entries.append((R_SYNC, None, None))
        self.owed().extend(entries * count)

    def query_unanswered(self) -> bool:
        """A simple Query is owed an answer (it might DISCARD ALL: see _query_ahead)."""
        return any(e[0] == R_QUERY for e in self.expect)

    def answered(self, count: int) -> None:
        """``count`` whole answers went to the client unchanged, each through its ReadyForQuery
        (the C relay): as server_frame for each of their frames. Such an answer holds no error and
        no frame of pgmp's own, so each of its frames answers the message at the head in turn."""
        exp = self.expect
        for _ in range(count):
            while exp and exp[0][0] in _PLAIN_EXTENDED:
                exp.popleft()
            if not exp or exp[0][0] not in (R_SYNC, R_QUERY, R_FUNC):
                break
            exp.popleft()

    def c_relay_ok(self) -> bool:
        """All the client is owed are answers to its own Queries, unnamed extended messages and
        Binds, unchanged (no statement of pgmp's to confirm, no made-up response, no Close), and no
        error is being skipped past: the C relay may pass those answers (see answered(); a Bind's
        server name matters only to an error, which is Python's)."""
        return not self.skipping and all(code in _C_ANSWERABLE and (data is None or code == R_BIND)
                                         for code, data, _u in self.expect)

    def synthetic_ready(self) -> bytes:
        """Made-up responses owed before anything the server still has to answer: send them now."""
        out = []
        exp = self.expect
        while exp and exp[0][0] == SYNTHETIC:
            out.append(exp.popleft()[1])
        return b"".join(out)

    # -- server to client ----------------------------------------------------------
    def server_frame(self, kind: int, frame_bytes, srv: ServerStatements) -> bytes | None:
        """A response-type frame from the server: None = forward, b"" = drop, else what to send instead."""
        exp = self.expect
        pre = self.synthetic_ready() if exp and exp[0][0] == SYNTHETIC else b""
        if not exp:
            return pre + bytes(frame_bytes) if pre else None
        code, data, _u = exp[0]
        drop = False
        if kind == 69:                                  # ErrorResponse
            if code in (R_QUERY, R_FUNC, R_SYNC):
                pass                                    # their ReadyForQuery still comes
            else:
                if code == R_BIND and data is not None and _stale_plan(frame_bytes):
                    # the table changed under the statement pgmp prepared: the error goes to the
                    # client, and its next use prepares the statement afresh (a direct
                    # connection would keep failing until the client prepared it again itself)
                    srv.mark_stale(data)
                self._skip_to_sync(srv)
        elif kind == 49:                                # ParseComplete
            if code == R_PARSE or code == DROP_PARSE:
                exp.popleft()
                if data is not None:
                    srv.confirm(data)
                drop = code == DROP_PARSE
        elif kind == 50:                                # BindComplete
            if code == R_BIND:
                exp.popleft()
        elif kind == 51:                                # CloseComplete
            if code == R_CLOSE or code == DROP_CLOSE:
                exp.popleft()
                drop = code == DROP_CLOSE
        elif kind == 90:                                # ReadyForQuery
            if code in (R_SYNC, R_QUERY, R_FUNC):
                exp.popleft()
        elif kind == 67 or kind == 73 or kind == 115:   # CommandComplete, EmptyQuery, PortalSuspended
            if code == R_EXEC:
                exp.popleft()
            if kind == 67:
                tag = bytes(frame_bytes[5:-1])
                if tag in (b"DISCARD ALL", b"DEALLOCATE ALL"):
                    srv.clear()
                    self.statements = NO_STATEMENTS
                    self.version += 1
                    for c2, d2, u2 in exp:
                        if c2 in (R_PARSE, DROP_PARSE) and d2 is not None:
                            srv.add(d2)
                        if u2 is not None:
                            if u2[2] is None:
                                self.own_statements().pop(u2[0], None)
                            else:
                                self.own_statements()[u2[0]] = u2[2]
        elif kind == 84 or kind == 110:                 # RowDescription, NoData
            if code == R_DESC_STMT or code == R_DESC_PORTAL:
                exp.popleft()
        elif kind == 71:                                # CopyInResponse
            if code == R_EXEC:
                self._copy_in_from_execute()
        post = self.synthetic_ready() if exp and exp[0][0] == SYNTHETIC else b""
        if drop:
            return pre + post
        if pre or post:
            return pre + bytes(frame_bytes) + post
        return None

    def _skip_to_sync(self, srv: ServerStatements) -> None:
        """After an error the server discards everything up to the next Sync."""
        exp = self.expect
        undone = []
        while exp and exp[0][0] != R_SYNC:
            undone.append(exp.popleft())
        for code, data, undo in reversed(undone):
            if code in (R_PARSE, DROP_PARSE) and data is not None:
                srv.forget(data)
            elif code == DROP_CLOSE:
                srv.restore(data)
            if undo is not None:
                self.version += 1
                name, prev, _new = undo
                if prev is not None:
                    self.own_statements()[name] = prev
                else:
                    self.own_statements().pop(name, None)
        if not exp:
            self.skipping = True

    def _copy_in_from_execute(self) -> int:
        """COPY FROM STDIN started by Execute: Syncs already sent are swallowed by copy mode."""
        exp = self.expect
        head = exp.popleft()
        kept = [e for e in exp if e[0] != R_SYNC]
        dropped = len(exp) - len(kept)
        exp.clear()
        exp.append(head)
        exp.extend(kept)
        return dropped
