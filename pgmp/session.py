"""The client session's state machine and the sans-IO rules for session parameters (the link uses them).

The IO glue (pgmp.client) asks this module what a state change means; it
never decides protocol questions itself.
"""
import enum
import re
import weakref

from pgmp import errors
from pgmp.errors import ClientProtocolError
from pgmp.protocol import messages
from pgmp.protocol.startup import StartupPacket, parse_options


class ClientState(enum.Enum):
    STARTUP = "startup"        # waiting for the startup packet (an SSLRequest may come first)
    AUTH_LOOKUP = "auth-lookup"  # user not in auth_file: waiting for auth_query to return its secret
    AUTH = "auth"              # password / SASL exchange with pgmp
    LOGIN_WAIT = "login"       # authenticated; waiting for the pool's parameters (cold pool) or, in session mode, a server
    IDLE = "idle"              # logged in, no server linked
    WAITING = "waiting"        # has a request, queued for a server
    ACTIVE = "active"          # a server is linked
    CONSOLE = "console"        # logged in to the admin console (pgmp.console): no pool, no server
    CLOSED = "closed"

    # members are singletons compared by identity: hash them so too (Enum's own __hash__ is
    # Python code, and set_state asks TRANSITIONS twice per state change)
    __hash__ = object.__hash__


_S = ClientState
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    _S.STARTUP: frozenset({_S.STARTUP, _S.AUTH_LOOKUP, _S.AUTH, _S.CONSOLE, _S.CLOSED}),  # CONSOLE: peer
    _S.AUTH_LOOKUP: frozenset({_S.AUTH, _S.CLOSED}),
    _S.AUTH: frozenset({_S.LOGIN_WAIT, _S.IDLE, _S.CONSOLE, _S.CLOSED}),
    _S.LOGIN_WAIT: frozenset({_S.IDLE, _S.ACTIVE, _S.CLOSED}),   # session mode: linked at login
    _S.IDLE: frozenset({_S.WAITING, _S.ACTIVE, _S.CLOSED}),
    _S.WAITING: frozenset({_S.ACTIVE, _S.CLOSED}),
    _S.ACTIVE: frozenset({_S.IDLE, _S.CLOSED}),
    _S.CONSOLE: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: ClientState, new: ClientState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"client session cannot go from {old.value} to {new.value}")


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


def settings_query(wanted: dict[str, str], applied: dict[str, str], reported: dict[str, str]) -> bytes | None:
    """A Query that brings a server's session to a client's settings, or None if it already matches.

    ``applied`` is what pgmp knows to be set on that server (by earlier clients too);
    ``reported`` what the server reported by ParameterStatus, keyed in lower case.
    Only differences are sent; what an earlier client set and this one did not ask
    for is RESET first (the session user before the role: resetting it resets the
    role), then the settings are applied (again the session user first). ``applied``
    is updated to what the query establishes.
    """
    if applied == wanted:
        return None                         # the common case: the server has the client's settings
    resets = sorted((name for name in applied if name not in wanted), key=_order)
    for name in resets:
        del applied[name]
    stmts = []
    for name in sorted(wanted, key=_order) if _ORDERED & wanted.keys() else wanted:
        value = wanted[name]
        if applied.get(name) == value:
            continue
        applied[name] = value
        cur = reported.get(name)
        if cur is not None and normalize(name, cur) == normalize(name, value):
            continue
        stmts.append(_set_config(name, value))
    if not stmts and not resets:
        return None
    sql = [f"RESET {name}" for name in resets]
    if stmts:
        sql.append("SELECT " + ", ".join(stmts))
    return messages.query(";".join(sql))


# The session user goes first (setting or resetting it resets the role), then the role.
_ORDERED = {"session_authorization", "role"}


def _order(name: str) -> int:
    return 0 if name == "session_authorization" else 1 if name == "role" else 2


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


class SharedDict(dict):
    """A dict of values that several clients hold alike (Sharing): never changed in place; a
    client that is to change its values copies it first."""
    __slots__ = ("__weakref__",)


class Sharing:
    """One SharedDict per distinct content, for as long as some client holds it: a weak cache, so
    that nothing in it outlives its clients and it cannot grow past them (memory per idle client).
    Used only after a client's login, so that what unauthenticated peers send is never kept."""
    __slots__ = ("_cache",)

    def __init__(self):
        self._cache: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def get(self, values: dict[str, str]) -> SharedDict:
        key = tuple(values.items())
        shared = self._cache.get(key)
        if shared is None:
            shared = SharedDict(values)
            self._cache[key] = shared
        return shared

    def __len__(self) -> int:
        return len(self._cache)


SHARED_PARAMETERS = Sharing()      # the ParameterStatus values clients logged in with (ClientConnection.reported)
SHARED_STARTUPS = Sharing()        # the login settings of Links (Link.startup)


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
