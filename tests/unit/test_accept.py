"""accept() failing for want of descriptors: the worker's listeners and the master's control socket back off."""
from __future__ import annotations

import errno
import logging
import socket
from types import SimpleNamespace

from pgmp import master
from pgmp.loop import Loop
from pgmp.worker import ACCEPT_BACKOFF_MAX, AcceptPause


class FakeLoop:
    def __init__(self):
        self.now = 100.0
        self.timers: list[tuple[float, object]] = []

    def clock(self):
        return self.now

    def call_later(self, delay, fn, *args):
        self.timers.append((delay, fn))
        return SimpleNamespace(cancel=lambda: None)

    def fire(self) -> float:
        delay, fn = self.timers.pop(0)
        self.now += delay
        fn()
        return delay


class FakeListener:
    def __init__(self, name):
        self.name = name
        self.reading = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


EMFILE = OSError(errno.EMFILE, "Too many open files")


def test_backoff_doubles_to_one_second_pauses_every_listener_and_logs_once(caplog):
    loop = FakeLoop()
    tcp, unix = FakeListener("127.0.0.1:6432"), FakeListener("/tmp/.s.PGSQL.6432")
    worker = SimpleNamespace(loop=loop, slot=0, listeners=[tcp, unix])
    pause = AcceptPause(worker)
    delays = []
    with caplog.at_level(logging.INFO, logger="pgmp"):
        for _ in range(7):
            pause.failed(tcp, EMFILE)
            assert not tcp.reading and not unix.reading
            assert len(loop.timers) == 1
            delays.append(loop.fire())
            assert tcp.reading and unix.reading          # watched again: the next accept() tries
        pause.recovered()
        pause.failed(unix, EMFILE)                       # a new episode starts from the shortest pause
        delays.append(loop.fire())
    assert delays == [0.1, 0.2, 0.4, 0.8, ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MAX, 0.1]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("accept() failed on 127.0.0.1:6432: Too many open files")
    assert "raise LimitNOFILE / ulimit -n or lower max_client_conn" in lines[0]
    assert lines[1] == ("accept resumed after 7 failures: too many open files — "
                        "raise LimitNOFILE / ulimit -n or lower max_client_conn")
    assert lines[2].startswith("accept() failed on /tmp/.s.PGSQL.6432")


def test_a_long_episode_is_reminded_once_a_minute(caplog):
    loop = FakeLoop()
    lst = FakeListener("127.0.0.1:6432")
    pause = AcceptPause(SimpleNamespace(loop=loop, slot=2, listeners=[lst]))
    with caplog.at_level(logging.INFO, logger="pgmp"):
        for _ in range(200):                             # 200 failures over about 3 minutes
            pause.failed(lst, OSError(errno.ENFILE, "Too many open files in system"))
            loop.fire()
    lines = [r.getMessage() for r in caplog.records]
    assert 3 <= len(lines) <= 5, lines
    assert "fs.file-max" in lines[0]
    assert all("still failing on worker 2" in line for line in lines[1:])


class EmfileSocket(socket.socket):
    def accept(self):
        raise OSError(errno.EMFILE, "Too many open files")


def test_control_socket_accept_failure_pauses_the_master_instead_of_spinning(tmp_path, caplog):
    clock = [0.0]
    loop = Loop(4096, clock=lambda: clock[0])
    sock = EmfileSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "pgmp.ctl"))
    sock.listen(1)
    try:
        listener = master._ControlListener(loop, sock, None)
        with caplog.at_level(logging.INFO, logger="pgmp"):
            listener.read()
        assert not listener.reading, "still watched: a level-triggered loop would call accept() again at once"
        assert len(caplog.records) == 1 and "accept() failed" in caplog.records[0].getMessage()
        clock[0] += master.CONTROL_ACCEPT_RETRY
        loop.run_once(max_timeout=0)
        assert listener.reading
    finally:
        sock.close()
        loop.close()
