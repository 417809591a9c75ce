"""What every dashboard view shares: finding what the URL names with the same selectors as the
API (another project's objects are 404, never 403), and putting a service's ``field`` error
beside the form field it names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import forms
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from common.exceptions import DomainError, NotFound
from jobs import selectors as job_selectors
from jobs.models import Job
from sites import selectors
from sites.models import Project


def project_for(request: HttpRequest, slug: str) -> Project:
    """The project named by ``slug`` (or its numeric id, as in the API:
    :func:`sites.selectors.project_visible_to`) if the user belongs to it; 404 otherwise,
    whether or not it exists elsewhere."""
    found = selectors.project_visible_to(request.user, slug)
    if found is None:
        raise Http404(f"You have no project called “{slug}”.")
    return found


def job_for(request: HttpRequest, uid: Any) -> Job:
    """The job ``uid`` if the user may see it; 404 otherwise."""
    try:
        return job_selectors.job_visible_to(request.user, uid)
    except NotFound:
        raise Http404("No such job in your projects.") from None


def require(allowed: bool, message: str) -> None:
    """403 with ``message`` (shown on the error page) unless ``allowed``."""
    if not allowed:
        raise PermissionDenied(message)


def source_address(request: HttpRequest) -> str | None:
    address: str | None = request.META.get("REMOTE_ADDR")
    return address


def form_error(form: forms.Form, exc: DomainError, fields: Mapping[str, str] | None = None) -> None:
    """Show a service's error beside the field it names (``fields`` maps service field names to
    form field names), or above the form when it names none of the form's fields."""
    name = exc.field or ""
    name = (fields or {}).get(name, name)
    form.add_error(name if name in form.fields else None, exc.message)


def no_store(response: HttpResponse) -> HttpResponse:
    """A page that shows a secret once (a token, a key) must never be cached."""
    response["Cache-Control"] = "no-store"
    return response


def render_once(request: HttpRequest, template: str, context: dict[str, Any]) -> HttpResponse:
    return no_store(render(request, template, context))
