"""Load the auth_file (PgBouncer's format) and hold each user's secret, plus the hash math each kind implies.

A line is ``"username" "secret"``; fields after the second are ignored, as
PgBouncer does. Inside quotes ``""`` is a literal ``"``. Blank lines and
lines whose first non-blank character is ``;`` or ``#`` are comments.

A secret is one of (PostgreSQL's ``get_password_type`` rules):

- ``md5`` followed by 32 lowercase hex digits: md5(password + username);
- ``SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>``,
  exactly pg_authid's format; one that starts like this but does not parse
  is an error, never silently a plaintext password;
- anything else: a plaintext password.

The SCRAM and md5 helpers live here because they are what a secret means:
both the client side (``client.py``) and the server side (``server.py``)
derive keys the same way. They are written over hashlib/hmac because pgmp
needs the raw keys (ClientKey, StoredKey, ServerKey) and PostgreSQL's
lenient SASLprep fallback, which scramp's high-level API does not expose.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from dataclasses import dataclass

from scramp.utils import ScramException, saslprep

SCRAM_PREFIX = "SCRAM-SHA-256$"
SCRAM_KEY_LEN = 32
_MD5_HEX = frozenset("0123456789abcdef")
_KINDS = ("plain", "md5", "scram")


class AuthFileError(Exception):
    """The auth_file (or one secret in it) is unusable; the message names file and line."""

    def __init__(self, message: str, path: str | None = None, lineno: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{lineno}: " if lineno is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.lineno = lineno


@dataclass(frozen=True, repr=False)
class Secret:
    """One user's stored secret. ``repr()`` and ``str()`` never show the secret."""

    kind: str                                   # "plain" | "md5" | "scram"
    value: str                                  # the raw text from the file
    iterations: int = 0                         # scram only
    salt: bytes = b""                           # scram only
    stored_key: bytes = b""                     # scram only
    server_key: bytes = b""                     # scram only

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown secret kind {self.kind!r}")

    def __repr__(self) -> str:
        if self.kind == "scram":
            return f"Secret(kind='scram', iterations={self.iterations})"
        return f"Secret(kind={self.kind!r})"

    __str__ = __repr__


def parse_secret(value: str) -> Secret:
    """Classify one secret; AuthFileError for a SCRAM secret that does not parse."""
    if value.startswith(SCRAM_PREFIX):
        return _parse_scram(value)
    if len(value) == 35 and value.startswith("md5") and set(value[3:]) <= _MD5_HEX:
        return Secret("md5", value)
    return Secret("plain", value)


