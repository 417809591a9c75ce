"""Typed live events about sites and people's access, sent after commit through the portal's
one sender.

- ``site.status`` goes to the group of the pages that show the project's sites (the project's
  overview and its jobs' pages): a site's agent connected, went away, or was cut off.
- ``site.revoked`` goes to the site's own group with the certificate's serial: the connected
  agent that signs with that certificate is closed at once rather than at its next message
  (a re-enrolment supersedes the old certificate the same way).
- ``access.changed`` goes to the groups of the dashboard sockets whose access may have ended:
  a person's (membership removed or changed, account changed or deleted), a sign-in session's
  (signed out) or a project's or job's (deleted). The sockets check their access again with
  the same selectors as at their handshake and close when it is gone; ``signed_out`` closes
  them without asking, since the session is being flushed as the event is sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fedportal.events import (
    send_after_commit,
    session_group,
    site_group,
    sites_group,
    user_group,
)

if TYPE_CHECKING:
    from sites.models import Site


# Why an ``access.changed`` was sent; the socket's close message names it.
SIGNED_OUT = "signed_out"
MEMBERSHIP_CHANGED = "membership_changed"
ACCOUNT_CHANGED = "account_changed"
DELETED = "deleted"


@dataclass(frozen=True)
class SiteStatusChanged:
    project_id: int
    site: str
    state: str
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


@dataclass(frozen=True)
class AccessChanged:
    reason: str
    kind: str = field(init=False, default="access.changed")


def site_status(site: Site, *, online: bool) -> None:
    event = SiteStatusChanged(
        project_id=site.project_id,
        site=site.name,
        state=site.state,
        online=online,
        last_heartbeat=site.last_heartbeat.isoformat() if site.last_heartbeat else None,
        agent_version=site.agent_version,
    )
    send_after_commit([sites_group(site.project_id)], asdict(event))


def certificate_revoked(certificate: Any, reason: str) -> None:
    event = CertificateRevoked(site=certificate.site.name, serial=certificate.serial, reason=reason)
    send_after_commit([site_group(certificate.site_id)], asdict(event))


def access_changed(
    *, reason: str, user_ids: Iterable[int] = (), groups: Iterable[str] = ()
) -> None:
    """Tell the dashboard sockets of ``user_ids`` (and of ``groups``) to check their access."""
    targets = [*map(user_group, user_ids), *groups]
    if targets:
        send_after_commit(targets, asdict(AccessChanged(reason=reason)))


def session_ended(session_key: str) -> None:
    """Close the dashboard sockets opened with this sign-in session."""
    send_after_commit([session_group(session_key)], asdict(AccessChanged(reason=SIGNED_OUT)))
