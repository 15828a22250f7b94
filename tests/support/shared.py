"""The run directory shared by the pytest controller and its xdist workers, and the one cluster in it.

The controller creates the directory before any worker spawns and exports it
as $PGMP_TEST_RUN_DIR, which the workers inherit. The first test that needs
PostgreSQL starts the cluster there under an exclusive lock; every other
process waits on that lock and then reads the cluster's coordinates from
cluster.json. The controller stops the cluster and removes the directory at
the end of the run, whatever happened to the workers.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .cluster import Cluster, become_subreaper, start_cluster, stop_cluster, stop_clusters_under
from .waiting import RUN_DIR_ENV, wait_for


def create_run_dir(prefix: str = "pgmp-test-") -> Path:
    """A fresh directory for this run, exported to child processes; the server user can enter it.

    The calling process (the pytest controller) also becomes the subreaper of
    its descendants, so the detached postmaster is reaped when it is stopped.
    """
    become_subreaper()
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    run_dir.chmod(0o711)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def current_run_dir() -> Path:
    value = os.environ.get(RUN_DIR_ENV)
    if not value or not Path(value).is_dir():
        raise RuntimeError(f"${RUN_DIR_ENV} is not set to a directory: the tests/conftest.py "
                           "of this run should have created it")
    return Path(value)


@contextmanager
def _locked(run_dir: Path, timeout: float | None = None):
    with open(run_dir / "cluster.lock", "w") as lock:
        if timeout is None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            def take() -> bool:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False
            try:
                wait_for(take, timeout=timeout, interval=0.05)
            except TimeoutError:
                pass  # a stuck holder must not keep the cluster alive
        yield


def shared_cluster(run_dir: Path) -> Cluster:
    """The run's cluster: started by the first caller, read from cluster.json by the others."""
    info, failure = run_dir / "cluster.json", run_dir / "cluster.error"
    with _locked(run_dir):
        if info.exists():
            return Cluster.load(info)
        if failure.exists():
            raise RuntimeError(f"the test cluster failed to start earlier in this run:\n"
                               f"{failure.read_text()}")
        try:
            cluster = start_cluster(run_dir / "pg")
        except Exception as exc:
            failure.write_text(str(exc))
            raise
        cluster.save(info)
        return cluster


def remove_run_dir(run_dir: Path) -> None:
    """Stop the cluster (if any process started one) and delete the run directory."""
    with _locked(run_dir, timeout=30):
        stop_cluster(run_dir / "pg")
        stop_clusters_under(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
