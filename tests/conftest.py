"""Suite-wide fixtures: the shared PostgreSQL cluster (`pg`) and pgmp processes (`pgmp`).

The harness itself lives in tests/support/; tests import helpers from there
(``from tests.support import wait_for, run, free_port``).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.cluster import Cluster
from tests.support.proxy import PgmpFactory
from tests.support.waiting import kill_trees, process_alive, wait_for
from tests.support.shared import RUN_DIR_ENV, create_run_dir, current_run_dir, remove_run_dir, shared_cluster

_RUN_DIR = pytest.StashKey[Path]()
_PREVIOUS_RUN_DIR = pytest.StashKey["str | None"]()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """In the controller (or a run without xdist): make the run directory the workers inherit."""
    if hasattr(config, "workerinput"):
        return
    config.stash[_PREVIOUS_RUN_DIR] = os.environ.get(RUN_DIR_ENV)
    config.stash[_RUN_DIR] = create_run_dir()
    # A plain SIGTERM (CI timeout, kill) would skip pytest_unconfigure and leak the cluster.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    """In the controller: stop the cluster, remove the run directory, also after failures or ^C."""
    run_dir = config.stash.get(_RUN_DIR, None)
    if run_dir is None:
        return
    remove_run_dir(run_dir)
    previous = config.stash[_PREVIOUS_RUN_DIR]
    if previous is None:
        os.environ.pop(RUN_DIR_ENV, None)
    else:
        os.environ[RUN_DIR_ENV] = previous


@pytest.fixture(scope="session")
def pg() -> Cluster:
    """The run's PostgreSQL cluster (started on first use, shared by all xdist workers)."""
    return shared_cluster(current_run_dir())


@pytest.fixture
def pgmp(pg: Cluster, tmp_path: Path):
    """Factory for pgmp processes: ``pgmp.start(...)`` (or ``pgmp(...)``); all stopped after the test."""
    factory = PgmpFactory(tmp_path, pg)
    yield factory
    factory.stop_all()


@pytest.fixture
def strays():
    """Pids of pgmp processes started outside the harness (a restart's new master, a daemon): they and
    their descendants are killed by pid after the test."""
    pids: list[int] = []
    yield pids
    every = kill_trees(pids)
    wait_for(lambda: not any(map(process_alive, every)), timeout=10, message=f"strays {every} survived SIGKILL")
