"""The master process: binds the listening sockets, forks shared-nothing workers, keeps them alive, answers the CLI.

The loop reads as its verbs: signal handlers only record the signal (the
wakeup fd); ``handle_<signal>`` methods act on it; dead workers are reaped
and respawned with backoff; workers that miss heartbeats are killed; the
control socket serves ``pgmp status/stats/reload/stop/restart``.
"""
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import psutil

from pgmp import __version__, control
from pgmp import config as configmod
from pgmp.files import FileCheckError, check_files
from pgmp.listen import ListenError, bind_all, tcp_listener
from pgmp.loop import Endpoint, Loop
from pgmp.logs import reopen_log_files, set_log_level
from pgmp.notify import notify
from pgmp.pool import note_pause
from pgmp.runfiles import (RunFileError, SocketInUse, bind_unix, check_pidfile, clear_socket_path, read_pidfile,
                           write_pidfile)

log = logging.getLogger("pgmp")

EXIT_OK = 0
EXIT_ERROR = 1
WORKER_BOOT_ERROR = 3          # a worker that could not start: the master stops instead of respawning
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 30.0       # a worker silent this long is hung: SIGABRT, then SIGKILL
HEARTBEAT_TIMEOUT_ENV = "PGMP_HEARTBEAT_TIMEOUT"   # overrides it (seconds), for tests and debugging
KILL_GRACE = 5.0
BOOT_TIMEOUT = 30.0
CONTROL_ACCEPT_RETRY = 1.0


class StartError(Exception):
    """pgmp cannot start: the message says what to fix."""


def heartbeat_timeout() -> float:
    """HEARTBEAT_TIMEOUT, or $PGMP_HEARTBEAT_TIMEOUT when it is a positive number of seconds."""
    value = os.environ.get(HEARTBEAT_TIMEOUT_ENV, "")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    return seconds if seconds > 0 else HEARTBEAT_TIMEOUT


# ---- pidfile --------------------------------------------------------------------

def running_pid(path: str) -> int | None:
    """The pid in ``path`` if that process is alive and is a pgmp master; None for a missing or stale pidfile."""
    pid = read_pidfile(path)
    if pid is None or pid == os.getpid():
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return pid if is_pgmp_master(cmdline) else None


def is_pgmp_master(cmdline: list[str]) -> bool:
    """A master by its title ("pgmp: master …") or, before it sets one, its command: pgmp or python -m pgmp.

    Not "pgmp" anywhere in the line: an editor on pgmp.toml must not pass for a running pgmp.
    """
    if not cmdline:
        return False
    if " ".join(cmdline).startswith("pgmp: master"):      # (psutil splits a title at its spaces)
        return True
    if os.path.basename(cmdline[0]) == "pgmp":
        return True
    return any(a == "-m" and b == "pgmp" for a, b in zip(cmdline, cmdline[1:]))


def _socket_file(path: str) -> tuple[str, tuple[int, int]] | None:
    """The path of a socket file we just bound and its identity, to remove it later only if still ours.

    (fstat on a socket fd describes the socket, not the file it is bound to: compare the file's own
    device and inode as they were right after bind.)
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return path, (st.st_dev, st.st_ino)


def _unlink_if_ours(entry: tuple[str, tuple[int, int]] | None) -> None:
    """Remove a socket file recorded by _socket_file, unless another process has replaced it since."""
    if entry is None:
        return
    path, ident = entry
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


# ---- control links ----------------------------------------------------------------

class ControlLink(Endpoint):
    """One control connection: a worker's socketpair end, or a CLI client of the control socket."""
    __slots__ = ("master", "decoder", "worker")

    def __init__(self, loop, sock, master, worker=None):
        super().__init__(loop, sock)
        self.master = master
        self.decoder = control.Decoder()
        self.worker = worker

    def on_data(self, view, n):
        try:
            msgs = self.decoder.feed(bytes(view[:n]))
        except control.ControlError as exc:
            log.error("bad control message from %s: %s", self.worker or "CLI", exc)
            self.close_socket()
            return
        for msg in msgs:
            self.master.on_message(self, msg)

    def post(self, msg_type: str, **fields):
        self.send(control.encode(msg_type, **fields))

    def on_eof(self, reason):
        self.close_socket()


