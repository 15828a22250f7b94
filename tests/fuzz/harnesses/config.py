"""Fuzz the TOML config loader: pgmp/config.py load (tomllib, then the schema's validation).

Input: the config file's bytes.

Documented errors: ConfigError (TOML syntax, UTF-8, every schema violation; its
``errors`` list says each). Invariants: a ConfigError names the file; a loaded Config
has every database and user the file declares, passes validation when loaded again,
and diff() of it against itself reports nothing.
"""
import os
import tempfile

from pgmp.config import ConfigError, diff, load
from tests.fuzz.harnesses._common import check

MAX_LEN = 8192
_PATH = os.path.join(tempfile.mkdtemp(prefix="pgmp-fuzz-config-"), "pgmp.toml")


def one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        cfg = load(_PATH)
    except ConfigError as exc:
        check(str(exc).startswith(_PATH) and all(e.startswith(_PATH) for e in exc.errors or [str(exc)]),
              f"ConfigError that does not name the file: {exc}")
        return
    again = load(_PATH)
    check(again == cfg, "loading the same file twice differs")
    check(diff(cfg, again) == ([], []), "diff of a config against itself is not empty")
