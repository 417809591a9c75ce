"""A request to the portal's ASGI application in this process, with no server or socket in
front: for the tests of the handler and for ``bench/request_threads.py``."""

from __future__ import annotations

import asyncio
from typing import Any

HEALTHZ_SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "GET",
    "path": "/healthz",
    "raw_path": b"/healthz",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1")],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 8000),
    "scheme": "http",
    "http_version": "1.1",
    "root_path": "",
    "asgi": {"version": "3.0"},
}


async def get_healthz(app: Any, body_arrives: asyncio.Event | None = None) -> int:
    """One ``GET /healthz`` through ``app``; its status. Its (empty) body arrives once
    ``body_arrives`` is set, so that several requests can be in the application at once; the
    client stays connected."""
    answers: list[dict[str, Any]] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            if body_arrives is not None:
                await body_arrives.wait()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    await app(dict(HEALTHZ_SCOPE), receive, send)
    return int(answers[0]["status"])
