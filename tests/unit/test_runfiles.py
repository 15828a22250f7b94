"""The files pgmp makes while it runs: the pidfile and the socket paths, against files planted by someone else."""
from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest

from pgmp import master

NOBODY = 65534
PRECIOUS = "must not be overwritten\n"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file owned by another user")


@pytest.fixture
def precious(tmp_path):
    target = tmp_path / "precious"
    target.write_text(PRECIOUS)
    return target


def runfiles():
    from pgmp import runfiles
    return runfiles


# ---- writing the pidfile ---------------------------------------------------------------

def test_pidfile_is_written_with_our_pid_mode_0644(tmp_path):
    path = tmp_path / "pgmp.pid"
    old = os.umask(0o022)
    try:
        master.write_pidfile(str(path))
    finally:
        os.umask(old)
    assert path.read_text() == f"{os.getpid()}\n"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["pgmp.pid"], "a temporary file was left behind"


def test_pidfile_write_does_not_follow_a_link_planted_at_the_temporary_name(tmp_path, precious):
    path = tmp_path / "pgmp.pid"
    for name in (f"pgmp.pid.{os.getpid()}.tmp", f".pgmp.pid.{os.getpid()}.tmp"):   # guessable names
        (tmp_path / name).symlink_to(precious)
    master.write_pidfile(str(path))
    assert precious.read_text() == PRECIOUS
    assert not path.is_symlink() and path.read_text() == f"{os.getpid()}\n"


def test_pidfile_symlink_is_refused(tmp_path, precious):
    path = tmp_path / "pgmp.pid"
    path.symlink_to(precious)
    with pytest.raises(runfiles().RunFileError, match="symbolic link"):
        master.write_pidfile(str(path))
    assert precious.read_text() == PRECIOUS and path.is_symlink()


def test_stale_pidfile_of_ours_is_replaced(tmp_path):
    path = tmp_path / "pgmp.pid"
    path.write_text("999999999\n")
    inode = os.lstat(path).st_ino
    master.write_pidfile(str(path))
    assert path.read_text() == f"{os.getpid()}\n"
    assert os.lstat(path).st_ino != inode, "written in place, not replaced atomically"


@pytest.mark.parametrize("mode, refused", [(0o777, True), (0o1777, False), (0o775, False), (0o700, False)])
def test_pidfile_directory_writable_by_all_needs_the_sticky_bit(tmp_path, mode, refused):
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(mode)
    path = d / "pgmp.pid"
    if refused:
        with pytest.raises(runfiles().RunFileError, match=r"writable by every user and has no sticky bit"):
            master.write_pidfile(str(path))
        assert not path.exists()
    else:
        master.write_pidfile(str(path))
        assert path.read_text() == f"{os.getpid()}\n"


@as_root
def test_pidfile_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "pgmp.pid"
    path.write_text("1\n")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(runfiles().RunFileError, match=rf"belongs to uid {NOBODY}"):
        master.write_pidfile(str(path))
    assert path.read_text() == "1\n"


def test_pidfile_that_is_a_directory_is_refused(tmp_path):
    path = tmp_path / "pgmp.pid"
    path.mkdir()
    with pytest.raises(runfiles().RunFileError, match="is a directory, not a regular file"):
        master.write_pidfile(str(path))


# ---- reading the pidfile ---------------------------------------------------------------

def test_read_pidfile(tmp_path, precious):
    path = tmp_path / "pgmp.pid"
    assert master.read_pidfile(str(path)) is None                  # missing
    path.write_text("4242\n")
    assert master.read_pidfile(str(path)) == 4242
    for junk in ("", "pgmp\n", "-5\n", "0\n"):
        path.write_text(junk)
        assert master.read_pidfile(str(path)) is None, junk
    link = tmp_path / "link.pid"
    (tmp_path / "target.pid").write_text("4242\n")
    link.symlink_to(tmp_path / "target.pid")
    assert master.read_pidfile(str(link)) is None                  # not through a link


