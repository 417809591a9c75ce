"""What a site's agent connection changes: its version, its heartbeat, whether the site is
online, and who is told.

A site has at most one live agent WebSocket, named in ``Site.agent_channel``. A newer
connection of the site replaces the older one (:func:`site_agent_connect` returns the channel
to close) rather than being refused: an agent restarted after a network cut must get in at
once, while its old socket may linger half-open until the server's pings time it out. Kept in
the database, the name survives a portal restart: the next connection simply overwrites it.

When the socket closes the site is offline at once (``agent_disconnected_at``, see
``sites.selectors.site_is_online``), unless a newer connection replaced it meanwhile.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from common.exceptions import ValidationFailed
from sites import events
from sites.authentication import site_heartbeat_record
from sites.models import Site
from sites.selectors import site_is_online
from sites.signed_cache import site_heartbeat_due

MAX_AGENT_VERSION = 64


def site_agent_connect(*, site: Site, agent_version: str, channel: str) -> str:
    """The site's agent opened its WebSocket ``channel``: record it and its version, count it
    as a heartbeat and tell the pages showing the site.

    Returns the channel of the site's earlier connection, which this one replaces and the
    caller closes ("" when there was none).
    """
    if not isinstance(agent_version, str) or len(agent_version) > MAX_AGENT_VERSION:
        raise ValidationFailed(
            f"must be a string of at most {MAX_AGENT_VERSION} characters", field="agent_version"
        )
    with transaction.atomic():
        locked = Site.objects.select_for_update().get(pk=site.pk)
        replaced = locked.agent_channel
        Site.objects.filter(pk=site.pk).update(agent_channel=channel, agent_version=agent_version)
        for name in ("state", "last_heartbeat", "agent_disconnected_at"):
            setattr(site, name, getattr(locked, name))
        site.agent_channel = channel
        site.agent_version = agent_version
        site_heartbeat_record(site, notify=False)
        events.site_status(site, online=True)
    return replaced if replaced != channel else ""


def site_agent_heartbeat(*, site: Site) -> Site:
    """A heartbeat on the open WebSocket (signed requests record their own)."""
    site_heartbeat_record(site)
    return site


def site_agent_disconnect(*, site: Site, channel: str) -> bool:
    """The agent's WebSocket ``channel`` closed: the site is offline from now until its agent
    is heard again, and the pages showing it are told.

    Nothing changes when a newer connection replaced this one, or a revocation cut it off
    already (the site's channel is another one by then); returns whether the site went offline.
    """
    if not channel:
        return False
    with transaction.atomic():
        gone = Site.objects.filter(pk=site.pk, agent_channel=channel).update(
            agent_channel="", agent_disconnected_at=timezone.now()
        )
        if not gone:
            return False
        site_heartbeat_due(site.pk)  # offline now: its next heartbeat must be written
        fresh = Site.objects.get(pk=site.pk)
        events.site_status(fresh, online=site_is_online(fresh))
    return True
