"""Authentication, sans-IO: auth_file parsing, pgmp as the server (clients) and as the client (servers)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramClient, ScramException, ScramMechanism

from pgmp.auth import client as client_mod
from pgmp.auth import server as server_mod
from pgmp.auth.authfile import (
    AuthFileError, Secret, load_auth_file, make_scram_secret, parse_auth_file, parse_secret,
    scram_keys,
)
from pgmp.auth.client import ClientAuthenticator, mock_salt
from pgmp.auth.server import ServerAuthenticator, ServerAuthError
from pgmp.errors import AuthenticationFailed, ClientProtocolError, PgmpError
from pgmp.protocol import messages

SEED = b"mock-seed-for-tests-0123456789ab"
SALT = b"0123456789abcdef"


# ---- helpers ----------------------------------------------------------------------

def scram_secret(password: str, iterations: int = 4096, salt: bytes = SALT) -> Secret:
    return parse_secret(make_scram_secret(password, salt, iterations))


def md5_of(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def md5_secret_of(password: str, user: str) -> Secret:
    return parse_secret("md5" + md5_of(password + user))


def auth_request(frame: bytes) -> tuple[int, bytes]:
    """Code and data of one 'R' frame."""
    assert frame[:1] == b"R"
    (length,) = struct.unpack_from("!I", frame, 1)
    assert length == len(frame) - 1
    return messages.parse_auth_request(frame[5:])


def p_payload(frame: bytes) -> bytes:
    """Payload of one 'p' frame."""
    assert frame[:1] == b"p"
    (length,) = struct.unpack_from("!I", frame, 1)
    assert length == len(frame) - 1
    return frame[5:]


def sasl_initial(data: bytes | None, mech: bytes = b"SCRAM-SHA-256") -> bytes:
    if data is None:
        return mech + b"\0" + struct.pack("!i", -1)
    return mech + b"\0" + struct.pack("!i", len(data)) + data


def md5_answer_bytes(password: str, user: str, salt: bytes) -> bytes:
    """What a client sends for AuthenticationMD5Password, computed here by hand."""
    inner = md5_of(password + user).encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\0"


def scramp_login(auth: ClientAuthenticator, password: str, *, initial_none: bool = False) -> None:
    """Drive ``auth`` with scramp's ScramClient, an independent SCRAM implementation."""
    code, data = auth_request(auth.start())
    assert code == messages.AUTH_SASL
    assert messages.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256"]
    c = ScramClient(["SCRAM-SHA-256"], "ignored-by-postgres", password)
    first = c.get_client_first().encode()
    if initial_none:
        code, data = auth_request(auth.feed(sasl_initial(None)))
        assert (code, data) == (messages.AUTH_SASL_CONTINUE, b"")
        out = auth.feed(first)
    else:
        out = auth.feed(sasl_initial(first))
    code, server_first = auth_request(out)
    assert code == messages.AUTH_SASL_CONTINUE
    c.set_server_first(server_first.decode())
    code, server_final = auth_request(auth.feed(c.get_client_final().encode()))
    assert code == messages.AUTH_SASL_FINAL
    c.set_server_final(server_final.decode())      # raises unless pgmp's signature is right


def server_first_of(auth: ClientAuthenticator, client_nonce: bytes = b"clientnonce") -> dict[bytes, bytes]:
    auth.start()
    code, data = auth_request(auth.feed(sasl_initial(b"n,,n=," + b"r=" + client_nonce)))
    assert code == messages.AUTH_SASL_CONTINUE
    return dict((part[:1], part[2:]) for part in data.split(b","))


def started_scram(user: str = "alice", secret: Secret | None = None) -> ClientAuthenticator:
    auth = ClientAuthenticator("scram-sha-256", user, secret or scram_secret("pw"), mock_seed=SEED)
    auth.start()
    return auth


def after_client_first(gs2: bytes = b"n,,") -> tuple[ClientAuthenticator, bytes]:
    auth = started_scram()
    _, sf = auth_request(auth.feed(sasl_initial(gs2 + b"n=,r=abc")))
    return auth, sf.split(b",")[0][2:]


