"""Project-level views that belong to no app, and the error pages.

Under ``/api/`` every error is the API's JSON body (``{"code", "message"}``), even one that
happens outside DRF's views (an unknown URL, an exception DRF does not handle); the dashboard's
pages get the HTML templates (``templates/404.html`` …).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.templatetags.static import static
from django.views import defaults
from django.views.decorators.http import require_safe

API_PREFIX = "/api/"


def is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


@require_safe
def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico whatever a page links: send them to the static icon (its
    name is looked up per request, as collectstatic's manifest may rename it)."""
    response = redirect(static("dashboard/favicon.svg"))
    response["Cache-Control"] = "max-age=86400"
    return response


@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves requests. It checks no database, broker or storage."""
    return JsonResponse({"status": "ok"})


def _error(code: str, message: str, status: int) -> JsonResponse:
    return JsonResponse({"code": code, "message": message}, status=status)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if is_api(request):
        return _error("bad_request", "the request could not be understood", 400)
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if is_api(request):
        return _error("permission_denied", "you may not do this", 403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if is_api(request):
        return _error("not_found", f"no API endpoint at {request.path}", 404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if is_api(request):
        # The traceback went to the log (django.request); the client learns nothing of it.
        return _error(
            "server_error", "the portal failed to answer this request; it was logged", 500
        )
    return defaults.server_error(request)
