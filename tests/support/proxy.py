"""Start pgmp processes for tests and the demo: write config + userlist, launch, wait, stop."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from signal import SIGKILL, SIGTERM

import psutil

from pgmp.importer import toml_key, toml_value  # noqa: F401 (re-exported for tests)

from .cluster import PASSWORDS, Cluster, conninfo
from .waiting import RUN_DIR_ENV, free_port, port_accepts, process_alive, run, wait_for, wait_started

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 15.0
BIND_ATTEMPTS = 3


# --- config files -----------------------------------------------------------
# TOML is written with pgmp's own writer (the one `pgmp config import` uses).

def toml_table(name: str, values: Mapping) -> str:
    lines = [f"[{name}]"]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def userlist(users: Mapping[str, str]) -> str:
    """PgBouncer auth_file format: "user" "secret", a '"' doubled inside quotes."""
    def quote(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'
    return "".join(f"{quote(name)} {quote(secret)}\n" for name, secret in users.items())


def default_databases(cluster: Cluster) -> dict[str, dict]:
    return {name: {"host": cluster.host, "port": cluster.port, "dbname": name}
            for name in ("appdb", "otherdb")}


@dataclass
class PgmpConfig:
    """A written pgmp config: the file and the addresses it makes pgmp listen on."""

    path: Path
    host: str
    port: int
    unix_socket_dir: str
    text: str


def write_config(
    workdir: Path,
    cluster: Cluster,
    config: Mapping | None = None,
    databases: Mapping[str, Mapping] | None = None,
    users: Mapping[str, str] | None = None,
    auth_type: str = "scram-sha-256",
    workers: int = 1,
    extra_toml: str = "",
    name: str = "pgmp",
) -> PgmpConfig:
    """Write NAME.toml and NAME.users in workdir.

    `config` overrides keys of [pgmp] (None drops a key). `databases` replaces
    the default appdb/otherdb entries; each entry gets host, port and dbname
    (= its name) from the cluster unless it sets them. `users` maps names to
    auth_file secrets (plaintext, md5 or SCRAM); default: the three test users
    with their plaintext passwords. `extra_toml` is appended as it is.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    if "listen_port" not in config:
        config["listen_port"] = free_port()
    if "unix_socket_dir" not in config:
        # Short, so that "<dir>/.s.PGSQL.<port>" fits in sun_path (108 bytes).
        config["unix_socket_dir"] = tempfile.mkdtemp(
            prefix="pgmp-s-", dir=os.environ.get(RUN_DIR_ENV))
    settings = {
        "listen_addr": "127.0.0.1",
        "auth_type": auth_type,
        "auth_file": f"{name}.users",
        "pool_mode": "session",
        "default_pool_size": 20,
        "max_client_conn": 1000,
        "workers": workers,
        "log_level": "info",
        **config,
    }
    if databases is None:
        databases = default_databases(cluster)
    sections = [toml_table("pgmp", settings)]
    for db, values in databases.items():
        entry = {"host": cluster.host, "port": cluster.port, **({} if db == "*" else {"dbname": db}), **values}
        sections.append(toml_table(f"databases.{toml_key(db)}", entry))
    text = "\n".join(sections) + ("\n" + extra_toml.strip() + "\n" if extra_toml else "")
    (workdir / f"{name}.users").write_text(userlist(PASSWORDS if users is None else users))
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return PgmpConfig(path=path, host=str(settings["listen_addr"]), port=int(settings["listen_port"]),
                      unix_socket_dir=str(settings["unix_socket_dir"] or ""), text=text)


# --- processes --------------------------------------------------------------

@cache
def pgmp_env() -> dict[str, str]:
    """The environment for pgmp: as it is if pgmp is installed, else with the repo on PYTHONPATH."""
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c", "import pgmp"], cwd="/", capture_output=True)
    if probe.returncode != 0:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def pgmp_cli(*args: str | os.PathLike, check: bool = False, timeout: float = 30.0,
             **kwargs) -> subprocess.CompletedProcess[str]:
    """Run `python -m pgmp ARGS...` (config check, reload, status, ...) and capture its output."""
    return run([sys.executable, "-m", "pgmp", *args], check=check, timeout=timeout,
               env=pgmp_env(), **kwargs)


