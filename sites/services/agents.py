"""What a site's agent connection changes: its version, its heartbeat, and who is told."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction

from sites import events
from sites.authentication import site_heartbeat_record
from sites.exceptions import ValidationFailed

if TYPE_CHECKING:
    from sites.models import Site

MAX_AGENT_VERSION = 64


def site_agent_connect(*, site: Site, agent_version: str) -> Site:
    """The site's agent opened its WebSocket: record its version and tell the dashboard."""
    if not isinstance(agent_version, str) or len(agent_version) > MAX_AGENT_VERSION:
        raise ValidationFailed(
            f"must be a string of at most {MAX_AGENT_VERSION} characters", field="agent_version"
        )
    with transaction.atomic():
        if site.agent_version != agent_version:
            site.agent_version = agent_version
            site.save(update_fields=["agent_version"])
        site_heartbeat_record(site)
        events.site_status(site, online=True)
    return site


def site_agent_heartbeat(*, site: Site) -> Site:
    """A heartbeat on the open WebSocket (signed requests record their own)."""
    site_heartbeat_record(site)
    return site


def site_agent_disconnect(*, site: Site) -> None:
    """The agent's WebSocket closed. The site counts as online while its last heartbeat is
    recent (it may be reconnecting); the dashboard is told the connection is gone."""
    with transaction.atomic():
        events.site_status(site, online=False)
