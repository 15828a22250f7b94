"""Property: two transaction-mode clients interleaved on one server each see only their own session state.

A small model of a PostgreSQL session (settings, role) stands in for the
server; every transaction of either client first runs the query its Link
asks for at attach, then the client's own statement, fed to the Link as
bytes. Whatever the interleaving, SHOW answers what that client itself set
(or the server default), never what the other client set.
"""
from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pgmp.link import Link, ServerSession
from pgmp.prepared import Pipeline, StatementCache
from pgmp.stats import PoolStats

Q = ord("Q")
IDLE, IN_TX = ord("I"), ord("T")
NAMES = ["work_mem", "myapp.x", "role"]
VALUES = ["a", "b", "c"]
DEFAULT = None


class FakeServer:
    """What matters of one PostgreSQL session here: its non-default settings (role among them)."""

    def __init__(self):
        self.gucs: dict[str, str] = {}

    def run_settings_query(self, frame: bytes) -> None:
        sql = frame[5:-1].decode()
        for stmt in sql.split(";"):
            if stmt.startswith("RESET "):
                self.gucs.pop(stmt[6:], None)
            elif stmt.startswith("SELECT "):
                for name, value in re.findall(r"set_config\('([^']*)', '([^']*)', false\)", stmt):
                    self.gucs[name] = value
            else:
                raise AssertionError(f"unexpected statement in a settings query: {stmt!r}")


def statement(op, name, value) -> tuple[str, bool]:
    """The SQL of one operation and whether it leaves the session changed (committed)."""
    sql_name = "ROLE" if name == "role" else name
    if op == "set":
        return (f"SET ROLE {value}" if name == "role" else f"SET {name} = '{value}'"), True
    if op == "reset":
        return f"RESET {sql_name}", True
    if op == "rolled_back":
        return (f"BEGIN; SET ROLE {value}; ROLLBACK" if name == "role"
                else f"BEGIN; SET {name} = '{value}'; ROLLBACK"), False
    return "RESET ALL", True


def apply(gucs: dict, op, name, value) -> None:
    """PostgreSQL's semantics of the operation on a session's settings."""
    if op == "set":
        gucs[name] = value
    elif op == "reset":
        gucs.pop(name, None)
    elif op == "reset_all":
        for n in [n for n in gucs if n != "role"]:     # RESET ALL leaves the role
            del gucs[n]


ops = st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["set", "reset", "rolled_back", "reset_all"]),
                         st.sampled_from(NAMES), st.sampled_from(VALUES)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_interleaved_clients_never_see_each_others_session_state(steps):
    server = FakeServer()
    session = ServerSession(100)
    links, models = [], [{}, {}]
    for i in range(2):
        link = Link({}, frozenset(), name=f"c{i}@db")
        link.logged_in(lambda: 0.0, PoolStats(), Pipeline(StatementCache()))
        links.append(link)
    for i, op, name, value in steps:
        link = links[i]
        q = link.attach(session)
        if q is not None:
            server.run_settings_query(q)
        assert server.gucs == models[i], f"client {i} got the server with {server.gucs}, expected {models[i]}"
        sql, _ = statement(op, name, value)
        assert link.client_frame(Q, sql.encode() + b"\0") is None
        apply(server.gucs, op, name, value)
        apply(models[i], op, name, value)
        link.server_ready(1, IDLE)
        assert not link.pinned
        link.detach()
        assert link.settings == models[i]