def _die_with_parent() -> None:
    """In the child before exec: stop pgmp (SIGTERM) if the test process dies without cleaning up.

    The signal fires when the *thread* that started pgmp exits, so start pgmp
    from the test's own thread, not from a short-lived helper thread.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, SIGTERM)


class PgmpProcess:
    """One running `python -m pgmp start -c FILE` and how to talk to it."""

    def __init__(self, config: PgmpConfig, log_path: Path, args: list[str] | None = None,
                 rewrite=None):
        self.config = config
        self._rewrite = rewrite
        self.config_path = config.path
        self.host, self.port = config.host, config.port
        self.unix_socket_dir = config.unix_socket_dir
        self.log_path = log_path
        cmd = [sys.executable, "-m", "pgmp", "start", "-c", str(config.path), *(args or [])]
        with open(log_path, "wb") as log:
            # Its own session: Ctrl-C in the terminal reaches pytest, not pgmp,
            # and teardown can find workers that outlive the master by group.
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=config.path.parent,
                env=pgmp_env(), start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.pid = self.process.pid

    def __repr__(self) -> str:
        return f"<pgmp pid={self.pid} {self.host}:{self.port}>"

    def rewrite_config(self, config: Mapping | None = None, **changes) -> PgmpConfig:
        """Rewrite this pgmp's config file in place (same port and unix socket dir unless changed).

        Takes start()'s arguments: `config` keys are merged into the current
        [pgmp] overrides, other arguments (users=, databases=, ...) replace the
        current ones. Changes accumulate over calls. Apply with .signal(SIGHUP)
        or `pgmp reload`. .port/.unix_socket_dir keep the addresses pgmp runs on.
        """
        settings = {"listen_port": self.port, "unix_socket_dir": self.unix_socket_dir,
                    **(self._rewrite.keywords.get("config") or {}), **(config or {})}
        self._rewrite = partial(self._rewrite, **changes, config=settings)
        self.config = self._rewrite()
        return self.config

    # connecting
    def dsn(self, user: str = "scram_user", password: str | None = None,
            dbname: str = "appdb", **params) -> str:
        """libpq conninfo through pgmp over TCP; params may override host/port (e.g. host=unix dir)."""
        if password is None:
            password = PASSWORDS.get(user)
        base = {"host": self.host, "port": self.port, "user": user, "password": password,
                "dbname": dbname, "connect_timeout": 10}
        return conninfo(**{**base, **params})

    def asyncpg_kwargs(self, user: str = "scram_user", password: str | None = None,
                       dbname: str = "appdb", **extra) -> dict:
        if password is None:
            password = PASSWORDS.get(user)
        return {"host": self.host, "port": self.port, "user": user, "password": password,
                "database": dbname, **extra}

    # watching
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Wait until the regex `pattern` matches the log after character offset `start`."""
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log(), start), timeout=timeout,
                        message=lambda: f"no {pattern!r} in pgmp log:\n{self.log()[start:]}")

    def stats(self) -> dict:
        """``pgmp stats --json`` of this pgmp, parsed (the command must succeed)."""
        return json.loads(pgmp_cli("stats", "--json", "-c", self.config_path, check=True).stdout)

    def poll(self) -> int | None:
        return self.process.poll()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the TCP port accepts connections; fail early if pgmp exits."""
        wait_started(lambda: port_accepts(self.host, self.port, timeout=0.2), self.process, timeout,
                     lambda why: PgmpStartError(self, f"{why} (not accepting on {self.host}:{self.port})"))

    # stopping
    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0, sig: int = SIGTERM) -> int:
        """Send `sig` (graceful stop), wait, SIGKILL after `timeout`; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._kill_leftovers()
        return self.process.returncode

    def _kill_leftovers(self) -> None:
        """Kill processes of pgmp's group still alive after the master exited (they are a bug)."""
        leftovers = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.pid and process_alive(proc.pid):
                    leftovers.append(proc.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not leftovers:
            return
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SIGKILL)
        wait_for(lambda: not any(map(process_alive, leftovers)), timeout=5,
                 message=f"pgmp's leftover processes {leftovers} survived SIGKILL")
        for pid in leftovers:  # ours to reap if they were reparented to us (subreaper)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        warnings.warn(f"{self!r} left processes {leftovers} after exiting; killed them",
                      stacklevel=3)


