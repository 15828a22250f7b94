"""pgmp's logging: one handler on the "pgmp" logger (stderr or logfile), its level, and reopening on reload."""
import logging
import sys


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
    root.propagate = False
    set_log_level(level)


def set_log_level(level: str) -> None:
    logging.getLogger("pgmp").setLevel(level.upper())


def reopen_log_files() -> None:
    """Close the logfile so the next line reopens it by name (after logrotate moved it away)."""
    for handler in logging.getLogger("pgmp").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()
