"""The operator's command line: pgmp start, config check, and the rest (typer)."""
import logging
import sys

import typer

from pgmp import __version__
from pgmp.logs import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pgmp: PostgreSQL wire-protocol proxy and connection pooler.")
config_app = typer.Typer(no_args_is_help=True, help="Validate and describe the configuration.")
app.add_typer(config_app, name="config")

DEFAULT_CONFIG = "/etc/pgmp/pgmp.toml"
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Configuration file (TOML).")


def _version(value: bool):
    if value:
        typer.echo(f"pgmp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def _check_files(cfg) -> list[str]:
    from pgmp.files import FileCheckError, check_files
    try:
        return check_files(cfg)
    except FileCheckError as exc:
        typer.echo(f"pgmp: {exc}", err=True)
        raise typer.Exit(1)


def _load(path: str):
    from pgmp import config
    try:
        return config.load(path)
    except config.ConfigError as exc:
        typer.echo(f"pgmp: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(1)
    except OSError as exc:
        typer.echo(f"pgmp: cannot read configuration {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1)


@app.command()
def start(config: str = ConfigOpt,
          daemon: bool = typer.Option(False, "--daemon", "-d", help="Detach (double fork); needs logfile and pidfile."),
          takeover: int = typer.Option(0, "--takeover", hidden=True,
                                       help="Internal: the pid of the master this one replaces (pgmp restart).")):
    """Start pgmp: a master and its workers, in the foreground unless --daemon."""
    cfg = _load(config)
    _check_files(cfg)
    started = None
    if daemon:
        if not cfg.logfile or not cfg.pidfile:
            typer.echo("pgmp: --daemon needs logfile and pidfile set in the configuration "
                       "(a detached pgmp has no terminal to log to)", err=True)
            raise typer.Exit(1)
        started = _daemonize(cfg.logfile)
    setup_logging(cfg.log_level, cfg.logfile)
    from pgmp.master import Master, StartError
    master = Master(cfg, takeover_pid=takeover or None)
    try:
        master.start()
    except StartError as exc:
        logging.getLogger("pgmp").error("cannot start: %s", exc)
        if not daemon:
            typer.echo(f"pgmp: {exc}", err=True)
        raise typer.Exit(1)
    if started is not None:
        import os
        os.write(started, b"1")          # the waiting `pgmp start --daemon` exits 0
        os.close(started)
    raise typer.Exit(master.run())


def _daemonize(logfile: str) -> int:
    """Detach (double fork). The command itself returns only once the daemon has bound its sockets:
    exit 0 when it did, 1 (pointing at the log) when it could not start. Returns the fd to report on."""
    import os
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        ok = os.read(r, 1) == b"1"       # EOF: the daemon exited before it was started
        if not ok:
            sys.stderr.write(f"pgmp: could not start; see {logfile}\n")
        os._exit(0 if ok else 1)
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return w


def _ask(cfg, command: str, args: dict | None = None, timeout: float = 10.0) -> dict:
    """Send one command to the master's control socket and return its reply."""
    import socket
    from pgmp import control
    path = cfg.control_socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        typer.echo(f"pgmp: pgmp is not running (no control socket at {path})", err=True)
        raise typer.Exit(3 if command == "status" else 1)
    except ConnectionRefusedError:
        typer.echo(f"pgmp: pgmp is not running (nobody answers on {path})", err=True)
        raise typer.Exit(3 if command == "status" else 1)
    except PermissionError:
        typer.echo(f"pgmp: permission denied on {path}: run as the user pgmp runs as", err=True)
        raise typer.Exit(4)
    with s:
        s.sendall(control.encode("command", command=command, args=args or {}))
        dec = control.Decoder()
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                typer.echo(f"pgmp: no answer from pgmp within {timeout:g}s", err=True)
                raise typer.Exit(1)
            if not data:
                typer.echo("pgmp: the master closed the control connection without answering", err=True)
                raise typer.Exit(1)
            for msg in dec.feed(data):
                if msg["type"] == "reply":
                    return msg


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited; a zombie (exited, its parent has not reaped it yet) counts.

    psutil's wait() polls a non-child until its pid disappears, which never happens to a zombie whose
    parent does not reap (a shell that is busy, an init that does not reap).
    """
    import time
    import psutil
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@app.command()
def stop(config: str = ConfigOpt,
         mode: str = typer.Option("graceful", "--mode", "-m",
                                  help="graceful: close clients at their next transaction boundary; "
                                       "fast: close them now; immediate: exit at once."),
         wait: bool = typer.Option(True, help="Wait until pgmp has exited.")):
    """Stop a running pgmp."""
    cfg = _load(config)
    reply = _ask(cfg, "stop", {"mode": mode})
    if not reply.get("ok"):
        typer.echo(f"pgmp: {reply.get('error')}", err=True)
        raise typer.Exit(1)
    pid = reply["data"]["pid"]
    if wait and not _wait_exit(pid, cfg.shutdown_timeout + 15):
        typer.echo(f"pgmp: pid {pid} still running", err=True)
        raise typer.Exit(1)
    typer.echo(f"pgmp stopped ({mode}, pid {pid})")


def _control_socket_of(path: str) -> str | None:
    """The control socket named by a config file that does not validate (as config.check derives it).

    Lets ``pgmp reload`` of a broken file still reach the running master, which then refuses
    the file itself: the failure is in pgmp's log, not only on the operator's terminal.
    """
    import os
    import tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    g = doc.get("pgmp") if isinstance(doc.get("pgmp"), dict) else {}
    base = os.path.dirname(os.path.abspath(path))
    sock, pidfile, port = g.get("control_socket"), g.get("pidfile"), g.get("listen_port", 6432)
    if isinstance(sock, str) and sock:
        return os.path.join(base, sock)
    if not isinstance(port, int) or isinstance(port, bool):
        return None
    run_dir = os.path.dirname(os.path.join(base, pidfile)) if isinstance(pidfile, str) and pidfile else "/tmp"
    return os.path.join(run_dir, f".pgmp.{port}.ctl")


@app.command()
def reload(config: str = ConfigOpt):
    """Re-read the configuration; an invalid one is refused and the running one stays."""
    import os
    import types
    from pgmp import config as configmod
    try:
        cfg = configmod.load(config)
    except (configmod.ConfigError, OSError):
        sock = _control_socket_of(config)
        if sock is None or not os.path.exists(sock):
            cfg = _load(config)                            # prints the error, exits 1
        else:
            cfg = types.SimpleNamespace(control_socket=sock)   # the master refuses the file and logs why
    reply = _ask(cfg, "reload", timeout=15)
    if not reply.get("ok"):
        typer.echo(f"pgmp: reload failed, the running configuration stays:\n{reply.get('error')}", err=True)
        raise typer.Exit(1)
    data = reply.get("data") or {}
    changed = ", ".join(data.get("changed") or []) or "no changes"
    typer.echo(f"reloaded: {changed} (worker generation {data.get('generation')})")


@app.command()
def restart(config: str = ConfigOpt):
    """Zero-downtime restart: a new master takes over the sockets, the old one drains."""
    cfg = _load(config)
    reply = _ask(cfg, "restart")
    if not reply.get("ok"):
        typer.echo(f"pgmp: restart failed: {reply.get('error')}", err=True)
        raise typer.Exit(1)
    import time
    data = reply["data"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            st = _ask(cfg, "status", timeout=2)
            if st.get("ok") and st["data"]["pid"] == data["new_pid"]:
                typer.echo(f"restarted: new master pid {data['new_pid']}, old master {data['old_pid']} draining")
                return
        except typer.Exit:
            pass
        time.sleep(0.1)
    typer.echo(f"pgmp: the new master (pid {data['new_pid']}) did not take over within 30s; see the log", err=True)
    raise typer.Exit(1)


def _pool_command(config: str, action: str, database: str | None) -> dict:
    cfg = _load(config)
    reply = _ask(cfg, action, {"database": database})
    if not reply.get("ok"):
        typer.echo(f"pgmp: {action} failed: {reply.get('error')}", err=True)
        raise typer.Exit(1)
    return reply.get("data") or {}


DatabaseArg = typer.Argument(None, help="The database (as clients name it); all databases when omitted.")


@app.command()
def pause(database: str = DatabaseArg, config: str = ConfigOpt,
          timeout: float = typer.Option(60.0, help="Seconds to wait for transactions in flight to end.")):
    """Hand out no server connection: waits until every transaction in flight has ended; new ones queue."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        data = _pool_command(config, "pause", database)
        if data.get("busy_servers", 0) == 0:
            typer.echo(f"paused {database or 'all databases'} ({data.get('pools', 0)} pools)")
            return
        if time.monotonic() > deadline:
            typer.echo(f"pgmp: still {data['busy_servers']} servers in use after {timeout:g}s; "
                       "the pause stays in force (pgmp resume undoes it)", err=True)
            raise typer.Exit(1)
        time.sleep(0.2)


@app.command()
def resume(database: str = DatabaseArg, config: str = ConfigOpt):
    """Undo pgmp pause: queued clients get their servers."""
    data = _pool_command(config, "resume", database)
    typer.echo(f"resumed {database or 'all databases'} ({data.get('pools', 0)} pools)")


@app.command()
def reconnect(database: str = DatabaseArg, config: str = ConfigOpt):
    """Close server connections as soon as they are not in use (after a failover); new ones are opened."""
    data = _pool_command(config, "reconnect", database)
    typer.echo(f"reconnecting {database or 'all databases'} ({data.get('pools', 0)} pools)")


def _terminal():
    from pgmp.tables import Terminal
    return Terminal.of(sys.stdout)


@app.command()
def status(config: str = ConfigOpt, json_out: bool = typer.Option(False, "--json", help="Machine-readable.")):
    """Say whether pgmp runs: pid, version, uptime, generation; each worker's state, clients, RSS and CPU."""
    cfg = _load(config)
    reply = _ask(cfg, "status", timeout=5)
    data = reply.get("data") or {}
    if json_out:
        import json
        typer.echo(json.dumps(data, indent=2))
        return
    from pgmp import stats as statsmod
    figures = statsmod.process_figures([w["pid"] for w in data.get("workers", [])])
    typer.echo(statsmod.render_status(data, figures, **_terminal().layout))


@app.command()
def stats(config: str = ConfigOpt, json_out: bool = typer.Option(False, "--json", help="Machine-readable.")):
    """Pools over the whole instance (clients, servers, counters, averages), then each process with RSS and CPU."""
    cfg = _load(config)
    reply = _ask(cfg, "stats", timeout=10)
    from pgmp import stats as statsmod
    data = reply.get("data") or {}
    typer.echo(statsmod.to_json(data) if json_out else statsmod.render(data, **_terminal().layout))


@app.command()
def top(config: str = ConfigOpt,
        interval: float = typer.Option(1.0, "--interval", "-i", min=0.1, help="Seconds between frames."),
        once: bool = typer.Option(False, "--once", help="Print one frame (the rates over one interval) and exit."),
        iterations: int = typer.Option(0, "--iterations", "-n", min=0,
                                       help="Print this many frames, one per interval, and exit (0: until q or Ctrl-C).")):
    """A live view: databases by transactions per second, clients waiting, servers in use, each worker's CPU."""
    import signal
    import time

    from pgmp import stats as statsmod
    cfg = _load(config)
    frames = 1 if once else iterations
    live = _terminal().tty and not frames          # redraw in place; otherwise one plain frame per interval

    def ask(command: str) -> dict:
        try:
            return _ask(cfg, command, timeout=10).get("data") or {}
        except typer.Exit as exc:                  # not running: exit 1 as stats does, not status's 3
            raise typer.Exit(1 if exc.exit_code == 3 else exc.exit_code)

    keys = _Keys(sys.stdin if live else None)
    shown = 0
    try:
        before, since = ask("stats"), time.monotonic()
        if live:
            signal.signal(signal.SIGTERM, _interrupt)   # a kill gives the terminal back too
            keys.start()
            sys.stdout.write(f"\x1b[?25l\x1b[H\x1b[2Jpgmp top: first figures in {interval:g}s (q quits)")
            sys.stdout.flush()
        due = since + interval
        while not keys.wait(due - time.monotonic()):
            status, after = ask("status"), ask("stats")
            now = time.monotonic()
            term = _terminal()
            frame = statsmod.render_top(status, before, after, now - since, height=term.height and term.height - 1,
                                        **term.layout)
            if live:
                sys.stdout.write("\x1b[H" + frame.replace("\n", "\x1b[K\n") + "\x1b[K\x1b[J")
                sys.stdout.flush()
            else:
                typer.echo(("\n" if shown else "") + frame)
            shown += 1
            if frames and shown >= frames:
                break
            before, since = after, now
            due = max(due + interval, now)         # a slow answer delays the next frame, it does not bunch them
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:                        # `pgmp top | head`: the reader is gone
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        keys.stop()
        if live:
            sys.stdout.write("\x1b[?25h\n")
            sys.stdout.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Keys:
    """pgmp top's keyboard: a terminal stdin in cbreak mode (no echo, no line buffering) until stop()."""

    def __init__(self, stdin):
        self.fd = stdin.fileno() if stdin is not None and stdin.isatty() else None
        self.saved = None

    def start(self):
        if self.fd is not None:
            import termios
            import tty
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def stop(self):
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True as soon as q is pressed."""
        import os
        import select
        import time
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.saved is None:
                time.sleep(left)
                break
            if select.select([self.fd], [], [], left)[0]:
                data = os.read(self.fd, 64)
                if not data:                       # the terminal went away: only Ctrl-C or the count ends it now
                    self.stop()
                elif b"q" in data.lower():
                    return True
        return False


@config_app.command("check")
def config_check(config: str = ConfigOpt):
    """Validate the configuration file and the files it names (auth_file, hba_file, TLS) without starting."""
    cfg = _load(config)
    for line in _check_files(cfg):
        typer.echo(line)
    typer.echo(f"{cfg.path}: OK ({len(cfg.databases)} databases)")


@config_app.command("import")
def config_import(pgbouncer_ini: str = typer.Argument(..., help="The PgBouncer configuration file to read."),
                  output: str = typer.Option(None, "--output", "-o",
                                             help="Write pgmp.toml here (default: standard output)."),
                  force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
                  relative_to: str = typer.Option(None, "--relative-to",
                                                  help="Directory PgBouncer runs in, which its relative paths "
                                                       "(%include, auth_file, ...) start from; default: the "
                                                       "ini file's directory.")):
    """Write the pgmp.toml equivalent to a pgbouncer.ini; exit 1 if something cannot be carried over safely."""
    from pgmp import importer
    try:
        result = importer.import_ini(pgbouncer_ini, relative_to)
        if output:
            importer.write_output(output, result.toml, force, importer.output_mode(pgbouncer_ini))
    except importer.InvalidIni as exc:
        typer.echo(f"pgmp: cannot import {pgbouncer_ini}, nothing written:\n{exc}", err=True)
        raise typer.Exit(2)
    except FileExistsError:
        typer.echo(f"pgmp: {output} exists, nothing written (--force overwrites it)", err=True)
        raise typer.Exit(2)
    except OSError as exc:
        typer.echo(f"pgmp: cannot write {output}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2)
    if not output:
        typer.echo(result.toml, nl=False)
    for note in result.in_file_order():
        typer.echo(f"pgmp: {note}", err=True)
    if result.unsafe:
        typer.echo(f"pgmp: {len(result.unsafe)} of the settings could not be carried over safely (NOT CARRIED "
                   f"OVER above); pgmp refuses the output until each is resolved and {importer.BLOCKER} is "
                   "deleted", err=True)
        raise typer.Exit(1)


@config_app.command("settings")
def config_settings():
    """List every setting with its type, default and whether reload applies it."""
    from pgmp.config import render_settings_table
    typer.echo(render_settings_table())


def main():
    app(prog_name="pgmp")


if __name__ == "__main__":
    main()
