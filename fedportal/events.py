"""The one way anything in the portal sends a live event: after the transaction commits.

Browsers (the dashboard) and site agents listen on Channels groups; an app's ``events`` module
builds typed payloads and calls :func:`send_after_commit`. A consumer forwards the ``event``
dict of a ``fedportal.event`` message to its WebSocket as is.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

MESSAGE_TYPE = "fedportal.event"


def project_group(project_id: int) -> str:
    return f"project.{project_id}"


def job_group(job_id: int) -> str:
    return f"job.{job_id}"


def site_group(site_id: int) -> str:
    """Where a site's connected agent listens: any event here makes it look for work."""
    return f"site.{site_id}"


def sites_group(project_id: int) -> str:
    """Where the pages that show a project's sites listen (its overview and its jobs' pages):
    ``site.status`` only."""
    return f"project.{project_id}.sites"


def user_group(user_id: int) -> str:
    """Every dashboard socket of one person: told when their access may have changed."""
    return f"user.{user_id}"


def session_group(session_key: str) -> str:
    """Every dashboard socket opened with one sign-in session: told when it ends. Named by a
    digest, so that the session key (a bearer secret) is never written to the channel layer."""
    return "session." + hashlib.sha256(session_key.encode()).hexdigest()[:40]


def send_after_commit(groups: Iterable[str], payload: dict[str, Any]) -> None:
    """Send ``payload`` to ``groups`` once the current transaction commits (at once outside one).

    A channel layer that is down must not undo a state change that is already in the
    database, so a failed send is logged, not raised.
    """
    targets = list(groups)

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        message = {"type": MESSAGE_TYPE, "event": payload}
        try:
            for group in targets:
                async_to_sync(layer.group_send)(group, message)
        except Exception:
            log.exception("could not publish %s to %s", payload.get("kind"), ", ".join(targets))

    transaction.on_commit(send)