def expect(exc_type, sqlstate, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    assert info.value.sqlstate == sqlstate
    return info.value


# ---- auth_file ----------------------------------------------------------------------

class TestAuthFile:
    def test_parses_quotes_comments_and_extra_fields(self):
        text = (
            '; a comment\n'
            '# another comment\n'
            '   ; indented comment\n'
            '\n'
            '"alice" "s3cret"\n'
            '"bob"   "md5' + md5_of("pwbob") + '"  "ignored" extra\n'
            '"quo""te" "pa""ss"\r\n'
            '"sp ace"\t"with space"\n'
            '"empty" ""\n'
        )
        users = parse_auth_file(text, "users.txt")
        assert set(users) == {"alice", "bob", 'quo"te', "sp ace", "empty"}
        assert users["alice"] == Secret("plain", "s3cret")
        assert users["bob"].kind == "md5"
        assert users['quo"te'].value == 'pa"ss'
        assert users["sp ace"].value == "with space"
        assert users["empty"].value == ""

    def test_secret_kinds(self):
        assert parse_secret("hello").kind == "plain"
        assert parse_secret("md5" + "a" * 32).kind == "md5"
        # PostgreSQL's rule: only 32 lowercase hex digits make an md5 hash.
        assert parse_secret("md5" + "A" * 32).kind == "plain"
        assert parse_secret("md5" + "a" * 31).kind == "plain"
        secret = scram_secret("pw", iterations=5000)
        assert (secret.kind, secret.iterations, secret.salt) == ("scram", 5000, SALT)
        assert len(secret.stored_key) == len(secret.server_key) == 32

    @pytest.mark.parametrize("line, what", [
        ('alice "pw"', "double quotes"),
        ('"alice" pw', "double quotes"),
        ('"alice"', "missing the secret"),
        ('"alice "pw"', "white space after"),
        ('"alice" "pw', "no closing double quote"),
        ('"alice""" "pw"x', "white space or end of line"),
        ('"" "pw"', "user name is empty"),
        ('"alice" "SCRAM-SHA-256$4096:c2FsdA=="', "malformed SCRAM secret"),
        ('"alice" "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA"', "iteration count"),
        ('"alice" "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA"', "iteration count"),
        ('"alice" "SCRAM-SHA-256$4096:!!!$AAAA:AAAA"', "salt is not valid base64"),
        ('"alice" "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA"', "StoredKey is 3 bytes"),
    ])
    def test_errors_name_file_line_and_problem(self, line, what):
        text = '; header\n"ok" "fine"\n' + line + "\n"
        with pytest.raises(AuthFileError) as info:
            parse_auth_file(text, "/etc/pgmp/users.txt")
        message = str(info.value)
        assert message.startswith("/etc/pgmp/users.txt:3: ")
        assert what in message
        assert info.value.lineno == 3

    def test_errors_never_echo_the_secret(self):
        bad = "SCRAM-SHA-256$4096:c2FsdA==$TOPSECRETKEY:AAAA"
        with pytest.raises(AuthFileError) as info:
            parse_auth_file(f'"alice" "{bad}"', "f")
        assert "TOPSECRET" not in str(info.value)

    def test_duplicate_user(self):
        with pytest.raises(AuthFileError, match=r'f:3: user "a" is listed twice \(first on line 1\)'):
            parse_auth_file('"a" "x"\n"b" "y"\n"a" "z"\n', "f")

    def test_repr_never_shows_the_secret(self):
        for secret in (parse_secret("hunter2-plain"), md5_secret_of("hunter2", "u"),
                       scram_secret("hunter2")):
            shown = repr(secret) + str(secret) + repr({"u": secret}) + f"{secret}"
            assert secret.value not in shown
            assert "hunter2" not in shown
            assert base64.b64encode(secret.salt).decode() not in shown or not secret.salt
            assert secret.kind in shown

    def test_load_auth_file(self, tmp_path):
        path = tmp_path / "users.txt"
        path.write_text('"alice" "pw"\n')
        assert load_auth_file(str(path)) == {"alice": Secret("plain", "pw")}
        with pytest.raises(AuthFileError, match="cannot read auth_file"):
            load_auth_file(str(tmp_path / "missing.txt"))
        path.write_bytes(b'"a" "b"\n"c" "\xff"\n')
        with pytest.raises(AuthFileError, match=r"users.txt:2: not valid UTF-8"):
            load_auth_file(str(path))

    def test_secrets_made_by_postgresql(self):
        # SCRAM and md5 secrets from PgBouncer's test/userlist.txt (PostgreSQL's pg_authid format);
        # that file says the passwords are "foo" and "bar".
        text = (
            '"muser1" "md5ab8b744ff66bee42dc47bae34ca17959"\n'
            '"scramuser1" "SCRAM-SHA-256$4096:D76gvGUVj9Z4DNiGoabOBg==$RukL0Xo3Ql/2F9FsD7mcQ3GAT'
            'G2fD3PA71qY1JagGDs=:BhKUwyyivFm7Tq2jDJVXSVRbRDgTWyBilZKgg6DDuYU="\n'
            '"scramuser2" "SCRAM-SHA-256$4096:BUYIT9YAsWf036OHLPfv2Q==$zuk7pzdEc5tvftsRIuwlStNxVc'
            '+wIE/xfDs7ahsKN0k=:Lov6mndE0DmlgtY60e1LyDsLctQyoH+Bvkm9K9njSa8="\n'
        )
        users = parse_auth_file(text, "userlist.txt")
        assert users["muser1"] == md5_secret_of("foo", "muser1")
        for user, password in (("scramuser1", "foo"), ("scramuser2", "bar")):
            secret = users[user]
            assert make_scram_secret(password, secret.salt, secret.iterations) == secret.value
            # and a client logs in with it, end to end
            auth = ClientAuthenticator("scram-sha-256", user, secret, mock_seed=SEED)
            scramp_login(auth, password)
            assert auth.done


# ---- pgmp authenticating clients ------------------------------------------------------

class TestTrust:
    def test_trust_is_done_at_start(self):
        auth = ClientAuthenticator("trust", "alice", None, mock_seed=SEED)
        assert auth.start() == b""
        assert auth.done
        expect(ClientProtocolError, "08P01", auth.feed, b"pw\0")

    def test_unknown_method(self):
        with pytest.raises(ValueError):
            ClientAuthenticator("ident", "alice", None, mock_seed=SEED)


SECRETS = {
    "plain": lambda: parse_secret("s3cret"),
    "md5": lambda: md5_secret_of("s3cret", "alice"),
    "scram": lambda: scram_secret("s3cret"),
}


class TestPassword:
    @pytest.mark.parametrize("kind", SECRETS)
    def test_right_password(self, kind):
        auth = ClientAuthenticator("password", "alice", SECRETS[kind](), mock_seed=SEED)
        assert auth_request(auth.start()) == (messages.AUTH_CLEARTEXT, b"")
        assert auth.max_payload == 65535
        assert auth.feed(b"s3cret\0") == b""
        assert auth.done and auth.password == "s3cret" and auth.client_key is None

    @pytest.mark.parametrize("kind", SECRETS)
    def test_wrong_password(self, kind):
        auth = ClientAuthenticator("password", "alice", SECRETS[kind](), mock_seed=SEED)
        auth.start()
        err = expect(AuthenticationFailed, "28P01", auth.feed, b"wrong\0")
        assert err.message == 'password authentication failed for user "alice"'
        assert "does not match" in err.reason
        assert not auth.done and auth.password is None

    def test_md5_hash_is_not_a_password(self):
        secret = md5_secret_of("s3cret", "alice")
        auth = ClientAuthenticator("password", "alice", secret, mock_seed=SEED)
        auth.start()
        expect(AuthenticationFailed, "28P01", auth.feed, secret.value.encode() + b"\0")

    def test_saslprep_applies_to_scram_secrets(self):
        # U+00AD (soft hyphen) is mapped to nothing by SASLprep, as PostgreSQL does.
        auth = ClientAuthenticator("password", "alice", scram_secret("pass"), mock_seed=SEED)
        auth.start()
        auth.feed("pa\u00adss".encode() + b"\0")
        assert auth.done

    def test_non_utf8_password(self):
        secret = parse_secret(make_scram_secret(b"caf\xe9".decode("utf-8", "surrogateescape"), SALT))
        auth = ClientAuthenticator("password", "alice", secret, mock_seed=SEED)
        auth.start()
        auth.feed(b"caf\xe9\0")
        assert auth.password.encode("utf-8", "surrogateescape") == b"caf\xe9"

    @pytest.mark.parametrize("method", ["password", "md5"])
    def test_unknown_user_fails_after_the_response(self, method):
        auth = ClientAuthenticator(method, "nobody", None, mock_seed=SEED, mock_md5=True)
        code, _ = auth_request(auth.start())
        assert code == (messages.AUTH_CLEARTEXT if method == "password" else messages.AUTH_MD5)
        err = expect(AuthenticationFailed, "28P01", auth.feed, b"anything\0")
        assert err.message == 'password authentication failed for user "nobody"'
        assert "does not exist" in err.reason

    def test_empty_plain_secret_never_matches(self):
        auth = ClientAuthenticator("md5", "alice", parse_secret(""), mock_seed=SEED)
        _, salt = auth_request(auth.start())
        err = expect(AuthenticationFailed, "28P01", auth.feed, md5_answer_bytes("", "alice", salt))
        assert "empty password" in err.reason


class TestMd5:
    @pytest.mark.parametrize("kind", ["plain", "md5"])
    def test_right_password(self, kind):
        auth = ClientAuthenticator("md5", "alice", SECRETS[kind](), mock_seed=SEED)
        code, salt = auth_request(auth.start())
        assert code == messages.AUTH_MD5 and len(salt) == 4
        assert auth.feed(md5_answer_bytes("s3cret", "alice", salt)) == b""
        assert auth.done and auth.password is None and auth.client_key is None

    @pytest.mark.parametrize("kind", ["plain", "md5"])
    def test_wrong_password(self, kind):
        auth = ClientAuthenticator("md5", "alice", SECRETS[kind](), mock_seed=SEED)
        _, salt = auth_request(auth.start())
        expect(AuthenticationFailed, "28P01", auth.feed, md5_answer_bytes("nope", "alice", salt))

    def test_salt_is_random(self):
        salts = {auth_request(ClientAuthenticator("md5", "a", None, mock_seed=SEED, mock_md5=True).start())[1]
                 for _ in range(8)}
        assert len(salts) > 1

    def test_scram_secret_runs_scram(self):
        secret = scram_secret("s3cret")
        auth = ClientAuthenticator("md5", "alice", secret, mock_seed=SEED)
        assert auth.exchange == "scram-sha-256"
        scramp_login(auth, "s3cret")
        assert auth.done
        assert auth.client_key == scram_keys(b"s3cret", SALT, 4096)[0]


class TestScram:
    def test_scram_secret(self):
        auth = ClientAuthenticator("scram-sha-256", "alice", scram_secret("s3cret"), mock_seed=SEED)
        scramp_login(auth, "s3cret")
        assert auth.done and auth.password is None
        assert auth.client_key == scram_keys(b"s3cret", SALT, 4096)[0]
        assert auth.max_payload == 0

    def test_plain_secret(self):
        auth = ClientAuthenticator("scram-sha-256", "alice", parse_secret("s3cret"), mock_seed=SEED)
        scramp_login(auth, "s3cret")
        assert auth.done and auth.client_key is None

    def test_initial_response_without_data(self):
        auth = ClientAuthenticator("scram-sha-256", "alice", scram_secret("s3cret"), mock_seed=SEED)
        scramp_login(auth, "s3cret", initial_none=True)
        assert auth.done

    @pytest.mark.parametrize("kind", ["plain", "scram"])
    def test_wrong_password_fails_at_the_final_message(self, kind):
        auth = ClientAuthenticator("scram-sha-256", "alice", SECRETS[kind](), mock_seed=SEED)
        with pytest.raises(AuthenticationFailed) as info:
            scramp_login(auth, "wrong")
        assert info.value.sqlstate == "28P01"
        assert info.value.message == 'password authentication failed for user "alice"'
        assert "proof" in info.value.reason
        assert not auth.done and auth.client_key is None

    def test_md5_secret_cannot_do_scram(self):
        auth = ClientAuthenticator("scram-sha-256", "alice", md5_secret_of("s3cret", "alice"),
                                   mock_seed=SEED)
        with pytest.raises(AuthenticationFailed) as info:
            scramp_login(auth, "s3cret")
        assert "no SCRAM secret" in info.value.reason
        assert info.value.message == 'password authentication failed for user "alice"'

    def test_unknown_user_looks_like_a_known_one(self):
        known = server_first_of(ClientAuthenticator("scram-sha-256", "alice", scram_secret("x"),
                                                    mock_seed=SEED))
        unknown = server_first_of(ClientAuthenticator("scram-sha-256", "nobody", None, mock_seed=SEED))
        assert known.keys() == unknown.keys() == {b"r", b"s", b"i"}
        assert unknown[b"i"] == known[b"i"] == b"4096"
        assert len(base64.b64decode(unknown[b"s"])) == len(base64.b64decode(known[b"s"])) == 16
        assert len(unknown[b"r"]) == len(known[b"r"])
        # the same unknown user gets the same salt every time; other users and seeds differ
        again = server_first_of(ClientAuthenticator("scram-sha-256", "nobody", None, mock_seed=SEED))
        assert again[b"s"] == unknown[b"s"] and again[b"r"] != unknown[b"r"]
        other = server_first_of(ClientAuthenticator("scram-sha-256", "nobody2", None, mock_seed=SEED))
        assert other[b"s"] != unknown[b"s"]
        reseeded = server_first_of(ClientAuthenticator("scram-sha-256", "nobody", None,
                                                       mock_seed=b"other"))
        assert reseeded[b"s"] != unknown[b"s"]
        assert base64.b64decode(unknown[b"s"]) == mock_salt(SEED, "nobody")

    def test_unknown_user_fails_at_the_final_message_like_a_wrong_password(self):
        auth = ClientAuthenticator("scram-sha-256", "nobody", None, mock_seed=SEED)
        with pytest.raises(AuthenticationFailed) as unknown:
            scramp_login(auth, "whatever")
        auth = ClientAuthenticator("scram-sha-256", "alice", scram_secret("x"), mock_seed=SEED)
        with pytest.raises(AuthenticationFailed) as wrong:
            scramp_login(auth, "whatever")
        assert "does not exist" in unknown.value.reason
        assert unknown.value.message.replace("nobody", "alice") == wrong.value.message
        assert unknown.value.sqlstate == wrong.value.sqlstate == "28P01"

    def test_plain_and_md5_users_get_the_mock_salt(self):
        for secret in (parse_secret("pw"), md5_secret_of("pw", "carol")):
            sf = server_first_of(ClientAuthenticator("scram-sha-256", "carol", secret, mock_seed=SEED))
            assert base64.b64decode(sf[b"s"]) == mock_salt(SEED, "carol")

    def test_mock_iterations_can_match_the_installation(self):
        auth = ClientAuthenticator("scram-sha-256", "nobody", None, mock_seed=SEED, mock_iterations=10000)
        assert server_first_of(auth)[b"i"] == b"10000"

    def test_rfc7677_vector(self, monkeypatch):
        # RFC 7677 section 3: user "user", password "pencil"; the SCRAM user name is ignored.
        monkeypatch.setattr(client_mod, "_new_nonce", lambda: b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        secret = parse_secret(make_scram_secret("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")))
        auth = ClientAuthenticator("scram-sha-256", "user", secret, mock_seed=SEED)
        auth.start()
        _, server_first = auth_request(auth.feed(sasl_initial(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")))
        assert server_first == (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                                b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
        _, server_final = auth_request(auth.feed(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="))
        assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        assert auth.done

    def test_libpq_style_empty_user_and_gs2_y(self):
        # libpq sends "n=," and, over TLS to a server without -PLUS, the 'y' flag; scramp's
        # client can do neither, so the client side is computed by hand here.
        secret = scram_secret("s3cret", iterations=1000)     # below scramp's minimum
        auth = ClientAuthenticator("scram-sha-256", "alice", secret, mock_seed=SEED)
        auth.start()
        nonce = b"libpqnonce"
        _, sf = auth_request(auth.feed(sasl_initial(b"y,,n=,r=" + nonce)))
        salted = hashlib.pbkdf2_hmac("sha256", b"s3cret", SALT, 1000)
        ck = hmac.new(salted, b"Client Key", "sha256").digest()
        sk = hmac.new(salted, b"Server Key", "sha256").digest()
        without_proof = b"c=eSws,r=" + sf.split(b",")[0][2:]
        am = b"n=,r=" + nonce + b"," + sf + b"," + without_proof
        sig = hmac.new(hashlib.sha256(ck).digest(), am, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(ck, sig))
        _, final = auth_request(auth.feed(without_proof + b",p=" + base64.b64encode(proof)))
        assert final == b"v=" + base64.b64encode(hmac.new(sk, am, "sha256").digest())
        assert auth.client_key == ck

    def test_extensions_are_ignored(self):
        auth = started_scram()
        code, _ = auth_request(auth.feed(sasl_initial(b"n,,n=,r=abc,x=ext")))
        assert code == messages.AUTH_SASL_CONTINUE


class TestMalformed:
    @pytest.mark.parametrize("payload", [
        b"SCRAM-SHA-256",                                     # mechanism not terminated
        b"SCRAM-SHA-1\0" + struct.pack("!i", 3) + b"abc",     # not offered
        b"SCRAM-SHA-256-PLUS\0" + struct.pack("!i", 3) + b"abc",
        b"SCRAM-SHA-256\0\0\0",                               # length cut short
        b"SCRAM-SHA-256\0" + struct.pack("!i", -2),
        b"SCRAM-SHA-256\0" + struct.pack("!i", 50) + b"n,,n=,r=abc",   # length too big
        b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"n,,n=,r=abc",    # trailing bytes
        b"SCRAM-SHA-256\0" + struct.pack("!i", -1) + b"x",
        sasl_initial(b""),                                    # empty SCRAM message
        sasl_initial(b"n,,n=,r=a\0b"),                        # NUL inside
        sasl_initial(b"p=tls-server-end-point,,n=,r=abc"),    # channel binding not offered
        sasl_initial(b"x,,n=,r=abc"),
        sasl_initial(b"n,n=,r=abc"),
        sasl_initial(b"n,,r=abc"),
        sasl_initial(b"n,,n=,r="),
        sasl_initial(b"n,,n=,r=ab\x01c"),                     # non-printable nonce
        sasl_initial(b"n,,n=,r=abc,1=x"),
    ])
    def test_bad_initial_response_is_a_protocol_violation(self, payload):
        auth = started_scram()
        expect(ClientProtocolError, "08P01", auth.feed, payload)
        expect(ClientProtocolError, "08P01", auth.feed, sasl_initial(b"n,,n=,r=abc"))  # failed: stays so

    @pytest.mark.parametrize("payload", [sasl_initial(b"n,a=bob,n=,r=abc"), sasl_initial(b"n,,m=x,n=,r=abc")])
    def test_unsupported_scram_features(self, payload):
        expect(ClientProtocolError, "0A000", started_scram().feed, payload)

    def test_final_nonce_must_extend_the_server_nonce(self):
        # PostgreSQL answers this with 08P01 "invalid SCRAM response" (auth-scram.c), not 28P01.
        auth, nonce = after_client_first()
        proof = base64.b64encode(bytes(32))
        wrong = nonce[:3] + (b"Y" if nonce[3:4] == b"X" else b"X") + nonce[4:]   # differs in one byte
        err = expect(ClientProtocolError, "08P01", auth.feed, b"c=biws,r=" + wrong + b",p=" + proof)
        assert err.detail == "Nonce does not match."
        auth, nonce = after_client_first()
        expect(ClientProtocolError, "08P01", auth.feed, b"c=biws,r=abc,p=" + proof)

    @pytest.mark.parametrize("tail", [
        b",p=" + base64.b64encode(bytes(31)),       # proof of the wrong length
        b",p=not*base64",
        b",p=" + base64.b64encode(bytes(32)) + b",x=garbage",
        b"",                                        # no proof
        b",1=x,p=" + base64.b64encode(bytes(32)),
    ])
    def test_bad_client_final(self, tail):
        auth, nonce = after_client_first()
        expect(ClientProtocolError, "08P01", auth.feed, b"c=biws,r=" + nonce + tail)

    @pytest.mark.parametrize("gs2, cbind", [(b"n,,", b"eSws"), (b"y,,", b"biws"), (b"n,,", b"xxxx")])
    def test_channel_binding_must_repeat_the_header(self, gs2, cbind):
        auth, nonce = after_client_first(gs2)
        proof = base64.b64encode(bytes(32))
        expect(ClientProtocolError, "08P01", auth.feed, b"c=" + cbind + b",r=" + nonce + b",p=" + proof)

    def test_right_shape_wrong_proof_is_28P01(self):
        auth, nonce = after_client_first()
        err = expect(AuthenticationFailed, "28P01", auth.feed,
                     b"c=biws,r=" + nonce + b",p=" + base64.b64encode(bytes(32)))
        assert "proof" in err.reason

    @pytest.mark.parametrize("payload", [b"", b"pw", b"pw\0x", b"p\0w\0"])
    def test_bad_password_packet(self, payload):
        auth = ClientAuthenticator("password", "alice", parse_secret("pw"), mock_seed=SEED)
        auth.start()
        expect(ClientProtocolError, "08P01", auth.feed, payload)

    @pytest.mark.parametrize("method", ["password", "md5"])
    def test_empty_password_is_28P01(self, method):
        auth = ClientAuthenticator(method, "alice", parse_secret("pw"), mock_seed=SEED)
        auth.start()
        err = expect(AuthenticationFailed, "28P01", auth.feed, b"\0")
        assert err.reason == "empty password returned by client"

    def test_size_caps(self):
        auth = ClientAuthenticator("password", "alice", parse_secret("pw"), mock_seed=SEED)
        auth.start()
        expect(ClientProtocolError, "08P01", auth.feed, b"x" * 65535 + b"\0")
        auth = started_scram()
        assert auth.max_payload == 1024
        expect(ClientProtocolError, "08P01", auth.feed, sasl_initial(b"n,,n=,r=" + b"a" * 1010))

    def test_feed_before_start_or_after_done(self):
        auth = ClientAuthenticator("password", "alice", parse_secret("pw"), mock_seed=SEED)
        expect(ClientProtocolError, "08P01", auth.feed, b"pw\0")
        auth.start()
        auth.feed(b"pw\0")
        expect(ClientProtocolError, "08P01", auth.feed, b"pw\0")


def _fresh(method: str, kind: str | None) -> ClientAuthenticator:
    secret = {"plain": parse_secret("pw"), "md5": md5_secret_of("pw", "u"),
              "scram": scram_secret("pw", salt=SALT)}.get(kind)
    auth = ClientAuthenticator(method, "u", secret, mock_seed=SEED)
    auth.start()
    return auth


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(method=st.sampled_from(["password", "md5", "scram-sha-256"]),
           kind=st.sampled_from([None, "plain", "md5", "scram"]),
           payloads=st.lists(st.binary(max_size=200), min_size=1, max_size=3))
    def test_random_bytes_raise_only_pgmp_errors(self, method, kind, payloads):
        auth = _fresh(method, kind)
        for payload in payloads:
            try:
                auth.feed(payload)
            except PgmpError:
                return

    @settings(max_examples=300, deadline=None)
    @given(kind=st.sampled_from([None, "plain", "md5", "scram"]),
           final=st.one_of(st.binary(max_size=200),
                           st.builds(lambda a, b: b"c=biws,r=" + a + b",p=" + b,
                                     st.binary(max_size=60), st.binary(max_size=60))))
    def test_random_client_final_raises_only_pgmp_errors(self, kind, final):
        auth = _fresh("scram-sha-256", kind)
        auth.feed(sasl_initial(b"n,,n=,r=abc"))
        try:
            auth.feed(final)
        except PgmpError:
            pass
        else:
            pytest.fail("a random client-final was accepted")

    @settings(max_examples=200, deadline=None)
    @given(first=st.binary(max_size=120))
    def test_random_client_first(self, first):
        auth = _fresh("scram-sha-256", "scram")
        try:
            auth.feed(sasl_initial(first))
        except PgmpError:
            pass


# ---- pgmp authenticating itself to servers --------------------------------------------

def scramp_server(password: str, iterations: int = 4096, salt: bytes = SALT):
    m = ScramMechanism("SCRAM-SHA-256")
    auth_info = m.make_auth_info(password, iteration_count=iterations, salt=salt)
    return m.make_server(lambda username: auth_info)


def scram_to_scramp(auth: ServerAuthenticator, server) -> None:
    """Run pgmp's SCRAM client against scramp's ScramServer, frame by frame."""
    out = auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    mech, first = messages.parse_sasl_initial(p_payload(out))
    assert mech == "SCRAM-SHA-256" and first.startswith(b"n,,n=")
    server.set_client_first(first.decode())
    final = auth.feed(messages.AUTH_SASL_CONTINUE, server.get_server_first().encode())
    try:
        server.set_client_final(p_payload(final).decode())
    except ScramException:
        pass                                      # get_server_final then answers e=...
    assert auth.feed(messages.AUTH_SASL_FINAL, server.get_server_final().encode()) == b""
    assert auth.feed(messages.AUTH_OK, b"") == b""


class TestServerAuthenticator:
    def test_cleartext(self):
        out = ServerAuthenticator("app", password="pw").feed(messages.AUTH_CLEARTEXT, b"")
        assert p_payload(out) == b"pw\0"
        out = ServerAuthenticator("app", secret=parse_secret("filepw")).feed(messages.AUTH_CLEARTEXT, b"")
        assert p_payload(out) == b"filepw\0"

    @pytest.mark.parametrize("secret", [None, md5_secret_of("pw", "app"), scram_secret("pw")])
    def test_cleartext_without_a_password(self, secret):
        auth = ServerAuthenticator("app", secret=secret, database="appdb")
        err = expect(ServerAuthError, "28000", auth.feed, messages.AUTH_CLEARTEXT, b"")
        assert 'cleartext password authentication for user "app"' in err.message
        assert "[databases.appdb]" in err.message and "auth_file" in err.message

    def test_md5(self):
        salt = b"\x01\x02\xff\x04"
        expected = md5_answer_bytes("pw", "app", salt)
        assert p_payload(ServerAuthenticator("app", password="pw").feed(messages.AUTH_MD5, salt)) == expected
        # an md5 auth_file secret answers without the password
        by_hash = ServerAuthenticator("app", secret=md5_secret_of("pw", "app"))
        assert p_payload(by_hash.feed(messages.AUTH_MD5, salt)) == expected

    def test_md5_without_a_usable_credential(self):
        auth = ServerAuthenticator("x", secret=scram_secret("pw"), database="appdb")
        err = expect(ServerAuthError, "28000", auth.feed, messages.AUTH_MD5, b"salt")
        assert err.message.startswith('server asked for md5 password authentication for user "x" but '
                                      "pgmp has only a SCRAM secret for it: set password in "
                                      "[databases.appdb] or add the user to auth_file")
        expect(ServerAuthError, "08006", ServerAuthenticator("x", password="pw").feed,
               messages.AUTH_MD5, b"abc")

    def test_scram_with_password_against_scramp(self):
        auth = ServerAuthenticator("app", password="s3cret")
        scram_to_scramp(auth, scramp_server("s3cret"))

    def test_scram_with_wrong_password(self):
        auth = ServerAuthenticator("app", password="wrong")
        with pytest.raises(ServerAuthError, match="rejected SCRAM.*invalid-proof"):
            scram_to_scramp(auth, scramp_server("s3cret"))

    def test_scram_low_iteration_count(self):
        # PostgreSQL 16+ allows scram_iterations below 4096; pgmp's client must follow.
        secret = scram_secret("pw", iterations=1000)
        client = ClientAuthenticator("scram-sha-256", "app", secret, mock_seed=SEED)
        server = ServerAuthenticator("app", password="pw")
        code, data = auth_request(client.start())
        out = server.feed(code, data)
        while not client.done:
            code, data = auth_request(client.feed(p_payload(out)))
            out = server.feed(code, data)
        assert server.feed(messages.AUTH_OK, b"") == b""

    def test_wrong_server_signature(self):
        auth = ServerAuthenticator("app", password="s3cret")
        server = scramp_server("s3cret")
        out = auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        server.set_client_first(messages.parse_sasl_initial(p_payload(out))[1].decode())
        server.set_client_final(p_payload(auth.feed(messages.AUTH_SASL_CONTINUE,
                                                    server.get_server_first().encode())).decode())
        bogus = b"v=" + base64.b64encode(bytes(32))
        err = expect(ServerAuthError, "08006", auth.feed, messages.AUTH_SASL_FINAL, bogus)
        assert "signature" in err.message

    def test_ok_before_scram_final_is_refused(self):
        auth = ServerAuthenticator("app", password="s3cret")
        auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        expect(ServerAuthError, "08006", auth.feed, messages.AUTH_OK, b"")
        # without SCRAM, OK needs nothing
        assert ServerAuthenticator("app", password="pw").feed(messages.AUTH_OK, b"") == b""

    def test_scram_keys_from_a_client_login(self):
        # The path pgmp takes with only a SCRAM secret: a client logs in, pgmp keeps the ClientKey
        # from its proof and logs into PostgreSQL (here scramp's server) with the same secret.
        secret = scram_secret("s3cret", iterations=4096)
        client_side = ClientAuthenticator("scram-sha-256", "app", secret, mock_seed=SEED)
        scramp_login(client_side, "s3cret")
        assert client_side.client_key is not None
        auth = ServerAuthenticator("app", scram_keys=(client_side.client_key, secret.server_key),
                                   secret=secret)
        server = ScramMechanism("SCRAM-SHA-256").make_server(
            lambda username: (secret.salt, secret.stored_key, secret.server_key, secret.iterations))
        scram_to_scramp(auth, server)

    def test_scram_keys_with_a_changed_server_secret(self):
        secret = scram_secret("s3cret")
        client_key = scram_keys(b"s3cret", SALT, 4096)[0]
        auth = ServerAuthenticator("app", scram_keys=(client_key, secret.server_key), secret=secret,
                                   database="appdb")
        server = scramp_server("s3cret", salt=b"another-salt-16b")
        out = auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        server.set_client_first(messages.parse_sasl_initial(p_payload(out))[1].decode())
        err = expect(ServerAuthError, "28000", auth.feed, messages.AUTH_SASL_CONTINUE,
                     server.get_server_first().encode())
        assert "does not match auth_file" in err.message

    def test_scram_without_credentials(self):
        err = expect(ServerAuthError, "28000", ServerAuthenticator("app", secret=scram_secret("x")).feed,
                     messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        assert "client key" in err.message
        expect(ServerAuthError, "28000", ServerAuthenticator("app").feed,
               messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")

    def test_only_channel_binding_offered(self):
        err = expect(ServerAuthError, "08006", ServerAuthenticator("app", password="pw").feed,
                     messages.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0\0")
        assert "channel binding" in err.message

    @pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 42])
    def test_unsupported_methods(self, code):
        err = expect(ServerAuthError, "08006", ServerAuthenticator("app", password="pw").feed, code, b"")
        assert 'user "app"' in err.message or "unknown" in err.message

    def test_rfc7677_vector(self, monkeypatch):
        monkeypatch.setattr(server_mod, "_new_nonce", lambda: b"rOprNGfwEbeRWgbNEkqO")
        auth = ServerAuthenticator("user", password="pencil")
        out = auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        assert messages.parse_sasl_initial(p_payload(out)) == ("SCRAM-SHA-256",
                                                               b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        out = auth.feed(messages.AUTH_SASL_CONTINUE,
                        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
        assert p_payload(out) == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                                  b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        assert auth.feed(messages.AUTH_SASL_FINAL,
                         b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") == b""

    @pytest.mark.parametrize("server_first", [
        b"r=XXXX,s=c2FsdHNhbHRzYWx0,i=4096",            # nonce does not extend ours
        b"r={n},s=c2FsdHNhbHRzYWx0,i=4096",             # nonce not longer than ours
        b"r={n}x,i=4096",                               # no salt
        b"r={n}x,s=***,i=4096",
        b"r={n}x,s=c2FsdHNhbHRzYWx0,i=0",
        b"r={n}x,s=c2FsdHNhbHRzYWx0,i=99999999999",
        b"r={n}x,s=c2FsdHNhbHRzYWx0,i=-1",
        b"m=ext,r={n}x,s=c2FsdHNhbHRzYWx0,i=4096",
        b"garbage",
        b"",
    ])
    def test_malformed_server_first(self, monkeypatch, server_first):
        monkeypatch.setattr(server_mod, "_new_nonce", lambda: b"NONCE")
        auth = ServerAuthenticator("app", password="pw")
        auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        expect(ServerAuthError, "08006", auth.feed, messages.AUTH_SASL_CONTINUE,
               server_first.replace(b"{n}", b"NONCE"))

    def test_out_of_order_sasl_messages(self):
        auth = ServerAuthenticator("app", password="pw")
        expect(ServerAuthError, "08006", auth.feed, messages.AUTH_SASL_CONTINUE, b"r=x,s=eA==,i=1")
        expect(ServerAuthError, "08006", auth.feed, messages.AUTH_SASL_FINAL, b"v=eA==")

    @settings(max_examples=200, deadline=None)
    @given(code=st.sampled_from([3, 5, 10, 11, 12]), data=st.binary(max_size=100))
    def test_random_server_messages_raise_only_pgmp_errors(self, code, data):
        auth = ServerAuthenticator("app", password="pw")
        if code in (11, 12):
            auth.feed(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        try:
            auth.feed(code, data)
        except PgmpError:
            pass


class TestMockProfile:
    """What an unknown user is shown is chosen from the users pgmp knows (user enumeration)."""

    def test_unknown_user_under_md5_runs_scram_by_default(self):
        auth = ClientAuthenticator("md5", "nobody", None, mock_seed=SEED)
        code, _ = auth_request(auth.start())
        assert code == messages.AUTH_SASL and auth.exchange == "scram-sha-256"

    def test_profile_follows_the_known_secrets(self):
        from pgmp.auth.client import mock_profile
        scram = {f"s{i}": scram_secret("pw", iterations=8192) for i in range(3)}
        md5 = {f"m{i}": parse_secret("md5" + md5_of(f"pw{i}")) for i in range(2)}
        profile = mock_profile({**scram, **md5, "odd": scram_secret("pw", iterations=4096)}, b"material")
        assert profile.iterations == 8192 and profile.md5 is False
        assert mock_profile({**md5, "p": parse_secret("plain")}, b"material").md5 is True
        empty = mock_profile({}, b"material")
        assert empty.iterations == 4096 and empty.md5 is False
        # the seed is a keyed hash of the material: stable for the same material, else different
        assert empty.seed == mock_profile({}, b"material").seed != mock_profile({}, b"other").seed
        assert b"material" not in empty.seed and "seed" not in repr(empty)


class TestDeferredDerivation:
    """defer=True: the PBKDF2 of a cleartext check is left to the caller (a thread), not run in feed()."""

    def run(self, secret, answer: bytes, user: str = "alice"):
        from pgmp.auth.authfile import scram_keys
        auth = ClientAuthenticator("password", user, secret, mock_seed=SEED, defer=True)
        auth.start()
        assert auth.feed(answer + b"\0") == b"" and not auth.done
        assert auth.pending is not None
        # nothing else may come from the client meanwhile
        expect(ClientProtocolError, "08P01", auth.feed, b"more\0")
        return auth, scram_keys(*auth.pending)

    def test_right_password(self):
        auth, keys = self.run(scram_secret("s3cret"), b"s3cret")
        assert auth.derived(keys) == b"" and auth.done and auth.password == "s3cret"
        assert auth.pending is None

    def test_wrong_password(self):
        auth, keys = self.run(scram_secret("s3cret"), b"nope")
        expect(AuthenticationFailed, "28P01", auth.derived, keys)

    def test_unknown_user_costs_a_derivation_too(self):
        auth, keys = self.run(None, b"anything", user="nobody")
        err = expect(AuthenticationFailed, "28P01", auth.derived, keys)
        assert "does not exist" in err.reason

    def test_plain_and_md5_secrets_need_no_derivation(self):
        for kind in ("plain", "md5"):
            auth = ClientAuthenticator("password", "alice", SECRETS[kind](), mock_seed=SEED, defer=True)
            auth.start()
            assert auth.feed(b"s3cret\0") == b"" and auth.done and auth.pending is None
