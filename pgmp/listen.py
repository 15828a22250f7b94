"""Create the listening sockets: TCP with SO_REUSEPORT (one per worker slot) and the unix socket."""
import logging
import os
import socket

from pgmp.runfiles import RunFileError, SocketInUse, bind_unix, clear_socket_path

log = logging.getLogger("pgmp")


class ListenError(Exception):
    pass


def tcp_listener(addr: str, port: int, backlog: int = 4096, reuseport: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def unix_listener(directory: str, port: int, mode: int, backlog: int = 4096,
                  takeover: bool = False) -> socket.socket:
    """The unix socket; ``takeover`` replaces a live one (a restart or a new worker generation).

    Only a socket of pgmp's own user is replaced; a link, a file or another user's socket at the
    path is refused (pgmp.runfiles).
    """
    path = os.path.join(directory, f".s.PGSQL.{port}")
    try:
        clear_socket_path(path, "unix socket", "unix_socket_dir", takeover=takeover)
    except SocketInUse:
        raise ListenError(f"cannot listen on {path}: another server is accepting connections there") from None
    except RunFileError as exc:
        raise ListenError(str(exc)) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix(sock, path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bind_all(config, slots: int = 1, takeover: bool = False) -> tuple[list[list[socket.socket]], socket.socket | None]:
    """Per slot, one TCP socket on every listen address; plus the shared unix socket (or None)."""
    per_slot: list[list[socket.socket]] = []
    try:
        for _ in range(slots):
            per_slot.append([tcp_listener(a, config.listen_port) for a in config.listen_addr])
        unix = unix_listener(config.unix_socket_dir, config.listen_port, config.unix_socket_mode,
                             takeover=takeover) if config.unix_socket_dir else None
    except ListenError:
        for socks in per_slot:
            for s in socks:
                s.close()
        raise
    return per_slot, unix
