"""ASGI entry point: HTTP through Django, WebSocket through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")

# Set up Django before importing anything that may touch models (Channels' auth does).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # No WebSocket routes yet: the dashboard's and the site agent's consumers come with
        # their issues, and are added to this URLRouter.
        "websocket": AuthMiddlewareStack(URLRouter([])),
    }
)
