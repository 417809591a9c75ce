"""Sign-in throttling with django-axes (the dashboard's ``/login/`` and ``/admin/login/``).

Wrong passwords are counted per account and per client address in the database (axes'
``AccessAttempt``), so every portal process sees the same counts:

- an account is locked after ``FEDPORTAL_SIGNIN_ACCOUNT_FAILURES`` (default 5) wrong passwords,
  from any address;
- an address is locked after ``FEDPORTAL_SIGNIN_ADDRESS_FAILURES`` (default 20), over any
  accounts (password spraying), a larger number because many people may share one address;
- either lasts ``FEDPORTAL_SIGNIN_COOLOFF_MINUTES`` (default 15) after the last failure, and
  meanwhile even the right password is refused with a 429 page saying when to try again; a
  successful sign-in clears the account's count.

The unlocking is by waiting, or by an admin (``manage.py axes_reset``, or the admin's "Access
attempts"). This follows OWASP ASVS 2.2.1: a soft lockout, no CAPTCHA.
"""

from __future__ import annotations

import math
from typing import Any

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_cool_off
from django.conf import settings
from django.db.models import Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from fedportal.throttling import client_address as _client_address


def client_address(request: HttpRequest) -> str | None:
    """The address axes counts (the one the API's throttles count)."""
    return _client_address(request)


# Ignored: axes ships no type information, so its handler is Any to mypy.
class SignInAttemptHandler(AxesDatabaseHandler):  # type: ignore[misc]
    """Axes' database handler with a limit per account and a larger one per address.

    Axes compares one number with ``AXES_FAILURE_LIMIT`` (the account limit); the address's
    failures are scaled to that limit, so that an address reaches it after
    ``FEDPORTAL_SIGNIN_ADDRESS_FAILURES`` failures. ``AXES_LOCKOUT_PARAMETERS`` is
    ``["username", "ip_address"]``: the querysets come in that order.
    """

    def get_failures(self, request: HttpRequest, credentials: dict[str, Any] | None = None) -> int:
        by_account, by_address = (
            attempts.aggregate(total=Sum("failures_since_start"))["total"] or 0
            for attempts in self.get_user_attempts(request, credentials)
        )
        account_limit = int(settings.FEDPORTAL_SIGNIN_ACCOUNT_FAILURES)
        address_limit = max(1, int(settings.FEDPORTAL_SIGNIN_ADDRESS_FAILURES))
        return max(int(by_account), math.floor(by_address * account_limit / address_limit))


def locked_out(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: Any = None
) -> HttpResponse:
    """The page a locked-out sign-in gets: 429, with when to try again (also in Retry-After)."""
    cool_off = get_cool_off(request)
    seconds = int(cool_off.total_seconds()) if cool_off else 0
    response = render(
        request,
        "registration/locked_out.html",
        {"minutes": max(1, math.ceil(seconds / 60))},
        status=429,
    )
    if seconds:
        response["Retry-After"] = str(seconds)
    return response
