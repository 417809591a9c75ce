"""The request type of the dashboard's signed-in views."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.http import HttpRequest

if TYPE_CHECKING:
    from django.contrib.auth.models import User


class SignedInRequest(HttpRequest):
    """The request a ``login_required`` view gets: the decorator sends anonymous visitors to
    the sign-in page before the view runs, so ``user`` is an account. Only an annotation:
    Django passes its own request objects."""

    user: User
