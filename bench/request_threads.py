"""The cost of one HTTP request in the portal's ASGI handler, against Django's own.

Django's ``ASGIHandler`` starts a thread for every request (asgiref gives each request's
``ThreadSensitiveContext`` a new single-thread executor) and another to join it when the
request ends. The portal's handler (``fedportal.asgi.PortalASGIHandler``) keeps those
threads for later requests (``RequestThreads``), and runs the middleware and view in one
step. Both serve ``GET /healthz`` through the whole middleware chain here, in this process,
with no server or socket in front: what differs is the handler alone.

Each round serves ``--requests`` requests with each handler, the two taking turns; the
figures are process CPU and wall time per request, best and median of ``--rounds``.

    .venv/bin/python bench/request_threads.py [--requests 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import benchlib
from benchlib import REPO_ROOT, md_table, median

sys.path.insert(0, str(REPO_ROOT))  # tests.asgi_requests: the request the tests send
from tests.asgi_requests import get_healthz

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")
os.environ.setdefault("FEDPORTAL_DEV", "1")  # the development secrets; nothing is served


async def per_request(app: Callable[..., Any], requests: int) -> tuple[float, float]:
    """(CPU, wall) seconds per request over ``requests`` requests."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        status = await get_healthz(app)
        if status != 200:
            raise SystemExit(f"GET /healthz answered {status}")
    return (time.process_time() - cpu) / requests, (time.perf_counter() - wall) / requests


async def measure(requests: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from django.core.handlers.asgi import ASGIHandler

    from fedportal.asgi import django_asgi_app

    portal = django_asgi_app

    async def djangos(scope: Any, receive: Any, send: Any) -> None:
        # Django's own entry point (a thread started for the request and one to join it),
        # around the same middleware chain and view.
        await ASGIHandler.__call__(portal, scope, receive, send)

    apps: dict[str, Callable[..., Any]] = {
        "Django's ASGIHandler (a thread per request)": djangos,
        "the portal's handler (threads kept)": portal,
    }
    for app in apps.values():  # warm up: imports, URL resolver, first connections
        await per_request(app, 200)
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            figures[name].append(await per_request(app, requests))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    benchlib.print_header(
        "An HTTP request in the portal's ASGI handler against Django's",
        f"GET /healthz in-process, {args.requests} requests a round, {args.rounds} rounds",
    )
    import django

    django.setup(set_prefix=False)
    figures = asyncio.run(measure(args.requests, args.rounds))
    rows = []
    for name, runs in figures.items():
        cpus = [cpu * 1e6 for cpu, _ in runs]
        walls = [wall * 1e6 for _, wall in runs]
        rows.append(
            [
                name,
                f"{min(cpus):.0f}",
                f"{median(cpus):.0f}",
                f"{min(walls):.0f}",
                f"{median(walls):.0f}",
            ]
        )
    print(
        md_table(
            ["handler", "CPU µs / request, best", "median", "wall µs / request, best", "median"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
