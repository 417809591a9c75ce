"""What every API view shares, whichever app it belongs to: the bases that check the caller and
find the project in the URL, and the helpers that parse input and describe errors in the schema.

Apart from :mod:`fedportal.api` (the error handler, parser and paginator) because DRF's settings
name that module, and ``rest_framework.views`` reads those settings when it is imported: the
view bases here import it, so in one module the two would import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from django.contrib.auth.models import AnonymousUser
from django.db.models import Model
from drf_spectacular.utils import OpenApiResponse
from rest_framework import generics
from rest_framework.exceptions import NotAuthenticated
from rest_framework.serializers import BaseSerializer

from common.exceptions import NotFound
from fedportal.throttling import client_address
from sites.api.permissions import IsPerson
from sites.api.serializers import ErrorSerializer
from sites.models import Project
from sites.selectors import project_visible_to

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# The model a view lists, shows or serializes.
M = TypeVar("M", bound=Model)


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """Error responses for the schema: each is an :class:`ErrorSerializer` body."""
    return {code: OpenApiResponse(ErrorSerializer) for code in sorted({401, *codes})}


def parse(serializer_class: type[BaseSerializer[Any]], data: Any, **context: Any) -> dict[str, Any]:
    """``data`` checked by an input serializer; a DRF ``ValidationError`` (400) otherwise."""
    serializer = serializer_class(data=data, context=context)
    serializer.is_valid(raise_exception=True)
    validated: dict[str, Any] = serializer.validated_data
    return validated


class PersonView(generics.GenericAPIView[M]):
    """An endpoint for people (API token or session). Site agents are refused with 401."""

    permission_classes = [IsPerson]

    @property
    def person(self) -> User:
        """The signed-in person, for the services that record who acted. ``IsPerson`` lets
        only an active account through before a handler runs, so this never refuses there."""
        user = self.request.user
        if isinstance(user, AnonymousUser) or not user.is_authenticated:
            raise NotAuthenticated()
        return user

    @property
    def source_address(self) -> str | None:
        return client_address(self.request)

    def query(self, serializer_class: type[BaseSerializer[Any]]) -> dict[str, Any]:
        return parse(serializer_class, self.request.query_params)


class ProjectView(PersonView[M]):
    """An endpoint under ``/projects/<project>/``: the project (its slug or numeric id, see
    :func:`sites.selectors.project_visible_to`) must be visible to the caller, else 404."""

    _project: Project | None = None

    def get_project(self) -> Project:
        if self._project is None:
            ref = str(self.kwargs["project"])
            found = project_visible_to(self.request.user, ref)
            if found is None:
                # The same answer for a project that exists elsewhere as for none at all.
                raise NotFound(f"no project {ref!r}")
            self._project = found
        return self._project
