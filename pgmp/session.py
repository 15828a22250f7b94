"""The client session's state machine and the sans-IO rules a session follows: transaction tracking and session parameters.

The IO glue (pgmp.client) asks this module what a state change means; it
never decides protocol questions itself.
"""
import collections
import enum
import re

from pgmp import errors
from pgmp.errors import ClientProtocolError
from pgmp.protocol import messages
from pgmp.protocol.startup import StartupPacket, parse_options


class ClientState(enum.Enum):
    STARTUP = "startup"        # waiting for the startup packet (an SSLRequest may come first)
    AUTH_LOOKUP = "auth-lookup"  # user not in auth_file: waiting for auth_query to return its secret
    AUTH = "auth"              # password / SASL exchange with pgmp
    LOGIN_WAIT = "login"       # authenticated; waiting for the pool's server parameters (cold pool)
    IDLE = "idle"              # logged in, no server linked
    WAITING = "waiting"        # has a request, queued for a server
    ACTIVE = "active"          # a server is linked
    CLOSED = "closed"


_S = ClientState
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    _S.STARTUP: frozenset({_S.STARTUP, _S.AUTH_LOOKUP, _S.AUTH, _S.CLOSED}),
    _S.AUTH_LOOKUP: frozenset({_S.AUTH, _S.CLOSED}),
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
    __slots__ = ("outstanding", "status", "copy_in", "stats", "clock", "t_query", "t_xact", "t_ready", "kinds")

    def __init__(self, clock=None, stats=None):
        self.outstanding = 0
        self.status = 73            # b"I"
        self.copy_in = False
        self.stats = stats
        self.clock = clock
        self.t_query = 0.0
        self.t_xact = 0.0
        self.t_ready = 0.0          # when the server last finished all outstanding requests
        self.kinds: collections.deque = collections.deque()   # outstanding request kinds, oldest first

    def client_frame(self, kind: int) -> None:
        if kind == 81 or kind == 70 or (kind == 83 and not self.copy_in):   # Query, FunctionCall, Sync
            self.kinds.append(kind)
            if self.outstanding == 0:
                if self.clock is not None:
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
        kinds = self.kinds
        for _ in range(min(count, len(kinds))):
            kinds.popleft()
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
        """CopyInResponse: requests sent after the statement that started the COPY are swallowed.

        A COPY started by a Query is answered by that Query's ReadyForQuery; one started by an
        extended-protocol Execute ends at a Sync the client sends after CopyDone, so every Sync
        already counted was (or will be) ignored by the server in copy mode.
        """
        self.copy_in = True
        kinds = self.kinds
        if kinds and kinds[0] != 83:        # the Query (or FunctionCall) that started the COPY
            first = kinds[0]
            kinds.clear()
            kinds.append(first)
        else:
            kinds.clear()
        self.outstanding = len(kinds)

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


# ParameterStatus names whose value follows a client from server to server (lower case, as
# PostgreSQL compares setting names); track_extra_parameters adds to these.
TRACKED = frozenset({"application_name", "client_encoding", "datestyle", "intervalstyle", "timezone",
                     "standard_conforming_strings", "search_path"})


def client_settings(sp: StartupPacket) -> dict[str, str]:
    """The settings a client asked for at startup, to be applied on whichever server it gets.

    Names are lower-cased: PostgreSQL's setting names are case-insensitive.
    """
    settings: dict[str, str] = {}
    if sp.params.get("options"):
        for name, value in parse_options(sp.params["options"]).items():
            settings[name.lower()] = value
    for name, value in sp.params.items():
        if name not in _NOT_SETTINGS:
            settings[name.lower()] = value
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


def _clean_encoding(value: str) -> str:
    """PostgreSQL's clean_encoding_name: lower case, letters and digits only."""
    return "".join(ch for ch in value.lower() if ch.isalnum())


def normalize(name: str, value: str) -> str:
    """A comparable form of a setting, so 'utf-8' and 'UTF8' count as the same encoding."""
    name = name.lower()
    if name == "client_encoding":
        clean = _clean_encoding(value)
        return ENCODING_ALIASES.get(clean, clean.upper())
    if name == "datestyle":
        return value.replace(" ", "").upper()
    return value


