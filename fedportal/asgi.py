"""ASGI entry point: HTTP through Django, WebSocket through Channels (see fedportal.routing).

HTTP bodies are bounded per route (``fedportal.bodylimits.BodyLimitMiddleware``); served by
``python -m fedportal.serve`` they are bounded before the server even stores them. With
``FEDPORTAL_SERVE_STATIC`` (development mode) the portal serves /static/ itself.
"""

import os
from typing import Any

import django
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler

from fedportal.bodylimits import STORED_BODY

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")


class PortalASGIHandler(ASGIHandler):
    """Django's ASGI handler, which takes the body as the file ``fedportal.server`` already
    stored, when offered, instead of copying it into a temporary file of its own, and runs a
    request's middleware and view in one step of its worker thread.

    Django's own handler keeps the middleware chain async: each of the (sync) middlewares then
    hops to the request's thread and back for its request part and again for its response
    part, about sixteen hops a request with ours, and the view one more. Every middleware and
    view here is sync, so the whole chain runs in sync mode, in one hop, on the same
    per-request thread (``ThreadSensitiveContext``) as before; an async view would still be
    run, from that thread.
    """

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
