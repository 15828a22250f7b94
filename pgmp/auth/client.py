"""Authenticate a client (pgmp acting as the server) with trust, password, md5 or SCRAM-SHA-256, sans-IO.

The IO loop sends what ``start()`` returns, then hands the payload of each
'p' message to ``feed()`` and sends what comes back, until ``done`` (then it
sends AuthenticationOk itself) or an exception: ``AuthenticationFailed``
(28P01, same client message whatever the reason; ``reason`` is for the log)
or ``ClientProtocolError`` (08P01 malformed message, 0A000 unsupported SCRAM
feature, 28000 failed channel binding). The rules and limits are PostgreSQL's (auth.c, auth-sasl.c,
auth-scram.c):

- "md5" with a SCRAM secret runs SCRAM instead; "password" checks the
  cleartext against any kind of secret; SCRAM with a plaintext secret
  derives the keys; SCRAM with an md5 secret cannot succeed.
- A user without a usable secret (unknown, empty password, md5 secret under
  SCRAM) goes through the whole exchange and fails where a wrong password
  would. Its SCRAM salt is HMAC(mock_seed, user)[:16], stable per user, with
  the iteration count most real secrets have, so it looks like a real
  secret. A plaintext secret gets the same salt, so even those users look
  alike. Under "md5" an unknown user runs SCRAM, as most real users do (a
  SCRAM secret runs SCRAM), unless ``mock_md5`` says the known users mostly
  run md5. ``mock_profile`` makes those choices from the known secrets;
  the seed comes from the caller (the worker derives it from a file the
  operator keeps, so that it is the same in every worker and after a
  restart: a salt that changed would tell an unknown user from a real one).
- SCRAM-SHA-256-PLUS (channel binding tls-server-end-point, a hash of
  pgmp's own certificate) is offered only when the client connection is
  TLS and the caller passes ``channel_binding``. A client that answers "y"
  (it could bind but believes the server cannot) while PLUS was offered is
  refused: someone removed PLUS from the offer on the way.
- Password messages are capped at 65535 bytes (PG_MAX_AUTH_TOKEN_LENGTH),
  SASL messages at 1024 (PG_MAX_SASL_MESSAGE_LENGTH); ``max_payload`` says
  which applies next so the loop can refuse before buffering.

The SCRAM server is written by hand over hashlib/hmac, not with scramp's
ScramServer, because pgmp needs what scramp does not offer: the ClientKey
recovered from the proof (to log into PostgreSQL later), a mock exchange
with a chosen salt, libpq's empty SCRAM user name ("n=,", which scramp
rejects), and iteration counts below 4096 (PostgreSQL's scram_iterations).
Tests run it against scramp's ScramClient.
"""
from __future__ import annotations

import base64
import binascii
import collections
import enum
import hmac
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from pgmp.auth.authfile import (
    Secret, hmac_sha256, md5_hex, md5_response, md5_secret, scram_keys, scram_keys_cached,
    sha256, to_bytes, xor,
)
from pgmp.errors import FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION, AuthenticationFailed, ClientProtocolError
from pgmp.protocol import messages

METHODS = ("trust", "password", "md5", "scram-sha-256")
SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_PLUS_MECHANISM = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = b"tls-server-end-point"
MAX_PASSWORD_PAYLOAD = 65535      # PG_MAX_AUTH_TOKEN_LENGTH
MAX_SASL_PAYLOAD = 1024           # PG_MAX_SASL_MESSAGE_LENGTH
MOCK_ITERATIONS = 4096            # SCRAM_DEFAULT_ITERATIONS
MOCK_SALT_LEN = 16                # SCRAM_DEFAULT_SALT_LEN
RAW_NONCE_LEN = 18                # SCRAM_RAW_NONCE_LEN
_I32 = struct.Struct("!i")


class _State(enum.Enum):
    START = "start"
    PASSWORD = "password"          # waiting for a cleartext or md5 PasswordMessage
    SASL_INITIAL = "sasl-initial"  # waiting for SASLInitialResponse
    SASL_FIRST = "sasl-first"      # initial response had no data: waiting for client-first
    SASL_FINAL = "sasl-final"      # server-first sent: waiting for client-final
    DERIVING = "deriving"          # waiting for the caller to run ``pending`` (a key derivation)
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, repr=False)
class MockProfile:
    """How pgmp answers a user without a usable secret, so that it looks like the users it knows."""

    seed: bytes                          # key of the per-user mock salt
    md5: bool = False                    # under "md5": the md5 exchange (else SCRAM)
    iterations: int = MOCK_ITERATIONS    # of the mock SCRAM exchange

    def __repr__(self):
        return f"MockProfile(md5={self.md5}, iterations={self.iterations})"


