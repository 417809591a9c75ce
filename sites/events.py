"""Typed live events about sites, sent after commit through the portal's one sender.

``site.status`` goes to the project's group (the dashboard's site list); ``site.revoked`` goes
to the site's own group, where its connected agent's consumer closes the connection at once
rather than at the agent's next message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedportal.events import project_group, send_after_commit, site_group


@dataclass(frozen=True)
class SiteStatusChanged:
    project_id: int
    site: str
    online: bool
    last_heartbeat: str | None
    agent_version: str
    kind: str = field(init=False, default="site.status")


@dataclass(frozen=True)
class CertificateRevoked:
    site: str
    serial: str
    reason: str
    kind: str = field(init=False, default="site.revoked")


def site_status(site: Any, *, online: bool) -> None:
    event = SiteStatusChanged(
        project_id=site.project_id,
        site=site.name,
        online=online,
        last_heartbeat=site.last_heartbeat.isoformat() if site.last_heartbeat else None,
        agent_version=site.agent_version,
    )
    send_after_commit([project_group(site.project_id)], asdict(event))


def certificate_revoked(certificate: Any, reason: str) -> None:
    event = CertificateRevoked(site=certificate.site.name, serial=certificate.serial, reason=reason)
    send_after_commit([site_group(certificate.site_id)], asdict(event))
