"""`scripts/demo`: a throwaway cluster, pgmp in front of it, pgbench and psql through pgmp.

Usage: python -m tests.support.demo [--target pgmp|direct] [--seconds 10] [--clients 8] ...
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from .cluster import start_cluster
from .proxy import start_pgmp
from .shared import create_run_dir, remove_run_dir
from .waiting import run

# Where pgbench and psql connect: "pgmp", or "direct" to bypass pgmp.
DEFAULT_TARGET = "pgmp"

USER, PASSWORD, DBNAME = "scram_user", "scram_pass", "appdb"


def banner(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="A throwaway PostgreSQL cluster, pgmp in front of it, pgbench and psql through pgmp.")
    parser.add_argument("--target", choices=("pgmp", "direct"), default=DEFAULT_TARGET,
                        help=f"where pgbench and psql connect (default: {DEFAULT_TARGET})")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T (default: 10)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default: 8)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default: 2)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default: 10)")
    parser.add_argument("--workers", type=int, default=1, help="pgmp worker processes (default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    run_dir = create_run_dir(prefix="pgmp-demo-")
    proxy = None
    try:
        banner("starting a throwaway PostgreSQL cluster")
        started = time.monotonic()
        cluster = start_cluster(run_dir / "pg")
        print(f"{cluster.psql('select version()')}\nlistening on {cluster.host}:{cluster.port}, "
              f"data in {cluster.datadir} (up in {time.monotonic() - started:.1f}s)")
        host, port = cluster.host, cluster.port
        if args.target == "pgmp":
            banner(f"starting pgmp ({args.workers} worker(s), scram-sha-256 auth, session pooling)")
            proxy = start_pgmp(run_dir / "pgmp", cluster, users={USER: PASSWORD},
                               workers=args.workers, databases={DBNAME: {}})
            host, port = proxy.host, proxy.port
            print(f"pgmp pid {proxy.pid} listening on {host}:{port}, in front of {cluster.port}")
        bin_dir = Path(cluster.bin_dir)
        env = {"PGHOST": host, "PGPORT": str(port), "PGUSER": USER, "PGPASSWORD": PASSWORD,
               "PGDATABASE": DBNAME}
        via = f"through pgmp at {host}:{port}" if proxy else f"directly to PostgreSQL at {host}:{port}"

        banner(f"pgbench -i -s {args.scale} {via}")
        started = time.monotonic()
        run([bin_dir / "pgbench", "-i", "-q", "-s", str(args.scale)], env=env, timeout=300)
        print(f"initialized {args.scale * 100000} accounts in {time.monotonic() - started:.1f}s")

        banner(f"pgbench -c {args.clients} -j {args.jobs} -T {args.seconds} {via}")
        subprocess.run([bin_dir / "pgbench", "-c", str(args.clients), "-j", str(args.jobs),
                        "-T", str(args.seconds), "-P", str(max(1, args.seconds // 2))],
                       env={**os.environ, **env}, timeout=args.seconds + 120, check=True)

        banner(f"psql {via}")
        query = ("select version(), current_user, inet_server_addr() as server_addr, "
                 "inet_server_port() as server_port, "
                 "(select count(*) from pgbench_accounts) as accounts")
        print(run([bin_dir / "psql", "-X", "-x", "-c", query], env=env, timeout=30).stdout, end="")

        banner("what PostgreSQL sees (pg_stat_activity, as superuser over its unix socket)")
        print(cluster.psql(
            f"select count(*) || ' server connection(s) open for {USER}, from ' || "
            f"coalesce(string_agg(distinct host(client_addr), ', '), 'nobody') "
            f"from pg_stat_activity where usename = '{USER}'"))
        if proxy:
            banner("stopping pgmp (SIGTERM)")
            code = proxy.stop()
            print(f"pgmp exited with {code}; last lines of its log:")
            print("\n".join(proxy.log().splitlines()[-5:]))
            if code != 0:
                return 1
        return 0
    finally:
        if proxy:
            proxy.stop(timeout=5)
        remove_run_dir(run_dir)
        print(f"\nstopped everything and removed {run_dir}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