MOCK_SEED_LABEL = b"pgmp mock SCRAM salt seed v1"


def mock_profile(known: Mapping[str, Secret], seed_material: bytes) -> MockProfile:
    """The mock that matches ``known`` (auth_file's secrets): the exchange most of them run under
    "md5", the most common SCRAM iteration count; the seed is a keyed hash of ``seed_material``."""
    kinds = collections.Counter("scram" if s.kind == "scram" else "md5" for s in known.values())
    counts = collections.Counter(s.iterations for s in known.values() if s.kind == "scram")
    iterations = counts.most_common(1)[0][0] if counts else MOCK_ITERATIONS
    return MockProfile(hmac_sha256(seed_material, MOCK_SEED_LABEL), kinds["md5"] > kinds["scram"], iterations)


def mock_salt(mock_seed: bytes, user: str) -> bytes:
    """The salt pgmp shows for a user without a SCRAM secret: stable per user, secret per install."""
    return hmac_sha256(mock_seed, to_bytes(user))[:MOCK_SALT_LEN]


def _new_nonce() -> bytes:
    """A fresh SCRAM nonce: random bytes, base64 (printable, no comma), as PostgreSQL makes them."""
    return base64.b64encode(secrets.token_bytes(RAW_NONCE_LEN))


def _printable(s: str, limit: int = 64) -> str:
    """A client-chosen string made safe for the log: printable ASCII only, truncated."""
    return "".join(c if " " <= c <= "~" else "?" for c in s[:limit])


def _malformed(detail: str) -> ClientProtocolError:
    return ClientProtocolError("malformed SCRAM message", detail=detail)


