"""Tell which statements of a client's query text change session state (sans-IO).

In transaction pooling a client's session state must follow it from server to
server. session_effects() reads the text of a simple Query or of a Parse and
lists, statement by statement, what it does to that state: SETs to record and
replay with set_config(name, value, false), transaction boundaries, and state
that cannot be moved ("pin") or not followed with certainty ("unknown"); the
caller pins the client to its server for the last two.

This is a lexer plus a few grammar rules, not PostgreSQL's parser. It assumes
standard_conforming_strings on and a UTF-8 server encoding. Approximations:
quote_identifier() knows the non-unreserved keywords of PostgreSQL 15 to 18 (a
superset for older servers: quoting one more word names the same schema);
SET TIME ZONE accepts any non-reserved word where PostgreSQL takes only a
non-keyword; SQL-standard routine bodies are split the way psql splits them
(BEGIN ... END inside CREATE FUNCTION/PROCEDURE). What runs inside functions,
DO blocks or dynamic SQL is not seen.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Effect:
    """One change: `kind` says what, `name` which setting (or why a pin), `value` the set_config() value."""
    kind: str
    name: str = ""
    value: str | None = None


# Every statement with an effect contains one of these, so the usual
# SELECT/INSERT/UPDATE is answered by a single search of the raw bytes.
# (temp/temporary: SELECT ... INTO TEMP also creates a temporary table.)
# It runs on bytes.lower(): three times faster than re.IGNORECASE.
_TRIGGER = re.compile(
    rb"\b(?:set|reset|discard|listen|unlisten|prepare|declare|create|begin|start|commit|end|rollback"
    rb"|abort|savepoint|release|load|temp|temporary|do|call)\b|advisory_lock|set_config")

# Token kinds. Words are folded to lower case; quoted identifiers are not.
WORD, IDENT, STR, NUM, PARAM, OP, BAD = "word", "ident", "str", "num", "param", "op", "bad"

_ID = r"A-Za-z_\x80-\U0010ffff"  # the lexer's ident_start; non-ASCII (and surrogate escapes) count
_LEX = re.compile(rf"""
    (?P<space> [ \t\n\r\f\v]+ | --[^\n\r]* )
  | (?P<comment> /\* )
  | (?P<estr> [eE]' )
  | (?P<ustr> [uU]&' ) | (?P<uident> [uU]&" ) | (?P<bstr> [bBxXnN]' )
  | (?P<str> ' ) | (?P<ident> " )
  | (?P<dollar> \$ (?:[{_ID}][{_ID}0-9]*)? \$ )
  | (?P<param> \$[0-9]+ )
  | (?P<num> (?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)? [{_ID}0-9$]* )
  | (?P<word> [{_ID}][{_ID}0-9$]* )
  | (?P<op> . )
""", re.X | re.S)
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")  # else trailing junk
_SBODY = re.compile(r"([^']*(?:''[^']*)*)'")
_EBODY = re.compile(r"([^'\\]*(?:(?:\\.|'')[^'\\]*)*)'", re.S)
_QBODY = re.compile(r'([^"]*(?:""[^"]*)*)"')
# 'a'<newline>'b' is one string constant 'ab' (SQL standard; scan.l's quotecontinue). Written so that
# each character can match one way only: nested repeats such as (?:[ \n]+|--.*)* backtrack
# exponentially when no quote follows (a client's Query stalled the worker loop).
_CONTINUE = re.compile(r"[ \t\f]*(?:--[^\n\r]*)?[\n\r](?:[ \t\n\r\f\v]|--[^\n\r]*[\n\r])*'")
_COMMENT = re.compile(r"/\*|\*/")
_ESCAPE = re.compile(rb"\\(?:x([0-9A-Fa-f]{1,2})|([0-7]{1,3})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))|''", re.S)
_CONTROL = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
NAMEDATALEN = 64

# pg_get_keywords(): category R (reserved), and C/T (column-name, type-function-name).
_RESERVED = frozenset("""
    all analyse analyze and any array as asc asymmetric both case cast check collate column constraint
    create current_catalog current_date current_role current_time current_timestamp current_user default
    deferrable desc distinct do else end except false fetch for foreign from grant group having in
    initially intersect into lateral leading limit localtime localtimestamp not null offset on only or
    order placing primary references returning select session_user some symmetric system_user table
    then to trailing true union unique user using variadic when where window with""".split())
_KEYWORDS = _RESERVED | frozenset("""
    between bigint bit boolean char character coalesce dec decimal exists extract float greatest grouping
    inout int integer interval json json_array json_arrayagg json_exists json_object json_objectagg
    json_query json_scalar json_serialize json_table json_value least merge_action national nchar none
    normalize nullif numeric out overlay position precision real row setof smallint substring time
    timestamp treat trim values varchar xmlattributes xmlconcat xmlelement xmlexists xmlforest
    xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable
    authorization binary collation concurrently cross current_schema freeze full ilike inner is isnull
    join left like natural notnull outer overlaps right similar tablesample verbose""".split())
_PLAIN = re.compile(r"[a-z_][a-z0-9_]*\Z")

# GUCs flagged GUC_LIST_QUOTE: flatten_set_variable_args quotes their string arguments.
_LIST_QUOTE = frozenset({"search_path", "temp_tablespaces", "session_preload_libraries",
                         "shared_preload_libraries", "local_preload_libraries"})
# Reset by every transaction start, so a session-level SET of them lasts one transaction.
_XACT_LOCAL = frozenset({"transaction_isolation", "transaction_read_only", "transaction_deferrable"})
_ADVISORY = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared",
                       "pg_try_advisory_lock", "pg_try_advisory_lock_shared"})
_TRUE = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})  # parse_bool's true spellings
_INT_MAX = 2**31 - 1

SEMI, COMMA, DOT, EQ, LPAREN, RPAREN = ((OP, c) for c in ";,.=()")
DEFAULT = (WORD, "default")
_SIGNS = ((OP, "+"), (OP, "-"))
BEGIN, COMMIT, ROLLBACK, SAVEPOINT = Effect("begin"), Effect("commit"), Effect("rollback"), Effect("savepoint")
PIN_TEMP = Effect("pin", "temp")


def session_effects(text: bytes) -> tuple[Effect, ...]:
    """The session-state effects of the statements in `text`, in order; () for ordinary queries."""
    if text[-1:] == b"\0":
        text = text[:-1]
    if not _TRIGGER.search(bytes(text).lower()):
        return ()
    effects: list[Effect] = []
    for stmt in _statements(_tokens(str(text, "utf-8", "surrogateescape"))):
        effects.extend(dict.fromkeys(_statement_effects(stmt)))
    return tuple(effects)


# ---- lexer ---------------------------------------------------------------------------

def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value) tokens; comments and whitespace dropped, quotes undone, identifiers folded."""
    out, pos = [], 0
    while pos < len(text):
        m = _LEX.match(text, pos)
        kind, value, pos = m.lastgroup, m.group(), m.end()
        if kind == "space":
            continue
        if kind == "comment":
            pos = _comment_end(text, pos)
        elif kind in ("str", "estr", "ustr", "bstr"):
            value, pos = _string(text, pos, kind == "estr")
            out.append((STR if value is not None and kind in ("str", "estr") else BAD, value or ""))
        elif kind in ("ident", "uident"):
            m = _QBODY.match(text, pos)
            pos = m.end() if m else len(text)
            value = m and m[1].replace('""', '"')
            out.append((IDENT, _truncate(value)) if value and kind == "ident" else (BAD, ""))
        elif kind == "dollar":
            end = text.find(value, pos)
            out.append((STR, text[pos:end]) if end >= 0 else (BAD, ""))
            pos = end + len(value) if end >= 0 else len(text)
        elif kind == "num":
            out.append((NUM if _NUMBER.match(value) else BAD, value))
        elif kind == "word":
            out.append((WORD, _truncate(value.translate(_UPPER))))
        else:
            out.append((PARAM if kind == "param" else OP, value))
    return out


def _comment_end(text: str, pos: int) -> int:
    """Where the /* comment opened before `pos` ends; they nest."""
    depth = 1
    for m in _COMMENT.finditer(text, pos):
        depth += 1 if m.group() == "/*" else -1
        if not depth:
            return m.end()
    return len(text)


def _string(text: str, pos: int, escapes: bool) -> tuple[str | None, int]:
    """The value of the string constant whose body starts at `pos` (None if unterminated or invalid)."""
    parts = []
    while True:
        m = (_EBODY if escapes else _SBODY).match(text, pos)
        if not m:
            return None, len(text)
        try:
            parts.append(_unescape(m[1]) if escapes else m[1].replace("''", "'"))
        except (ValueError, UnicodeError):  # \u escape of a surrogate or beyond U+10FFFF
            return None, m.end()
        pos = m.end()
        more = _CONTINUE.match(text, pos)
        if not more:
            return "".join(parts), pos
        pos = more.end()


def _unescape(body: str) -> str:
    """Undo E'' escapes. \\ooo and \\xhh give bytes, not characters, so work on the bytes."""
    def one(m: re.Match) -> bytes:
        hexa, octal, u4, u8, other = m.groups()
        if hexa or octal:
            return bytes([int(hexa, 16) if hexa else int(octal, 8) & 0xFF])
        if u4 or u8:
            return chr(int(u4 or u8, 16)).encode("utf-8")
        return b"'" if other is None else _CONTROL.get(other, other)
    raw = body.encode("utf-8", "surrogateescape")
    return _ESCAPE.sub(one, raw).decode("utf-8", "surrogateescape")


def _truncate(ident: str) -> str:
    """The lexer cuts identifiers to NAMEDATALEN-1 bytes, at a character boundary.

    A byte that is not UTF-8 (surrogate-escaped) is a character of its own, as in a
    SQL_ASCII database: looking for UTF-8 lead bytes in the raw bytes would cut those to nothing."""
    if len(ident.encode("utf-8", "surrogateescape")) < NAMEDATALEN:
        return ident
    size = 0
    for i, ch in enumerate(ident):
        size += 1 if ch < "\x80" or "\udc80" <= ch <= "\udcff" else len(ch.encode("utf-8", "surrogatepass"))
        if size > NAMEDATALEN - 1:
            return ident[:i]
    return ident


def _statements(tokens: list[tuple[str, str]]):
    """Split at top-level ';'. Like psql, a BEGIN ... END routine body keeps its own ';'s."""
    stmt: list[tuple[str, str]] = []
    depth = body = 0
    for tok in tokens:
        if tok == SEMI and depth == 0 and body == 0:
            if stmt:
                yield stmt
            stmt = []
            continue
        stmt.append(tok)
        if tok[0] == OP:
            depth = max(depth + (tok == LPAREN) - (tok == RPAREN), 0)
        elif tok[0] == WORD and depth == 0 and tok[1] in ("begin", "case", "end") and _is_routine(stmt):
            if tok[1] == "begin" or (tok[1] == "case" and body):  # CASE ends with END too
                body += 1
            elif tok[1] == "end" and body:
                body -= 1
    if stmt:
        yield stmt


def _is_routine(t) -> bool:
    i = 3 if _words(t, 1, "or", "replace") else 1
    return _w(t, 0) == "create" and _w(t, i) in ("function", "procedure")


# ---- token helpers ---------------------------------------------------------------------

def _w(t, i: int) -> str | None:
    """The word at t[i], if there is one."""
    return t[i][1] if 0 <= i < len(t) and t[i][0] == WORD else None


def _words(t, i: int, *words: str) -> bool:
    return all(_w(t, i + k) == w for k, w in enumerate(words))


def _unknown(name: str = "") -> list[Effect]:
    return [Effect("unknown", name)]


def _quote_ident(s: str) -> str:
    """ruleutils.c quote_identifier(): quote unless a plain lower-case identifier and not a keyword."""
    if _PLAIN.match(s) and s not in _KEYWORDS:
        return s
    return '"' + s.replace('"', '""') + '"'


def _var_name(t, i: int) -> tuple[str | None, int]:
    """A possibly dotted GUC name at t[i] and the index after it. GUC names ignore case."""
    parts = []
    while i < len(t) and t[i][0] in (WORD, IDENT):
        parts.append(t[i][1].translate(_UPPER))
        if i + 2 < len(t) and t[i + 1] == DOT:
            i += 2
        else:
            return ".".join(parts), i + 1
    return None, i


def _value(t, quote: bool) -> str | None:
    """flatten_set_variable_args() of a var_list: strings, numbers and words joined with ', '."""
    values, i = [], 0
    while True:
        v, i = _one_value(t, i, quote)
        if v is None:
            return None
        values.append(v)
        if i == len(t):
            return ", ".join(values)
        if t[i] != COMMA:
            return None
        i += 1


def _one_value(t, i: int, quote: bool) -> tuple[str | None, int]:
    if i >= len(t):
        return None, i
    kind, v = t[i]
    if kind == STR or kind == IDENT or (kind == WORD and (v not in _RESERVED or v in ("on", "true", "false"))):
        return (_quote_ident(v) if quote else v), i + 1
    sign = v if t[i] in _SIGNS else ""
    if sign and i + 1 < len(t):
        kind, v = t[i + 1]
        i += 1
    if kind != NUM:
        return None, i
    if v.isdigit() and int(v) <= _INT_MAX:  # an Integer node, printed with %d
        return str(-int(v) if sign == "-" else int(v)), i + 1
    return ("-" + v if sign == "-" else v), i + 1  # a Float node keeps its text


def _name_or_string(t) -> str | None:
    """NonReservedWord_or_Sconst, the whole of t."""
    if len(t) == 1 and (t[0][0] in (STR, IDENT) or (t[0][0] == WORD and t[0][1] not in _RESERVED)):
        return t[0][1]
    return None


# ---- statements ------------------------------------------------------------------------

def _statement_effects(t) -> list[Effect]:
    literal = _literal_set_config(t)
    if literal is not None:
        return literal
    handler = _STATEMENTS.get(_w(t, 0))
    return (handler(t[1:]) if handler else []) + _calls(t)


_FALSE = frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "off", "of", "0"})  # parse_bool's false


