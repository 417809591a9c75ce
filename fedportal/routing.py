"""WebSocket routes.

Site agents sign their handshake, so their route needs no session and sends no Origin. Routes
for people go through :func:`for_people`: Django's session (``scope["user"]``) and a check that
the page opening the socket came from this portal's own hosts.
"""

from typing import Any

from channels.auth import AuthMiddlewareStack
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
