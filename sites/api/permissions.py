"""Who may call what. The rules themselves are the ``can_*``/``is_*`` helpers in
``sites.selectors``; this module turns their answers into HTTP.

How a request is answered, in order (so that existence never leaks):

1. No credentials, or credentials of the wrong kind: **401**. People endpoints take an API
   token or a session; agent endpoints take only a signed request, so a person cannot call
   an agent endpoint and a site agent cannot call a people endpoint.
2. An object the caller cannot see (another project's, or one hidden from their role):
   **404**, the same answer as for an object that does not exist. Every lookup goes through a
   ``*_visible_to`` selector.
3. An object the caller can see but may not act on: **403**, with a message saying who may.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import NotAuthenticated, PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from sites.authentication import SiteIdentity


class IsPerson(BasePermission):
    """An authenticated, active person (API token or session), never a site agent."""

    message = "this endpoint is for people; sign in or send an API token"

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(
            user is not None
            and user.is_authenticated
            and user.is_active
            and not isinstance(request.auth, SiteIdentity)
        )


class IsSiteAgent(BasePermission):
    """A site agent whose signed request verified (``request.auth`` is a SiteIdentity)."""

    message = "this endpoint is for enrolled site agents; sign the request with the site's key"

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, SiteIdentity)


def site_identity(request: Request) -> SiteIdentity:
    """The site a request proves, for a view whose permission is ``IsSiteAgent`` (which lets
    only a verified signed request through, so this never refuses there)."""
    identity = request.auth
    if not isinstance(identity, SiteIdentity):
        raise NotAuthenticated()
    return identity


def require(allowed: bool, message: str) -> None:
    """Refuse with 403 unless ``allowed``. Call it only after the object was found visible."""
    if not allowed:
        raise PermissionDenied(message)
