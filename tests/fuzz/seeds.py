"""Write the seeds that do not come from recorded sessions: the repo's example files and inputs built for each harness's layout.

    python -m tests.fuzz.seeds [--out tests/fuzz/corpus]

hba, auth_file and config seeds come from the files and strings in the repository
(README and man page examples, the test cluster's pg_hba.conf, the unit tests' texts,
the test harness's generated configs and auth files); startup seeds from the message
builders; client_auth and server_auth seeds walk each honest exchange of their harness
(every method, credential, gs2 header). Real captures come from tests/fuzz/record.py.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

from tests.fuzz.record import OUT_DIR, write_seeds

REPO = Path(__file__).resolve().parents[2]


def _strings_in(path: Path, must: str) -> list[str]:
    """String constants of a Python file that contain ``must``."""
    tree = ast.parse(path.read_text())
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and must in n.value]


def config_seeds() -> list[bytes]:
    from tests.support.proxy import toml_table
    out = []
    readme = (REPO / "README.md").read_text()
    out += [m.encode() for m in re.findall(r"```toml\n(.*?)```", readme, re.S)]
    man = (REPO / "man" / "pgmp.toml.5").read_text()
    out += [m.encode() for m in re.findall(r"\.SH EXAMPLE\n\.nf\n(.*?)\.fi", man, re.S)]
    out += [s.encode() for s in _strings_in(REPO / "tests" / "unit" / "test_config.py", "[")]
    out.append((toml_table("pgmp", {"listen_addr": "127.0.0.1", "listen_port": 6432, "auth_type": "md5",
                                    "auth_file": "users.txt", "pool_mode": "transaction", "workers": 2,
                                    "server_tls_mode": "prefer", "query_timeout": "30s",
                                    "max_message_size": "64MB", "track_extra_parameters": ["search_path"],
                                    "auth_user": "pgmp_auth", "auth_query": "SELECT 1"})
                + toml_table('databases."*"', {"host": "/run/postgresql", "port": 5432})
                + toml_table("databases.appdb", {"host": "127.0.0.1", "dbname": "app", "pool_size": 5})
                + toml_table("users.report", {"pool_mode": "session"})).encode())
    return out


def hba_seeds() -> list[bytes]:
    from tests.support.cluster import HBA
    out = [HBA.encode()]
    out += [s.encode() for s in _strings_in(REPO / "tests" / "unit" / "test_hba.py", " all ")]
    out.append(b"# TYPE DATABASE USER ADDRESS METHOD\nlocal all postgres trust\n"
               b"host \"app db\",sameuser +admins,@users 192.168.0.0 255.255.0.0 md5\n"
               b"hostssl all all ::/0 cert clientcert=verify-full map=certs\n"
               b"hostnossl replication all 0.0.0.0/0 reject\n"
               b"host all all 10.0.0.1/32 \\\n    scram-sha-256\n")
    return out


def authfile_seeds() -> list[bytes]:
    from tests.support.proxy import userlist
    out = [userlist({"scram_user": "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$"
                                   "Q0xJRU5US0VZQ0xJRU5US0VZQ0xJRU5US0VZQ0xJRU4=:"
                                   "U0VSVkVSS0VZU0VSVkVSS0VZU0VSVkVSS0VZU0VSVkU=",
                     "md5_user": "md5" + "0123456789abcdef" * 2, "plain_user": "plain_pass",
                     'quo"ted': 'pa"ss', "empty": ""}).encode(),
           b'; comment\n# another\n\n  "alice"   "secret"  extra fields\n"bob" "md5d41d8cd98f00b204e9800998ecf8427e"\n']
    out += [s.encode() for s in _strings_in(REPO / "tests" / "unit" / "test_auth.py", '" "')]
    return out


def startup_seeds() -> list[bytes]:
    from pgmp.protocol import messages
    sm = messages.startup_message
    return [sm({"user": "alice", "database": "appdb"}),
            messages.ssl_request() + sm({"user": "bob", "options": r"-c search_path=a,b --work_mem=4MB -cx.y=1\ 2"}),
            sm({"user": "u", "replication": "false", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
                "_pq_.compression": "on", "role": "r", "session_authorization": "s"}),
            messages.cancel_request(1234, 5678),
            (8).to_bytes(4, "big") + messages.GSSENC_REQUEST_CODE.to_bytes(4, "big") + sm({"user": "g"})]


def client_auth_seeds() -> list[bytes]:
    out = []
    for method in range(1, 4):
        for secret in range(5):
            for cb in (0, 1):
                for gs2 in (0, 1, 2):
                    plus = (0,) if gs2 == 2 else ()
                    # method, secret, channel binding, mock iterations, knows the password,
                    # gs2 header, [PLUS], split initial response, then honest steps
                    out.append(bytes([method, secret, cb, 1, 1, gs2, *plus, 1]) + bytes(6))
    out.append(bytes([3, 3, 0, 1, 1, 0, 0]) + bytes(6))     # client-first in its own message
    return out


def server_auth_seeds() -> list[bytes]:
    out = []
    for credential in range(5):
        for knows in (0, 1):
            # script mode, credential, fake server's password knowledge, salt, iterations, honest steps
            out.append(bytes([0, credential, knows, 1, 1]) + bytes(10))
        out.append(bytes([0, credential, 1, 1, 1, 4, 0, 4, 0, 0, 0, 0]))   # asks for cleartext/md5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    seeds = {"config": config_seeds(), "hba": hba_seeds(), "authfile": authfile_seeds(),
             "startup": startup_seeds(), "client_auth": client_auth_seeds(), "server_auth": server_auth_seeds()}
    written = write_seeds(seeds, args.out, cap=200)
    print("new seeds: " + ", ".join(f"{h} {n}" for h, n in written.items()))


if __name__ == "__main__":
    main()
