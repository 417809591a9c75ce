"""The browser's WebSocket: ``/ws/dashboard/jobs/<uid>/`` and ``/ws/dashboard/projects/<slug>/``.

A signed-in person who may see the job (or project) joins its Channels groups and receives
every event published there (``job.state``, ``job.decision``, ``round.state``, ``task.state``,
``metrics``, ``log``, and ``site.status`` of the project's sites) as the JSON object
``jobs.events`` / ``sites.events`` built. Anyone else is refused at the handshake (close code
4404, as the page would be 404): the same selectors as the API decide. The socket is one-way;
messages from the browser are ignored.

Access that ends closes the socket (codes in :mod:`fedportal.sockets`): the socket also joins
its person's group and its sign-in session's group, where ``access.changed`` events arrive
(``sites.events``). Signing out closes it at once (4401); any other change makes it check
again, reading the session from the session store and the person from the database as a new
request would, with the same selectors as at the handshake, and close with 4401 (the session
is gone or no longer valid) or 4404 (the job or project is no longer visible). It checks the
same way every ``FEDPORTAL_SOCKET_RECHECK_SECONDS`` and before forwarding an event when its
last check is older than a few seconds, in case an event was lost. Before it closes, the
socket sends ``{"kind": "closed", "code", "message"}`` so that the page can say why.

A person holds at most ``FEDPORTAL_MAX_SOCKETS_PER_USER`` open sockets; the next one is
accepted, told ``{"kind": "error", "code": "too_many_sockets", ...}`` and closed with 4429.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from importlib import import_module
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib import auth
from django.utils.crypto import constant_time_compare

from fedportal import sockets
from fedportal.events import job_group, project_group, session_group, sites_group, user_group
from jobs.selectors import jobs_visible_to
from sites.events import SIGNED_OUT
from sites.selectors import UserLike, project_visible_to

if TYPE_CHECKING:
    from django.contrib.auth.models import User

CLOSE_NOT_FOUND = sockets.CLOSE_NOT_FOUND
CLOSE_SIGNED_OUT = sockets.CLOSE_UNAUTHENTICATED
CLOSE_TOO_MANY = sockets.CLOSE_TOO_MANY

_GONE = {
    CLOSE_SIGNED_OUT: ("signed_out", "Your session ended: sign in again to follow this page."),
    CLOSE_NOT_FOUND: ("access_lost", "You can no longer see this page."),
}


def groups_for(user: UserLike | None, kwargs: dict[str, Any]) -> list[str] | None:
    """The groups ``user`` may listen to for the URL's job or project; None when they may not
    see it (or it does not exist: the same answer). The first is the page's own group."""
    if "uid" in kwargs:
        job = jobs_visible_to(user).filter(uid=kwargs["uid"]).values_list("pk", "project_id")
        found = job.first()
        return [job_group(found[0]), sites_group(found[1])] if found is not None else None
    project = project_visible_to(user, str(kwargs.get("slug", "")))
    return [project_group(project.pk), sites_group(project.pk)] if project is not None else None


def session_user(session_key: str | None) -> User | None:
    """The person signed in with ``session_key`` now, read from the session store and the
    database as :func:`django.contrib.auth.get_user` reads them for a request, or None: the
    session ended or expired, its backend is no longer configured, the account is inactive
    or gone, or its password changed since (the session's auth hash no longer verifies).

    Unlike ``get_user`` it changes nothing: it never flushes the session or cycles its key.
    """
    if not session_key:
        return None
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    try:
        user_id = store[auth.SESSION_KEY]
        backend_path = store[auth.BACKEND_SESSION_KEY]
    except KeyError:
        return None
    session_hash = store.get(auth.HASH_SESSION_KEY)
    if backend_path not in settings.AUTHENTICATION_BACKENDS or not session_hash:
        return None
    user = auth.load_backend(backend_path).get_user(
        auth.get_user_model()._meta.pk.to_python(user_id)
    )
    if user is None:
        return None
    # The current secret key's hash, then each fallback key's, as get_user tries them.
    hashes = itertools.chain([user.get_session_auth_hash()], user.get_session_auth_fallback_hash())
    if not any(constant_time_compare(session_hash, known) for known in hashes):
        return None
    return user


