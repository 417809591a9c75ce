"""The portal's ASGI application as the browser tests serve it: the real one, with Django's
static files handler in front of HTTP. A deployment serves /static/ from its reverse proxy
(``collectstatic``); the tests have none."""

from channels.routing import ProtocolTypeRouter
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from fedportal.asgi import application as portal

application = ProtocolTypeRouter(
    {
        "http": ASGIStaticFilesHandler(portal.application_mapping["http"]),
        "websocket": portal.application_mapping["websocket"],
    }
)
