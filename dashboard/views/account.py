"""The audit log with filters, and a person's API tokens."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from common.exceptions import DomainError
from dashboard.forms import ApiTokenForm, AuditFilterForm
from dashboard.http import SignedInRequest
from dashboard.presenters import ApiTokenRow, api_token_rows
from dashboard.views._common import form_error, render_once, source_address
from sites import selectors, services

AUDIT_PAGE = 50


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Form datetimes are typed in UTC (the portal's time zone, as the pages show)."""
    if value is None:
        return None
    return value if timezone.is_aware(value) else timezone.make_aware(value, dt.UTC)


@login_required
@require_safe
def audit_log(request: SignedInRequest) -> HttpResponse:
    projects = list(selectors.projects_visible_to(request.user))
    form = AuditFilterForm(request.GET or None, projects=projects)
    filters: dict[str, Any] = {}
    if form.is_valid():
        data = form.cleaned_data
        if data["project"]:
            filters["project"] = next(p for p in projects if p.slug == data["project"])
        filters.update(
            actor_username=data["actor"] or None,
            action=data["action"] or None,
            since=_utc(data["since"]),
            until=_utc(data["until"]),
        )
        events = selectors.audit_events_visible_to(request.user, **filters)
    elif form.is_bound:
        events = selectors.audit_events_visible_to(request.user).none()
    else:
        events = selectors.audit_events_visible_to(request.user)
    page = Paginator(events, AUDIT_PAGE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "dashboard/audit.html",
        {"form": form, "page": page, "query": query.urlencode()},
    )


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def api_tokens(request: SignedInRequest) -> HttpResponse:
    form = ApiTokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            token, key = services.api_token_create(
                user=request.user,
                name=form.cleaned_data["name"],
                expires_at=_utc(form.cleaned_data["expires_at"]),
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            # The key is in this answer only: no redirect, not cached.
            return render_once(
                request,
                "dashboard/api_tokens.html",
                {"form": ApiTokenForm(), "tokens": _tokens(request), "created": token, "key": key},
            )
    return render(request, "dashboard/api_tokens.html", {"form": form, "tokens": _tokens(request)})


def _tokens(request: SignedInRequest) -> list[ApiTokenRow]:
    return api_token_rows(selectors.api_tokens_of(request.user), now=timezone.now())


@login_required
@require_POST
def api_token_revoke(request: SignedInRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(selectors.api_tokens_of(request.user), pk=pk)
    try:
        services.api_token_revoke(
            token=token, revoked_by=request.user, source_address=source_address(request)
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"API token “{token.name}” ({token.prefix}…) was revoked.")
    return redirect("dashboard:api-tokens")
