"""The audit trail, filtered by actor, action, target and time."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics

from fedportal.api_views import PersonView, parse
from sites import selectors
from sites.api import serializers as s
from sites.api.views._base import ProjectScopedView
from sites.models import AuditEvent


def _audit_filters(query: dict[str, Any]) -> dict[str, Any]:
    names = {"actor": "actor_username", "actor_site": "actor_site_name"}
    return {names.get(key, key): value for key, value in query.items()}


@extend_schema(tags=["audit"])
@extend_schema_view(get=extend_schema(parameters=[s.AuditEventQuerySerializer]))
class AuditEventListView(PersonView[AuditEvent], generics.ListAPIView[AuditEvent]):
    """Audit events the caller may see, in every project: project admins see their projects'
    events, everyone sees what they did themselves (API tokens included)."""

    serializer_class = s.AuditEventSerializer

    def get_queryset(self) -> QuerySet[AuditEvent]:
        query = parse(s.AuditEventQuerySerializer, self.request.query_params)
        return selectors.audit_events_visible_to(self.request.user, **_audit_filters(query))


@extend_schema(tags=["audit"])
@extend_schema_view(get=extend_schema(parameters=[s.AuditEventQuerySerializer]))
class ProjectAuditEventListView(ProjectScopedView[AuditEvent], generics.ListAPIView[AuditEvent]):
    """One project's audit events (all of them for its project admins, else the caller's)."""

    serializer_class = s.AuditEventSerializer

    def get_queryset(self) -> QuerySet[AuditEvent]:
        query = self.query(s.AuditEventQuerySerializer)
        return selectors.audit_events_visible_to(
            self.request.user, project=self.get_project(), **_audit_filters(query)
        )
