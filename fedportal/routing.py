"""WebSocket routes.

Site agents sign their handshake, so their route needs no session and sends no Origin. Routes
for people go through :func:`for_people`: Django's session (``scope["user"]``) and a check that
the page opening the socket came from this portal's own hosts. A path that is no route is
refused with close code 4404 (Channels' router would raise, and the server log a traceback).
"""

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import URLPattern, path

from dashboard.consumers import DashboardConsumer
from jobs.consumers import AgentConsumer


def for_people(app: Any) -> Any:
    return AllowedHostsOriginValidator(AuthMiddlewareStack(app))


websocket_urlpatterns: list[URLPattern] = [
    path("ws/agent/", AgentConsumer.as_asgi()),
    path("ws/dashboard/jobs/<uuid:uid>/", for_people(DashboardConsumer.as_asgi())),
    path("ws/dashboard/projects/<str:slug>/", for_people(DashboardConsumer.as_asgi())),
]


CLOSE_NO_ROUTE = 4404


class WebSocketRouter(URLRouter):  # type: ignore[misc]  # Channels ships no type information
    """Channels' ``URLRouter`` that refuses a path it has no route for with close code 4404
    instead of raising ``ValueError``."""

    def _has_route(self, scope: dict[str, Any]) -> bool:
        path = str(scope.get("path_remaining", scope.get("path", "")))
        root_path = str(scope.get("root_path", ""))
        if "path_remaining" not in scope and root_path:
            if not path.startswith(root_path):
                return False
            path = path[len(root_path) :]
        path = path.lstrip("/")
        return any(route.pattern.match(path) for route in self.routes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self._has_route(scope):
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": CLOSE_NO_ROUTE})
            return
        await super().__call__(scope, receive, send)


websocket_application = WebSocketRouter(websocket_urlpatterns)
