"""Fuzz the session-effects classifier: pgmp/protocol/sql.py session_effects on a client's query text.

Input: the text of a simple Query or a Parse, as bytes (any encoding, maybe NUL-terminated).

Documented errors: none; session_effects answers for every text. Invariants: every
Effect has a known kind and str fields; a trailing NUL changes nothing; the answer is the
same for bytes and memoryview and on a second call; a "set" has a value, the others that
need one have a name. A slow input (libFuzzer's -timeout) is a crash too: the classifier
runs in the worker loop on every Query.
"""
from pgmp.protocol.sql import Effect, session_effects
from tests.fuzz.harnesses._common import check

MAX_LEN = 4096
KINDS = frozenset({"begin", "commit", "rollback", "savepoint", "set", "reset", "reset_all", "discard",
                   "discard_all", "pin", "unknown"})


def one_input(data: bytes) -> None:
    effects = session_effects(data)
    check(isinstance(effects, tuple), "session_effects did not return a tuple")
    for e in effects:
        check(isinstance(e, Effect) and e.kind in KINDS, f"unknown effect {e!r}")
        check(isinstance(e.name, str) and (e.value is None or isinstance(e.value, str)), f"bad fields in {e!r}")
        if e.kind == "set":
            check(e.name and e.value is not None, f"a set without a name or value: {e!r}")
        if e.kind == "reset":
            check(e.name, f"a reset without a name: {e!r}")
    if not data.endswith(b"\0"):
        check(session_effects(data + b"\0") == effects, "a trailing NUL changed the effects")
    check(session_effects(memoryview(data)) == effects, "memoryview and bytes differ")
