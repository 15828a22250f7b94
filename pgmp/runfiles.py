"""The files pgmp makes while it runs (pidfile, control socket, unix socket), made so that nobody else can steer them.

pgmp often runs as root or as the database's owner, and these paths may sit
in shared directories (/tmp is the default for both sockets). So a path is
never followed through a symbolic link, a file or socket that belongs to
another user is never removed or replaced, a directory where anyone may
swap files (writable by all, without the sticky bit) is refused, and the
pidfile is created under a fresh name with O_EXCL|O_NOFOLLOW and renamed
into place. Each refusal names the path and says what to do.
"""
import errno
import os
import pwd
import secrets
import socket
import stat

PRIVATE_DIR_ADVICE = "a directory only pgmp's user can write, such as /run/pgmp (systemd's RuntimeDirectory=)"
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"))


class RunFileError(Exception):
    """A run-time file cannot be made safely; the message names it and says what to do."""


class SocketInUse(RunFileError):
    """Another process accepts connections on a socket path pgmp was to bind."""


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "something unknown"


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_directory(path: str, what: str, setting: str) -> None:
    """The directory of ``path`` exists and no other user can swap the files in it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise RunFileError(f"{what} {path}: directory {directory} does not exist: create it, or set {setting} "
                           "to a path in an existing directory") from None
    except OSError as exc:
        raise RunFileError(f"{what} {path}: cannot use directory {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{what} {path}: {directory} is {kind_of(st.st_mode)}, not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise RunFileError(f"{what} {path}: directory {directory} is writable by every user and has no sticky bit, "
                           f"so another user could replace the file: set {setting} to a path in {PRIVATE_DIR_ADVICE}")


def existing(path: str, what: str) -> os.stat_result | None:
    """What is at ``path`` itself (a link is not followed), or None."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunFileError(f"{what} {path}: {exc.strerror or exc}") from None


def check_ours(path: str, st: os.stat_result, what: str, setting: str, want: str) -> None:
    """An existing ``path`` may be replaced only if it is ``want`` (its kind) and belongs to us."""
    found = kind_of(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise RunFileError(f"{what} {path} is a symbolic link; pgmp does not follow links there: remove it, "
                           f"or set {setting} to a path in {PRIVATE_DIR_ADVICE}")
    if found != want:
        raise RunFileError(f"{what} {path} is {found}, not {want}: remove it, or set {setting} to another path")
    if st.st_uid != os.geteuid():
        raise RunFileError(f"{what} {path} belongs to {_user(st.st_uid)}, not to pgmp's user "
                           f"{_user(os.geteuid())}: remove it if it is stale, or set {setting} to another path")


# ---- the pidfile --------------------------------------------------------------------------

def check_pidfile(path: str) -> None:
    """Refuse a pidfile path pgmp must not write: a link, not a file, someone else's, in a shared directory."""
    check_directory(path, "pidfile", "pidfile")
    st = existing(path, "pidfile")
    if st is not None:
        check_ours(path, st, "pidfile", "pidfile", "a regular file")


def write_pidfile(path: str) -> None:
    """Our pid into ``path``: a new file (O_EXCL, O_NOFOLLOW, mode 0644) renamed over the old one at once."""
    check_pidfile(path)
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o644)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise RunFileError(f"pidfile {path}: cannot create a file in {directory}: {exc.strerror or exc}") from None
    else:
        raise RunFileError(f"pidfile {path}: cannot create a temporary file in {directory}")
    try:
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)                 # replaces a link or file at path itself, never its target
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise RunFileError(f"pidfile {path}: cannot write it: {exc.strerror or exc}") from None


def read_pidfile(path: str) -> int | None:
    """The pid in ``path``; None when it is missing, not a regular file (a link, a FIFO…) or not a pid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pid = int(data.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 else None


# ---- socket paths -------------------------------------------------------------------------

def clear_socket_path(path: str, what: str, setting: str, takeover: bool = False) -> None:
    """Make room to bind a unix socket at ``path``: nothing there, or a socket of ours (removed).

    A live socket is refused unless ``takeover`` (a restart, a new worker generation).
    Anything else (a link, a directory, a file, someone else's socket) is refused:
    pgmp removes only what it could have made itself.
    """
    check_directory(path, what, setting)
    st = existing(path, what)
    if st is None:
        return
    check_ours(path, st, what, setting, "a socket")
    if not takeover and _accepts(path, what):
        raise SocketInUse(f"{what} {path}: another process accepts connections there")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RunFileError(f"{what} {path}: cannot remove the stale socket: {exc.strerror or exc}; remove it, "
                           f"or set {setting} to another path") from None


def _accepts(path: str, what: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return False
        raise RunFileError(f"{what} {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def bind_unix(sock: socket.socket, path: str, mode: int) -> None:
    """Bind ``sock`` at ``path`` with file mode ``mode``.

    The mode comes from the umask during bind, so the socket never exists with a wider
    one; a chmod by name follows only if a default ACL overrode the umask, and only
    after checking that the name is still a socket of ours (not a link put there since).
    """
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != mode and stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
        os.chmod(path, mode)