def _literal_set_config(t) -> list[Effect] | None:
    """``SELECT [pg_catalog.]set_config('name', 'value', false)`` and nothing else: a SET by another
    name, whose name and value are in the text (the call runs exactly once). None otherwise."""
    if t[:2] == [(WORD, "select"), (WORD, "pg_catalog")] and t[2:3] == [DOT]:
        t = t[:1] + t[3:]
    if len(t) != 9 or t[0] != (WORD, "select") or t[1] != (WORD, "set_config") or t[2] != LPAREN \
            or t[4] != COMMA or t[6] != COMMA or t[8] != RPAREN or t[3][0] != STR or t[5][0] != STR:
        return None
    local = t[7]
    if not (local == (WORD, "false") or (local[0] == STR and local[1].strip().lower() in _FALSE)):
        return None
    name = t[3][1].lower()
    if name in _XACT_LOCAL:
        return []
    return [Effect("set", name, t[5][1])]


def _calls(t) -> list[Effect]:
    """Function calls anywhere in the statement that leave session state behind."""
    out = []
    for i, (kind, name) in enumerate(t):
        if kind not in (WORD, IDENT) or i + 1 >= len(t) or t[i + 1] != LPAREN:
            continue
        if i and t[i - 1] == DOT and (i < 2 or t[i - 2][1] != "pg_catalog"):
            continue  # some other schema's function of that name
        if name in _ADVISORY:
            out.append(Effect("pin", "advisory_lock"))
        elif name == "set_config" and not _is_true(_argument(t, i + 2, 2)):
            out.append(Effect("pin", "set_config"))
    return out


