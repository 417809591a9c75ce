"""WSGI entry point (HTTP only; WebSocket needs fedportal.asgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")

application = get_wsgi_application()