def settings_query(wanted: dict[str, str], applied: dict[str, str], reported: dict[str, str],
                   dirty: bool = False) -> bytes | None:
    """A Query that brings a server's session to a client's settings, or None if it already matches.

    ``applied`` is what pgmp set on that server earlier (for other clients too);
    ``reported`` what the server reported by ParameterStatus, keyed in lower case.
    Only differences are sent; what an earlier client set and this one did not ask
    for is RESET. ``dirty`` means a client ran SET/RESET/DISCARD itself, so what the
    server holds is unknown: RESET ALL, then everything wanted. ``applied`` is
    updated to what the query establishes.
    """
    if dirty:
        applied.clear()
        applied.update(wanted)
        sql = ["RESET ALL"]
        if wanted:
            sql.append("SELECT " + ", ".join(_set_config(n, v) for n, v in wanted.items()))
        return messages.query(";".join(sql))
    stmts = []
    resets = [name for name in applied if name not in wanted]
    for name in resets:
        del applied[name]
    for name, value in wanted.items():
        if applied.get(name) == value:
            continue
        applied[name] = value
        cur = reported.get(name)
        if cur is not None and normalize(name, cur) == normalize(name, value):
            continue
        stmts.append(_set_config(name, value))
    if not stmts and not resets:
        return None
    sql = ["SELECT " + ", ".join(stmts)] if stmts else []
    sql += [f"RESET {name}" for name in resets]
    return messages.query(";".join(sql))


def _set_config(name: str, value: str) -> str:
    # set_config takes the value as a startup option would: a list setting such as
    # search_path = 'a,b' stays a list (SET x = 'a,b' would make it one quoted name).
    return f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"


# PostgreSQL's encoding names and aliases (encnames.c), keyed by the cleaned name.
ENCODING_ALIASES = {
    "abc": "WIN1258", "alt": "WIN866", "big5": "BIG5", "euccn": "EUC_CN", "eucjis2004": "EUC_JIS_2004",
    "eucjp": "EUC_JP", "euckr": "EUC_KR", "euctw": "EUC_TW", "gb18030": "GB18030", "gbk": "GBK",
    "iso88591": "LATIN1", "iso885910": "LATIN6", "iso885913": "LATIN7", "iso885914": "LATIN8",
    "iso885915": "LATIN9", "iso885916": "LATIN10", "iso88592": "LATIN2", "iso88593": "LATIN3",
    "iso88594": "LATIN4", "iso88595": "ISO_8859_5", "iso88596": "ISO_8859_6", "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8", "iso88599": "LATIN5", "johab": "JOHAB", "koi8": "KOI8R", "koi8r": "KOI8R",
    "koi8u": "KOI8U", "latin1": "LATIN1", "latin2": "LATIN2", "latin3": "LATIN3", "latin4": "LATIN4",
    "latin5": "LATIN5", "latin6": "LATIN6", "latin7": "LATIN7", "latin8": "LATIN8", "latin9": "LATIN9",
    "latin10": "LATIN10", "mskanji": "SJIS", "muleinternal": "MULE_INTERNAL", "shiftjis": "SJIS",
    "shiftjis2004": "SHIFT_JIS_2004", "sjis": "SJIS", "sqlascii": "SQL_ASCII", "tcvn": "WIN1258",
    "tcvn5712": "WIN1258", "uhc": "UHC", "unicode": "UTF8", "utf8": "UTF8", "vscii": "WIN1258",
    "win": "WIN1251", "win1250": "WIN1250", "win1251": "WIN1251", "win1252": "WIN1252",
    "win1253": "WIN1253", "win1254": "WIN1254", "win1255": "WIN1255", "win1256": "WIN1256",
    "win1257": "WIN1257", "win1258": "WIN1258", "win866": "WIN866", "win874": "WIN874", "win932": "SJIS",
    "win936": "GBK", "win949": "UHC", "win950": "BIG5", "windows1250": "WIN1250", "windows1251": "WIN1251",
    "windows1252": "WIN1252", "windows1253": "WIN1253", "windows1254": "WIN1254", "windows1255": "WIN1255",
    "windows1256": "WIN1256", "windows1257": "WIN1257", "windows1258": "WIN1258", "windows866": "WIN866",
    "windows874": "WIN874", "windows932": "SJIS", "windows936": "GBK", "windows949": "UHC",
    "windows950": "BIG5",
}


def login_parameters(server_params: dict[str, str], settings: dict[str, str]) -> dict[str, str]:
    """ParameterStatus values for a client's login: the pool's server values, with the client's own requests."""
    out = dict(server_params)
    case = {name.lower(): name for name in out}
    for name, value in settings.items():
        if name in case:
            if name == "client_encoding":
                value = normalize(name, value)
            out[case[name]] = value
    if "application_name" in settings:
        out["application_name"] = settings["application_name"]
    return out
