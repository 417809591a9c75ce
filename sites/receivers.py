"""Signal receivers that end dashboard sockets when a grant ends outside the services: a person
signs out (Django's ``user_logged_out``, from the dashboard or the admin), an account is changed
(deactivated, superuser status or password changed: the admin saves the user) or deleted, a
project is deleted. Membership changes are told by their services (``sites.services``)."""

from __future__ import annotations

from typing import Any

from fedportal.events import project_group, sites_group
from sites import events


def on_logged_out(*, request: Any, **_: Any) -> None:
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None)
    if key:
        events.session_ended(key)


def on_user_saved(*, instance: Any, created: bool, update_fields: Any = None, **_: Any) -> None:
    # Signing in writes last_login alone: that changes nobody's access.
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return
    events.access_changed(reason=events.ACCOUNT_CHANGED, user_ids=[instance.pk])


def on_user_deleted(*, instance: Any, **_: Any) -> None:
    events.access_changed(reason=events.ACCOUNT_CHANGED, user_ids=[instance.pk])


def on_project_deleted(*, instance: Any, **_: Any) -> None:
    events.access_changed(
        reason=events.DELETED, groups=[project_group(instance.pk), sites_group(instance.pk)]
    )
