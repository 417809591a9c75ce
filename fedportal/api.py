"""What every API view shares: the one place domain errors and DRF errors become JSON.

Every error body is ``{"code": "...", "message": "...", "field": "..."}`` (``field`` when one
input is at fault). Views raise ``sites.exceptions.DomainError`` subclasses (through the
services) or DRF's own exceptions; neither builds an error response itself.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from sites.exceptions import DomainError


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
    return response