class _ControlListener(Endpoint):
    __slots__ = ("master",)

    def __init__(self, loop, sock, master):
        super().__init__(loop, sock)
        self.master = master

    def read(self):
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # level-triggered: retrying at once (out of descriptors, say) would spin the master
            log.error("control socket: accept() failed: %s; trying again in %gs", exc.strerror or exc,
                      CONTROL_ACCEPT_RETRY)
            self.pause_reading()
            self.loop.call_later(CONTROL_ACCEPT_RETRY, self.resume_reading)
            return
        ControlLink(self.loop, sock, self.master)

    def on_eof(self, reason):
        pass


class _SignalPipe(Endpoint):
    __slots__ = ("queue",)

    def __init__(self, loop, sock, queue):
        super().__init__(loop, sock)
        self.queue = queue

    def on_data(self, view, n):
        self.queue.extend(bytes(view[:n]))

    def on_eof(self, reason):
        pass


class WorkerProcess:
    __slots__ = ("slot", "generation", "pid", "link", "ready", "started", "last_heartbeat", "draining",
                 "abort_sent", "clients", "servers")

    def __init__(self, slot, generation, pid, link, now):
        self.slot = slot
        self.generation = generation
        self.pid = pid
        self.link = link
        self.ready = False
        self.started = now
        self.last_heartbeat = now
        self.draining = False
        self.abort_sent = 0.0
        self.clients = 0
        self.servers = 0

    def __repr__(self):
        return f"worker {self.slot} (pid {self.pid}, generation {self.generation})"


# ---- the master ---------------------------------------------------------------------

