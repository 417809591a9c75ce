"""Request throttles: how often one client address may call the anonymous endpoints, and how
many wrong credentials it may present.

Counted in Django's cache (Redis, so every portal process counts together) per client address,
with DRF's rate strings in ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]``; a refusal is the API's
429 JSON error naming the wait (``fedportal.api.exception_handler``), with ``Retry-After``.

- ``enrol`` (:class:`EnrolThrottle`): the anonymous enrolment endpoints, every request.
- ``credential_failures`` (:class:`CredentialFailures`): wrong enrolment tokens and unknown,
  revoked or expired API tokens. Only failures count, so a site admin enrolling fifty sites,
  or a script using its token, is never slowed down; an address that reached the limit is
  refused every attempt (the right token included) until its oldest counted failure is older
  than the period.

Sign-in with a password (``/login/``, ``/admin/login/``) is throttled by django-axes, by account
and by address (``fedportal.signin``).

The client address is the connection's (``REMOTE_ADDR``). Behind a reverse proxy, start the
portal with ``--proxy-headers`` (``python -m fedportal.serve``) so that Daphne takes it from the
proxy's ``X-Forwarded-For``; otherwise every client counts as the proxy.
"""

from __future__ import annotations

import re
from typing import Any

from django.http import HttpRequest
from rest_framework.exceptions import Throttled
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour|d|day)s?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def client_address(request: HttpRequest | Request) -> str | None:
    """The address a request came from, as throttles, sign-in lockouts and the audit log
    count it; None when the server gave none."""
    address = request.META.get("REMOTE_ADDR")
    return str(address) if address else None


class _AddressThrottle(SimpleRateThrottle):
    """A DRF throttle per client address, whose rate may name a multiple of its unit
    (``"20/10minute"``: 20 in ten minutes) besides DRF's ``"20/minute"``."""

    # Set by SimpleRateThrottle.__init__ from parse_rate; DRF's stubs do not declare them.
    num_requests: int | None
    duration: int | None

    def get_cache_key(self, request: Request, view: Any) -> str:
        ident = client_address(request) or "unknown"
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def parse_rate(self, rate: str | None) -> tuple[int | None, int | None]:
        if rate is None:
            return None, None
        match = _RATE.fullmatch(rate)
        if match is None:
            raise ValueError(f"throttle rate {rate!r} is not like '20/minute' or '20/10minute'")
        count, multiple, unit = match.groups()
        return int(count), int(multiple or 1) * _UNIT_SECONDS[unit[0]]


class EnrolThrottle(_AddressThrottle):
    """Requests to the anonymous enrolment endpoints, per address."""

    scope = "enrol"


class CredentialFailures(_AddressThrottle):
    """Wrong credentials per address: :meth:`allow_request` only looks (a DRF throttle that
    refuses an address over its limit), :meth:`record` counts a failure."""

    scope = "credential_failures"

    def _load(self, request: HttpRequest | Request) -> None:
        self.key = self.get_cache_key(request, None)  # type: ignore[arg-type]
        self.history = self.cache.get(self.key, [])
        self.now = self.timer()
        assert self.duration is not None
        while self.history and self.history[-1] <= self.now - self.duration:
            self.history.pop()

    def allow_request(self, request: Request, view: Any) -> bool:
        if self.rate is None:
            return True
        self._load(request)
        assert self.num_requests is not None
        return len(self.history) < self.num_requests

    def refuse_if_over(self, request: HttpRequest | Request) -> None:
        """Raise DRF's ``Throttled`` (429) while the address is over its limit."""
        if not self.allow_request(request, None):  # type: ignore[arg-type]
            raise Throttled(
                wait=self.wait(),
                detail="Too many wrong credentials were sent from this address.",
            )

    def record(self, request: HttpRequest | Request) -> None:
        """Count one wrong credential from the request's address."""
        if self.rate is None:
            return
        self._load(request)
        self.history.insert(0, self.now)
        self.cache.set(self.key, self.history, self.duration)
