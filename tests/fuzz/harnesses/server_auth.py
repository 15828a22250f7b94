"""Fuzz pgmp's login to a server (pgmp as the client): pgmp/auth/server.py ServerAuthenticator through server.ServerLogin.

Input, first byte even ("script"): a fake server's login, step by step. Each step the
input picks the honest next message (AuthenticationSASL, the SCRAM server-first built on
pgmp's nonce, a server-final signed with the password the fake server believes in,
AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery, or a cleartext/md5
request), that message with one byte changed, or a frame of the input's own. Odd first
byte ("stream"): the rest is a server's byte stream, cut into frames. Which credential
pgmp holds (password, SCRAM keys, md5 or SCRAM secret, none) and whether the fake server
knows the right password come from the input too.

Documented errors: PgmpError (ServerAuthError, ServerProtocolError, ServerError) and
ValueError (message decoders). Invariants: AuthenticationOk after SCRAM began is accepted
only once the server's signature was verified, and a verified signature is the correct
HMAC(ServerKey, AuthMessage) of pgmp's credential (a server that does not know the
password cannot log pgmp in); pgmp's SCRAM proof, md5 answer and cleartext answer are the
correct ones for its credential. SCRAM iteration counts above 64 are skipped (PBKDF2 cost).
"""
import base64
import hashlib
import hmac
import re

import pgmp.auth.server as server_auth
from pgmp.auth.authfile import md5_secret, parse_secret
from pgmp.errors import PgmpError
from pgmp.protocol import messages
from pgmp.server import ServerLogin
from tests.fuzz.harnesses._common import Bytes, check, frame, frames

MAX_LEN = 4096
USER = "fuzz_user"
PASSWORD = b"fuzz-pass"
SALT = b"0123456789abcdef"
ITERATIONS = 2
NONCE = b"cGdtcC1mdXp6LW5vbmNlLTE4"      # pgmp's client nonce, fixed so inputs replay
server_auth._new_nonce = lambda: NONCE
_BIG_ITERATIONS = re.compile(rb"(?:^|,)i=0*[0-9]{3,}|(?:^|,)i=0*(?:6[5-9]|[7-9][0-9])(?:,|$)")


def _keys(password: bytes, salt: bytes, iterations: int):
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return client_key, hmac.new(salted, b"Server Key", hashlib.sha256).digest()


_CLIENT_KEY, _SERVER_KEY = _keys(PASSWORD, SALT, ITERATIONS)
_b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
_STORED = hashlib.sha256(_CLIENT_KEY).digest()
_SCRAM_SECRET = parse_secret(f"SCRAM-SHA-256${ITERATIONS}:{_b64(SALT)}${_b64(_STORED)}:{_b64(_SERVER_KEY)}")
_MD5_SECRET = parse_secret(md5_secret(PASSWORD, USER.encode()))
CREDENTIALS = ("password", "keys", "md5", "scram", "none")


def _authenticator(which: str):
    if which == "password":
        return server_auth.ServerAuthenticator(USER, password=PASSWORD.decode(), database="db")
    if which == "keys":
        return server_auth.ServerAuthenticator(USER, scram_keys=(_CLIENT_KEY, _SERVER_KEY), secret=_SCRAM_SECRET)
    if which == "md5":
        return server_auth.ServerAuthenticator(USER, secret=_MD5_SECRET)
    if which == "scram":
        return server_auth.ServerAuthenticator(USER, secret=_SCRAM_SECRET)
    return server_auth.ServerAuthenticator(USER)


