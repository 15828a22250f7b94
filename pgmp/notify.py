"""systemd's sd_notify protocol: a datagram to $NOTIFY_SOCKET, no dependency."""
import os
import socket


def notify(*lines: str) -> bool:
    """Send ``READY=1``-style lines to systemd; False when not run under a notify service."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]              # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False
