"""The pgmp test harness: a shared PostgreSQL cluster, pgmp processes, waiting helpers.

Tests import what they need from here, e.g. ``from tests.support import wait_for, run``;
the fixtures `pg` and `pgmp` are defined in tests/conftest.py.
"""
from .cluster import PASSWORDS, TEST_USERS, Cluster, conninfo
from .proxy import PgmpProcess, PgmpStartError, pgmp_cli, start_pgmp, write_config
from .waiting import CommandFailed, free_port, holds, kill_trees, port_accepts, run, sent, stop_process, wait_for, wait_started

__all__ = [
    "PASSWORDS", "TEST_USERS", "Cluster", "conninfo",
    "PgmpProcess", "PgmpStartError", "pgmp_cli", "start_pgmp", "write_config",
    "CommandFailed", "free_port", "holds", "kill_trees", "port_accepts", "run", "sent", "wait_for", "wait_started",
]