def access_recheck(session_key: str | None, user_id: int, kwargs: dict[str, Any]) -> int | None:
    """None while the session's person may still listen to the URL's groups; else the code to
    close with."""
    user = session_user(session_key)
    if user is None or user.pk != user_id:
        return CLOSE_SIGNED_OUT
    if groups_for(user, kwargs) is None:
        return CLOSE_NOT_FOUND
    return None


# Channels ships no type information: to mypy its consumer base is Any.
class DashboardConsumer(
    sockets.DispatchMixin,
    sockets.EventBatchMixin,
    sockets.BoundedJSONMixin,
    AsyncJsonWebsocketConsumer,  # type: ignore[misc]
):
    joined: list[str]
    user_id: int | None = None
    session_key: str | None = None
    claimed = False
    closing = False
    checked_at = 0.0
    watch: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.joined = []
        kwargs = self.scope.get("url_route", {}).get("kwargs", {})
        user = self.scope.get("user")
        groups = await database_sync_to_async(groups_for)(user, kwargs)
        if groups is None or user is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.user_id = user.pk
        session = self.scope.get("session")
        self.session_key = session.session_key if session is not None else None
        await self.accept()
        self.claimed = await sockets.socket_claim(user.pk, self.channel_name)
        if not self.claimed:
            await self._close(
                CLOSE_TOO_MANY,
                "error",
                "too_many_sockets",
                f"You have {sockets.max_sockets_per_user()} live pages open already: close "
                "some, and this one reconnects.",
            )
            return
        # The person's and session's groups first: an access change from here on is heard,
        # and the check below sees any change made before.
        personal = [user_group(user.pk)]
        if self.session_key:
            personal.append(session_group(self.session_key))
        for group in [*personal, *groups]:
            await self.channel_layer.group_add(group, self.channel_name)
            self.joined.append(group)
        if not await self._recheck():
            return
        await self.send_json({"kind": "hello", "group": groups[0]})
        self.watch = asyncio.create_task(self._watch())

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        return  # one-way: the page acts through forms and the REST API

    async def fedportal_event(self, message: dict[str, Any]) -> None:
        if self.closing:
            return
        event = message["event"]
        if event.get("kind") == "access.changed":
            if event.get("reason") == SIGNED_OUT:
                await self._close(CLOSE_SIGNED_OUT, "closed", *_GONE[CLOSE_SIGNED_OUT])
            else:
                await self._recheck()
            return
        stale = time.monotonic() - self.checked_at >= sockets.EVENT_RECHECK_SECONDS
        if stale and not await self._recheck():
            return
        await self.send_json(event)

    async def _recheck(self) -> bool:
        """Check access again; close (and return False) when it is gone."""
        assert self.user_id is not None
        self.checked_at = time.monotonic()
        kwargs = self.scope.get("url_route", {}).get("kwargs", {})
        code = await database_sync_to_async(access_recheck)(self.session_key, self.user_id, kwargs)
        if code is None:
            return True
        await self._close(code, "closed", *_GONE[code])
        return False

    async def _watch(self) -> None:
        """The safety net for lost events: check again, and renew this socket's claim in the
        person's count, every ``FEDPORTAL_SOCKET_RECHECK_SECONDS``."""
        assert self.user_id is not None
        while not self.closing:
            await asyncio.sleep(sockets.recheck_seconds())
            if self.closing or not await self._recheck():
                return
            await sockets.socket_claim(self.user_id, self.channel_name)
            await sockets.groups_join_again(self.channel_layer, self.joined, self.channel_name)

    async def _close(self, code: int, kind: str, reason: str, message: str) -> None:
        if self.closing:
            return
        self.closing = True
        await self.send_json({"kind": kind, "code": reason, "message": message})
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
        for group in getattr(self, "joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)
        if self.claimed and self.user_id is not None:
            await sockets.socket_release(self.user_id, self.channel_name)