def test_read_pidfile_does_not_block_on_a_fifo(tmp_path):
    path = tmp_path / "pgmp.pid"
    os.mkfifo(path)
    result = []
    reader = threading.Thread(target=lambda: result.append(master.read_pidfile(str(path))), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read_pidfile blocked opening a FIFO"
    assert result == [None]


# ---- the running-pgmp check -------------------------------------------------------------

@pytest.mark.parametrize("cmdline, is_pgmp", [
    (["pgmp: master [gen 0] 2 workers, 0 clients, 0 servers /etc/pgmp/pgmp.toml"], True),
    ("pgmp: master [gen 0] 2 workers, 0 clients, 0 servers /etc/pgmp/pgmp.toml".split(), True),
    (["pgmp: worker 0 [clients=0 servers=0]"], False),
    (["/usr/bin/python3", "-m", "pgmp", "start", "-c", "/etc/pgmp/pgmp.toml"], True),
    (["/usr/local/bin/pgmp", "start", "-c", "/etc/pgmp/pgmp.toml"], True),
    (["vim", "/etc/pgmp/pgmp.toml"], False),
    (["pgmp-notes", "60"], False),
    (["/usr/bin/python3", "-m", "pytest", "tests/pgmp"], False),
    ([], False),
])
def test_is_pgmp_master(cmdline, is_pgmp):
    assert master.is_pgmp_master(cmdline) is is_pgmp


# ---- socket paths ------------------------------------------------------------------------

def bound(path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                                   # a dead socket: nobody listens


def test_socket_path_free_or_stale_of_ours(tmp_path):
    rf = runfiles()
    path = tmp_path / "pgmp.ctl"
    rf.clear_socket_path(str(path), "control socket", "control_socket")     # nothing there
    bound(path)
    rf.clear_socket_path(str(path), "control socket", "control_socket")     # stale, ours: removed
    assert not os.path.lexists(path)


@pytest.mark.parametrize("plant, words", [
    (lambda p: p.mkdir(), "is a directory, not a socket"),
    (lambda p: p.write_text("x"), "is a regular file, not a socket"),
    (lambda p: os.mkfifo(p), "is a FIFO, not a socket"),
])
def test_socket_path_taken_by_something_else_is_refused(tmp_path, plant, words):
    path = tmp_path / "pgmp.ctl"
    plant(path)
    with pytest.raises(runfiles().RunFileError, match=words) as info:
        runfiles().clear_socket_path(str(path), "control socket", "control_socket")
    assert str(path) in str(info.value) and "control_socket" in str(info.value)
    assert os.path.lexists(path)


def test_socket_path_symlink_is_refused_even_to_a_dead_socket_of_ours(tmp_path):
    target = tmp_path / "elsewhere.ctl"
    bound(target)
    path = tmp_path / "pgmp.ctl"
    path.symlink_to(target)
    with pytest.raises(runfiles().RunFileError, match="symbolic link"):
        runfiles().clear_socket_path(str(path), "control socket", "control_socket")
    assert path.is_symlink() and target.exists()


@as_root
def test_socket_of_another_user_is_refused(tmp_path):
    path = tmp_path / "pgmp.ctl"
    bound(path)
    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(runfiles().RunFileError, match=rf"belongs to uid {NOBODY}"):
        runfiles().clear_socket_path(str(path), "control socket", "control_socket")
    assert os.path.lexists(path)


def test_live_socket_is_refused_unless_taken_over(tmp_path):
    rf = runfiles()
    path = tmp_path / "pgmp.ctl"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(rf.RunFileError, match="another process accepts connections"):
            rf.clear_socket_path(str(path), "control socket", "control_socket")
        rf.clear_socket_path(str(path), "control socket", "control_socket", takeover=True)
        assert not os.path.lexists(path)
    finally:
        live.close()


def test_socket_path_that_cannot_be_removed_is_a_clear_error(tmp_path, monkeypatch):
    """(As root, permission bits cannot show it: the unlink is made to fail as it would for another user.)"""
    rf = runfiles()
    path = tmp_path / "pgmp.ctl"
    bound(path)

    def denied(p, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", p)
    monkeypatch.setattr(rf.os, "unlink", denied)
    with pytest.raises(rf.RunFileError, match=r"cannot remove the stale socket: Permission denied"):
        rf.clear_socket_path(str(path), "control socket", "control_socket")


def test_socket_directory_writable_by_all_without_sticky_bit_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(runfiles().RunFileError, match="no sticky bit"):
        runfiles().clear_socket_path(str(d / "pgmp.ctl"), "control socket", "control_socket")


def test_socket_directory_missing_is_a_clear_error(tmp_path):
    with pytest.raises(runfiles().RunFileError, match="does not exist"):
        runfiles().clear_socket_path(str(tmp_path / "nope" / "pgmp.ctl"), "control socket", "control_socket")
