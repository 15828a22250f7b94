"""Key derivations (PBKDF2) off the worker's event loop.

A SCRAM key derivation costs milliseconds to tens of milliseconds of CPU
(auth_max_iterations bounds it), and a client can ask for one per login
before it has proved anything: cleartext ``password`` logins against a SCRAM
secret. Run in the loop, a burst of such logins would stall every session of
the worker. hashlib's PBKDF2 releases the GIL, so a small thread pool runs
them in parallel with the loop; each result comes back to the loop through
a socketpair the loop watches, and its callback runs there, like any event.

Threads start at the first derivation, in the worker process, never in the
master before a fork.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import socket

from pgmp.loop import Endpoint

log = logging.getLogger("pgmp")

THREADS = 2


class Deriver:
    """``submit(fn, args, done)``: ``fn(*args)`` runs in a thread, ``done(result, error)`` in the loop."""

    def __init__(self, loop, threads: int = THREADS):
        self.loop = loop
        self.threads = threads
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.finished: collections.deque = collections.deque()    # (done, future), appended by threads
        self._wake_r: _Wakeup | None = None
        self._wake_w: socket.socket | None = None

    def submit(self, fn, args: tuple, done) -> None:
        if self.pool is None:
            rsock, wsock = socket.socketpair()
            rsock.setblocking(False)
            wsock.setblocking(False)
            self._wake_r = _Wakeup(self.loop, rsock, self)
            self._wake_w = wsock
            self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="pgmp-derive")
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda f: self._finished(done, f))

    def _finished(self, done, future) -> None:          # in a pool thread (or at once, if already done)
        self.finished.append((done, future))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):               # a wake-up is pending already, or closing
            pass

    def run_finished(self) -> None:
        while self.finished:
            done, future = self.finished.popleft()
            if future.cancelled():
                continue
            error = future.exception()
            try:
                done(None if error is not None else future.result(), error)
            except Exception:
                log.exception("internal error in a key derivation's callback")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self._wake_r is not None:
            self._wake_r.close_socket()
            self._wake_w.close()
            self._wake_r = self._wake_w = None


class _Wakeup(Endpoint):
    __slots__ = ("deriver",)

    def __init__(self, loop, sock, deriver):
        super().__init__(loop, sock)
        self.deriver = deriver

    def on_data(self, view, n):
        self.deriver.run_finished()

    def on_eof(self, reason):
        pass
