"""What the views of the sites API share beyond :mod:`fedportal.api_views`: the roles that
manage a project, and the messages that say who may act."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response

from fedportal.api_views import M, ProjectView
from sites import selectors
from sites.api.permissions import require
from sites.models import Role

MANAGER_ROLES = frozenset({Role.PROJECT_ADMIN, Role.ORG_ADMIN})

ONLY_PROJECT_ADMIN = "only a project admin of this project may do this"
ONLY_ORG_ADMIN = "only an org admin of the organisation (or a project admin) may do this"


def shown_once(data: Any, status: int = 200) -> Response:
    """A response that carries a secret shown this once (a token, a key): never cached."""
    response = Response(data, status=status)
    response["Cache-Control"] = "no-store"
    return response


class ProjectScopedView(ProjectView[M]):
    """An endpoint under ``/projects/<project>/`` of the sites API: the caller's roles there."""

    def roles(self) -> set[str]:
        return selectors.role_in_project(self.request.user, self.get_project())

    def require_manager(self) -> None:
        """A cheap first check for writes that only admins make, before the body is parsed."""
        require(bool(self.roles() & MANAGER_ROLES), ONLY_ORG_ADMIN)