class ClientAuthenticator:
    """One client's authentication exchange; see the module docstring for the protocol.

    Public state: ``done``; ``exchange`` (the method actually run, e.g.
    "scram-sha-256" for "md5" with a SCRAM secret); ``max_payload`` (the
    largest 'p' payload accepted next); after success ``client_key`` (SCRAM
    against a SCRAM secret) or ``password`` (method "password").
    """

    def __init__(self, method: str, user: str, secret: Secret | None, *, mock_seed: bytes,
                 mock_iterations: int = MOCK_ITERATIONS, mock_md5: bool = False,
                 channel_binding: bytes | None = None, missing: str | None = None, defer: bool = False):
        if method not in METHODS:
            raise ValueError(f"unknown authentication method {method!r}; expected one of {METHODS}")
        self.method = method
        self.user = user
        self.done = False
        self.client_key: bytes | None = None
        self.password: str | None = None
        self.max_payload = 0
        self._secret = secret
        self._missing = missing                  # why there is no secret (for the log), if known
        self._user = to_bytes(user)
        self._mock_seed = mock_seed
        self._mock_iterations = mock_iterations
        self._mock_md5 = mock_md5
        # defer: a key derivation is not run here but left in ``pending`` = (password, salt,
        # iterations) for the caller to run (off its event loop) and hand to ``derived()``
        self._defer = defer
        self.pending: tuple[bytes, bytes, int] | None = None
        self._then = None
        # tls-server-end-point data when the client came over TLS: SCRAM-SHA-256-PLUS is offered
        self._channel_binding = channel_binding
        self._plus = False                       # the client chose SCRAM-SHA-256-PLUS
        self._state = _State.START
        # The exchange actually run: "md5" with a SCRAM secret runs SCRAM, as in PostgreSQL; without
        # a secret, what most known users run (PostgreSQL mocks its password_encryption, SCRAM).
        if method == "md5" and (secret.kind == "scram" if secret is not None else not mock_md5):
            self.exchange = "scram-sha-256"
        else:
            self.exchange = method
        self._doomed = self._doom_reason()

    def _doom_reason(self) -> str | None:
        """Why this login cannot succeed whatever the client sends, or None."""
        who = f'user "{_printable(self.user)}"'
        if self._secret is None:
            return self._missing or f"{who} does not exist (no secret found)"
        if self._secret.kind == "plain" and not self._secret.value:
            return f"{who} has an empty password in auth_file"
        if self.exchange == "scram-sha-256" and self._secret.kind == "md5":
            return f"{who} has no SCRAM secret (auth_file holds an md5 hash, which cannot do SCRAM)"
        return None

    # ---- the exchange -------------------------------------------------------------

    def start(self) -> bytes:
        """The first message to send: an authentication request, or b"" for trust."""
        if self._state is not _State.START:
            raise RuntimeError("start() called twice")
        if self.exchange == "trust":
            self._state = _State.DONE
            self.done = True
            return b""
        if self.exchange == "scram-sha-256":
            self._state = _State.SASL_INITIAL
            self.max_payload = MAX_SASL_PAYLOAD
            offered = [SCRAM_PLUS_MECHANISM, SCRAM_MECHANISM] if self._channel_binding else [SCRAM_MECHANISM]
            return messages.auth_sasl(offered)
        self._state = _State.PASSWORD
        self.max_payload = MAX_PASSWORD_PAYLOAD
        if self.exchange == "md5":
            self._md5_salt = secrets.token_bytes(4)
            return messages.auth_md5(self._md5_salt)
        return messages.auth_cleartext()

    def feed(self, payload: bytes) -> bytes:
        """Take one 'p' message payload; return the bytes to send next (b"" when none)."""
        state = self._state
        if state in (_State.START, _State.DONE, _State.FAILED, _State.DERIVING):
            raise ClientProtocolError(f"unexpected password message (authentication is {state.value})")
        if len(payload) > self.max_payload:
            self._state = _State.FAILED
            raise ClientProtocolError("invalid message length",
                                      detail=f"{len(payload)} bytes; the limit here is {self.max_payload}")
        try:
            if state is _State.PASSWORD:
                return self._password_message(payload)
            if state is _State.SASL_INITIAL:
                return self._sasl_initial(payload)
            if state is _State.SASL_FIRST:
                return self._client_first(self._scram_input(payload))
            return self._client_final(self._scram_input(payload))
        except BaseException:
            self._state = _State.FAILED
            raise

    def _fail(self, reason: str) -> AuthenticationFailed:
        self._state = _State.FAILED
        return AuthenticationFailed(f'password authentication failed for user "{self.user}"', reason)

    def _succeed(self) -> None:
        self._state = _State.DONE
        self.done = True
        self.max_payload = 0

    # ---- password and md5 ---------------------------------------------------------------

    def _password_message(self, payload: bytes) -> bytes:
        # One NUL-terminated string filling the whole message, as recv_password_packet checks.
        if not payload or payload.find(b"\0") != len(payload) - 1:
            raise ClientProtocolError("invalid password packet size")
        answer = payload[:-1]
        if not answer:
            raise self._fail("empty password returned by client")
        secret = self._secret
        if self._doomed:
            if self.exchange == "password" and not self._mock_md5:
                # a real user's cleartext check costs a derivation (SCRAM secret): so does this one,
                # or the time the failure takes would tell the two apart
                return self._derive(answer, mock_salt(self._mock_seed, self.user), self._mock_iterations,
                                    lambda keys: self._password_result(answer, False))
            raise self._fail(self._doomed)
        if self.exchange == "md5":
            return self._password_result(answer, hmac.compare_digest(answer, self._expected_md5()))
        if secret.kind == "scram":
            # Not cached: the password is the client's guess.
            return self._derive(answer, secret.salt, secret.iterations, lambda keys: self._password_result(
                answer, hmac.compare_digest(keys[1] + keys[2], secret.stored_key + secret.server_key)))
        return self._password_result(answer, self._check_cleartext(answer))

    def _derive(self, password: bytes, salt: bytes, iterations: int, then) -> bytes:
        """``then(scram_keys(...))`` now, or (defer) once the caller hands the keys to ``derived()``."""
        if not self._defer:
            return then(scram_keys(password, salt, iterations))
        self.pending = (password, salt, iterations)
        self._then = then
        self._state = _State.DERIVING
        return b""

    def derived(self, keys: tuple[bytes, bytes, bytes]) -> bytes:
        """The result of ``scram_keys(*pending)``; returns what to send next, like ``feed``."""
        if self._state is not _State.DERIVING:
            raise RuntimeError("derived() without a pending derivation")
        then, self._then, self.pending = self._then, None, None
        try:
            return then(keys)
        except BaseException:
            self._state = _State.FAILED
            raise

    def _password_result(self, answer: bytes, ok: bool) -> bytes:
        if self._doomed:
            raise self._fail(self._doomed)
        if not ok:
            raise self._fail(f"password does not match ({self.exchange} authentication)")
        if self.exchange == "password":
            self.password = answer.decode("utf-8", "surrogateescape")
        self._succeed()
        return b""

    def _expected_md5(self) -> bytes:
        secret = self._secret
        inner = secret.value[3:] if secret.kind == "md5" else md5_hex(to_bytes(secret.value) + self._user)
        return md5_response(inner, self._md5_salt)

    def _check_cleartext(self, password: bytes) -> bool:
        """A cleartext password against a plaintext or md5 secret (SCRAM secrets: ``_derive``)."""
        secret = self._secret
        if secret.kind == "plain":
            return hmac.compare_digest(password, to_bytes(secret.value))
        return hmac.compare_digest(md5_secret(password, self._user).encode(), secret.value.encode())

    # ---- SCRAM-SHA-256 ----------------------------------------------------------------

    def _sasl_initial(self, payload: bytes) -> bytes:
        end = payload.find(b"\0")
        if end < 0:
            raise ClientProtocolError("invalid string in message",
                                      detail="SASLInitialResponse has no terminated mechanism name")
        mechanism = payload[:end]
        if mechanism == SCRAM_PLUS_MECHANISM.encode() and self._channel_binding:
            self._plus = True
        elif mechanism != SCRAM_MECHANISM.encode():
            raise ClientProtocolError("client selected an invalid SASL authentication mechanism")
        pos = end + 1
        if len(payload) - pos < 4:
            raise ClientProtocolError("insufficient data left in message")
        (length,) = _I32.unpack_from(payload, pos)
        pos += 4
        rest = len(payload) - pos
        if length == -1:
            if rest:
                raise ClientProtocolError("invalid message format")
            # No initial response: send an empty challenge, the client answers with client-first.
            self._state = _State.SASL_FIRST
            return messages.auth_sasl_continue(b"")
        if length < 0 or length > rest:
            raise ClientProtocolError("insufficient data left in message")
        if length < rest:
            raise ClientProtocolError("invalid message format")
        return self._client_first(self._scram_input(payload[pos:]))

    @staticmethod
    def _scram_input(data: bytes) -> bytes:
        if not data:
            raise _malformed("The message is empty.")
        if b"\0" in data:
            raise _malformed("Message length does not match input length.")
        return data

    def _gs2_header_length(self, data: bytes) -> int:
        """Check the gs2-header ("n,,", "y,," or "p=tls-server-end-point,,", no authzid); its length.

        A client that says "y" (it could bind, but believes pgmp cannot) while pgmp offered
        SCRAM-SHA-256-PLUS is being downgraded by someone in the middle: refused.
        """
        flag = data[:1]
        if flag == b"p":
            if not self._plus:
                raise _malformed("The client selected SCRAM-SHA-256 without channel binding, "
                                 "but the SCRAM message includes channel binding data.")
            comma = data.find(b",")
            if data[1:2] != b"=" or comma < 0:
                raise _malformed('Expected attribute "p" in client-first-message.')
            if data[2:comma] != CHANNEL_BINDING_TYPE:
                raise ClientProtocolError(f'unsupported SCRAM channel-binding type '
                                          f'"{_printable(data[2:comma].decode("latin-1"))}"')
            pos = comma
        elif flag in (b"n", b"y"):
            if self._plus:
                raise _malformed("The client selected SCRAM-SHA-256-PLUS, but the SCRAM message "
                                 "does not include channel binding data.")
            if flag == b"y" and self._channel_binding:
                raise ClientProtocolError("SCRAM channel binding negotiation error",
                                          detail="The client supports SCRAM channel binding but thinks the server "
                                                 "does not.  However, this server does support channel binding.")
            if data[1:2] != b",":
                raise _malformed("Comma expected after the channel-binding flag.")
            pos = 1
        else:
            raise _malformed("Unexpected channel-binding flag.")
        if data[pos + 1:pos + 2] == b"a":
            raise ClientProtocolError("client uses authorization identity, but it is not supported",
                                      FEATURE_NOT_SUPPORTED)
        if data[pos + 1:pos + 2] != b",":
            raise _malformed("Unexpected attribute in client-first-message.")
        return pos + 2

    def _client_first(self, data: bytes) -> bytes:
        header = self._gs2_header_length(data)
        bare = data[header:]
        if bare[:1] == b"m":
            raise ClientProtocolError("client requires an unsupported SCRAM extension",
                                      FEATURE_NOT_SUPPORTED)
        parts = bare.split(b",")
        # The SCRAM user name (n=) is ignored: the startup packet's user is the one that counts.
        if len(parts) < 2 or not parts[0].startswith(b"n=") or not parts[1].startswith(b"r="):
            raise _malformed("client-first-message must be n=<user>,r=<nonce>.")
        _check_extensions(parts[2:])
        nonce = parts[1][2:]
        if not nonce or not all(0x21 <= c <= 0x7E for c in nonce):
            raise ClientProtocolError("non-printable characters in SCRAM nonce")
        # what client-final's c= must carry: the gs2-header, then the binding data with PLUS
        self._cbind_input = data[:header] + (self._channel_binding if self._plus else b"")
        self._client_first_bare = bare
        self._client_nonce = nonce
        self._server_nonce = _new_nonce()
        salt, iterations = self._salt_and_iterations()
        self._server_first = (b"r=" + nonce + self._server_nonce + b",s=" + base64.b64encode(salt)
                              + b",i=" + str(iterations).encode())
        self._state = _State.SASL_FINAL
        return messages.auth_sasl_continue(self._server_first)

    def _salt_and_iterations(self) -> tuple[bytes, int]:
        if self._secret is not None and self._secret.kind == "scram":
            return self._secret.salt, self._secret.iterations
        return mock_salt(self._mock_seed, self.user), self._mock_iterations

    def _stored_and_server_key(self) -> tuple[bytes, bytes]:
        secret = self._secret
        if self._doomed:
            return bytes(32), bytes(32)     # never matched; the proof is still computed
        if secret.kind == "scram":
            return secret.stored_key, secret.server_key
        # A plaintext secret: derive once per (password, salt); the password is trusted.
        salt, iterations = self._salt_and_iterations()
        _, stored_key, server_key = scram_keys_cached(to_bytes(secret.value), salt, iterations)
        return stored_key, server_key

    def _client_final(self, data: bytes) -> bytes:
        parts = data.split(b",")
        if not parts[0].startswith(b"c="):
            raise _malformed('Expected attribute "c" in client-final-message.')
        if not hmac.compare_digest(parts[0][2:], base64.b64encode(self._cbind_input)):
            if self._plus:
                raise ClientProtocolError("SCRAM channel binding check failed", INVALID_AUTHORIZATION)
            raise ClientProtocolError("unexpected SCRAM channel-binding attribute in client-final-message")
        if len(parts) < 2 or not parts[1].startswith(b"r="):
            raise _malformed('Expected attribute "r" in client-final-message.')
        proof_at = next((i for i in range(2, len(parts)) if parts[i].startswith(b"p=")), None)
        if proof_at is None:
            raise _malformed("Attribute expected, but found end of string.")
        _check_extensions(parts[2:proof_at])
        if proof_at != len(parts) - 1:
            raise _malformed("Garbage found at the end of client-final-message.")
        try:
            proof = base64.b64decode(parts[proof_at][2:], validate=True)
        except binascii.Error:
            proof = b""
        if len(proof) != 32:
            raise _malformed("Malformed proof in client-final-message.")
        if not hmac.compare_digest(parts[1][2:], self._client_nonce + self._server_nonce):
            raise ClientProtocolError("invalid SCRAM response", detail="Nonce does not match.")

        auth_message = b",".join((self._client_first_bare, self._server_first,
                                  b",".join(parts[:proof_at])))
        stored_key, server_key = self._stored_and_server_key()
        client_key = xor(proof, hmac_sha256(stored_key, auth_message))
        proof_ok = hmac.compare_digest(sha256(client_key), stored_key)
        if self._doomed:
            raise self._fail(self._doomed)
        if not proof_ok:
            raise self._fail("password does not match (SCRAM proof is wrong)")
        if self._secret.kind == "scram":
            self.client_key = client_key
        self._succeed()
        return messages.auth_sasl_final(b"v=" + base64.b64encode(hmac_sha256(server_key, auth_message)))


def _check_extensions(parts: list[bytes]) -> None:
    """Optional attributes we ignore must still be ALPHA "=" value."""
    for part in parts:
        if len(part) < 2 or not (part[:1].isalpha() and part[:1].isascii()) or part[1:2] != b"=":
            raise _malformed("Attribute expected, but found invalid character.")