def _argument(t, i: int, n: int):
    """The tokens of argument n of the call whose arguments start at t[i], or None."""
    depth, args, arg = 0, [], []
    for tok in t[i:]:
        if tok == COMMA and depth == 0:
            args.append(arg)
            arg = []
            continue
        if tok == RPAREN and depth == 0:
            args.append(arg)
            break
        if tok[0] == OP and tok[1] in "([)]":
            depth += 1 if tok[1] in "([" else -1
        arg.append(tok)
    return args[n] if len(args) > n else None


def _is_true(arg) -> bool:
    if arg == [(WORD, "true")]:
        return True
    return arg is not None and len(arg) == 1 and arg[0][0] == STR and arg[0][1].strip().lower() in _TRUE


def _set(t) -> list[Effect]:
    if _w(t, 0) == "local" and not _is_assign(t, 1):
        return []  # SET LOCAL ends with the transaction
    if _w(t, 0) == "session" and _w(t, 1) not in ("authorization", "characteristics") and not _is_assign(t, 1):
        t = t[1:]
    name, i = _var_name(t, 0)
    if name is not None and _is_assign(t, i):
        return _generic_set(name, t[i + 1:])
    if name is not None and _words(t, i, "from", "current") and i + 2 == len(t):
        return _unknown(name)
    special = _SET_FORMS.get(_w(t, 0))
    return special(t) if special else _unknown(name or "")


