"""The one way an audit event is written. Every other service calls it inside its transaction,
so an event exists exactly when its change was committed."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from django.db import models

from sites.models import AuditEvent, Project, Site

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def _clean_address(source_address: str | None) -> str | None:
    # The address comes from the request (perhaps a proxy header); a malformed one must not make
    # the whole change fail on PostgreSQL's inet type, so it is dropped rather than stored.
    if not source_address:
        return None
    try:
        return str(ipaddress.ip_address(source_address.strip()))
    except ValueError:
        return None


def audit_event_record(
    *,
    action: str,
    target: models.Model,
    project: Project | None,
    actor: User | None = None,
    actor_site: Site | None = None,
    source_address: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one audit event. Call it inside the transaction that makes the change."""
    actor_repr = actor.get_username() if actor is not None and actor.is_authenticated else ""
    return AuditEvent.objects.create(
        actor=actor if actor is not None and actor.is_authenticated else None,
        actor_repr=actor_repr,
        actor_site=actor_site,
        action=action,
        target_type=target._meta.model_name or type(target).__name__.lower(),
        target_id=str(target.pk),
        target_repr=str(target)[:200],
        project=project,
        source_address=_clean_address(source_address),
        details=details or {},
    )
