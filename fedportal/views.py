"""Project-level views that belong to no app."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe


@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves requests. It checks no database, broker or storage."""
    return JsonResponse({"status": "ok"})