def _is_assign(t, i: int) -> bool:
    return i < len(t) and (t[i] == EQ or t[i] == (WORD, "to"))


def _generic_set(name: str, v) -> list[Effect]:
    if name in _XACT_LOCAL:
        return []
    if v == [DEFAULT]:
        return [Effect("reset", name)]
    value = _value(v, name in _LIST_QUOTE)
    if value is None:
        return _unknown(name)
    if name == "role" and value == "none":  # check_role() takes "none" as RESET ROLE
        return [Effect("reset", "role")]
    return [Effect("set", name, value)]


def _set_time_zone(t) -> list[Effect]:
    v = t[2:]
    if not _words(t, 1, "zone") or len(v) != 1 and not (len(v) == 2 and v[0] in _SIGNS):
        return _unknown("timezone")  # includes INTERVAL '...': a TypeCast we do not evaluate
    if _w(v, 0) in ("local", "default"):
        return [Effect("reset", "timezone")]
    value = _value(v, False)
    return [Effect("set", "timezone", value)] if value is not None else _unknown("timezone")


def _set_schema(t) -> list[Effect]:
    if len(t) == 2 and t[1][0] == STR:
        return [Effect("set", "search_path", _quote_ident(t[1][1]))]
    return _unknown("search_path")


def _set_names(t) -> list[Effect]:
    if t[1:] in ([], [DEFAULT]):
        return [Effect("reset", "client_encoding")]
    if len(t) == 2 and t[1][0] == STR:
        return [Effect("set", "client_encoding", t[1][1])]
    return _unknown("client_encoding")