class PgmpStartError(RuntimeError):
    def __init__(self, proc: PgmpProcess, what: str):
        self.proc = proc
        super().__init__(f"pgmp {what}\n--- config {proc.config_path} ---\n{proc.config.text}"
                         f"--- pgmp stderr ---\n{proc.log()}")


def start_pgmp(workdir: Path, cluster: Cluster, ready_timeout: float = READY_TIMEOUT,
               args: list[str] | None = None, **config_args) -> PgmpProcess:
    """Write a config (see write_config) and start pgmp on it; return once it accepts.

    A port taken between choosing and binding it is retried with a new port.
    """
    name = config_args.pop("name", None) or _unused_name(workdir)
    for attempt in range(BIND_ATTEMPTS):
        config = write_config(workdir, cluster, name=name, **config_args)

        proc = PgmpProcess(config, workdir / f"{name}.log", args,
                           rewrite=partial(write_config, workdir, cluster, name=name, **config_args))
        try:
            proc.wait_ready(ready_timeout)
            return proc
        except PgmpStartError:
            proc.stop(timeout=5)
            port_taken = "address already in use" in proc.log().lower()
            port_fixed = "listen_port" in (config_args.get("config") or {})
            if not port_taken or port_fixed or attempt == BIND_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _unused_name(workdir: Path) -> str:
    n = 0
    while (workdir / f"pgmp{n}.toml").exists():
        n += 1
    return f"pgmp{n}"


class PgmpFactory:
    """The `pgmp` fixture: starts pgmp processes for one test and stops them all after it."""

    def __init__(self, workdir: Path, cluster: Cluster):
        self.workdir, self.cluster = workdir, cluster
        self.started: list[PgmpProcess] = []

    def start(self, config: Mapping | None = None, databases: Mapping[str, Mapping] | None = None,
              users: Mapping[str, str] | None = None, auth_type: str = "scram-sha-256",
              workers: int = 1, extra_toml: str = "", **kwargs) -> PgmpProcess:
        """Start a pgmp (see write_config for the arguments) and return it once it accepts.

        Also: name= (file stem), ready_timeout=, args= (extra `pgmp start` arguments).
        """
        proc = start_pgmp(self.workdir, self.cluster, config=config, databases=databases,
                          users=users, auth_type=auth_type, workers=workers,
                          extra_toml=extra_toml, **kwargs)
        self.started.append(proc)
        return proc

    __call__ = start

    def start_file(self, path: Path, host: str, port: int, unix_socket_dir: str = "",
                   ready_timeout: float = READY_TIMEOUT) -> PgmpProcess:
        """Start a pgmp on a config file written elsewhere (it listens on host:port); return once it accepts."""
        config = PgmpConfig(path=path, host=host, port=port, unix_socket_dir=unix_socket_dir,
                            text=path.read_text())
        proc = PgmpProcess(config, path.with_suffix(".log"))
        self.started.append(proc)
        proc.wait_ready(ready_timeout)
        return proc

    def write_config(self, **kwargs) -> PgmpConfig:
        """Only write a config (for `pgmp config check` or a reload); same arguments as start()."""
        kwargs.setdefault("name", _unused_name(self.workdir))
        return write_config(self.workdir, self.cluster, **kwargs)

    @staticmethod
    def cli(*args: str | os.PathLike, check: bool = False, timeout: float = 30.0,
            **kwargs) -> subprocess.CompletedProcess[str]:
        """`python -m pgmp ARGS...`, e.g. pgmp.cli("config", "check", "-c", path)."""
        return pgmp_cli(*args, check=check, timeout=timeout, **kwargs)

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()
