"""Record real client sessions (psql, pgbench, psycopg 3, asyncpg) against PostgreSQL and write them as seed corpora.

    python -m tests.fuzz.record [--out tests/fuzz/corpus]

Starts a throwaway cluster (tests/support/cluster.py) and a recording TCP relay in
front of it, runs each client through the relay as the three test users (SCRAM, md5 and
cleartext logins), and cuts the byte streams it saw into seed files for each harness:
the client's first packets (startup), its frames (frontend, sql, scan), the server's
frames (messages, server_auth, scan, scanner) and both interleaved (link). Seeds are
named by their content's hash, so recording again only adds what is new. Needs the
PostgreSQL binaries and psql/pgbench (scripts/setup-env installs them).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

from tests.support.cluster import Cluster, become_subreaper, start_cluster, stop_cluster

OUT_DIR = Path(__file__).resolve().parent / "corpus"
SEED_MAX = 4096                    # bytes per seed (most harnesses' MAX_LEN)
PER_SESSION = 4                    # seeds per harness taken from one session at most

PSQL_SCRIPT = r"""
SELECT 1 AS one, 'two' AS two, NULL AS three;
BEGIN;
SET LOCAL work_mem = '8MB';
SET search_path = public, pg_catalog;
SAVEPOINT s1;
SELECT 1/0;
ROLLBACK TO SAVEPOINT s1;
COMMIT;
CREATE TEMP TABLE t (id int PRIMARY KEY, name text, data bytea);
INSERT INTO t SELECT g, 'name ' || g, '\x0102'::bytea FROM generate_series(1, 20) g;
COPY t TO STDOUT;
COPY t (id, name) FROM STDIN;
100	hundred
101	hundred and one
\.
\copy t to stdout with (format csv)
PREPARE p(int) AS SELECT * FROM t WHERE id = $1;
EXECUTE p(3);
DEALLOCATE p;
DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t;
FETCH 2 FROM c;
CLOSE c;
LISTEN chan;
NOTIFY chan, 'payload';
UNLISTEN *;
DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$;
SELECT pg_advisory_lock(1), pg_advisory_unlock(1);
SELECT set_config('myapp.x', 'y', false);
SET TIME ZONE 'UTC'; SET datestyle = ISO, DMY; RESET ALL;
SELECT $1::int + 1 AS p \bind 41 \g
\d t
SHOW server_version;
DISCARD ALL;
"""


class Recorder:
    """A TCP relay to PostgreSQL that keeps each connection's chunks, in the order they passed."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions: list[tuple[str, list[tuple[str, bytes]]]] = []
        self.label = "?"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            chunks: list[tuple[str, bytes]] = []
            with self._lock:
                self.sessions.append((self.label, chunks))
            for src, dst, direction in ((client, server, "C"), (server, client, "S")):
                t = threading.Thread(target=self._pump, args=(src, dst, direction, chunks), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, chunks: list) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    chunks.append((direction, data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for t in self._threads:
            t.join(timeout=10)


# ---- the clients ---------------------------------------------------------------------------

def _libpq_env(cluster: Cluster, port: int, user: str) -> dict:
    return {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": user,
            "PGPASSWORD": cluster.passwords[user], "PGDATABASE": "appdb", "PGSSLMODE": "disable",
            "PGGSSENCMODE": "disable", "PGAPPNAME": "pgmp-record"}


def run_psql(cluster: Cluster, rec: Recorder, user: str) -> None:
    psql = Path(cluster.bin_dir) / "psql"
    subprocess.run([psql, "-X", "-q", "-f", "-"], input=PSQL_SCRIPT, text=True, capture_output=True,
                   env=_libpq_env(cluster, rec.port, user), timeout=60)


def run_pgbench(cluster: Cluster, rec: Recorder, user: str) -> None:
    pgbench = Path(cluster.bin_dir) / "pgbench"
    env = _libpq_env(cluster, rec.port, user)
    subprocess.run([pgbench, "-i", "-s", "1", "-q", "appdb"], env=env, capture_output=True, timeout=120)
    for mode in ("simple", "extended", "prepared"):
        subprocess.run([pgbench, "-n", "-t", "15", "-M", mode, "appdb"], env=env, capture_output=True, timeout=120)


def run_psycopg(cluster: Cluster, rec: Recorder, user: str) -> None:
    import psycopg
    dsn = f"host=127.0.0.1 port={rec.port} user={user} password={cluster.passwords[user]} dbname=appdb " \
          "sslmode=disable gssencmode=disable application_name=pgmp-record options='-c work_mem=4MB'"
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE items (id int, label text, price numeric, seen timestamptz)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s, %s, now())",
                            [(i, f"item {i}", i * 1.5) for i in range(10)])
            cur.execute("SELECT * FROM items WHERE id > %s ORDER BY id", (3,), prepare=True)
            cur.fetchall()
            cur.execute("SELECT * FROM items WHERE id > %s ORDER BY id", (5,), prepare=True)
            cur.fetchall()
            cur.execute("SELECT %b::bytea, %t::text", (b"\x00\x01binary", "text"), binary=True)
            cur.fetchall()
            with cur.copy("COPY items (id, label) FROM STDIN") as copy:
                for i in range(5):
                    copy.write_row((100 + i, f"copied {i}"))
            with cur.copy("COPY items TO STDOUT") as copy:
                for _ in copy:
                    pass
            try:
                cur.execute("SELECT * FROM no_such_table")
            except psycopg.Error:
                conn.rollback()
        with conn.pipeline():
            for i in range(3):
                conn.execute("SELECT %s::int * 2", (i,))
            conn.execute("SET application_name = 'piped'")
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '5s'")
            with conn.transaction():
                conn.execute("SELECT 1")
        with conn.cursor(name="server_side") as cur:
            cur.execute("SELECT generate_series(1, 50)")
            cur.fetchmany(10)
        conn.execute("LISTEN psycopg_chan")
        conn.execute("NOTIFY psycopg_chan, 'hi'")


