"""The portal's server takes many connections at once: a listen backlog far above Twisted's
50, and WebSocket handshakes given time on a busy portal (Daphne's 5 s cut them)."""

from __future__ import annotations

import contextvars
import gc
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daphne.server import Server

from fedportal import server as server_module
from fedportal.server import (
    DEFAULT_LISTEN_BACKLOG,
    DEFAULT_WEBSOCKET_CONNECT_TIMEOUT,
    PortalCommandLine,
    PortalServer,
    with_backlog,
)
from tests.asgi_requests import get_healthz
from tests.daphne_portal import portal_env, served


def test_the_command_line_defaults_are_sized_for_hundreds_of_agents() -> None:
    args = PortalCommandLine().parser.parse_args([])
    assert args.backlog == DEFAULT_LISTEN_BACKLOG == 2048
    assert args.websocket_connect_timeout == DEFAULT_WEBSOCKET_CONNECT_TIMEOUT == 30
    assert PortalCommandLine().parser.parse_args(["--backlog", "64"]).backlog == 64


def test_every_listening_endpoint_gets_the_backlog() -> None:
    assert with_backlog("tcp:port=8000:interface=0.0.0.0", 99) == (
        "tcp:port=8000:interface=0.0.0.0:backlog=99"
    )
    assert with_backlog("unix:/run/portal.sock", 99) == "unix:/run/portal.sock:backlog=99"
    assert with_backlog("tcp:8000:backlog=7", 99) == "tcp:8000:backlog=7"  # its own kept
    assert with_backlog("fd:domain=INET:fileno=3", 99) == "fd:domain=INET:fileno=3"
    server = PortalServer(application=None, endpoints=["tcp:port=0:interface=127.0.0.1"])
    assert server.endpoints == [f"tcp:port=0:interface=127.0.0.1:backlog={DEFAULT_LISTEN_BACKLOG}"]


def test_a_backlog_below_one_is_refused_naming_the_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        PortalCommandLine().run(["--backlog", "0"])
    assert "--backlog must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.django_db
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_running_portal_listens_with_that_backlog(tmp_path: Path) -> None:
    with served(portal_env(tmp_path / "media"), tmp_path / "portal.log", ["--backlog", "777"]) as (
        _,
        port,
        _,
    ):
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
    # For a listening socket, ss's Send-Q column is the backlog it was given.
    queues = re.findall(r"LISTEN\s+\d+\s+(\d+)", listening)
    assert queues == ["777"], listening


def test_an_agent_waits_for_a_handshake_as_long_as_the_portal_gives_one() -> None:
    # An agent that gave up sooner (10 s before) tried again while the portal was still
    # working through the first attempt: at 200 agents, hundreds of retries.
    from client_agent.agent import HANDSHAKE_TIMEOUT_SECONDS

    assert HANDSHAKE_TIMEOUT_SECONDS >= DEFAULT_WEBSOCKET_CONNECT_TIMEOUT


def test_a_request_runs_its_middleware_and_view_in_one_step_of_its_thread() -> None:
    # Django's own ASGI handler kept the chain async: every sync middleware hopped to the
    # request's thread and back, twice, for each request.
    import inspect

    from django.core.handlers.asgi import ASGIHandler

    from fedportal.asgi import PortalASGIHandler

    ours: Any = PortalASGIHandler()  # _middleware_chain: Django's, not in its stubs
    djangos: Any = ASGIHandler()
    assert not inspect.iscoroutinefunction(ours._middleware_chain)
    assert inspect.iscoroutinefunction(djangos._middleware_chain)  # what it was


@pytest.mark.django_db
def test_requests_run_on_threads_kept_for_later_requests_one_thread_each_at_a_time() -> None:
    """Django's handler started a thread for every request, and another to join it (a
    twentieth of a busy portal's CPU). The portal's handler keeps them: one request after
    another runs on the same thread; requests in flight together each have their own; no
    more than ``kept`` wait idle."""
    import asyncio

    from fedportal.asgi import PortalASGIHandler, RequestThreads

    handler: Any = PortalASGIHandler()
    handler.request_threads = threads = RequestThreads(kept=2)
    taken: list[Any] = []
    take = threads.take

    def recorded_take() -> Any:
        executor = take()
        taken.append(executor)
        return executor

    threads.take = recorded_take  # type: ignore[method-assign]

    async def one_after_another() -> list[int]:
        return [await get_healthz(handler) for _ in range(3)]

    assert asyncio.run(one_after_another()) == [200, 200, 200]
    assert taken[0] is taken[1] is taken[2]
    assert len(taken[0]._threads) == 1  # one thread ran all three
    assert threads.idle == 1

    async def together() -> list[int]:
        body_arrives = asyncio.Event()
        requests = [asyncio.ensure_future(get_healthz(handler, body_arrives)) for _ in range(3)]
        await asyncio.sleep(0.05)  # all three are in the handler, waiting for their bodies
        body_arrives.set()
        return list(await asyncio.gather(*requests))

    taken.clear()
    assert asyncio.run(together()) == [200, 200, 200]
    assert len({id(executor) for executor in taken}) == 3
    assert threads.idle == 2  # the third was stopped
    stopped = [executor for executor in taken if executor._shutdown]
    assert len(stopped) == 1
    for executor in taken:  # no thread of this test outlives it
        executor.shutdown(wait=True)