def _set_role(t) -> list[Effect]:
    return _generic_set("role", t[1:]) if _name_or_string(t[1:]) is not None else _unknown("role")


def _set_session(t) -> list[Effect]:
    if _words(t, 1, "characteristics", "as", "transaction"):
        return _transaction_modes(t[4:])
    rest = t[2:]
    if not _words(t, 1, "authorization") or (rest != [DEFAULT] and _name_or_string(rest) is None):
        return _unknown("session_authorization")
    return _generic_set("session_authorization", rest)


_MODES = (  # SET SESSION CHARACTERISTICS AS TRANSACTION items: words, GUC, value
    (("isolation", "level", "serializable"), "default_transaction_isolation", "serializable"),
    (("isolation", "level", "repeatable", "read"), "default_transaction_isolation", "repeatable read"),
    (("isolation", "level", "read", "committed"), "default_transaction_isolation", "read committed"),
    (("isolation", "level", "read", "uncommitted"), "default_transaction_isolation", "read uncommitted"),
    (("read", "only"), "default_transaction_read_only", "on"),
    (("read", "write"), "default_transaction_read_only", "off"),
    (("deferrable",), "default_transaction_deferrable", "on"),
    (("not", "deferrable"), "default_transaction_deferrable", "off"),
)


def _transaction_modes(t) -> list[Effect]:
    out, i = [], 0
    while i < len(t):
        if out and t[i] == COMMA:  # the commas between modes are optional
            i += 1
        for words, name, value in _MODES:
            if _words(t, i, *words):
                out.append(Effect("set", name, value))
                i += len(words)
                break
        else:
            return _unknown("default_transaction_isolation")
    return out or _unknown("default_transaction_isolation")


def _set_xml(t) -> list[Effect]:
    if len(t) == 3 and _w(t, 1) == "option" and _w(t, 2) in ("document", "content"):
        return [Effect("set", "xmloption", t[2][1].upper())]  # gram.y passes "DOCUMENT"/"CONTENT"
    return _unknown("xmloption")


_SET_FORMS = {
    "time": _set_time_zone, "schema": _set_schema, "names": _set_names, "role": _set_role,
    "session": _set_session, "xml": _set_xml,
    "transaction": lambda t: [], "constraints": lambda t: [],  # both end with the transaction
}


