"""``GET /api/v1/``: what the API offers, read from its URL configuration.

The list is built from the routes the portal serves (``sites.api.urls`` and ``jobs.api.urls``),
so it cannot fall behind them: each entry is a path template, its URL name, the methods its
view answers and the first line of the view's docstring. It holds no data, so anyone may read
it, as anyone may read the OpenAPI schema it links to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

from django.urls import URLPattern, URLResolver, reverse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs.api import urls as jobs_urls
from sites.api import urls as sites_urls

API_ROOT = "/api/v1/"
# ``<str:project>`` → ``{project}``, as OpenAPI writes path parameters.
_CONVERTER = re.compile(r"<(?:\w+:)?(\w+)>")
_METHODS = ("get", "post", "put", "patch", "delete")


def _summary(view: Any) -> str:
    doc = (getattr(view, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _entries(patterns: Sequence[URLPattern | URLResolver], namespace: str) -> list[dict[str, Any]]:
    entries = []
    for pattern in patterns:
        if not isinstance(pattern, URLPattern):
            continue
        view = getattr(pattern.callback, "view_class", pattern.callback)
        methods = [m.upper() for m in _METHODS if callable(getattr(view, m, None))]
        entries.append(
            {
                "path": API_ROOT + _CONVERTER.sub(r"{\1}", str(pattern.pattern)),
                "name": f"{namespace}:{pattern.name}",
                "methods": methods,
                "description": _summary(view),
            }
        )
    return entries


@cache
def resources() -> list[dict[str, Any]]:
    """Every route under /api/v1/, people's first and the site agents' (``agent/``, ``enrol/``)
    last; each app in the order its URL module lists them."""
    found = _entries(sites_urls.urlpatterns, sites_urls.app_name)
    found += _entries(jobs_urls.urlpatterns, jobs_urls.app_name)
    for_agents = ("/api/v1/agent/", "/api/v1/enrol/")
    return [e for e in found if not e["path"].startswith(for_agents)] + [
        e for e in found if e["path"].startswith(for_agents)
    ]


_Resource = inline_serializer(
    "ApiResource",
    {
        "path": serializers.CharField(),
        "name": serializers.CharField(),
        "methods": serializers.ListField(child=serializers.CharField()),
        "description": serializers.CharField(),
    },
)


class ApiRootView(APIView):
    """The API's resources, with links to its OpenAPI schema and documentation."""

    permission_classes = [AllowAny]

    @extend_schema(
        tags=["api"],
        responses=inline_serializer(
            "ApiRoot",
            {
                "version": serializers.CharField(),
                "schema": serializers.CharField(),
                "docs": serializers.CharField(),
                "resources": serializers.ListField(child=_Resource),
            },
        ),
    )
    def get(self, request: Request) -> Response:
        return Response(
            {
                "version": "v1",
                "schema": reverse("schema"),
                "docs": reverse("api-docs"),
                "resources": resources(),
            }
        )
