"""The client session's state machine and the sans-IO rules a session follows: transaction tracking and session parameters.

The IO glue (pgmp.client) asks this module what a state change means; it
never decides protocol questions itself.
"""
import enum
import re

from pgmp import errors
from pgmp.errors import ClientProtocolError
from pgmp.protocol import messages
from pgmp.protocol.startup import StartupPacket, parse_options


class ClientState(enum.Enum):
    STARTUP = "startup"        # waiting for the startup packet (an SSLRequest may come first)
    AUTH = "auth"              # password / SASL exchange with pgmp
    LOGIN_WAIT = "login"       # authenticated; waiting for the pool's server parameters (cold pool)
    IDLE = "idle"              # logged in, no server linked
    WAITING = "waiting"        # has a request, queued for a server
    ACTIVE = "active"          # a server is linked
    CLOSED = "closed"


_S = ClientState
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    _S.STARTUP: frozenset({_S.STARTUP, _S.AUTH, _S.CLOSED}),
    _S.AUTH: frozenset({_S.LOGIN_WAIT, _S.IDLE, _S.CLOSED}),
    _S.LOGIN_WAIT: frozenset({_S.IDLE, _S.CLOSED}),
    _S.IDLE: frozenset({_S.WAITING, _S.ACTIVE, _S.CLOSED}),
    _S.WAITING: frozenset({_S.ACTIVE, _S.CLOSED}),
    _S.ACTIVE: frozenset({_S.IDLE, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: ClientState, new: ClientState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"client session cannot go from {old.value} to {new.value}")


# ---- transaction tracking ---------------------------------------------------

class TxTracker:
    """Knows whether the server linked to a client is between requests, and times what it sees.

    Counts the requests that the server will answer with ReadyForQuery
    (Query, Sync, FunctionCall) against the ReadyForQuery frames it sent. A
    server in COPY IN ignores Sync and Flush, so a Sync that arrives while
    pgmp knows the server copies is not counted. When in doubt the tracker
    says "busy": a busy server is closed instead of being reused dirty.
    ``stats`` (a PoolStats) gets query and transaction counts and times.
    """
    __slots__ = ("outstanding", "status", "copy_in", "stats", "clock", "t_query", "t_xact", "t_ready")

    def __init__(self, clock=None, stats=None):
        self.outstanding = 0
        self.status = 73            # b"I"
        self.copy_in = False
        self.stats = stats
        self.clock = clock
        self.t_query = 0.0
        self.t_xact = 0.0
        self.t_ready = 0.0          # when the server last finished all outstanding requests

    def client_frame(self, kind: int) -> None:
        if kind == 81 or kind == 70 or (kind == 83 and not self.copy_in):   # Query, FunctionCall, Sync
            if self.outstanding == 0 and self.clock is not None:
                self.t_query = now = self.clock()
                if self.status == 73:
                    self.t_xact = now
            self.outstanding += 1
        elif kind == 99 or kind == 102:         # 'c' CopyDone, 'f' CopyFail
            self.copy_in = False

    def server_ready(self, count: int, status: int) -> None:
        self.outstanding -= count
        if self.outstanding < 0:
            self.outstanding = 0
        self.status = status
        self.copy_in = False
        st = self.stats
        if st is not None:
            st.query_count += count
            if self.outstanding == 0:
                self.t_ready = now = self.clock()
                st.query_time_us += int((now - self.t_query) * 1e6)
                if status == 73:
                    st.xact_count += 1
                    st.xact_time_us += int((now - self.t_xact) * 1e6)

    def server_copy_in(self) -> None:
        self.copy_in = True

    @property
    def idle(self) -> bool:
        """No request in flight and no open transaction: the server may be reused."""
        return self.outstanding == 0 and self.status == 73 and not self.copy_in

    @property
    def between_requests(self) -> bool:
        """No request in flight (a transaction may be open)."""
        return self.outstanding == 0 and not self.copy_in


# ---- session parameters -----------------------------------------------------

# Startup parameters that are not settings to apply on a server.
_NOT_SETTINGS = {"user", "database", "options"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def client_settings(sp: StartupPacket) -> dict[str, str]:
    """The settings a client asked for at startup, to be applied on whichever server it gets."""
    settings: dict[str, str] = {}
    if sp.params.get("options"):
        settings.update(parse_options(sp.params["options"]))
    for name, value in sp.params.items():
        if name not in _NOT_SETTINGS:
            settings[name] = value
    for name in settings:
        if not _NAME.match(name):
            raise ClientProtocolError(f"invalid startup parameter name {name!r}",
                                      sqlstate=errors.PROTOCOL_VIOLATION)
    return settings


def quote_literal(value: str) -> str:
    if "\0" in value:
        raise ValueError("NUL in a setting value")
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def normalize(name: str, value: str) -> str:
    """A comparable form of a setting, so 'utf-8' and 'UTF8' count as the same encoding."""
    if name == "client_encoding":
        return value.replace("-", "").replace("_", "").upper()
    if name.lower() == "datestyle":
        return value.replace(" ", "").upper()
    return value


def settings_query(wanted: dict[str, str], applied: dict[str, str], reported: dict[str, str]) -> bytes | None:
    """A Query that brings a server's session to a client's settings, or None if it already matches.

    ``applied`` is what pgmp set on that server earlier; ``reported`` what the
    server reported by ParameterStatus. Only differences are sent.
    """
    stmts = []
    for name, value in wanted.items():
        if applied.get(name) == value:
            continue
        cur = reported.get(name)
        if cur is not None and normalize(name, cur) == normalize(name, value):
            continue
        stmts.append(f"SET {name} = {quote_literal(value)}")
    if not stmts:
        return None
    return messages.query(";".join(stmts))


CANONICAL_ENCODINGS = {
    "UTF8": "UTF8", "UNICODE": "UTF8", "SQLASCII": "SQL_ASCII", "LATIN1": "LATIN1",
    "ISO88591": "LATIN1", "WIN1252": "WIN1252", "EUCJP": "EUC_JP",
}


def login_parameters(server_params: dict[str, str], settings: dict[str, str]) -> dict[str, str]:
    """ParameterStatus values for a client's login: the pool's server values, with the client's own requests."""
    out = dict(server_params)
    for name, value in settings.items():
        if name in out:
            if name == "client_encoding":
                value = CANONICAL_ENCODINGS.get(normalize(name, value), value.upper())
            out[name] = value
    if "application_name" in settings:
        out["application_name"] = settings["application_name"]
    return out
