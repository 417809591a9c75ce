"""What every API view shares: the one place domain errors and DRF errors become JSON.

Every error body is ``{"code": "...", "message": "...", "field": "..."}`` (``field`` when one
input is at fault). Views raise ``common.exceptions.DomainError`` subclasses (through the
services) or DRF's own exceptions; neither builds an error response itself. The view bases
and the input and schema helpers they share are in :mod:`fedportal.api_views`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, pagination, parsers, status
from rest_framework.request import Request
from rest_framework.response import Response

from client_agent import jsonlimits
from common.exceptions import DomainError, ValidationFailed

# Positions in a list the API pages through: a page starts at most here (the database's
# integer range), and holds at most MAX_PAGE_SIZE items.
MAX_OFFSET = 2**31 - 1
MAX_PAGE_SIZE = 1000


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with the nesting bound of :mod:`client_agent.jsonlimits` (a deeply
    nested body is a 400 naming the limit, not a ``RecursionError``). The body's size is
    bounded before it is read (``fedportal.bodylimits``)."""

    def parse(
        self,
        stream: IO[bytes] | None,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        if stream is None:
            return None
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        raw = stream.read()
        try:
            return jsonlimits.loads(raw.decode(encoding), allow_nan=not self.strict)
        except (UnicodeDecodeError, ValueError) as exc:
            raise exceptions.ParseError(f"the body is not valid JSON: {exc}") from None


class StreamedJSONParser(parsers.BaseParser):
    """JSON for a body signed over its ``X-Content-SHA256`` header (an agent's streamed
    request, ``jobs.api.authentication``): read from the stream (not ``request.body``, which
    Django caps at ``DATA_UPLOAD_MAX_MEMORY_SIZE``; the route's own limit bounds it,
    ``fedportal.bodylimits``), it must hash to that header, else 400 and nothing is used."""

    media_type = "application/json"

    def parse(
        self,
        stream: IO[bytes] | None,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        import hashlib

        raw = stream.read() if stream is not None else b""
        request = (parser_context or {}).get("request")
        claimed = request.headers.get("X-Content-SHA256", "") if request is not None else ""
        if hashlib.sha256(raw).hexdigest() != claimed.strip().lower():
            raise exceptions.ParseError("the body does not match X-Content-SHA256")
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            return jsonlimits.loads(raw.decode(encoding), allow_nan=False)
        except (UnicodeDecodeError, ValueError) as exc:
            raise exceptions.ParseError(f"the body is not valid JSON: {exc}") from None


class Pagination(pagination.LimitOffsetPagination):
    """``?limit=&offset=`` checked like any other input: a value that is not a whole number in
    range is a 400 naming the parameter (DRF would quietly use the default, and pass an offset
    past the database's integer range to the database)."""

    max_limit = MAX_PAGE_SIZE

    def _bounded(self, request: Request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            raise ValidationFailed(f"must be a whole number from {low} to {high}", field=name)
        return int(raw)

    def get_limit(self, request: Request) -> int | None:
        default = self.default_limit or MAX_PAGE_SIZE
        return self._bounded(request, self.limit_query_param, default, 1, MAX_PAGE_SIZE)

    def get_offset(self, request: Request) -> int:
        return self._bounded(request, self.offset_query_param, 0, 0, MAX_OFFSET)


def _first_error(detail: Any, prefix: str = "") -> tuple[str | None, str]:
    """The first (field, message) of a DRF ValidationError's nested detail."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            field, message = _first_error(
                value, f"{prefix}.{name}" if prefix and name else name or prefix
            )
            return field or None, message
    if isinstance(detail, list) and detail:
        return _first_error(detail[0], prefix)
    return (prefix or None), str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    # Imported here, not at the top: DRF's settings name this module's parser and paginator,
    # and rest_framework.views reads those settings when it is imported, so importing it while
    # this module loads is a cycle (it broke Celery's start-up checks).
    from rest_framework.views import exception_handler as drf_exception_handler

    if isinstance(exc, DomainError):
        return Response(exc.as_dict(), status=exc.status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_error(exc.detail)
        body: dict[str, Any] = {"code": "invalid", "message": message}
        if field:
            body["field"] = field
            body["message"] = f"{field}: {message}"
        body["errors"] = exc.detail
        response.data = body
        response.status_code = status.HTTP_400_BAD_REQUEST
        return response
    if isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else exc.default_code
        response.data = {"code": code, "message": str(exc.detail)}
        if isinstance(exc, exceptions.ParseError):
            response.data["field"] = "body"
        if isinstance(exc, exceptions.Throttled):
            # Set by DRF's __init__ (seconds, or None); its stubs do not declare it.
            wait_s: float | None = getattr(exc, "wait", None)
            if wait_s is not None:
                wait = max(1, math.ceil(wait_s))
                response.data["message"] = f"{exc.detail} Try again in {wait} s."
                response.data["retry_after_seconds"] = wait
    return response