def _reset(t) -> list[Effect]:
    if t == [(WORD, "all")]:
        return [Effect("reset_all")]
    if len(t) == 2 and _words(t, 0, "time", "zone"):
        return [Effect("reset", "timezone")]
    if len(t) == 2 and _words(t, 0, "session", "authorization"):
        return [Effect("reset", "session_authorization")]
    if len(t) == 3 and _words(t, 0, "transaction", "isolation", "level"):
        return []
    name, i = _var_name(t, 0)
    if name is None or i != len(t):
        return _unknown(name or "")
    return [] if name in _XACT_LOCAL else [Effect("reset", name)]


_DISCARD = {"all": Effect("discard_all"), "plans": Effect("discard", "plans"),
            "sequences": Effect("discard", "sequences"), "temp": Effect("discard", "temp"),
            "temporary": Effect("discard", "temp")}


def _discard(t) -> list[Effect]:
    effect = _DISCARD.get(_w(t, 0)) if len(t) == 1 else None
    return [effect] if effect else _unknown()


def _end_transaction(kind: Effect):
    def handler(t) -> list[Effect]:
        if _w(t, 0) == "prepared":
            return []  # COMMIT/ROLLBACK PREPARED run outside any transaction block
        i = 1 if _w(t, 0) in ("work", "transaction") else 0
        if kind is ROLLBACK and _w(t, i) == "to":
            return [SAVEPOINT]
        return [kind, BEGIN] if _words(t, i, "and", "chain") else [kind]
    return handler


def _prepare(t) -> list[Effect]:
    if _w(t, 0) == "transaction" and len(t) == 2 and t[1][0] == STR:
        return [COMMIT]  # a prepared transaction keeps its SETs, like a commit
    return [Effect("pin", "prepare")]


def _declare(t) -> list[Effect]:
    for i in range(1, len(t)):
        if _w(t, i) == "for":
            break
        if _words(t, i, "with", "hold"):
            return [Effect("pin", "hold_cursor")]
    return []


_PG_TEMP = re.compile(r"pg_temp(?:_[0-9]+)?\Z")
_CREATE_MODIFIERS = frozenset({"or", "replace", "global", "local", "temp", "temporary", "unlogged", "recursive"})


def _create(t) -> list[Effect]:
    i = 0
    while _w(t, i) in _CREATE_MODIFIERS:
        if _w(t, i) in ("temp", "temporary"):
            return [PIN_TEMP]
        i += 1
    return [PIN_TEMP] if _names_pg_temp(t) else []


def _names_pg_temp(t) -> bool:
    """An object qualified with pg_temp (or pg_temp_N) is temporary too."""
    return any(kind in (WORD, IDENT) and _PG_TEMP.match(v) and i + 1 < len(t)
               and t[i + 1] == DOT for i, (kind, v) in enumerate(t))


def _select(t) -> list[Effect]:
    """SELECT ... INTO [GLOBAL|LOCAL] TEMP table creates a temporary table."""
    for i, tok in enumerate(t):
        if tok == (WORD, "into") and _w(t, i - 1) not in ("insert", "merge"):
            j = i + 1 + (_w(t, i + 1) in ("global", "local"))
            if _w(t, j) in ("temp", "temporary"):
                return [PIN_TEMP]
    return []


_STATEMENTS = {
    "set": _set, "reset": _reset, "discard": _discard,
    "begin": lambda t: [BEGIN], "start": lambda t: [BEGIN] if _w(t, 0) == "transaction" else [],
    "commit": _end_transaction(COMMIT), "end": _end_transaction(COMMIT),
    "rollback": _end_transaction(ROLLBACK), "abort": _end_transaction(ROLLBACK),
    "savepoint": lambda t: [SAVEPOINT], "release": lambda t: [SAVEPOINT],
    "prepare": _prepare, "declare": _declare, "create": _create, "select": _select, "with": _select,
    "listen": lambda t: [Effect("pin", "listen")], "load": lambda t: [Effect("pin", "load")],
    # code whose effects the text does not show (a DO block's set_config, a procedure's SET)
    "do": lambda t: [Effect("pin", "do_block")], "call": lambda t: [Effect("pin", "call")],
}
