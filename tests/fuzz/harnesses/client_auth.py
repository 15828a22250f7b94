"""Fuzz client authentication (pgmp as the server): pgmp/auth/client.py ClientAuthenticator, every method.

Input: which method (trust, password, md5, scram-sha-256), which secret pgmp holds for
the user (plaintext, empty, md5, SCRAM, none), whether the connection offers channel
binding, whether the fake client knows the password; then each step picks the honest
client's next 'p' payload (cleartext, md5 answer, SASLInitialResponse with any
gs2 header, with or without its client-first, client-final with a real proof), that
payload with one byte changed, or a payload of the input's own.

Documented errors: AuthenticationFailed, ClientProtocolError (both PgmpError). Invariants:
a login succeeds only if a reference check of the last message accepts it: the cleartext
is the password (or, against a SCRAM secret, a non-ASCII spelling SASLprep may map to
it), the md5 answer is md5(md5(password + user) + salt), the SCRAM client-final carries
the right channel-binding data, nonce and proof for the salt and iteration count pgmp
announced; a login with no usable secret never succeeds; max_payload is respected; after
SCRAM against a SCRAM secret, client_key is the user's real ClientKey.
"""
import base64
import hashlib
import hmac
import struct
import types

import pgmp.auth.client as client_auth
from pgmp.auth.authfile import Secret, md5_secret, parse_secret
from pgmp.errors import PgmpError
from tests.fuzz.harnesses._common import Bytes, check

MAX_LEN = 4096
USER = "fuzz_user"
PASSWORD = b"fuzz-pass"
SALT = b"fedcba9876543210"
ITERATIONS = 2
CBIND = bytes(range(32))                  # stands for the hash of pgmp's certificate
# fixed randomness, so that an input replays the same exchange
client_auth._new_nonce = lambda: b"c2VydmVyLW5vbmNlLWZ1enotMTg="
client_auth.secrets = types.SimpleNamespace(token_bytes=lambda n: b"\x5a" * n)
CNONCE = b"fuzz-client-nonce"


def _keys(password: bytes, salt: bytes, iterations: int):
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return client_key, hmac.new(salted, b"Server Key", hashlib.sha256).digest()


_CK, _SK = _keys(PASSWORD, SALT, ITERATIONS)
_b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
SECRETS = {
    "plain": Secret("plain", PASSWORD.decode()),
    "empty": Secret("plain", ""),
    "md5": parse_secret(md5_secret(PASSWORD, USER.encode())),
    "scram": parse_secret(f"SCRAM-SHA-256${ITERATIONS}:{_b64(SALT)}$"
                          f"{_b64(hashlib.sha256(_CK).digest())}:{_b64(_SK)}"),
    "none": None,
}
GS2 = (b"n,,", b"y,,", b"p=tls-server-end-point,,")


class FakeClient:
    def __init__(self, b: Bytes, auth, sent: bytes):
        self.auth = auth
        self.password = PASSWORD if b.byte() % 4 else b"wrong-pass"
        self.gs2 = b.pick(GS2)
        self.plus = self.gs2.startswith(b"p") and b.byte() % 2 == 0
        self.split_initial = b.byte() % 4 == 0        # SASLInitialResponse without client-first
        self.request = sent                            # pgmp's last authentication request
        self.initial_sent = self.first_sent = False

    def honest(self) -> bytes:
        code = struct.unpack_from("!i", self.request, 5)[0] if len(self.request) >= 9 else -1
        if code == 3:
            return self.password + b"\0"
        if code == 5:
            inner = hashlib.md5(self.password + USER.encode()).hexdigest().encode()
            return b"md5" + hashlib.md5(inner + self.request[9:13]).hexdigest().encode() + b"\0"
        first = self.gs2 + b"n=,r=" + CNONCE
        mech = b"SCRAM-SHA-256-PLUS" if self.plus else b"SCRAM-SHA-256"
        if code == 10 or not self.initial_sent:
            self.initial_sent = True
            if self.split_initial:
                return mech + b"\0" + struct.pack("!i", -1)
            self.first_sent = True
            return mech + b"\0" + struct.pack("!i", len(first)) + first
        server_first = self.request[9:]
        if code == 11 and not server_first or not self.first_sent:
            self.first_sent = True
            return first
        return self.client_final(first[len(self.gs2):], server_first, self.password)

    def client_final(self, first_bare: bytes, server_first: bytes, password: bytes) -> bytes:
        attrs = dict(p.split(b"=", 1) for p in server_first.split(b",") if b"=" in p)
        try:
            salt, iterations = base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
        except (KeyError, ValueError):
            return b"c=biws,r=x,p=x"
        cbind = self.gs2 + (CBIND if self.gs2.startswith(b"p") else b"")
        without_proof = b"c=" + base64.b64encode(cbind) + b",r=" + attrs.get(b"r", b"")
        client_key, _ = _keys(password, salt, min(iterations, 64))
        message = b",".join((first_bare, server_first, without_proof))
        signature = hmac.new(hashlib.sha256(client_key).digest(), message, hashlib.sha256).digest()
        return without_proof + b",p=" + base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature)))


