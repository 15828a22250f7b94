"""Fuzz the auth_file parser: pgmp/auth/authfile.py load_auth_file and parse_secret.

Input: the file's bytes (read through load_auth_file, UTF-8 check included).

Documented errors: AuthFileError. Invariants: user names are non-empty and unique; each
secret's kind follows PostgreSQL's rules (SCRAM prefix -> scram with a positive
iteration count, a salt and 32-byte keys; md5 + 32 lowercase hex -> md5; else plain)
and its raw text is kept; repr() and str() of a secret never show it; the text written
back in the file's quoting parses to the same users and secrets.
"""
import os
import tempfile

from pgmp.auth.authfile import SCRAM_PREFIX, AuthFileError, load_auth_file, parse_auth_file
from tests.fuzz.harnesses._common import check

MAX_LEN = 4096
_PATH = os.path.join(tempfile.mkdtemp(prefix="pgmp-fuzz-authfile-"), "userlist.txt")
_HEX = frozenset("0123456789abcdef")


def _quote(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        users = load_auth_file(_PATH)
    except AuthFileError as exc:
        check(str(exc).startswith(_PATH), f"AuthFileError without the file's name: {exc}")
        return
    for user, secret in users.items():
        check(user != "", "an empty user name was accepted")
        value = secret.value
        if value.startswith(SCRAM_PREFIX):
            check(secret.kind == "scram" and secret.iterations >= 1 and secret.salt
                  and len(secret.stored_key) == 32 and len(secret.server_key) == 32, f"bad SCRAM secret {secret!r}")
        elif len(value) == 35 and value.startswith("md5") and set(value[3:]) <= _HEX:
            check(secret.kind == "md5", f"an md5 hash taken as {secret.kind}")
        else:
            check(secret.kind == "plain", f"a plaintext password taken as {secret.kind}")
        for shown in (repr(secret), str(secret)):
            check(len(value) < 6 or value not in shown, "repr() of a secret shows it")
    if all("\n" not in u and "\r" not in u and "\n" not in s.value for u, s in users.items()):
        text = "".join(f"{_quote(u)} {_quote(s.value)}\n" for u, s in users.items())
        again = parse_auth_file(text, _PATH)
        check({u: s.value for u, s in again.items()} == {u: s.value for u, s in users.items()},
              "users written back in auth_file quoting parse differently")
