"""The one way anything in the portal sends a live event: after the transaction commits.

Browsers (the dashboard) and site agents listen on Channels groups; an app's ``events`` module
builds typed payloads and calls :func:`send_after_commit`. A consumer forwards the ``event``
dict of a ``fedportal.event`` message to its WebSocket as is, and each of the ``events`` of a
``fedportal.events`` message (:func:`send_all_after_commit`) in turn, as if each had come alone
(``fedportal.sockets.EventBatchMixin``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

MESSAGE_TYPE = "fedportal.event"
BATCH_MESSAGE_TYPE = "fedportal.events"
# Events of one batch message at most: a portal process that marks a thousand sites' tasks
# at once sends a few messages of a few tens of KB, not one of a megabyte.
BATCH_MAX_EVENTS = 200


def project_group(project_id: int) -> str:
    return f"project.{project_id}"


def job_group(job_id: int) -> str:
    return f"job.{job_id}"


def site_group(site_id: int) -> str:
    """Where a site's connected agent listens: any event here makes it look for work."""
    return f"site.{site_id}"


def agents_group(project_id: int) -> str:
    """Where every connected agent of a project's sites listens, for what concerns many of
    them at once (a round that opens: the event names its sites, ``site_ids``, and each socket
    passes it on only to its own site's agent). One group send then stores one message per
    portal process, which hands it to its sockets itself; one per site's group would be a
    message each, received one by one."""
    return f"project.{project_id}.agents"


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
    _send_after_commit(list(groups), [{"type": MESSAGE_TYPE, "event": payload}])


def send_all_after_commit(groups: Iterable[str], payloads: Iterable[dict[str, Any]]) -> None:
    """Send several ``payloads`` to the same ``groups`` once the current transaction commits,
    as one message per group (up to :data:`BATCH_MAX_EVENTS` events each), in their order.

    What one transaction says of many sites at once (a hundred tasks marked training, a
    check that accepts fifty updates) then costs a send per group, not one per event: each
    send is several round trips to Redis, made one after the other from the thread that
    committed. A consumer forwards each event as if it had come alone.
    """
    payloads = list(payloads)
    if len(payloads) == 1:
        send_after_commit(groups, payloads[0])
        return
    messages = [
        {"type": BATCH_MESSAGE_TYPE, "events": payloads[start : start + BATCH_MAX_EVENTS]}
        for start in range(0, len(payloads), BATCH_MAX_EVENTS)
    ]
    if messages:
        _send_after_commit(list(groups), messages)


def _send_after_commit(targets: list[str], messages: list[dict[str, Any]]) -> None:
    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return

        async def send_all() -> None:
            for message in messages:
                for group in targets:
                    await layer.group_send(group, message)

        try:
            if _shared_across_processes(layer):
                future = asyncio.run_coroutine_threadsafe(send_all(), _publisher_loop())
                future.result(timeout=_SEND_TIMEOUT_SECONDS)
            else:
                async_to_sync(send_all)()
        except Exception:
            kinds = sorted({str(event.get("kind")) for event in _events_of(messages)})
            log.exception("could not publish %s to %s", ", ".join(kinds), ", ".join(targets))

    transaction.on_commit(send)


def _events_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for m in messages for event in (m["events"] if "events" in m else [m["event"]])]


# A send that takes longer than this (Redis unreachable: its connect timeout is shorter) is
# given up and logged; the state change it reports is in the database already.
_SEND_TIMEOUT_SECONDS = 30.0


def _shared_across_processes(layer: Any) -> bool:
    """A layer in Redis (not the tests' in-memory one, whose queues belong to the loop of the
    consumers that read them)."""
    from channels_redis.core import RedisChannelLayer

    return isinstance(layer, RedisChannelLayer)


_publisher_lock = threading.Lock()
_publisher: tuple[int, asyncio.AbstractEventLoop] | None = None


def _publisher_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for sending events, on a thread of its own.

    channels_redis keeps its Redis connections per event loop. Sync code with no loop of its
    own (a Celery worker, a management command) would otherwise get a new loop from
    ``async_to_sync`` for every send, and with it a new Redis connection, opened and closed
    for each event. One loop that lives as long as the process keeps them. A forked child
    (Celery's prefork pool) makes its own: the parent's thread does not exist in it.
    """
    global _publisher
    with _publisher_lock:
        if _publisher is None or _publisher[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="event-publisher", daemon=True).start()
            _publisher = (os.getpid(), loop)
        return _publisher[1]
