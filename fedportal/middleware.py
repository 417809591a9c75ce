"""HTTP middleware of the portal's own."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Adds ``FEDPORTAL_CONTENT_SECURITY_POLICY`` to every response that has none (Django 5.2
    has no CSP support of its own). The pages keep every script and style in files, so the
    default policy needs neither ``'unsafe-inline'`` nor ``'unsafe-eval'``."""

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        policy = str(getattr(settings, "FEDPORTAL_CONTENT_SECURITY_POLICY", "") or "")
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy
        return response
