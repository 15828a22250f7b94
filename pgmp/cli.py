"""The operator's command line: pgmp start, config check, and the rest (typer)."""
import logging
import sys

import typer

from pgmp import __version__

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


def setup_logging(level: str, logfile: str = "") -> None:
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d [%(process)d] %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("pgmp")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


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
def start(config: str = ConfigOpt):
    """Start pgmp in the foreground (stop it with SIGTERM or Ctrl-C)."""
    cfg = _load(config)
    setup_logging(cfg.log_level, cfg.logfile)
    log = logging.getLogger("pgmp")
    from pgmp.auth.authfile import AuthFileError
    from pgmp.listen import ListenError, bind_all
    from pgmp.protocol import scanner
    from pgmp.worker import Worker
    try:
        worker = Worker(cfg)
    except AuthFileError as exc:
        typer.echo(f"pgmp: {exc}", err=True)
        raise typer.Exit(1)
    except OSError as exc:
        typer.echo(f"pgmp: cannot read auth_file {cfg.auth_file}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1)
    try:
        tcp, unix = bind_all(cfg, 1)
    except ListenError as exc:
        typer.echo(f"pgmp: {exc}", err=True)
        raise typer.Exit(1)
    worker.listen_on(tcp[0] + ([unix] if unix else []))
    where = ", ".join(f"{a}:{cfg.listen_port}" for a in cfg.listen_addr)
    if unix:
        where += f", {cfg.unix_socket_path}"
    log.info("pgmp %s ready: listening on %s (scanner: %s)", __version__, where, scanner.IMPL)
    worker.run()
    log.info("pgmp stopped")


@config_app.command("check")
def config_check(config: str = ConfigOpt):
    """Validate the configuration file (and its auth_file) without starting."""
    cfg = _load(config)
    if cfg.auth_file:
        from pgmp.auth.authfile import AuthFileError, load_auth_file
        try:
            users = load_auth_file(cfg.auth_file)
        except AuthFileError as exc:
            typer.echo(f"pgmp: {exc}", err=True)
            raise typer.Exit(1)
        except OSError as exc:
            typer.echo(f"pgmp: cannot read auth_file {cfg.auth_file}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{cfg.auth_file}: {len(users)} users")
    typer.echo(f"{cfg.path}: OK ({len(cfg.databases)} databases)")


@config_app.command("settings")
def config_settings():
    """List every setting with its type, default and whether reload applies it."""
    from pgmp.config import render_settings_table
    typer.echo(render_settings_table())


def main():
    app(prog_name="pgmp")


if __name__ == "__main__":
    main()
