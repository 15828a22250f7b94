"""Two pgmp nodes behind HAProxy (TCP mode, checked by GET /health), end to end with psycopg and one PostgreSQL.

Node a serves ``appdb`` from PostgreSQL's appdb, node b from otherdb, so that
``SELECT current_database()`` tells a client which node it reached. HAProxy
checks each node every 200 ms (down after 2 failures, up after 1 success) and
redispatches a connection a node refuses to the other one.

What is measured (new connections failed, time until HAProxy marks a node
down or up) is printed; run with ``-s`` to see it.
"""
from __future__ import annotations

import http.client
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
import pytest

from tests.support import free_port, holds, kill_trees, wait_for
from tests.support.haproxy import Checks, HAProxyFactory, Node, documented_config_for, find_haproxy
from tests.support.waiting import process_alive

pytestmark = pytest.mark.skipif(find_haproxy() is None,
                                reason="haproxy is not installed: run scripts/setup-env (apt-get install haproxy)")

NODE_DB = {"a": "appdb", "b": "otherdb"}            # node -> the PostgreSQL database it serves appdb from
DB_NODE = {db: node for node, db in NODE_DB.items()}
CHECKS = Checks(inter_ms=200, fall=2, rise=1, timeout_ms=500)


# ---- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture
def haproxy(tmp_path):
    factory = HAProxyFactory(tmp_path)
    yield factory
    factory.stop_all()


def start_node(pgmp, name: str, **config):
    """A pgmp node with its own listen and metrics ports, serving appdb from NODE_DB[name]."""
    metrics_port = free_port()
    proc = pgmp.start(name=name, workers=2,
                      config={"metrics_listen": f"127.0.0.1:{metrics_port}", "shutdown_timeout": 30, **config},
                      databases={"appdb": {"dbname": NODE_DB[name]}})
    proc.node = Node(name, proc.host, proc.port, metrics_port)
    return proc


