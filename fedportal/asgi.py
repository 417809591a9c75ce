"""ASGI entry point: HTTP through Django, WebSocket through Channels (see fedportal.routing).

HTTP bodies are bounded per route (``fedportal.bodylimits.BodyLimitMiddleware``); served by
``python -m fedportal.serve`` they are bounded before the server even stores them. With
``FEDPORTAL_SERVE_STATIC`` (development mode) the portal serves /static/ itself.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")

# Set up Django before importing anything that may touch models (consumers do).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from fedportal.bodylimits import BodyLimitMiddleware  # noqa: E402
from fedportal.routing import websocket_application  # noqa: E402

http_app = django_asgi_app
if settings.FEDPORTAL_SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(http_app)

application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(http_app),
        "websocket": websocket_application,
    }
)