def run_asyncpg(cluster: Cluster, rec: Recorder, user: str) -> None:
    import asyncpg

    async def session():
        conn = await asyncpg.connect(host="127.0.0.1", port=rec.port, user=user, ssl=False,
                                     password=cluster.passwords[user], database="appdb",
                                     server_settings={"application_name": "pgmp-record", "search_path": "public"})
        try:
            await conn.execute("CREATE TEMP TABLE rows (id int, payload jsonb, at timestamptz DEFAULT now())")
            await conn.executemany("INSERT INTO rows (id, payload) VALUES ($1, $2)",
                                   [(i, '{"k": %d}' % i) for i in range(10)])
            stmt = await conn.prepare("SELECT id, payload FROM rows WHERE id < $1")
            await stmt.fetch(5)
            await conn.fetchrow("SELECT $1::text || $2::text", "a", "b")
            await conn.copy_records_to_table("rows", records=[(50, '{}', None)], columns=["id", "payload", "at"])
            async with conn.transaction():
                await conn.execute("SET LOCAL work_mem = '2MB'")
                async for _ in conn.cursor("SELECT generate_series(1, 30)", prefetch=10):
                    pass
            try:
                await conn.fetch("SELECT 1/0")
            except asyncpg.PostgresError:
                pass
            await conn.execute("SELECT pg_advisory_lock(7); SELECT pg_advisory_unlock(7)")
        finally:
            await conn.close()

    asyncio.run(session())


CLIENTS = {"psql": run_psql, "pgbench": run_pgbench, "psycopg": run_psycopg, "asyncpg": run_asyncpg}
USERS = ("scram_user", "md5_user", "plain_user")


def record_sessions(cluster: Cluster) -> list[tuple[str, list[tuple[str, bytes]]]]:
    cluster.psql("GRANT CREATE ON DATABASE appdb TO scram_user, md5_user, plain_user;"
                 "ALTER DATABASE appdb OWNER TO scram_user")
    rec = Recorder((cluster.host, cluster.port))
    try:
        for client, run in CLIENTS.items():
            for user in USERS:
                if client == "pgbench" and user != "scram_user":
                    continue          # one pgbench run is plenty (its init owns the tables)
                rec.label = f"{client}-{user}"
                run(cluster, rec, user)
    finally:
        rec.close()
    return rec.sessions


# ---- cutting sessions into seeds ---------------------------------------------------------

def startup_length(stream: bytes) -> int:
    """Bytes of the startup slot: SSLRequest/GSSENCRequest (answered 'N') and the StartupMessage."""
    pos = 0
    while len(stream) - pos >= 8:
        length, code = struct.unpack_from("!Ii", stream, pos)
        pos += length
        if code not in (80877103, 80877104):
            break
    return pos


def split_frames(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while len(stream) - pos >= 5:
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        if length < 4 or pos + 1 + length > len(stream):
            break
        out.append(stream[pos:pos + 1 + length])
        pos += 1 + length
    return out


def pieces(items: list[bytes], limit: int = SEED_MAX, count: int = PER_SESSION, head: bytes = b"") -> list[bytes]:
    """Runs of consecutive items (frames or records) of at most ``limit`` bytes, spread over the session."""
    runs, cur = [], head
    for item in items:
        if len(cur) + len(item) > limit and cur != head:
            runs.append(cur)
            cur = head
        if len(head) + len(item) <= limit:
            cur += item
    if cur != head:
        runs.append(cur)
    if len(runs) <= count:
        return runs
    step = len(runs) / count
    return [runs[int(i * step)] for i in range(count)]


def seeds_of(label: str, chunks: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    client = b"".join(d for k, d in chunks if k == "C")
    server = b"".join(d for k, d in chunks if k == "S")
    n_start = startup_length(client)
    # the server answers an SSLRequest with one byte ('N'), not a frame
    server_frames_at = 1 if server[:1] == b"N" else 0
    client_frames = split_frames(client[n_start:])
    server_frames = split_frames(server[server_frames_at:])
    login_end = next((i + 1 for i, f in enumerate(server_frames) if f[:1] == b"Z"), len(server_frames))
    out: dict[str, list[bytes]] = {h: [] for h in ("startup", "frontend", "sql", "messages", "server_auth",
                                                   "client_auth", "link", "scan", "scanner")}
    out["startup"].append(client[:n_start])
    out["frontend"] += pieces(client_frames)
    for f in client_frames:
        if f[:1] == b"Q":
            out["sql"].append(f[5:])
        elif f[:1] == b"P":
            text = f[5:]
            start = text.find(b"\0") + 1
            out["sql"].append(text[start:text.find(b"\0", start)])
    out["messages"] += pieces(server_frames)
    # server_auth "stream" inputs: mode 1, each credential kind, the fake server's 3 choice bytes
    login = b"".join(server_frames[:login_end])
    for credential in range(5):
        out["server_auth"].append(bytes([1, credential, 1, 1, 1]) + login)
    # client_auth: the client's real 'p' payloads as inputs' own payloads (choice 7)
    for f in client_frames:
        if f[:1] == b"p" and len(f) < 250:
            for method, secret in ((1, 0), (2, 0), (2, 2), (3, 0), (3, 3)):
                out["client_auth"].append(bytes([method, secret, 0, 1, 1, 0, 1, 7, len(f) - 5]) + f[5:])
    # link: the session after login, both directions interleaved as they passed
    records, seen_c, seen_s = [], 0, 0
    c_stream, s_stream = client[n_start:], server[server_frames_at:]
    c_done = s_done = 0
    for direction, data in chunks:
        if direction == "C":
            seen_c += len(data)
            upto = seen_c - n_start
            new = split_frames(c_stream[c_done:max(c_done, upto)])
            c_done += sum(map(len, new))
            records += [b"C" + f for f in new]
        else:
            seen_s += len(data)
            upto = seen_s - server_frames_at
            new = split_frames(s_stream[s_done:max(s_done, upto)])
            s_done += sum(map(len, new))
            records += [b"S" + f for f in new]
    first_ready = next((i + 1 for i, r in enumerate(records) if r[:2] == b"SZ"), 0)
    after_login = [r for r in records[first_ready:] if not (r[:2] == b"Cp")]
    for mode, limit in ((1, 3), (2, 1), (0, 0)):
        out["link"] += pieces(after_login, 8192, 2, head=bytes([mode, limit]))
    # scan: the client stream under the client's tables, the server's under the server's
    out["scan"] += pieces(client_frames, 16384, 2, head=bytes([1, 0, 0, 0, 8, 0, 0, 0, 0x10, 0]))
    out["scan"] += pieces(client_frames, 16384, 1, head=bytes([2, 0, 0, 0, 3, 0, 0, 0, 0x08, 0]))
    out["scan"] += pieces(server_frames, 16384, 2, head=bytes([4, 0, 0, 0, 8, 0, 0, 0, 0x20, 0]))
    out["scan"] += pieces(server_frames, 16384, 1, head=bytes([3, 0x40, 0, 0x40, 1, 0, 0, 0, 0x05, 0]))
    out["scanner"] += [p + b"\0\0" for p in pieces(server_frames, SEED_MAX, 1, head=bytes([4, 0, 0, 7]))]
    out["scanner"] += [p + b"\0\0" for p in pieces(client_frames, SEED_MAX, 1, head=bytes([2, 0, 0, 3]))]
    return out


def write_seeds(seeds: dict[str, list[bytes]], out_dir: Path, cap: int) -> dict[str, int]:
    """Write each seed as <out_dir>/<harness>/<sha1 prefix>; at most ``cap`` new files per harness."""
    written = {}
    for harness, items in seeds.items():
        d = out_dir / harness
        d.mkdir(parents=True, exist_ok=True)
        n = 0
        for data in dict.fromkeys(items):        # de-duplicated, in order
            if not data or n >= cap:
                continue
            path = d / hashlib.sha1(data).hexdigest()[:16]
            if not path.exists():
                path.write_bytes(data)
                n += 1
        written[harness] = n
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="corpus directory (default tests/fuzz/corpus)")
    parser.add_argument("--cap", type=int, default=40, help="new seeds per harness at most (default 40)")
    args = parser.parse_args()
    become_subreaper()
    base = Path(tempfile.mkdtemp(prefix="pgmp-record-"))
    base.chmod(0o711)
    try:
        cluster = start_cluster(base / "pg")
        sessions = record_sessions(cluster)
    finally:
        stop_cluster(base / "pg")
        shutil.rmtree(base, ignore_errors=True)
    merged: dict[str, list[bytes]] = {}
    # round-robin over sessions, so the cap keeps seeds of every client
    per_session = [seeds_of(label, chunks) for label, chunks in sessions if chunks]
    for harness in ("startup", "frontend", "sql", "messages", "server_auth", "client_auth", "link", "scan",
                    "scanner"):
        lists = [s[harness] for s in per_session]
        merged[harness] = [x for group in _interleave(lists) for x in group]
    written = write_seeds(merged, args.out, args.cap)
    print(f"recorded {len(sessions)} sessions ({', '.join(sorted({label for label, _ in sessions}))}); "
          "new seeds: " + ", ".join(f"{h} {n}" for h, n in written.items()))


def _interleave(lists):
    for i in range(max(map(len, lists), default=0)):
        yield [lst[i] for lst in lists if i < len(lst)]


if __name__ == "__main__":
    main()