class Master:
    def __init__(self, config, takeover_pid: int | None = None):
        self.config = config
        self.takeover_pid = takeover_pid
        self.loop = Loop(65536, relay=False)
        self.generation = 0
        self.nworkers = 0
        self.listen: dict[int, tuple[list[list[socket.socket]], socket.socket | None]] = {}
        self.workers: dict[int, WorkerProcess] = {}
        self.failures: dict[int, int] = {}
        self.respawn_timers: dict[int, object] = {}
        self.signals: list[int] = []
        self.stopping: str | None = None
        self.exit_code = EXIT_OK
        self.started = time.time()
        self.control_sock = None
        self.control_file = None               # (path, identity) of the control socket we bound
        self.unix_files: dict[int, tuple] = {}  # generation -> (path, identity) of its unix socket file
        self.pidfile = ""                      # as at start: reload cannot move it
        self.instance_seed = os.urandom(32)    # shared by the workers (mock salts without a seed file)
        self.announced = False
        self.pending: dict[int, dict] = {}
        self._ids = itertools.count(1)
        self.retiring: list[int] = []          # generations being drained
        self.heartbeat_timeout = heartbeat_timeout()
        self.config_text: str | None = None     # the file's text as last loaded (SET reloads it with overrides)
        self.overrides: dict = {}               # the admin console's SET values, until the next reload
        # PAUSE / DISABLE state of the instance, given to every worker that starts (respawn, new generation)
        self.paused_all = False
        self.paused_dbs: set[str] = set()
        self.disabled_dbs: set[str] = set()
        self.metrics = None                    # pgmp.metrics.MetricsServer, once metrics_listen is set
        self.health = None                     # pgmp.health.HealthChecker: the hosts' state for the workers
        self.successor: int | None = None      # the new master of a restart, once started

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        if cfg.pidfile:
            other = running_pid(cfg.pidfile)
            if other is not None and other != self.takeover_pid:
                raise StartError(f"pgmp is already running (pid {other}, pidfile {cfg.pidfile}); "
                                 "use 'pgmp restart' or stop it first")
        try:
            self._make_files()
        except StartError:
            self._abandon()
            raise
        try:
            with open(cfg.path, encoding="utf-8") as f:
                self.config_text = f.read()
        except OSError:
            pass
        self._install_signals()
        from pgmp.health import HealthChecker
        self.health = HealthChecker(self)
        self.health.configure(cfg)
        for slot in range(self.nworkers):
            self.spawn(slot, 0)
        self.loop.call_later(HEARTBEAT_INTERVAL, self._tick)
        self._set_title()

    def _make_files(self) -> None:
        """The pidfile path is checked, then the control socket and the listening sockets (the metrics
        endpoint's first; in a takeover, only once the workers are ready) are made, then the pidfile.

        The control socket comes first, so that a second pgmp on the same config stops there
        before its SO_REUSEPORT listeners could take (and drop) connections meant for the first;
        in a takeover it comes last, so that a new master that cannot listen leaves the old
        one's control socket in place.
        """
        cfg = self.config
        takeover = self.takeover_pid is not None
        try:
            if cfg.pidfile:
                check_pidfile(cfg.pidfile)
            if not takeover:
                self._bind_control_socket()
            if not takeover:                   # (in a takeover: once ready, see _announce_ready)
                self._listen_metrics(cfg.metrics_listen)
            self.nworkers = cfg.workers or os.cpu_count() or 1
            self.listen[0] = bind_all(cfg, self.nworkers, takeover=takeover)
            if self.listen[0][1] is not None:
                self.unix_files[0] = _socket_file(cfg.unix_socket_path)
            if takeover:
                self._bind_control_socket()
            if cfg.pidfile:
                write_pidfile(cfg.pidfile)
                self.pidfile = cfg.pidfile
        except (ListenError, RunFileError) as exc:
            raise StartError(str(exc)) from None

    def _abandon(self) -> None:
        """A start that failed half-way: close what it bound and remove the socket files it made."""
        self._close_sockets()
        self.control_sock = None

    def _close_sockets(self) -> None:
        """Listeners, the metrics endpoint and the control socket (its file removed if it is ours)."""
        for gen in list(self.listen):
            self._close_listeners(gen)
        if self.metrics is not None:
            self.metrics.close()
        if self.control_sock is not None:
            _unlink_if_ours(self.control_file)
            self.control_sock.close()
        self.loop.close()

    def _listen_metrics(self, address: str, shared: bool = False) -> None:
        """Serve the metrics endpoint on ``address`` ("" = not at all); ListenError keeps the current one.

        ``shared``: the old master of a takeover still listens there."""
        if self.metrics is None:
            if not address:
                return
            from pgmp.metrics import MetricsServer   # (prometheus_client is loaded only when needed)
            self.metrics = MetricsServer(self)
        self.metrics.listen(address, shared)

    def _bind_control_socket(self):
        """The CLI's socket, mode 0600: only pgmp's own user may reload or stop it."""
        path = self.config.control_socket
        if not path:
            return
        try:
            clear_socket_path(path, "control socket", "control_socket", takeover=self.takeover_pid is not None)
        except SocketInUse:
            raise StartError(f"another pgmp answers on the control socket {path}; stop it first, "
                             "or use 'pgmp restart'") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_unix(sock, path, 0o600)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise StartError(f"cannot create control socket {path}: {exc.strerror or exc}") from None
        self.control_sock = sock
        self.control_file = _socket_file(path)
        _ControlListener(self.loop, sock, self)

    def _install_signals(self):
        rsock, wsock = socket.socketpair()
        wsock.setblocking(False)
        self._wakeup = (rsock, wsock)
        _SignalPipe(self.loop, rsock, self.signals)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, _record)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the exit code."""
        loop = self.loop
        loop.running = True
        while loop.running:
            loop.run_once()
            self.dispatch_signals()
            self.reap_workers()
            if self.stopping and not self.workers:
                break
        self.cleanup()
        return self.exit_code

    def dispatch_signals(self):
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name.lower()[3:]
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_hup(self):
        self.reload()

    def handle_term(self):
        self.stop("graceful")

    def handle_int(self):
        self.stop("fast")

    def handle_quit(self):
        self.stop("immediate")

    def handle_usr2(self):
        self.restart()

    def handle_chld(self):
        pass                    # reap_workers runs after every dispatch

    def _tick(self):
        self.murder_hung_workers()
        self._set_title()
        if not (self.stopping and not self.workers):
            self.loop.call_later(HEARTBEAT_INTERVAL, self._tick)

    # -- workers ----------------------------------------------------------------------------
    def spawn(self, slot: int, generation: int) -> None:
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            parent.close()
            code = WORKER_BOOT_ERROR
            try:
                code = self._worker_main(slot, generation, child)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else WORKER_BOOT_ERROR
            except BaseException:
                traceback.print_exc()
            finally:
                logging.shutdown()
                os._exit(code)
        child.close()
        link = ControlLink(self.loop, parent, self)
        wp = WorkerProcess(slot, generation, pid, link, self.loop.clock())
        link.worker = wp
        self.workers[pid] = wp
        log.debug("started worker %d (pid %d, generation %d)", slot, pid, generation)

    def _worker_main(self, slot: int, generation: int, link: socket.socket) -> int:
        """In the child: drop the master's state, become a worker."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        keep = []
        for gen, (tcp, unix) in self.listen.items():
            for i, socks in enumerate(tcp):
                for s in socks:
                    if gen == generation and i == slot:
                        keep.append(s)
                    else:
                        s.close()
            if unix is not None:
                if gen == generation:
                    keep.append(unix)
                else:
                    unix.close()
        for ep in list(self.loop.endpoints.values()):
            ep.sock.close()                  # siblings' control links, CLI socket, signal pipe
        if self.metrics is not None:
            self.metrics.close_sockets()     # (an HTTP connection waiting for a scrape is not in the loop)
        if self.health is not None:
            self.health.close_sockets()      # checks in flight, the resolver helper's socket
        self.loop.close()
        from pgmp.worker import Worker
        try:
            worker = Worker(self.config, slot, self.nworkers_of(generation), generation=generation,
                            instance_seed=self.instance_seed)
            worker.paused_all = self.paused_all
            worker.paused_dbs = set(self.paused_dbs)
            worker.disabled_dbs = set(self.disabled_dbs)
            if self.health is not None:
                worker.hosts.from_master(self.health.message_rows())   # later changes come as host_state
            worker.listen_on(keep)
            worker.attach_master(link)
        except Exception as exc:
            # One line the operator can act on (the auth_file, a TLS file...): workers booting
            # together would otherwise interleave their tracebacks in the log.
            log.error("worker %d could not start: %s: %s", slot, type(exc).__name__, exc)
            log.debug("worker %d boot failure", slot, exc_info=True)
            return WORKER_BOOT_ERROR
        worker.run()
        return EXIT_OK

    def nworkers_of(self, generation: int) -> int:
        return len(self.listen[generation][0])

    def reap_workers(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wp = self.workers.pop(pid, None)
            if wp is None:
                continue
            wp.link.close_socket()
            if self.metrics is not None:
                self.metrics.worker_exited(wp)
            code = os.waitstatus_to_exitcode(status)
            how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            lived = self.loop.clock() - wp.started
            expected = self.stopping or wp.draining
            (log.info if expected and code == 0 else log.error)("%r exited with %s after %.1fs", wp, how, lived)
            if code == WORKER_BOOT_ERROR and not wp.ready:
                if not self.announced:
                    log.error("worker %d could not start; stopping pgmp (see the error above)", wp.slot)
                    self.exit_code = EXIT_ERROR
                    self.stop("fast")
                    continue
                # pgmp is serving: a file edited into a broken state must not take the proxy down.
                log.error("worker %d could not start (see the error above); the other workers go on serving "
                          "and the slot is retried with backoff: fix the file, then run pgmp reload", wp.slot)
                # nobody accepts on this slot's sockets meanwhile: close them so the kernel sends
                # new connections to the other slots (and, with tcp_migrate_req, moves the queued ones)
                self._close_slot(wp.generation, wp.slot)
                self._schedule_respawn(wp, 0.0)
                continue
            if expected or wp.generation != self.generation:
                self._retire_check()
                continue
            self._schedule_respawn(wp, lived)

    def _schedule_respawn(self, wp, lived):
        n = self.failures.get(wp.slot, 0) + 1 if lived < 10 else 0
        self.failures[wp.slot] = n
        delay = 0.0 if n <= 1 else min(10.0, 0.1 * 2 ** (n - 1))
        if delay:
            log.warning("worker %d keeps dying; respawning in %.1fs", wp.slot, delay)
        self.loop.call_later(delay, self._respawn, wp.slot, wp.generation)

    def _respawn(self, slot, generation):
        if self.stopping or generation != self.generation:
            return
        tcp = self.listen[generation][0]
        if not tcp[slot] and self.config.listen_addr:
            try:
                tcp[slot] = [tcp_listener(a, self.config.listen_port) for a in self.config.listen_addr]
            except ListenError as exc:
                log.error("worker %d: %s; retrying", slot, exc)
                self.loop.call_later(1.0, self._respawn, slot, generation)
                return
        self.spawn(slot, generation)

    def _close_slot(self, generation: int, slot: int):
        tcp = self.listen.get(generation, ([], None))[0]
        if slot < len(tcp):
            for s in tcp[slot]:
                s.close()
            tcp[slot] = []

    def murder_hung_workers(self):
        now = self.loop.clock()
        for wp in list(self.workers.values()):
            limit = self.heartbeat_timeout if wp.ready else BOOT_TIMEOUT
            if now - wp.last_heartbeat <= limit:
                continue
            try:
                if not wp.abort_sent:
                    log.error("%r missed its heartbeats for %.0fs: sending SIGABRT", wp, now - wp.last_heartbeat)
                    os.kill(wp.pid, signal.SIGABRT)
                    wp.abort_sent = now
                elif now - wp.abort_sent > KILL_GRACE:
                    log.error("%r did not exit after SIGABRT: sending SIGKILL", wp)
                    os.kill(wp.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- messages from workers and the CLI -----------------------------------------------------
    def on_message(self, link: ControlLink, msg: dict):
        kind = msg["type"]
        wp = link.worker
        if wp is not None:
            wp.last_heartbeat = self.loop.clock()
            if kind == "ready":
                wp.ready = True
                log.debug("%r ready", wp)
                self._maybe_ready()
            elif kind == "heartbeat":
                wp.clients = msg.get("clients", 0)
                wp.servers = msg.get("servers", 0)
            elif kind == "cancel":
                self._forward_cancel(link, msg)
            elif kind in ("stats", "reload_result", "pool_result"):
                self._collect(wp, msg)
            elif kind == "console":
                self.command(_ConsoleReply(link, msg.get("id")), msg.get("command", ""), msg.get("args") or {})
            elif kind == "host_report":
                if self.health is not None:
                    self.health.report(str(msg.get("host", "")), int(msg.get("port") or 0),
                                       str(msg.get("event", "")), str(msg.get("error", "")))
            elif kind == "metrics":
                if self.metrics is not None:
                    self.metrics.figures_arrived(wp, msg)
                self._collect(wp, msg)
            return
        if kind == "command":
            self.command(link, msg.get("command", ""), msg.get("args") or {})

    def _forward_cancel(self, link, msg):
        """A worker got a CancelRequest with a key it did not hand out: ask every other worker."""
        for wp in self.workers.values():
            if wp.link is not link and wp.ready:
                wp.link.post("cancel", pid=msg["pid"], secret=msg["secret"])

    def _maybe_ready(self):
        current = [w for w in self.workers.values() if w.generation == self.generation]
        if len(current) < self.nworkers or not all(w.ready for w in current):
            return
        if self.retiring:
            for gen in self.retiring:
                self._drain_generation(gen, "graceful")
        if not self.announced:
            self.announced = True
            self._announce_ready()

    def _announce_ready(self):
        cfg = self.config
        where = ", ".join(f"{a}:{cfg.listen_port}" for a in cfg.listen_addr)
        if cfg.unix_socket_dir:
            where += f", {cfg.unix_socket_path}"
        from pgmp.protocol import scanner
        log.info("pgmp %s ready: %d workers listening on %s (scanner and relay: %s, pid %d)",
                 __version__, self.nworkers, where, scanner.IMPL, os.getpid())
        notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={self.summary()}")
        if self.takeover_pid:
            try:
                # only now: a scrape or health check must not reach a master whose workers are not ready
                self._listen_metrics(cfg.metrics_listen, shared=True)
            except ListenError as exc:
                log.error("%s; pgmp runs without its metrics endpoint", exc)
            log.info("taking over from pgmp pid %d: asking it to drain", self.takeover_pid)
            try:
                os.kill(self.takeover_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.takeover_pid = None

    def summary(self) -> str:
        live = [w for w in self.workers.values() if not w.draining]
        return (f"{len(live)} workers, {sum(w.clients for w in live)} clients, "
                f"{sum(w.servers for w in live)} servers")

    # -- commands ----------------------------------------------------------------------------
    def command(self, link, name: str, args: dict):
        if name == "status":
            link.post("reply", ok=True, data=self.status())
        elif name == "stats":
            self._ask_workers("stats_request", link, {"detail": args.get("detail")})
        elif name == "reload":
            self.reload(link)
        elif name == "stop":
            mode = args.get("mode", "graceful")
            if mode not in ("graceful", "fast", "immediate"):
                link.post("reply", ok=False, error=f"unknown stop mode {mode!r}")
                return
            link.post("reply", ok=True, data={"pid": os.getpid(), "mode": mode})
            self.stop(mode)
        elif name == "restart":
            link.post("reply", **self.restart())
        elif name in ("pause", "resume", "reconnect", "kill", "disable", "enable", "kill_client"):
            database = args.get("database") or None
            self._pool_state(name, database)

            def done(req):
                def total(key):
                    return sum((m.get("data") or {}).get(key, 0) for m in req["replies"].values())
                what = f"client {args.get('id')}" if name == "kill_client" else database or "all databases"
                log.info("%s %s: %d pools in %d workers", name, what, total("pools"), len(req["replies"]))
                link.post("reply", ok=not req["waiting"], error="some workers did not answer" if req["waiting"]
                          else None, data={"pools": total("pools"), "busy_servers": total("busy_servers"),
                                           "killed": total("killed"), "missing": sorted(req["waiting"])})
            current = [w for w in self.workers.values() if not w.draining or name == "kill_client"]
            # (also to workers still booting: they forked with the state before this command)
            self._ask_workers("pool_command", link, {"action": name, "database": database,
                                                     "client_id": args.get("id")}, targets=current, on_done=done,
                              booting=True)
        elif name == "set":
            self.set_setting(link, str(args.get("key", "")), args.get("value"))
        else:
            link.post("reply", ok=False, error=f"unknown command {name!r}")

    def _pool_state(self, action: str, database: str | None) -> None:
        """Keep PAUSE / RESUME / KILL / DISABLE / ENABLE for the workers that start later."""
        if action in ("pause", "kill", "resume"):
            note_pause(self, "pause" if action == "kill" else action, database)
        elif action == "disable":
            self.disabled_dbs.add(database)
        elif action == "enable":
            self.disabled_dbs.discard(database)

    def status(self) -> dict:
        return {
            "pid": os.getpid(), "version": __version__, "config": self.config.path,
            "uptime": time.time() - self.started, "generation": self.generation,
            "stopping": self.stopping, "summary": self.summary(),
            "workers": [{"slot": w.slot, "pid": w.pid, "generation": w.generation, "ready": w.ready,
                         "draining": w.draining, "clients": w.clients, "servers": w.servers,
                         "uptime": self.loop.clock() - w.started}
                        for w in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot))],
        }

    def _ask_workers(self, msg_type: str, link, fields: dict, targets=None, on_done=None, booting: bool = False):
        """Send a request to workers and reply to ``link`` once all answered (or after 3 s).

        ``booting``: also to workers not ready yet (they read it once their loop runs)."""
        rid = next(self._ids)
        targets = [w for w in (targets or self.workers.values()) if w.ready or booting]
        req = {"link": link, "type": msg_type, "waiting": {w.pid for w in targets}, "replies": {},
               "on_done": on_done}
        self.pending[rid] = req
        for w in targets:
            w.link.post(msg_type, id=rid, **fields)
        req["timer"] = self.loop.call_later(3.0, self._finish_request, rid)
        if not targets:
            self._finish_request(rid)

    def _collect(self, wp, msg):
        req = self.pending.get(msg.get("id"))
        if req is None:
            return
        req["replies"][wp.pid] = msg
        req["waiting"].discard(wp.pid)
        if not req["waiting"]:
            self._finish_request(msg["id"])

    def _finish_request(self, rid):
        req = self.pending.pop(rid, None)
        if req is None:
            return
        req["timer"].cancel() if "timer" in req else None
        if req["on_done"] is not None:
            req["on_done"](req)
            return
        link = req["link"]
        if req["type"] == "stats_request":
            link.post("reply", ok=True, data=self._stats_report(req))

    def _stats_report(self, req) -> dict:
        def figures(pid):
            try:
                p = psutil.Process(pid)
                t = p.cpu_times()
                return {"rss": p.memory_info().rss, "cpu": t.user + t.system}
            except psutil.Error:
                return {"rss": 0, "cpu": 0.0}
        workers = []
        for pid, msg in sorted(req["replies"].items()):
            wp = self.workers.get(pid)
            data = dict(msg.get("data") or {})
            data.update(figures(pid))
            data.setdefault("slot", wp.slot if wp else -1)
            data.setdefault("generation", wp.generation if wp else -1)
            data["pid"] = pid
            workers.append(data)
        missing = sorted(req["waiting"])
        silent = [{"pid": pid, "slot": wp.slot, "generation": wp.generation, "clients": wp.clients,
                   "servers": wp.servers, **figures(pid)}
                  for pid, wp in ((pid, self.workers.get(pid)) for pid in missing) if wp is not None]
        return {"master": {"pid": os.getpid(), **figures(os.getpid())}, "workers": workers,
                "missing": missing, "missing_workers": silent,
                "hosts": self.health.rows() if self.health is not None else [],
                "dns": self.health.resolver.rows() if self.health is not None else []}

    # -- reload --------------------------------------------------------------------------------
    def set_setting(self, link, key: str, value) -> None:
        """The admin console's SET: reload the configuration as last loaded, with ``key`` = ``value``."""
        setting = next((s for s in configmod.SCHEMA if s.section == "pgmp" and s.name == key), None)
        if setting is None or not setting.reloadable:
            link.post("reply", ok=False, error=f"{key} is not a setting that applies on reload")
            return
        self.reload(link, overrides={**self.overrides, key: value})

    def reload(self, link=None, overrides: dict | None = None):
        """Reload the config file (dropping SET values), or with ``overrides`` the text last loaded."""
        reopen_log_files()
        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        path = self.config.path
        try:
            if overrides is None or self.config_text is None:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            else:
                text = self.config_text
            new = configmod.loads(text, path, overrides)
            check_files(new)
        except (configmod.ConfigError, FileCheckError, OSError) as exc:
            msg = str(exc) if not isinstance(exc, OSError) else f"cannot read {path}: {exc.strerror or exc}"
            log.error("reload failed, keeping the running configuration:\n%s", msg)
            notify("READY=1", f"STATUS=reload failed; {self.summary()}")
            if link is not None:
                link.post("reply", ok=False, error=msg)
            return
        self.config_text, self.overrides = text, overrides or {}
        live, restart = configmod.diff(self.config, new)
        if new.metrics_listen != self.config.metrics_listen:
            try:
                self._listen_metrics(new.metrics_listen)
            except ListenError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                notify("READY=1", f"STATUS=reload failed; {self.summary()}")
                if link is not None:
                    link.post("reply", ok=False, error=str(exc))
                return
        fixed = [n for n in restart if n in ("pidfile", "control_socket")]
        if fixed:
            log.warning("reload: %s cannot change while pgmp runs; restart pgmp to apply", ", ".join(fixed))
        regen = [n for n in restart if n not in fixed]
        old = self.config
        if fixed:
            import dataclasses
            new = dataclasses.replace(new, pidfile=old.pidfile, control_socket=old.control_socket)
        self.config = new
        set_log_level(new.log_level)
        if self.health is not None:
            self.health.configure(new)
        if regen:
            try:
                self._new_generation()
            except StartError as exc:
                self.config = old
                if self.health is not None:
                    self.health.configure(old)
                if new.metrics_listen != old.metrics_listen:
                    try:
                        self._listen_metrics(old.metrics_listen)
                    except ListenError as err:
                        log.error("%s", err)
                log.error("reload failed, keeping the running configuration: %s", exc)
                notify("READY=1", f"STATUS=reload failed; {self.summary()}")
                if link is not None:
                    link.post("reply", ok=False, error=str(exc))
                return
            log.info("reload: %s changed: starting worker generation %d", ", ".join(regen), self.generation)
            notify("READY=1", f"STATUS={self.summary()}")
            if link is not None:
                link.post("reply", ok=True, data={"changed": live + regen, "generation": self.generation})
            return

        def done(req):
            errors = [m.get("error") for m in req["replies"].values() if not m.get("ok")]
            if req["waiting"]:
                errors.append(f"{len(req['waiting'])} workers did not answer")
            if errors:
                log.error("reload: some workers refused the configuration: %s", "; ".join(map(str, errors)))
            else:
                log.info("configuration reloaded from %s (%s)", path, ", ".join(live) or "no changes")
            notify("READY=1", f"STATUS={self.summary()}")
            if link is not None:
                link.post("reply", ok=not errors, error="; ".join(map(str, errors)) or None,
                          data={"changed": live, "generation": self.generation})

        current = [w for w in self.workers.values() if not w.draining]
        # (also to workers still booting: they forked with the configuration before this one, and
        # would keep it)
        self._ask_workers("reload", None, {"path": path, "text": text, "overrides": self.overrides},
                          targets=current, on_done=done, booting=True)

    def _new_generation(self):
        cfg = self.config
        n = cfg.workers or os.cpu_count() or 1
        try:
            socks = bind_all(cfg, n, takeover=True)
        except ListenError as exc:
            raise StartError(str(exc)) from None
        old = self.generation
        self.generation += 1
        self.nworkers = n
        self.listen[self.generation] = socks
        if socks[1] is not None:
            self.unix_files[self.generation] = _socket_file(cfg.unix_socket_path)
        self.retiring.append(old)
        for slot in range(n):
            self.spawn(slot, self.generation)

    def _drain_generation(self, gen: int, mode: str):
        for w in self.workers.values():
            if w.generation == gen and not w.draining:
                w.draining = True
                w.link.post("drain", mode=mode)
        self._close_listeners(gen)
        if gen in self.retiring:
            self.retiring.remove(gen)

    def _close_listeners(self, gen: int):
        tcp, unix = self.listen.pop(gen, ([], None))
        for socks in tcp:
            for s in socks:
                s.close()
        _unlink_if_ours(self.unix_files.pop(gen, None))
        if unix is not None:
            unix.close()

    def _retire_check(self):
        pass

    # -- stop and restart --------------------------------------------------------------------
    def stop(self, mode: str):
        if self.stopping == "immediate" or (self.stopping == mode):
            return
        first = self.stopping is None
        self.stopping = mode
        log.info("stopping (%s)%s", mode, "" if first else " (escalated)")
        notify("STOPPING=1", f"STATUS=stopping ({mode})")
        for gen in list(self.listen):
            self._close_listeners(gen)
        if self.metrics is not None and self.successor and psutil.pid_exists(self.successor):
            self.metrics.close_listener()      # the new master answers on the same address
        for timer in self.respawn_timers.values():
            timer.cancel()
        if mode == "immediate":
            for wp in self.workers.values():
                _kill(wp.pid, signal.SIGKILL)
            return
        for wp in self.workers.values():
            wp.draining = True
            wp.link.post("drain", mode=mode)
        if mode == "graceful":
            self.loop.call_later(self.config.shutdown_timeout, self._shutdown_timeout)
        else:
            self.loop.call_later(KILL_GRACE, self._kill_all)

    def _shutdown_timeout(self):
        if self.workers:
            log.warning("shutdown_timeout (%gs) reached with clients still connected: closing them",
                        self.config.shutdown_timeout)
            self.stopping = "fast"
            for wp in self.workers.values():
                wp.link.post("drain", mode="fast")
            self.loop.call_later(KILL_GRACE, self._kill_all)

    def _kill_all(self):
        for wp in self.workers.values():
            log.error("%r still running: SIGKILL", wp)
            _kill(wp.pid, signal.SIGKILL)

    def restart(self) -> dict:
        """Start a new master on the same sockets (SO_REUSEPORT); it tells this one to drain when ready."""
        if self.stopping:
            return {"ok": False, "error": "pgmp is stopping"}
        cmd = [sys.executable, "-m", "pgmp", "start", "-c", self.config.path, "--takeover", str(os.getpid())]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError as exc:
            log.error("restart: cannot start a new master: %s", exc)
            return {"ok": False, "error": f"cannot start a new master: {exc}"}
        log.info("restart: new master started (pid %d); this one drains once it is ready", proc.pid)
        self.successor = proc.pid
        return {"ok": True, "data": {"old_pid": os.getpid(), "new_pid": proc.pid}}

    def broadcast_hosts(self) -> None:
        """The health checks' host table to every worker (also those still booting: they read it once ready)."""
        rows = self.health.message_rows()
        for wp in self.workers.values():
            if not wp.link.closed:
                wp.link.post("host_state", hosts=rows)

    def cleanup(self):
        if self.health is not None:
            self.health.close()
        self._close_sockets()
        if self.pidfile and read_pidfile(self.pidfile) == os.getpid():
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        log.info("pgmp stopped (pid %d)", os.getpid())

    def _set_title(self):
        try:
            import setproctitle
            setproctitle.setproctitle(f"pgmp: master [gen {self.generation}] {self.summary()} {self.config.path}")
        except Exception:
            pass


class _ConsoleReply:
    """Where a command from a worker's admin console answers: "reply" becomes console_result with its id."""
    __slots__ = ("link", "id")

    def __init__(self, link, rid):
        self.link = link
        self.id = rid

    def post(self, msg_type: str, **fields):
        self.link.post("console_result", id=self.id, **fields)


def _record(signum, frame):
    """Signal handler: the wakeup fd already carries the signal number; nothing else happens here."""


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
