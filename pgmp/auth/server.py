"""Log pgmp into a PostgreSQL server (pgmp as the client) with cleartext, md5 or SCRAM-SHA-256, sans-IO.

The IO loop decodes each 'R' message with ``messages.parse_auth_request``
and feeds its code and data; ``feed`` returns the 'p' message to send (b""
when nothing is due). Feed AuthenticationOk too: it is refused if a SCRAM
exchange started and the server never proved it knows the password.

Which requests pgmp answers is the ``require_auth`` policy (the
server_require_auth setting, modelled on libpq's require_auth): a request
for a method it does not allow is refused before anything is sent, and so is
an AuthenticationOk that no request preceded ("none", a server that trusts
pgmp) unless "none" is allowed (a request pgmp holds no credential for fails
first with the error that says what is missing). Unset, it allows only scram-sha-256 when pgmp
logs in with SCRAM keys or an auth_file SCRAM secret (a server that knows the
user's secret proves it; anything else would let an impostor in), and every
method otherwise: with a password to give, refusing trust alone would stop no
impostor, which could ask for the password instead.

Credentials, in the order tried: a cleartext ``password`` (or a plaintext
auth_file secret); ``scram_keys`` = (ClientKey, ServerKey) recovered from a
client's SCRAM login, which work while the server's salt and iteration count
are those of the auth_file secret; an md5 auth_file ``secret``, which
answers md5 requests as is.

SCRAM is written by hand over hashlib/hmac, not with scramp's ScramClient,
because pgmp must log in with (ClientKey, ServerKey) and no password, which
scramp cannot do, and must accept any iteration count the server uses
(scramp refuses fewer than 4096) up to ``max_iterations`` (auth_max_iterations:
PBKDF2 runs in the worker's loop). Tests run it against scramp's ScramServer.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import secrets

from pgmp.auth.authfile import (
    Secret, hmac_sha256, md5_hex, md5_response, scram_keys_cached, sha256, to_bytes, xor,
)
from pgmp.config import SERVER_AUTH_METHODS
from pgmp.errors import CONNECTION_FAILURE, INVALID_AUTHORIZATION, PgmpError
from pgmp.protocol import messages

SCRAM_MECHANISM = "SCRAM-SHA-256"
RAW_NONCE_LEN = 18
# PBKDF2 runs in the worker loop: a server asking for more work than this is refused
# (auth_max_iterations; PostgreSQL's default is 4096).
DEFAULT_MAX_ITERATIONS = 100_000

METHODS = SERVER_AUTH_METHODS          # "none": AuthenticationOk without any request
_WHAT = {"password": "cleartext password", "md5": "md5 password", "scram-sha-256": "SCRAM-SHA-256"}

_UNSUPPORTED = {
    2: "Kerberos V5",
    6: "SCM credential",
    7: "GSSAPI",
    8: "GSSAPI/SSPI continuation",
    9: "SSPI",
}


class ServerAuthError(PgmpError):
    """pgmp could not log into a server: 28000 when it lacks a credential, 08006 otherwise."""

    def __init__(self, message: str, sqlstate: str = CONNECTION_FAILURE, **kw):
        super().__init__(sqlstate, message, **kw)


def allowed_methods(require_auth) -> frozenset[str]:
    """The methods a server_require_auth list allows: those listed, or with "!" all but those (libpq's rule)."""
    names = tuple(require_auth)
    if names and names[0].startswith("!"):
        return frozenset(METHODS) - {name[1:] for name in names}
    return frozenset(names)


class ServerAuthenticator:
    """One server login; see the module docstring."""

    def __init__(self, user: str, *, password: str | None = None,
                 scram_keys: tuple[bytes, bytes] | None = None, secret: Secret | None = None,
                 database: str | None = None, require_auth=(), max_iterations: int = DEFAULT_MAX_ITERATIONS):
        self.user = user
        self.database = database
        self._user = to_bytes(user)
        self._secret = secret
        if password:
            self._password: bytes | None = to_bytes(password)
        elif secret is not None and secret.kind == "plain" and secret.value:
            self._password = to_bytes(secret.value)
        else:
            self._password = None
        self._scram_keys = scram_keys
        self._scram_state: str | None = None   # None, "first-sent", "final-sent", "verified"
        self._require_auth = tuple(require_auth)
        self.allowed = allowed_methods(self._require_auth) if self._require_auth else self._default_allowed()
        self._max_iterations = max_iterations
        self._asked: str | None = None         # the method the server asked for, once it did

    def _default_allowed(self) -> frozenset[str]:
        secret = self._secret
        if self._password is None and (self._scram_keys is not None or (secret is not None and secret.kind == "scram")):
            return frozenset({"scram-sha-256"})
        return frozenset(METHODS)

    def feed(self, code: int, data: bytes) -> bytes:
        """Answer one authentication request; b"" when nothing is to be sent."""
        if code == messages.AUTH_OK:
            if self._asked is None:
                self._allow("none")
            if self._scram_state not in (None, "verified"):
                raise ServerAuthError("server sent AuthenticationOk before completing SCRAM "
                                      "authentication: it did not prove it knows the password")
            return b""
        method = {messages.AUTH_CLEARTEXT: "password", messages.AUTH_MD5: "md5",
                  messages.AUTH_SASL: "scram-sha-256"}.get(code)
        if method is not None:
            if self._asked is not None:
                raise ServerAuthError(f"server asked for {_WHAT[method]} authentication after "
                                      f"{_WHAT[self._asked]}: a server asks for one method per login")
            self._asked = method
        if code == messages.AUTH_CLEARTEXT:
            return self._cleartext()
        if code == messages.AUTH_MD5:
            return self._md5(data)
        if code == messages.AUTH_SASL:
            return self._sasl(data)
        if code == messages.AUTH_SASL_CONTINUE:
            return self._server_first(data)
        if code == messages.AUTH_SASL_FINAL:
            return self._server_final(data)
        what = _UNSUPPORTED.get(code)
        if what:
            raise ServerAuthError(f'server asked for {what} authentication for user "{self.user}", '
                                  "which pgmp does not support: use scram-sha-256, md5 or password "
                                  "for pgmp's connections in the server's pg_hba.conf")
        raise ServerAuthError(f"server sent an unknown authentication request (code {code})")

    # ---- server_require_auth ---------------------------------------------------------

    def _allow(self, method: str) -> None:
        """Refuse, before anything is sent, a method the policy does not allow.

        Called once pgmp knows it could answer: without a credential for the method, the
        error says what is missing (and nothing is sent either)."""
        if method in self.allowed:
            return
        allowed = ", ".join(m for m in METHODS if m in self.allowed) or "nothing"
        if self._require_auth:
            listed = ", ".join(f'"{m}"' for m in self._require_auth)
            why = f"server_require_auth = [{listed}] allows {allowed}"
        else:
            why = ("server_require_auth is not set and pgmp logs in with a SCRAM secret or SCRAM keys "
                   "for this user, so only scram-sha-256 is allowed")
        if method == "none":
            what = f'server let user "{self.user}" in without asking for a password (trust)'
            meant = "trust pgmp"
        else:
            what = f'server asked for {_WHAT[method]} authentication for user "{self.user}"'
            meant = f"ask for {_WHAT[method]} authentication"
        raise ServerAuthError(
            f"{what}, but {why}; pgmp sent nothing and refuses this server",
            hint=f'if the server is meant to {meant}, allow "{method}" with server_require_auth '
                 f"in {self._where()} (or in [pgmp], for every database)")

    # ---- messages -------------------------------------------------------------------

    def _where(self) -> str:
        return f"[databases.{self.database}]" if self.database else "the database's section"

    def _no_credential(self, what: str, have: str = "no password") -> ServerAuthError:
        return ServerAuthError(
            f'server asked for {what} authentication for user "{self.user}" but pgmp has {have} '
            f"for it: set password in {self._where()} or add the user to auth_file",
            INVALID_AUTHORIZATION)

    def _have(self) -> str:
        if self._scram_keys is not None:
            return "only SCRAM keys"
        if self._secret is not None and self._secret.kind == "md5":
            return "only an md5 hash"
        if self._secret is not None and self._secret.kind == "scram":
            return "only a SCRAM secret"
        return "no password"

    # ---- cleartext and md5 -----------------------------------------------------------

    def _cleartext(self) -> bytes:
        if self._password is None:
            raise self._no_credential("cleartext password", self._have())
        self._allow("password")
        return messages.password_message(self._password + b"\0")

    def _md5(self, salt: bytes) -> bytes:
        if len(salt) != 4:
            raise ServerAuthError(f"server sent a malformed md5 request ({len(salt)}-byte salt, expected 4)")
        if self._password is not None:
            inner = md5_hex(self._password + self._user)
        elif self._secret is not None and self._secret.kind == "md5":
            inner = self._secret.value[3:]
        else:
            raise self._no_credential("md5 password", self._have())
        self._allow("md5")
        return messages.password_message(md5_response(inner, salt) + b"\0")

    # ---- SCRAM-SHA-256 --------------------------------------------------------------

    def _sasl(self, data: bytes) -> bytes:
        if self._scram_state is not None:
            raise ServerAuthError("server restarted SASL authentication in the middle of an exchange")
        mechanisms = messages.parse_sasl_mechanisms(data)
        if SCRAM_MECHANISM not in mechanisms:
            offered = ", ".join(mechanisms) or "none"
            hint = (" (channel binding, SCRAM-SHA-256-PLUS, is not supported yet)"
                    if "SCRAM-SHA-256-PLUS" in mechanisms else "")
            raise ServerAuthError(f"server offered SASL mechanisms {offered}; "
                                  f"pgmp supports only SCRAM-SHA-256{hint}")
        if self._password is None and self._scram_keys is None:
            have = self._have()
            if have == "only a SCRAM secret":
                have = ("only a SCRAM secret and no client has logged in with SCRAM yet "
                        "to recover its client key")
            raise self._no_credential("SCRAM-SHA-256", have)
        self._allow("scram-sha-256")
        self._nonce = _new_nonce()
        name = self._user.replace(b"=", b"=3D").replace(b",", b"=2C")
        # PostgreSQL ignores the SCRAM user name (libpq sends "n="); send it for other servers.
        self._client_first_bare = b"n=" + name + b",r=" + self._nonce
        self._scram_state = "first-sent"
        return messages.sasl_initial_response(SCRAM_MECHANISM, b"n,," + self._client_first_bare)

    def _server_first(self, data: bytes) -> bytes:
        if self._scram_state != "first-sent":
            raise ServerAuthError("server sent SASLContinue outside a SCRAM exchange")
        attrs = _server_attributes(data, "server-first-message")
        nonce, salt_text, iterations_text = attrs.get(b"r"), attrs.get(b"s"), attrs.get(b"i")
        if nonce is None or salt_text is None or iterations_text is None:
            raise _malformed("server-first-message", "r, s and i are required")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise _malformed("server-first-message", "the nonce does not extend pgmp's nonce")
        try:
            salt = base64.b64decode(salt_text, validate=True)
        except binascii.Error:
            salt = b""
        if not salt:
            raise _malformed("server-first-message", "the salt is not valid base64")
        digits = iterations_text.lstrip(b"0")
        if not iterations_text.isdigit() or not digits:
            raise _malformed("server-first-message", "the iteration count must be a positive integer")
        iterations = int(digits) if len(digits) <= 12 else None    # (int() of a long text is slow)
        # Only a password needs PBKDF2 here: SCRAM keys work at any count (the auth_file's).
        if self._password is not None and (iterations is None or iterations > self._max_iterations):
            shown = digits.decode() if iterations is not None else "more than 10^12"
            raise ServerAuthError(
                f'server asked pgmp to derive the SCRAM key of user "{self.user}" with {shown} iterations, '
                f"more than auth_max_iterations ({self._max_iterations}): pgmp refuses the work, which would "
                "stall every session of its worker",
                hint="PostgreSQL stores passwords with 4096 iterations unless scram_iterations says otherwise; "
                     "raise auth_max_iterations if the server's secret really uses more")
        client_key, server_key = self._keys_for(salt, iterations or 0)
        without_proof = b"c=biws,r=" + nonce
        auth_message = b",".join((self._client_first_bare, data, without_proof))
        proof = xor(client_key, hmac_sha256(sha256(client_key), auth_message))
        self._server_signature = hmac_sha256(server_key, auth_message)
        self._scram_state = "final-sent"
        return messages.password_message(without_proof + b",p=" + base64.b64encode(proof))

    def _keys_for(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        if self._password is not None:
            client_key, _, server_key = scram_keys_cached(self._password, salt, iterations)
            return client_key, server_key
        secret = self._secret
        if secret is not None and secret.kind == "scram" and (
                salt != secret.salt or iterations != secret.iterations):
            raise ServerAuthError(
                f'the server\'s SCRAM secret for user "{self.user}" does not match auth_file\'s '
                "(different salt or iteration count; was the password changed?): copy the "
                "server's pg_authid secret into auth_file, or set password in "
                f"{self._where()}", INVALID_AUTHORIZATION)
        return self._scram_keys

    def _server_final(self, data: bytes) -> bytes:
        if self._scram_state != "final-sent":
            raise ServerAuthError("server sent SASLFinal outside a SCRAM exchange")
        attrs = _server_attributes(data, "server-final-message")
        if b"e" in attrs:
            error = attrs[b"e"].decode("ascii", "replace")
            raise ServerAuthError(f'server rejected SCRAM authentication for user "{self.user}": {error}')
        try:
            signature = base64.b64decode(attrs.get(b"v", b""), validate=True)
        except binascii.Error:
            signature = b""
        if not hmac.compare_digest(signature, self._server_signature):
            raise ServerAuthError(
                f'server\'s SCRAM signature for user "{self.user}" is wrong: the server does not '
                "know this user's password (misconfigured server, or something in between "
                "impersonating it)")
        self._scram_state = "verified"
        return b""


def _new_nonce() -> bytes:
    return base64.b64encode(secrets.token_bytes(RAW_NONCE_LEN))


def _malformed(which: str, detail: str) -> ServerAuthError:
    return ServerAuthError(f"server sent a malformed SCRAM {which}: {detail}")


def _server_attributes(data: bytes, which: str) -> dict[bytes, bytes]:
    """attr=value pairs of a server SCRAM message; a mandatory extension (m=) is refused."""
    attrs: dict[bytes, bytes] = {}
    for part in data.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not (part[:1].isalpha() and part[:1].isascii()):
            raise _malformed(which, "expected attr=value pairs")
        key = part[:1]
        if key == b"m":
            raise _malformed(which, "the server requires a SCRAM extension pgmp does not know")
        attrs.setdefault(key, part[2:])
    return attrs