class FakeServer:
    """The honest side of the exchange, and what pgmp sent it."""

    def __init__(self, b: Bytes, credential: str):
        self.credential = credential
        self.knows_password = b.byte() % 4 != 0
        self.salt = SALT if b.byte() % 4 else b.take(b.byte() % 20)
        self.iterations = ITERATIONS if b.byte() % 4 else 1 + b.byte() % 64
        self.client_first_bare = None
        self.server_first = None
        self.client_final = None        # without the proof
        self.final_sent = False
        self.scram_began = False        # pgmp sent a SASLInitialResponse
        self.final_accepted = False     # pgmp took a server-final message
        self.asked = False              # md5 asked for
        self.after = 0                  # messages sent after the SCRAM exchange
        self.md5_salt = b"salt"

    def honest(self, plain: bool = False) -> bytes:
        """The next message of an honest server (``plain``: md5 instead of SCRAM)."""
        if plain and not self.asked:
            self.asked = True
            return frame(ord("R"), b"\0\0\0\x05" + self.md5_salt)
        if not plain and self.client_first_bare is None:
            return frame(ord("R"), b"\0\0\0\x0aSCRAM-SHA-256\0\0")
        if not plain and self.server_first is None:
            nonce = dict(p.split(b"=", 1) for p in self.client_first_bare.split(b",") if b"=" in p).get(b"r", b"")
            return frame(ord("R"), b"\0\0\0\x0b" + b"r=" + nonce + b"srv,s=" + base64.b64encode(self.salt)
                         + b",i=%d" % self.iterations)
        if not plain and self.client_final is not None and not self.final_sent:
            self.final_sent = True
            password = PASSWORD if self.knows_password else b"wrong"
            _, server_key = _keys(password, self.salt, self.iterations)
            return frame(ord("R"), b"\0\0\0\x0c" + b"v=" + base64.b64encode(
                hmac.new(server_key, self.auth_message(), hashlib.sha256).digest()))
        self.after += 1
        return (frame(ord("R"), b"\0\0\0\0"), frame(ord("S"), b"server_version\x0016.0\0"),
                frame(ord("K"), b"\0\0\0\x07\0\0\0\x09"), frame(ord("Z"), b"I"))[min(self.after - 1, 3)]

    def auth_message(self) -> bytes:
        return b",".join((self.client_first_bare, self.server_first, self.client_final))

    def sent(self, reply: bytes, fed: tuple[int, bytes]) -> None:
        """pgmp answered ``fed`` with ``reply``: check the answer, remember the exchange."""
        kind, payload = fed
        if not reply:
            return
        check(reply[:1] == b"p", f"pgmp answered with a {reply[:1]!r} message")
        body = reply[5:]
        code = int.from_bytes(payload[:4], "big", signed=True)
        if code == messages.AUTH_CLEARTEXT:
            check(body == PASSWORD + b"\0", "pgmp sent a cleartext password that is not its own")
        elif code == messages.AUTH_MD5:
            inner = hashlib.md5(PASSWORD + USER.encode()).hexdigest().encode()
            check(body == b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode() + b"\0",
                  "pgmp's md5 answer is wrong")
        elif code == messages.AUTH_SASL:
            mech, data = messages.parse_sasl_initial(body)
            check(mech == "SCRAM-SHA-256" and data.startswith(b"n,,"), f"bad SASLInitialResponse {body!r}")
            check(not self.scram_began, "pgmp started SCRAM twice")
            self.scram_began = True
            self.client_first_bare = data[3:]
        elif code == messages.AUTH_SASL_CONTINUE:
            self.server_first = payload[4:]
            without_proof, _, proof = body.rpartition(b",p=")
            self.client_final = without_proof
            client_key = _CLIENT_KEY
            if self.credential == "password":
                client_key, _ = _keys(PASSWORD, self._salt_of(self.server_first), self._iterations_of())
            signature = hmac.new(hashlib.sha256(client_key).digest(), self.auth_message(), hashlib.sha256).digest()
            expected = bytes(a ^ b for a, b in zip(client_key, signature))
            check(base64.b64decode(proof) == expected, "pgmp's SCRAM proof is wrong for its credential")

    def _salt_of(self, server_first: bytes) -> bytes:
        attrs = {}
        for part in server_first.split(b","):
            attrs.setdefault(part[:1], part[2:])
        return base64.b64decode(attrs[b"s"])

    def _iterations_of(self) -> int:
        attrs = {}
        for part in self.server_first.split(b","):
            attrs.setdefault(part[:1], part[2:])
        return int(attrs[b"i"])

    def check_verified(self, signature_data: bytes) -> None:
        """pgmp accepted ``signature_data`` as the server-final message: it must be the right one."""
        if self.credential == "password":
            _, server_key = _keys(PASSWORD, self._salt_of(self.server_first), self._iterations_of())
        else:
            server_key = _SERVER_KEY
        right = hmac.new(server_key, self.auth_message(), hashlib.sha256).digest()
        attrs = {}
        for part in signature_data.split(b","):
            attrs.setdefault(part[:1], part[2:])
        check(base64.b64decode(attrs.get(b"v", b"")) == right,
              "pgmp accepted a SCRAM server signature that is not HMAC(ServerKey, AuthMessage)")


def _too_costly(kind: int, payload: bytes) -> bool:
    return kind == ord("R") and payload[:4] == b"\0\0\0\x0b" and _BIG_ITERATIONS.search(payload[4:]) is not None


def _feed(login, fake: FakeServer, kind: int, payload: bytes) -> bool:
    """Feed one frame; False once pgmp has refused the server (the connection would close)."""
    try:
        reply = login.feed(kind, payload)
    except (PgmpError, ValueError):
        return False
    code = payload[:4] if kind == ord("R") else None
    if code == b"\0\0\0\0":
        check(not fake.scram_began or fake.final_accepted,
              "AuthenticationOk accepted after SCRAM began but before a server signature was verified")
    elif code == b"\0\0\0\x0c":
        check(fake.client_final is not None and not fake.final_accepted,
              "a SCRAM server-final message was accepted outside the exchange")
        fake.final_accepted = True
        fake.check_verified(payload[4:])
    fake.sent(reply, (kind, payload))
    return not login.done


def one_input(data: bytes) -> None:
    b = Bytes(data)
    mode = b.byte()
    credential = b.pick(CREDENTIALS)
    auth = _authenticator(credential)
    login = ServerLogin(USER, "db", auth)
    fake = FakeServer(b, credential)
    if mode % 2:
        for kind, payload in frames(b.rest()):
            if _too_costly(kind, payload):
                return
            if not _feed(login, fake, kind, payload):
                return
        return
    for step in range(32):
        if not b.left:
            return
        choice = b.byte() % 8
        if choice < 5:
            message = fake.honest(credential == "md5")
        elif choice < 7:
            message = bytearray(fake.honest(credential == "md5"))
            at = 5 + b.byte() % max(1, len(message) - 5)
            if at < len(message):
                message[at] ^= b.byte() or 1
            message = bytes(message)
        else:
            message = bytes([b.byte()]) + b"\0\0\0\0" + b.chunk()
        kind, payload = message[0], message[5:]
        if choice == 4 and step % 3 == 0:     # the server asks for a password instead
            kind, payload = ord("R"), (b"\0\0\0\x03" if b.byte() % 2 else b"\0\0\0\x05" + b.take(4))
        if _too_costly(kind, payload):
            return
        if not _feed(login, fake, kind, payload):
            return
