"""Helpers shared by the harnesses: invariant checks, cutting bytes into frames, a deterministic data provider."""
from __future__ import annotations

import os
import struct

# Open bugs (tests/fuzz/crashes/OPEN lists them): a harness steps around each with
# guard(name) so that fuzzing goes on past it; replaying the kept crash inputs sets
# PGMP_FUZZ_NO_GUARDS=1, so that each open bug still shows until it is fixed.
_NO_GUARDS = os.environ.get("PGMP_FUZZ_NO_GUARDS") == "1"


class InvariantFailed(AssertionError):
    """A harness's invariant does not hold: a bug, whatever the input."""


def check(condition, message: str) -> None:
    if not condition:
        raise InvariantFailed(message)


def guard(name: str) -> bool:
    """True: step around open bug ``name`` (an entry of tests/fuzz/crashes/OPEN)."""
    return not _NO_GUARDS


def frames(data: bytes):
    """(type, payload) of each v3 frame in ``data``, read leniently so that any bytes make frames:
    a length word below 4 counts as 4, one past the end takes the rest."""
    pos, n = 0, len(data)
    while pos < n:
        kind = data[pos]
        if n - pos < 5:
            yield kind, data[pos + 1:]
            return
        (declared,) = struct.unpack_from("!I", data, pos + 1)
        end = min(n, pos + 1 + max(declared, 4))
        yield kind, data[pos + 5:end]
        pos = end


def frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!I", len(payload) + 4) + payload


class Bytes:
    """Reads choices off the front of the input, like atheris.FuzzedDataProvider but plain and
    deterministic (no atheris needed to replay an input): past the end every read is 0 / empty."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def pick(self, options):
        return options[self.byte() % len(options)]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def chunk(self) -> bytes:
        """A length-prefixed piece: one length byte (255: two more), then that many bytes."""
        n = self.byte()
        if n == 255:
            n = self.u16()
        return self.take(n)

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos
