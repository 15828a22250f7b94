"""A throwaway PostgreSQL cluster with the test roles and databases: start, describe, stop; its standbys.

``start_cluster`` makes a primary (initdb); ``start_standby`` a streaming
standby of one (pg_basebackup -R over the primary's unix socket) on a port
of its own; ``promote`` and ``stop_cluster`` act on either, the postmaster
found by its pid.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .waiting import CommandFailed, free_port, process_alive, run, wait_for

SUPERUSER = "postgres"

# role -> (password, how PostgreSQL authenticates it over TCP)
TEST_USERS = {
    "scram_user": ("scram_pass", "scram-sha-256"),
    "md5_user": ("md5_pass", "md5"),
    "plain_user": ("plain_pass", "password"),
}
PASSWORDS = {user: password for user, (password, _) in TEST_USERS.items()}

SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    "max_prepared_transactions": "10",   # two-phase commit through pgmp (psycopg tpc_*)
    "password_encryption": "'scram-sha-256'",
    "log_connections": "on",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
    "ssl": "off",
}

HBA = """\
# written by the pgmp test harness
local all all trust
local replication all trust
host all md5_user 127.0.0.1/32 md5
host all plain_user 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
host all md5_user ::1/128 md5
host all plain_user ::1/128 password
host all all ::1/128 scram-sha-256
"""

SETUP_SQL = """\
CREATE ROLE scram_user LOGIN PASSWORD 'scram_pass';
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pass';
RESET password_encryption;
CREATE ROLE plain_user LOGIN PASSWORD 'plain_pass';
CREATE DATABASE appdb OWNER scram_user;
CREATE DATABASE otherdb;
\\connect appdb
GRANT ALL ON SCHEMA public TO scram_user, md5_user, plain_user;
\\connect otherdb
GRANT ALL ON SCHEMA public TO scram_user, md5_user, plain_user;
"""


@dataclass(repr=False)
class Cluster:
    """Where a running test cluster is and how to reach it (the `pg` fixture)."""

    host: str
    port: int
    socket_dir: str
    bin_dir: str
    datadir: str
    logfile: str
    passwords: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))
    # rolpassword as stored by PostgreSQL: "SCRAM-SHA-256$4096:..." or "md5..."
    secrets: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<test cluster {self.host}:{self.port} socket_dir={self.socket_dir}>"

    def dsn(self, user: str = "scram_user", password: str | None = None,
            dbname: str = "appdb", **params) -> str:
        """libpq conninfo for a direct TCP connection to the cluster."""
        if password is None:
            password = self.passwords.get(user)
        return conninfo(host=self.host, port=self.port, user=user,
                        password=password, dbname=dbname, **params)

    def psql(self, sql: str, user: str = SUPERUSER, db: str = "postgres",
             timeout: float = 30.0) -> str:
        """Run SQL (psql syntax, several statements allowed) over the unix socket.

        Returns unaligned, tuples-only stdout without its final newline; a
        failing statement raises CommandFailed.
        """
        result = run(
            [Path(self.bin_dir) / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", db, "-f", "-"],
            input=sql, timeout=timeout, env={"PGCONNECT_TIMEOUT": "10"},
        )
        return result.stdout.removesuffix("\n")

    def log(self) -> str:
        """The server log so far (log_connections is on)."""
        return Path(self.logfile).read_text(errors="replace")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Cluster":
        return cls(**json.loads(path.read_text()))


def conninfo(**params) -> str:
    """A libpq key=value connection string; None values are left out."""
    def quote(value) -> str:
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"'{text}'"
    return " ".join(f"{key}={quote(value)}" for key, value in params.items() if value is not None)


def find_bin_dir() -> Path:
    """PostgreSQL server binaries: $PGMP_PG_BINDIR, the newest /usr/lib/postgresql/*/bin, pg_config."""
    if os.environ.get("PGMP_PG_BINDIR"):
        return Path(os.environ["PGMP_PG_BINDIR"])
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if candidates:
        return max(candidates, key=lambda p: _version_key(p.parent.name))
    if shutil.which("pg_config"):
        bindir = Path(run(["pg_config", "--bindir"]).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise RuntimeError("PostgreSQL server binaries (initdb) not found: run scripts/test "
                       "once to install them, or set PGMP_PG_BINDIR")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _server_user_kwargs() -> dict:
    """initdb and postgres refuse to run as root: as root, run them as `postgres`."""
    if os.geteuid() != 0:
        return {}
    return {"user": SUPERUSER, "group": SUPERUSER, "extra_groups": []}


def start_cluster(base_dir: Path) -> Cluster:
    """initdb and start a cluster under base_dir (data/, the socket and the log live there)."""
    bin_dir = find_bin_dir()
    base_dir.mkdir(parents=True, exist_ok=True)
    datadir, logfile = base_dir / "data", base_dir / "postgres.log"
    as_server = _server_user_kwargs()
    if as_server:
        shutil.chown(base_dir, SUPERUSER, SUPERUSER)
    run([bin_dir / "initdb", "-D", datadir, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
         "--locale=C", "--no-sync"], cwd=base_dir, timeout=120, **as_server)
    port = free_port()
    settings = {**SERVER_SETTINGS, "port": str(port), "unix_socket_directories": f"'{base_dir}'"}
    with open(datadir / "postgresql.conf", "a") as conf:
        conf.write("\n# pgmp test harness\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    (datadir / "pg_hba.conf").write_text(HBA)
    _pg_ctl_start(bin_dir, datadir, logfile, base_dir, as_server, "PostgreSQL")
    cluster = Cluster(host="127.0.0.1", port=port, socket_dir=str(base_dir), bin_dir=str(bin_dir),
                      datadir=str(datadir), logfile=str(logfile))
    cluster.psql(SETUP_SQL)
    rows = cluster.psql("SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL")
    cluster.secrets = dict(line.split("|", 1) for line in rows.splitlines())
    return cluster


def _pg_ctl_start(bin_dir: Path, datadir: Path, logfile: Path, base_dir: Path, as_server: dict, what: str) -> None:
    """pg_ctl start -w; on failure the cluster is stopped and the error carries its log."""
    try:
        run([bin_dir / "pg_ctl", "start", "-D", datadir, "-l", logfile, "-w", "-t", "60"],
            cwd=base_dir, timeout=90, **as_server)
    except (CommandFailed, subprocess.TimeoutExpired) as exc:
        log = logfile.read_text(errors="replace") if logfile.exists() else "(no log)"
        stop_cluster(base_dir)
        raise RuntimeError(f"{what} did not start: {exc}\n--- {logfile} ---\n{log}") from exc


def start_standby(primary: Cluster, base_dir: Path, settings: dict[str, str] | None = None,
                  port: int | None = None) -> Cluster:
    """A hot standby of ``primary`` under base_dir, streaming from it, started and ready for reads.

    ``settings`` are appended to its postgresql.conf (after the port and socket directory);
    ``port``: the one it listens on (default: a free one), e.g. a former primary's rebuilt as a standby.
    """
    bin_dir = Path(primary.bin_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    datadir, logfile = base_dir / "data", base_dir / "postgres.log"
    as_server = _server_user_kwargs()
    if as_server:
        shutil.chown(base_dir, SUPERUSER, SUPERUSER)
    run([bin_dir / "pg_basebackup", "-D", datadir, "-h", primary.socket_dir, "-p", str(primary.port),
         "-U", SUPERUSER, "-R", "-X", "stream", "-c", "fast", "--no-sync"], cwd=base_dir, timeout=120, **as_server)
    port = port or free_port()
    conf = {"port": str(port), "unix_socket_directories": f"'{base_dir}'", "hot_standby": "on",
            "wal_receiver_status_interval": "1s", **(settings or {})}
    with open(datadir / "postgresql.conf", "a") as f:
        f.write("\n# pgmp test harness: standby\n")
        f.writelines(f"{key} = {value}\n" for key, value in conf.items())
    _pg_ctl_start(bin_dir, datadir, logfile, base_dir, as_server, "the standby")
    return Cluster(host=primary.host, port=port, socket_dir=str(base_dir), bin_dir=str(bin_dir),
                   datadir=str(datadir), logfile=str(logfile), passwords=dict(primary.passwords),
                   secrets=dict(primary.secrets))


def promote(cluster: Cluster, timeout: float = 60.0) -> None:
    """pg_ctl promote a standby and wait until it accepts writes."""
    run([Path(cluster.bin_dir) / "pg_ctl", "promote", "-D", cluster.datadir, "-w", "-t", str(int(timeout))],
        timeout=timeout + 10, **_server_user_kwargs())


def stop_server(cluster: Cluster, mode: str = "fast", timeout: float = 30.0) -> None:
    """pg_ctl stop (fast: sessions terminated with 57P01, a shutdown checkpoint); the cluster stays on disk."""
    run([Path(cluster.bin_dir) / "pg_ctl", "stop", "-D", cluster.datadir, "-m", mode, "-w", "-t", str(int(timeout))],
        timeout=timeout + 10, **_server_user_kwargs())


def start_server(cluster: Cluster, timeout: float = 60.0) -> None:
    """pg_ctl start a cluster stopped with stop_server, on its own port again."""
    run([Path(cluster.bin_dir) / "pg_ctl", "start", "-D", cluster.datadir, "-l", cluster.logfile, "-w",
         "-t", str(int(timeout))], cwd=cluster.socket_dir, timeout=timeout + 10, **_server_user_kwargs())


def wal_replayed(primary: Cluster, standby: Cluster) -> bool:
    """Has the standby replayed everything the primary has written so far?"""
    lsn = primary.psql("SELECT pg_current_wal_lsn()")
    return standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t"


def postmaster_pid(datadir: Path) -> int | None:
    try:
        return int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def stop_cluster(base_dir: Path, timeout: float = 15.0) -> None:
    """Stop the cluster under base_dir, if one runs: immediate shutdown, then SIGKILL by pid."""
    datadir = base_dir / "data"
    pid = postmaster_pid(datadir)
    if pid is None or not process_alive(pid):
        return
    try:
        run([find_bin_dir() / "pg_ctl", "stop", "-D", datadir, "-m", "immediate", "-w",
             "-t", str(int(timeout))], cwd=base_dir, timeout=timeout + 5, check=False,
            **_server_user_kwargs())
    except subprocess.TimeoutExpired:
        pass
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), timeout=timeout,
                 message=f"postmaster {pid} still alive after SIGKILL")
    _reap(pid)


def stop_clusters_under(run_dir: Path) -> None:
    """Stop every cluster whose data directory lies under run_dir (standbys, throwaway pairs): the
    run's last safety net, should a test's own teardown not have run."""
    for pidfile in sorted(run_dir.glob("**/data/postmaster.pid")):
        stop_cluster(pidfile.parent.parent)


def _reap(pid: int) -> None:
    """Collect the postmaster's exit status if it became our child (see become_subreaper)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # not ours: its parent (or init) reaps it


def become_subreaper() -> None:
    """Adopt orphaned descendants, so that the postmaster, which pg_ctl detaches, is
    reaped by us when it exits rather than left as a zombie under an init that
    does not reap (as in some containers)."""
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