def _parse_scram(value: str) -> Secret:
    # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    rest = value[len(SCRAM_PREFIX):]
    head, sep, keys = rest.partition("$")
    iterations_text, sep2, salt_text = head.partition(":")
    stored_text, sep3, server_text = keys.partition(":")
    if not (sep and sep2 and sep3):
        raise AuthFileError("malformed SCRAM secret: expected "
                            "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
    if not (iterations_text.isascii() and iterations_text.isdigit()) or int(iterations_text) < 1:
        raise AuthFileError("malformed SCRAM secret: the iteration count is not a positive integer")
    salt = _b64(salt_text, "salt")
    if not salt:
        raise AuthFileError("malformed SCRAM secret: the salt is empty")
    stored_key = _b64(stored_text, "StoredKey")
    server_key = _b64(server_text, "ServerKey")
    for name, key in (("StoredKey", stored_key), ("ServerKey", server_key)):
        if len(key) != SCRAM_KEY_LEN:
            raise AuthFileError(f"malformed SCRAM secret: {name} is {len(key)} bytes, "
                                f"SCRAM-SHA-256 needs {SCRAM_KEY_LEN}")
    return Secret("scram", value, int(iterations_text), salt, stored_key, server_key)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise AuthFileError(f"malformed SCRAM secret: the {what} is not valid base64") from None


# ---- the file -----------------------------------------------------------------

def load_auth_file(path: str, max_iterations: int | None = None) -> dict[str, Secret]:
    """Read and parse an auth_file; AuthFileError if it cannot be read or parsed, or a SCRAM secret
    has more than ``max_iterations`` iterations."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AuthFileError(f"cannot read auth_file: {e.strerror or e}", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise AuthFileError("not valid UTF-8", path, lineno) from None
    return parse_auth_file(text, path, max_iterations)


def check_iterations(secret: Secret, max_iterations: int | None) -> str | None:
    """Why ``secret`` costs too much to use (more iterations than allowed), or None."""
    if max_iterations is not None and secret.kind == "scram" and secret.iterations > max_iterations:
        return (f"its SCRAM secret has {secret.iterations} iterations, more than "
                f"auth_max_iterations ({max_iterations})")
    return None


def parse_auth_file(text: str, path: str, max_iterations: int | None = None) -> dict[str, Secret]:
    """Parse auth_file text; ``path`` only names the file in error messages."""
    users: dict[str, Secret] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        try:
            user, secret_text = _split_line(stripped)
            if not user:
                raise AuthFileError("the user name is empty")
            if user in users:
                raise AuthFileError(f'user "{user}" is listed twice (first on line {first_line[user]})')
            users[user] = parse_secret(secret_text)
            costly = check_iterations(users[user], max_iterations)
            if costly:
                raise AuthFileError(f'user "{user}": {costly}; raise auth_max_iterations or store the '
                                    "password with fewer iterations")
        except AuthFileError as e:
            raise AuthFileError(str(e), path, lineno) from None
        first_line[user] = lineno
    return users


def _split_line(line: str) -> tuple[str, str]:
    """The first two quoted fields of a line; what follows them is ignored."""
    user, pos = _quoted(line, 0, "user name")
    if pos < len(line) and not line[pos].isspace():
        raise AuthFileError("expected white space after the quoted user name")
    while pos < len(line) and line[pos].isspace():
        pos += 1
    secret, pos = _quoted(line, pos, "secret")
    if pos < len(line) and not line[pos].isspace():
        raise AuthFileError("expected white space or end of line after the quoted secret")
    return user, secret


def _quoted(line: str, pos: int, what: str) -> tuple[str, int]:
    """The ``"..."`` field at ``pos`` (``""`` inside is one ``"``) and the position after it."""
    if pos >= len(line):
        raise AuthFileError(f"missing the {what}: each line is \"username\" \"secret\"")
    if line[pos] != '"':
        raise AuthFileError(f"the {what} must be in double quotes")
    out = []
    i = pos + 1
    while i < len(line):
        c = line[i]
        if c == '"':
            if line.startswith('""', i):
                out.append('"')
                i += 2
                continue
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise AuthFileError(f"the {what} has no closing double quote")


# ---- what a secret means: md5 and SCRAM-SHA-256 math --------------------------

def to_bytes(s: str) -> bytes:
    """Encode a name or password the way it came off the wire (surrogateescape round-trips)."""
    return s.encode("utf-8", "surrogateescape")


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_secret(password: bytes, user: bytes) -> str:
    """pg_authid's md5 form: 'md5' + md5(password + username)."""
    return "md5" + md5_hex(password + user)


def md5_response(inner_hex: str, salt: bytes) -> bytes:
    """The PasswordMessage body for AuthenticationMD5Password: 'md5' + md5(md5hex + salt), no NUL."""
    return b"md5" + md5_hex(inner_hex.encode("ascii") + salt).encode("ascii")


def prepare_password(password: bytes) -> bytes:
    """SASLprep as PostgreSQL applies it: ASCII passes as is; invalid UTF-8, prohibited
    characters or an empty result fall back to the raw bytes (pg_saslprep's contract)."""
    if password.isascii():
        return password
    try:
        prepared = saslprep(password.decode("utf-8"))
    except (UnicodeDecodeError, ScramException):
        return password
    return prepared.encode("utf-8") if prepared else password


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def scram_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) for a password, SASLprep'd like PostgreSQL does."""
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    client_key = hmac_sha256(salted, b"Client Key")
    return client_key, sha256(client_key), hmac_sha256(salted, b"Server Key")


@functools.lru_cache(maxsize=256)
def scram_keys_cached(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """``scram_keys`` memoised, for trusted passwords only (auth_file / config, never a
    client's guess): PBKDF2 blocks the worker loop, and the same salt comes back for
    every new server connection."""
    return scram_keys(password, salt, iterations)


def make_scram_secret(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The pg_authid text of a SCRAM-SHA-256 secret for ``password``."""
    _, stored_key, server_key = scram_keys(to_bytes(password), salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"{SCRAM_PREFIX}{iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
