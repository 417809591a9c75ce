"""What an agent's request costs the portal's server on a new connection and on a kept one.

An agent sends a request or two a round (its update, now and then its job list). Until
``client_agent.portal.PortalClient`` kept its connections, each went on a new one: the portal
accepted a socket and set up and tore down Daphne's protocol for it every time. This bench
starts the portal's server (``python -m fedportal.serve``, fail-closed settings) on a fresh
SQLite database and sends ``--requests`` ``GET /healthz`` (Django's whole request path) through
a ``PortalClient`` in turns: with its connection kept between requests, and closed after each
(``PortalClient.close()``), as every request was before. Per request: the server process's CPU
time (``/proc/<pid>/stat``) and the client's wall time; best and median of ``--turns`` turns.

    .venv/bin/python bench/kept_connections.py [--requests 1000] [--turns 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import md_table, median
from benchlib.portal import migrated_database, served_portal, served_portal_env

from client_agent.portal import PortalClient


def turn(client: PortalClient, pid: int, requests: int, *, kept: bool) -> tuple[float, float]:
    """``requests`` requests; the server's CPU ms and the client's wall ms per request."""
    client.close()
    cpu_before = sum(benchlib.cpu_seconds(pid))
    started = time.perf_counter()
    for _ in range(requests):
        client.get("/healthz")
        if not kept:
            client.close()
    wall = time.perf_counter() - started
    cpu = sum(benchlib.cpu_seconds(pid)) - cpu_before
    return 1000 * cpu / requests, 1000 * wall / requests


def measured(workspace: Path, requests: int, turns: int) -> dict[bool, list[tuple[float, float]]]:
    """The portal's server on a database in ``workspace``: per turn, with a kept connection
    (True) and a new connection each (False), the server's CPU ms and the client's wall ms per
    request."""
    env = served_portal_env(workspace)
    migrated_database(workspace, env)
    with served_portal(env) as (server, port):
        client = PortalClient(f"http://127.0.0.1:{port}")
        turn(client, server.pid, 200, kept=True)  # warm-up
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(turns):
            for kept in (False, True):
                results[kept].append(turn(client, server.pid, requests, kept=kept))
        client.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()
    benchlib.print_header(
        "Kept connections (bench/kept_connections.py)",
        f"{args.requests} GET /healthz a turn through PortalClient against the portal's "
        "server, on a kept connection and on a new connection each, in turns.",
    )
    workspace = Path(tempfile.mkdtemp(prefix="fedportal-kept-"))
    try:
        results = measured(workspace, args.requests, args.turns)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    rows = []
    for kept, label in ((False, "a new connection each"), (True, "a kept connection")):
        cpu = [c for c, _ in results[kept]]
        wall = [w for _, w in results[kept]]
        rows.append(
            [
                label,
                f"{min(cpu):.3f}",
                f"{median(cpu):.3f}",
                f"{min(wall):.3f}",
                f"{median(wall):.3f}",
            ]
        )
    print(
        md_table(
            [
                "requests on",
                "server CPU ms (best)",
                "server CPU ms (median)",
                "client wall ms (best)",
                "client wall ms (median)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
