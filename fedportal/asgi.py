"""ASGI entry point: HTTP through Django, WebSocket through Channels (see fedportal.routing).

HTTP bodies are bounded per route (``fedportal.bodylimits.BodyLimitMiddleware``); served by
``python -m fedportal.serve`` they are bounded before the server even stores them. With
``FEDPORTAL_SERVE_STATIC`` (development mode) the portal serves /static/ itself.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import django
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler

from fedportal.bodylimits import STORED_BODY

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")


# Idle request threads kept for the next requests; more than this many at once are started
# and, when their request ends, stopped. Requests beyond the database pool's size wait for a
# connection anyway (DATABASE_POOL_MAX_SIZE, 10 by default).
REQUEST_THREADS_KEPT = 32


class RequestThreads:
    """Threads for requests' sync code: one for each request while it runs, as Django's
    handler gives, but kept for later requests instead of started for every request.

    Django's handler enters a ``ThreadSensitiveContext`` of its own for each request, and
    asgiref gives that context a new single-thread executor: a thread started for the
    request and, when it ends, another started to join it: about 0.35-0.45 ms of CPU a request
    on this project's VM (``bench/request_threads.py``). A reused thread keeps its thread-local
    state as a WSGI server's threads do: Django closes (or returns to the pool) the
    request's database connection when the request finishes, so none is carried over.

    Only the event loop's thread takes and gives back executors.
    """

    def __init__(self, kept: int = REQUEST_THREADS_KEPT) -> None:
        self.kept = kept
        self._idle: list[ThreadPoolExecutor] = []

    def take(self) -> ThreadPoolExecutor:
        if self._idle:
            return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        if len(self._idle) < self.kept:
            self._idle.append(executor)
        else:
            executor.shutdown(wait=False)  # its thread ends once its work is done

    @property
    def idle(self) -> int:
        return len(self._idle)


class PortalASGIHandler(ASGIHandler):
    """Django's ASGI handler, which takes the body as the file ``fedportal.server`` already
    stored, when offered, instead of copying it into a temporary file of its own, and runs a
    request's middleware and view in one step of its worker thread.

    Django's own handler keeps the middleware chain async: each of the (sync) middlewares then
    hops to the request's thread and back for its request part and again for its response
    part, about sixteen hops a request with ours, and the view one more. Every middleware and
    view here is sync, so the whole chain runs in sync mode, in one hop, on the same
    per-request thread (``ThreadSensitiveContext``) as before; an async view would still be
    run, from that thread. That thread is one of :class:`RequestThreads`, kept between
    requests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.request_threads = RequestThreads()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # Django's error for it
            return
        executor = self.request_threads.take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.request_threads.give_back(executor)

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def get_response_async(self, request: Any) -> Any:
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)

    async def read_body(self, receive: Any) -> Any:
        first = await receive()
        stored = first.get(STORED_BODY)
        if stored is not None:
            return stored.take()

        async def replay() -> Any:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        return await super().read_body(replay)


# Set up Django before importing anything that may touch models (consumers do).
django.setup(set_prefix=False)
django_asgi_app = PortalASGIHandler()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from fedportal.bodylimits import BodyLimitMiddleware  # noqa: E402
from fedportal.routing import websocket_application  # noqa: E402

http_app: ASGIHandler = django_asgi_app
if settings.FEDPORTAL_SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(http_app)

application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(http_app),
        "websocket": websocket_application,
    }
)