def health(node: Node) -> int | None:
    """The status /health of a node answers now; None if it does not answer."""
    conn = http.client.HTTPConnection(node.host, node.metrics_port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def cluster(pgmp, haproxy, **haproxy_args):
    """Nodes a and b and HAProxy in front of them, both nodes UP."""
    nodes = {name: start_node(pgmp, name) for name in NODE_DB}
    lb = haproxy.start([n.node for n in nodes.values()], checks=CHECKS, **haproxy_args)
    for name in nodes:
        lb.wait_status(name, "UP")
    return nodes, lb


def node_of(conn) -> str:
    return DB_NODE[conn.execute("SELECT current_database()").fetchone()[0]]


def connect(lb, **kw) -> psycopg.Connection:
    return psycopg.connect(lb.dsn(), autocommit=True, **kw)


def sessions_on_both(lb, n: int) -> dict[str, list[psycopg.Connection]]:
    """Open n sessions through HAProxy; node -> its sessions."""
    by_node: dict[str, list] = {name: [] for name in NODE_DB}
    for _ in range(n):
        conn = connect(lb)
        by_node[node_of(conn)].append(conn)
    return by_node


class Runner(threading.Thread):
    """One session running a query after another until stopped or until one fails."""

    def __init__(self, conn):
        super().__init__(daemon=True)
        self.conn, self.done, self.error = conn, 0, None
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.conn.execute("SELECT pg_sleep(0.01)")
            except psycopg.Error as exc:
                self.error = exc
                return
            self.done += 1

    def stop(self):
        self.stopping.set()
        self.join(10)


@dataclass
class Prober:
    """Threads opening new connections through HAProxy one after another, each running one query."""

    lb: object
    threads: int = 2
    results: list = field(default_factory=list)       # (monotonic time, node or None, error or None)

    def __post_init__(self):
        self.stopping = threading.Event()
        self.workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def _run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                with psycopg.connect(self.lb.dsn(connect_timeout=5), autocommit=True) as conn:
                    self.results.append((started, node_of(conn), None))
            except psycopg.Error as exc:
                self.results.append((started, None, exc))

    def __enter__(self):
        for t in self.workers:
            t.start()
        wait_for(lambda: len(self.results) >= 10, timeout=20, message="no new connection through haproxy")
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.workers:
            t.join(15)

    def since(self, t: float) -> list:
        return [r for r in list(self.results) if r[0] >= t]

    def failures(self, since: float = 0.0) -> list:
        return [r for r in self.since(since) if r[2] is not None]

    def nodes(self, since: float = 0.0) -> Counter:
        return Counter(r[1] for r in self.since(since) if r[1] is not None)


def report(what: str, **figures) -> None:
    print(f"\n[load balancer] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ---- tests ---------------------------------------------------------------------------------------

def test_connections_spread_over_both_nodes(pgmp, haproxy):
    nodes, lb = cluster(pgmp, haproxy)
    by_node = sessions_on_both(lb, 8)
    try:
        counts = {name: len(conns) for name, conns in by_node.items()}
        assert counts == {"a": 4, "b": 4}, f"roundrobin should alternate: {counts}"
        assert {int(row["scur"]) for row in lb.stat().values()} == {4}
    finally:
        for conns in by_node.values():
            for c in conns:
                c.close()


def test_documented_config_works(pgmp, haproxy):
    """The haproxy.cfg of pgmp-ha(7) (and the README), pointed at two test nodes: checks pass, sessions spread."""
    nodes, lb = cluster(pgmp, haproxy, config=documented_config_for)
    wait_for(lambda: {row["check_status"] for row in lb.stat().values()} == {"L7OK"}, timeout=10,
             message=lambda: f"the documented health check does not pass: {lb.stat()}\n{lb.log()}")
    by_node = sessions_on_both(lb, 4)
    try:
        assert {name: len(conns) for name, conns in by_node.items()} == {"a": 2, "b": 2}, "leastconn should spread"
    finally:
        for conns in by_node.values():
            for c in conns:
                c.close()


def test_kill_one_node_loses_only_its_sessions(pgmp, haproxy):
    nodes, lb = cluster(pgmp, haproxy)
    by_node = sessions_on_both(lb, 8)
    runners = {name: [Runner(c) for c in conns] for name, conns in by_node.items()}
    for r in runners["a"] + runners["b"]:
        r.start()
    wait_for(lambda: all(r.done >= 3 for r in runners["a"] + runners["b"]), timeout=20,
             message="sessions did not run queries")
    try:
        with Prober(lb) as prober:
            killed_at = time.monotonic()
            pids = kill_trees([nodes["a"].pid])
            wait_for(lambda: not any(map(process_alive, pids)), timeout=10, message=f"{pids} survived SIGKILL")
            dead_at = time.monotonic()
            lb.wait_status("a", "DOWN", timeout=10)
            down_after = time.monotonic() - killed_at
            marked_down = time.monotonic()

            # the sessions of a are lost, those of b go on
            wait_for(lambda: all(r.error is not None for r in runners["a"]), timeout=10,
                     message="a session of the killed node still runs queries")
            before = [r.done for r in runners["b"]]
            wait_for(lambda: all(r.done >= n + 5 for r, n in zip(runners["b"], before)), timeout=10,
                     message="the sessions of node b stopped running queries")
            assert [r.error for r in runners["b"]] == [None] * len(runners["b"])

            # after HAProxy marked a down: every new connection succeeds, through b
            wait_for(lambda: len(prober.since(marked_down)) >= 20, timeout=20, message="no new connections")
            window_failures = prober.failures()
            # lost: only connections that were in flight to a when it died (a refused one is redispatched)
            assert [r for r in window_failures if r[0] >= dead_at] == [], \
                "a connection started after node a died failed"
            assert prober.nodes(marked_down).keys() == {"b"}

            # a comes back (same ports) and rejoins
            restarted_at = time.monotonic()
            revived = pgmp.start_file(nodes["a"].config_path, nodes["a"].host, nodes["a"].port,
                                      nodes["a"].unix_socket_dir)
            up_after = lb.wait_status("a", "UP", timeout=20)
            rejoined = time.monotonic()
            wait_for(lambda: prober.nodes(rejoined)["a"] >= 5, timeout=20,
                     message=lambda: f"node a got no new connections after it came back: {prober.nodes(rejoined)}")
            report("kill -9 of node a", down_after_s=f"{down_after:.3f}",
                   up_after_restart_s=f"{time.monotonic() - restarted_at:.3f}", up_wait_s=f"{up_after:.3f}",
                   new_connections=len(prober.results),
                   tried_while_up=len([r for r in prober.results if killed_at <= r[0] < marked_down]),
                   redispatched=lb.redispatched(), failed=len(window_failures), lost_sessions=len(runners["a"]),
                   kept_sessions=len(runners["b"]),
                   failures=[(round(r[0] - killed_at, 3), str(r[2]).strip()) for r in window_failures])
            assert down_after <= CHECKS.down_within + 3.0, f"HAProxy took {down_after:.2f}s to mark a down"
            assert revived.alive
        assert prober.failures(rejoined) == []
    finally:
        for r in runners["a"] + runners["b"]:
            r.stop()
            r.conn.close()


def test_graceful_stop_moves_new_connections_away(pgmp, haproxy):
    nodes, lb = cluster(pgmp, haproxy)
    by_node = sessions_on_both(lb, 8)
    in_transaction, *idle_on_a = by_node["a"]
    in_transaction.execute("BEGIN")
    in_transaction.execute("CREATE TEMP TABLE t (x int)")
    runners = [Runner(c) for c in by_node["b"]]
    for r in runners:
        r.start()
    a = nodes["a"]
    stopped: list = []
    try:
        with Prober(lb) as prober:
            stop = threading.Thread(target=lambda: stopped.append(
                pgmp.cli("stop", "-c", a.config_path, "--no-wait")), daemon=True)
            asked_at = time.monotonic()
            stop.start()
            wait_for(lambda: health(a.node) == 503, timeout=10, interval=0.005,
                     message=lambda: f"/health of the stopping node says {health(a.node)}")
            unhealthy_at = time.monotonic()
            stop.join(30)
            assert stopped[0].returncode == 0, stopped[0].stderr
            lb.wait_status("a", "DOWN", timeout=10)
            marked_down = time.monotonic()

            # the session in a transaction finishes it on the draining node; the idle ones are closed
            assert a.alive and health(a.node) == 503
            in_transaction.execute("INSERT INTO t VALUES (1)")
            assert in_transaction.execute("SELECT count(*) FROM t").fetchone() == (1,)
            in_transaction.execute("COMMIT")
            for conn in [in_transaction, *idle_on_a]:      # closed: at the transaction's end, or at once
                with pytest.raises(psycopg.OperationalError) as closed:
                    conn.execute("SELECT 1")
                # 57P01 (admin_shutdown), or none when the query met the closed socket first: the
                # reset it draws makes the client's kernel drop the unread FATAL
                assert closed.value.sqlstate in ("57P01", None), closed.value
            a.process.wait(15)
            exited_at = time.monotonic()
            # (and maybe a new connection a took just before, closed after its first request)
            assert a.log().count(": 57P01 terminating connection due to administrator command") >= len(by_node["a"]), \
                a.log()

            wait_for(lambda: len(prober.since(marked_down)) >= 20, timeout=20, message="no new connections")
            assert prober.nodes(marked_down).keys() == {"b"}
            holds(lambda: [r.error for r in runners] == [None] * len(runners), 0.3)
        failures = prober.failures()
        down_after = marked_down - unhealthy_at
        report("graceful stop of node a (pgmp stop)", unhealthy_after_command_s=f"{unhealthy_at - asked_at:.3f}",
               down_after_unhealthy_s=f"{down_after:.3f}", exited_after_unhealthy_s=f"{exited_at - unhealthy_at:.3f}",
               new_connections=len(prober.results),
               tried_while_up=len([r for r in prober.results if unhealthy_at <= r[0] < marked_down]),
               redispatched=lb.redispatched(), failed=len(failures), failures=[str(r[2]).strip() for r in failures])
        assert failures == [], "new connections failed during a graceful stop"
        assert a.process.returncode == 0
        assert down_after <= CHECKS.down_within + 3.0, f"HAProxy took {down_after:.2f}s to mark a down"
    finally:
        for r in runners:
            r.stop()
        for conns in by_node.values():
            for c in conns:
                c.close()


# ---- cancel requests -----------------------------------------------------------------------------

def sessions_total(lb) -> dict[str, int]:
    return {name: int(row["stot"]) for name, row in lb.stat().items()}


def cancel_once(lb, pg, conn, node: str) -> tuple[str, bool]:
    """Run pg_sleep(30) on ``conn`` (held by ``node``), cancel it through HAProxy: (node the cancel reached, worked?)."""
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    outcome: list = []

    def sleep():
        try:
            conn.execute("SELECT pg_sleep(30)")
            outcome.append("finished")
        except psycopg.errors.QueryCanceled as exc:
            outcome.append(exc)

    query = threading.Thread(target=sleep, daemon=True)
    query.start()
    running = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {backend} AND query LIKE '%pg_sleep(30)%' " \
              "AND state = 'active'"
    wait_for(lambda: pg.psql(running) == "1", timeout=10, message="the query did not start")
    before = sessions_total(lb)
    conn.cancel()
    after = wait_for(lambda: (t := sessions_total(lb)) != before and t, timeout=5,
                     message="the cancel request reached no node")
    reached = next(name for name in after if after[name] != before[name])
    if reached == node:
        query.join(10)
    else:
        # a miss is a query that keeps running; then it is cancelled on PostgreSQL itself
        holds(lambda: pg.psql(running) == "1", 1.0, interval=0.2)
        pg.psql(f"SELECT pg_cancel_backend({backend})")
        query.join(10)
    assert not query.is_alive()
    worked = reached == node and isinstance(outcome[0], psycopg.errors.QueryCanceled)
    return reached, worked


def test_cancel_through_roundrobin_works_only_when_it_reaches_the_session_node(pgmp, haproxy, pg):
    """A CancelRequest is a new connection: roundrobin may send it to the node that does not hold the session,
    which does not know the key and drops it (pgmp does not forward cancels between nodes)."""
    nodes, lb = cluster(pgmp, haproxy)
    by_node = sessions_on_both(lb, 2)
    conn = by_node["a"][0]
    outcomes = [cancel_once(lb, pg, conn, "a") for _ in range(4)]
    report("cancel through roundrobin", outcomes=outcomes,
           worked=sum(w for _, w in outcomes), missed=sum(not w for _, w in outcomes))
    assert all(worked == (reached == "a") for reached, worked in outcomes), outcomes
    assert {reached for reached, _ in outcomes} == {"a", "b"}, "roundrobin should send cancels to both nodes"
    for conns in by_node.values():
        for c in conns:
            c.close()


def test_cancel_with_balance_source_reaches_the_session_node(pgmp, haproxy, pg):
    """With ``balance source`` the cancel comes from the client's address, so it reaches the same node."""
    nodes, lb = cluster(pgmp, haproxy, balance="source")
    conn = connect(lb)
    node = node_of(conn)
    outcomes = [cancel_once(lb, pg, conn, node) for _ in range(3)]
    report("cancel through balance source", outcomes=outcomes)
    assert outcomes == [(node, True)] * 3
    conn.close()
