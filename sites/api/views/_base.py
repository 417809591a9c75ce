"""What every view of the sites API shares: the bases that find the project and check the
caller, and the helpers that parse input and describe errors in the schema."""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.utils import OpenApiResponse
from rest_framework import generics
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from common.exceptions import NotFound
from fedportal.throttling import client_address
from sites import selectors
from sites.api import serializers as s
from sites.api.permissions import IsPerson, require
from sites.models import Project, Role

_SLUG = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")
MANAGER_ROLES = frozenset({Role.PROJECT_ADMIN, Role.ORG_ADMIN})

ONLY_PROJECT_ADMIN = "only a project admin of this project may do this"
ONLY_ORG_ADMIN = "only an org admin of the organisation (or a project admin) may do this"


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """Error responses for the schema: each is an :class:`ErrorSerializer` body."""
    return {code: OpenApiResponse(s.ErrorSerializer) for code in sorted({401, *codes})}


def shown_once(data: Any, status: int = 200) -> Response:
    """A response that carries a secret shown this once (a token, a key): never cached."""
    response = Response(data, status=status)
    response["Cache-Control"] = "no-store"
    return response


def parse(serializer_class: type[BaseSerializer], data: Any, **context: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data, context=context)
    serializer.is_valid(raise_exception=True)
    validated: dict[str, Any] = serializer.validated_data
    return validated


# --- bases -------------------------------------------------------------------------------------


class PersonView(generics.GenericAPIView):
    """An endpoint for people (API token or session). Site agents are refused with 401."""

    permission_classes = [IsPerson]

    @property
    def source_address(self) -> str | None:
        return client_address(self.request)


class ProjectScopedView(PersonView):
    """An endpoint under ``/projects/<project>/``: the project must be visible, else 404."""

    _project: Project | None = None

    def get_project(self) -> Project:
        if self._project is None:
            slug = str(self.kwargs["project"])
            found = (
                selectors.projects_visible_to(self.request.user).filter(slug=slug).first()
                if _SLUG.fullmatch(slug)
                else None
            )
            if found is None:
                # The same answer for a project that exists elsewhere as for none at all.
                raise NotFound(f"no project {slug!r}")
            self._project = found
        return self._project

    def roles(self) -> set[str]:
        return selectors.role_in_project(self.request.user, self.get_project())

    def require_manager(self) -> None:
        """A cheap first check for writes that only admins make, before the body is parsed."""
        require(bool(self.roles() & MANAGER_ROLES), ONLY_ORG_ADMIN)

    def query(self, serializer_class: type[BaseSerializer]) -> dict[str, Any]:
        return parse(serializer_class, self.request.query_params)