def test_the_view_is_handed_what_the_check_of_its_sender_found() -> None:
    """What the server's check of an upload's sender found (bodylimits.sender_check) goes
    into the request's scope, for the view not to find it again; nothing when it found none."""
    import asyncio

    from fedportal import bodylimits
    from fedportal.server import GuardedRequest

    scopes: list[dict[str, Any]] = []

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)

    server = PortalServer(application=application, endpoints=["tcp:port=0"])  # never listens
    server.connections = {}  # what Server.run sets up

    async def serve(checked: object) -> None:
        # Only what create_application reads of a request: no connection behind it.
        request = GuardedRequest.__new__(GuardedRequest)
        request._checked_sender = checked
        server.connections[request] = {}
        server.create_application(request, {"type": "http"})
        await server.connections[request]["application_instance"]

    checked = object()
    asyncio.run(serve(checked))
    asyncio.run(serve(None))
    assert scopes[0][bodylimits.CHECKED_SENDER] is checked
    assert bodylimits.CHECKED_SENDER not in scopes[1]


def _leaked_request_context() -> Any:
    """What a callback scheduled while a request was answered carries: the thread-sensitive
    context of a handler that has since left it (fedportal.asgi's, with its own executor)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from asgiref.sync import SyncToAsync, ThreadSensitiveContext

    leaked: dict[str, Any] = {}

    async def answered() -> None:
        async with ThreadSensitiveContext(executor=ThreadPoolExecutor(max_workers=1)):
            leaked["context"] = contextvars.copy_context()

    asyncio.run(answered())
    assert leaked["context"][SyncToAsync.thread_sensitive_context]._exited
    return leaked["context"]


def test_a_task_the_server_starts_begins_from_a_fresh_context() -> None:
    """Found at 200 agents behind PocEnv's nginx, which keeps its connections to the portals
    alive: every upload's sender check failed ("ThreadSensitiveContext has exited") and was
    answered 503, because it ran in a context left by an earlier request on the connection.
    The server's tasks (each request's application, each sender check) start from a fresh
    context, where thread-sensitive calls run."""
    import asyncio

    from asgiref.sync import sync_to_async

    from fedportal.server import in_fresh_context

    async def thread_sensitive_call() -> str:
        return await sync_to_async(lambda: "ran", thread_sensitive=True)()

    async def start(starter: Any) -> str:
        return str(await starter(thread_sensitive_call()))

    leaked = _leaked_request_context()
    assert leaked.run(asyncio.run, start(in_fresh_context)) == "ran"
    with pytest.raises(RuntimeError, match="ThreadSensitiveContext has exited"):
        leaked.run(asyncio.run, start(asyncio.ensure_future))  # how it started them before


def test_the_server_starts_each_application_from_a_fresh_context() -> None:
    import asyncio

    from asgiref.sync import SyncToAsync

    from fedportal.server import GuardedRequest

    seen: list[Any] = []

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(SyncToAsync.thread_sensitive_context.get(None))

    server = PortalServer(application=application, endpoints=["tcp:port=0"])  # never listens
    server.connections = {}

    async def serve() -> None:
        request = GuardedRequest.__new__(GuardedRequest)
        request._checked_sender = None
        server.connections[request] = {}
        server.create_application(request, {"type": "http"})
        await server.connections[request]["application_instance"]

    _leaked_request_context().run(asyncio.run, serve())
    assert seen == [None]


def test_the_objects_the_portal_loaded_are_set_aside_from_the_collector() -> None:
    # Each full collection had walked every object the portal loaded (about 210,000), stopping
    # it for 170-370 ms every few seconds under a hundred agents.
    try:
        frozen = server_module.freeze_long_lived_objects()
        assert frozen > 10_000
        # A frozen object may still be freed (by another thread, say) before the count.
        assert frozen - 100 <= gc.get_freeze_count() <= frozen
        assert "jobs.api.views" in sys.modules  # the views are loaded before, not after
    finally:
        gc.unfreeze()


def test_the_server_sets_them_aside_before_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(server_module, "freeze_long_lived_objects", lambda: calls.append("freeze"))
    monkeypatch.setattr(Server, "run", lambda self: calls.append("serve"))

    PortalServer(application=None, endpoints=["tcp:port=0:interface=127.0.0.1"]).run()

    assert calls == ["freeze", "serve"]
