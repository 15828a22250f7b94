"""Control messages between the master and its workers, and between the CLI and the master (sans-IO).

A message is a JSON object with a ``type`` and the protocol version ``v``,
framed by a 4-byte big-endian length. The master and each worker share one
socketpair; the CLI talks to the master over the control socket with the
same framing.

Message types (version 1):

=================  ==============  =============================================
type               direction       fields
=================  ==============  =============================================
ready              worker→master   slot, generation, pid
heartbeat          worker→master   clients, servers
reload             master→worker   path, text (the validated config file),
                                   overrides ([pgmp] values of the console's SET)
reload_result      worker→master   ok, error
drain              master→worker   mode ("graceful" | "fast"): stop accepting,
                                   close clients (at the next transaction
                                   boundary when graceful), exit when none left
stop               master→worker   mode "immediate": exit now
stats_request      master→worker   id, detail (None | "sockets": also a row per
                                   client, server and listening socket)
stats              worker→master   id, data
cancel             worker→master   pid, secret: a CancelRequest for a session
                   master→worker   of another worker, forwarded to its owner
pool_command       master→worker   id, action ("pause" | "resume" | "reconnect" |
                                   "kill" | "disable" | "enable" |
                                   "kill_client"), database (None = all),
                                   client_id (kill_client: SHOW CLIENTS' id)
pool_result        worker→master   id, ok, data (pools, busy_servers, killed)
metrics_request    master→worker   id: a scrape of the metrics endpoint
metrics            worker→master   id, data (pgmp.metrics.worker_figures); also
                                   sent unasked (id 0) by a worker that exits
command            CLI→master      command ("status" | "stats" | "reload" |
                                   "stop" | "restart" | "pause" | "resume" |
                                   "reconnect" | "kill" | "disable" | "enable" |
                                   "kill_client" | "set"), args
reply              master→CLI      ok, error, data
console            worker→master   id (the worker's), command, args: a command
                                   of the admin console, run as the CLI's
console_result     master→worker   id, ok, error, data: its reply (a gather
                                   lists in data.missing the worker pids that
                                   did not answer within 3 s)
host_state         master→worker   hosts: the health checks' table, one dict per
                                   (host, port): up, in_recovery, read_only,
                                   lag, checked_at, banned_until, banned_at
                                   (the monotonic clock), error (pgmp.hosts)
host_report        worker→master   host, port, event ("failed" | "read_only"),
                                   error: check that host again now
=================  ==============  =============================================
"""
import json
import struct

VERSION = 1
MAX_MESSAGE = 16 << 20
_LEN = struct.Struct("!I")

TYPES = frozenset({"ready", "heartbeat", "reload", "reload_result", "drain", "stop", "stats_request",
                   "stats", "cancel", "pool_command", "pool_result", "metrics_request", "metrics", "command",
                   "reply", "console", "console_result", "host_state", "host_report"})


class ControlError(Exception):
    """A control message that cannot be decoded: the peer is broken or not pgmp."""


def encode(msg_type: str, **fields) -> bytes:
    if msg_type not in TYPES:
        raise ValueError(f"unknown control message type {msg_type!r}")
    body = json.dumps({"type": msg_type, "v": VERSION, **fields}, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"control message too large ({len(body)} bytes)")
    return _LEN.pack(len(body)) + body


class Decoder:
    """Turns a byte stream into control messages; bounded, strict about versions and types."""

    def __init__(self, max_message: int = MAX_MESSAGE):
        self.buf = bytearray()
        self.max_message = max_message

    def feed(self, data: bytes) -> list[dict]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf, 0)
            if n > self.max_message:
                raise ControlError(f"control message of {n} bytes exceeds the limit of {self.max_message}")
            if len(self.buf) < 4 + n:
                break
            body = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            out.append(self._decode(body))
        return out

    @staticmethod
    def _decode(body: bytes) -> dict:
        try:
            msg = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ControlError(f"control message is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ControlError("control message is not an object")
        if msg.get("v") != VERSION:
            raise ControlError(f"control protocol version {msg.get('v')!r} not supported (expected {VERSION})")
        if msg.get("type") not in TYPES:
            raise ControlError(f"unknown control message type {msg.get('type')!r}")
        return msg