def _reference_accepts(auth, secret_kind: str, request: bytes, payload: bytes, history: list,
                       server_first: bytes | None) -> bool:
    """Whether the last message proves the password, judged without pgmp's code."""
    if auth.exchange == "password":
        answer = payload[:-1]
        return answer == PASSWORD or (secret_kind == "scram" and not answer.isascii())
    if auth.exchange == "md5":
        inner = hashlib.md5(PASSWORD + USER.encode()).hexdigest().encode()
        return payload == b"md5" + hashlib.md5(inner + request[9:13]).hexdigest().encode() + b"\0"
    # SCRAM: the final message against the client-first and server-first of this exchange
    first_msg = next((m for m in reversed(history) if b"r=" in m and b"n=" in m), None)
    if first_msg is None or server_first is None:
        return False
    bare = first_msg[first_msg.index(b"n="):] if b"n=" in first_msg else b""
    parts = payload.split(b",")
    proof_part = [p for p in parts if p.startswith(b"p=")]
    if not proof_part:
        return False
    without_proof = payload[:payload.rindex(b",p=")]
    attrs = dict(p.split(b"=", 1) for p in server_first.split(b",") if b"=" in p)
    salt, iterations = base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
    client_key, _ = _keys(PASSWORD, salt, iterations)
    stored = hashlib.sha256(client_key).digest()
    message = b",".join((bare, server_first, without_proof))
    signature = hmac.new(stored, message, hashlib.sha256).digest()
    try:
        proof = base64.b64decode(proof_part[-1][2:])
    except ValueError:
        return False
    return len(proof) == 32 and bytes(a ^ b for a, b in zip(proof, signature)) == client_key \
        and parts[1] == b"r=" + attrs[b"r"]


def one_input(data: bytes) -> None:
    b = Bytes(data)
    method = b.pick(client_auth.METHODS)
    secret_kind = b.pick(tuple(SECRETS))
    channel_binding = CBIND if b.byte() % 2 else None
    auth = client_auth.ClientAuthenticator(method, USER, SECRETS[secret_kind], mock_seed=b"fuzz-seed",
                                           mock_iterations=1 + b.byte() % 4, channel_binding=channel_binding)
    request = auth.start()
    if method == "trust":
        check(auth.done and request == b"", "trust did not succeed at once")
        return
    fake = FakeClient(b, auth, request)
    history = []
    server_first = None                         # pgmp's SCRAM server-first message, once sent
    doomed = secret_kind in ("empty", "none") or (auth.exchange == "scram-sha-256" and secret_kind == "md5")
    for _ in range(8):
        if not b.left:
            return
        choice = b.byte() % 8
        if choice < 5:
            payload = fake.honest()
        elif choice < 7:
            payload = bytearray(fake.honest())
            if payload:
                payload[b.u16() % len(payload)] ^= b.byte() or 1
            payload = bytes(payload)
        else:
            payload = b.chunk()
        limit = auth.max_payload
        history.append(payload)
        try:
            reply = auth.feed(payload)
        except PgmpError:
            check(not auth.done, "done after an error")
            return
        check(len(payload) <= limit, f"a {len(payload)}-byte payload passed max_payload {limit}")
        if auth.done:
            check(not doomed, f"login succeeded with secret {secret_kind} ({auth.exchange})")
            check(_reference_accepts(auth, secret_kind, fake.request, payload, history, server_first),
                  f"pgmp accepted a {auth.exchange} message that does not prove the password: {payload!r}")
            if auth.exchange == "scram-sha-256" and secret_kind == "scram":
                check(auth.client_key == _CK, "client_key is not the user's ClientKey")
            if auth.exchange == "password":
                check(auth.password.encode("utf-8", "surrogateescape") == payload[:-1],
                      "the password kept is not the one sent")
            return
        fake.request = reply
        if reply[5:9] == b"\0\0\0\x0b" and len(reply) > 9:
            server_first = reply[9:]
