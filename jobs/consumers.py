"""The site agent's WebSocket: ``/ws/agent/``.

The handshake is a signed GET (the same signature as the agent's HTTP requests), so only an
enrolled site's agent gets in. Then:

- portal → agent: a ``welcome`` once; an ``event`` for every job or task change that concerns
  the site (the agent takes any as a sign to look for work, and fetches what it needs over
  signed HTTP; a round that opens brings the task, and a small model too, when every site
  got the same: the task is then marked ``training``, with those of the other sockets of the
  moment); an ``ack`` for each message with an id; an ``error`` just before a close.
- agent → portal: ``heartbeat``, ``task`` (progress on a round's task, e.g. ``failed``),
  ``report`` (``flare.log`` points and the script's output lines; ``metrics`` and ``log`` are
  accepted as reports with only one of them) and ``update`` (a round's update no larger than
  the welcome's ``update_max_bytes``, ``FEDPORTAL_SOCKET_UPDATE_MAX_BYTES``, stored as an HTTP
  upload is; acknowledged with the task's state) — nothing else. A larger update travels
  over HTTP, streamed.

The messages, their close codes and headers are typed in ``client_agent.protocol``, which the
agent imports too.

Whatever an agent sends, the socket stays open: a message over
``client_agent.protocol.MAX_MESSAGE_BYTES``, one that is not a JSON object, a binary frame, a
report that fails validation or meets an unexpected error is answered with an error
(an ``ack`` with ``error`` when it has an id: the agent then drops it, never resends it), not
with a close that the agent would answer by reconnecting and sending the same again. Output
lines sent faster than the site's rate get ``slow_down`` with ``retry_after``; until then the
consumer answers line reports so without a database query.


A revocation or a re-enrolment closes the socket of the agent signing with the old
certificate at once (the ``site.revoked`` event names the certificate's serial; close code 4403).
In case that event was lost, the certificate is checked again as a signed request's is (the
cache of verified certificates, which every change through the services renews:
``sites.signed_cache``) on every heartbeat and before a message or an event when its last
check is older than 5 s; and it is read from the database every
``FEDPORTAL_SOCKET_RECHECK_SECONDS`` (30 s), for a change made behind the services' back.
The cache spares a statement per round and site. A site has one live socket: a newer
connection of the site replaces the older one, which is closed with 4409 (see
``sites.services.agents``). A handshake that fails verification is closed with 4401. The
consumer only parses and calls services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.utils import timezone

from client_agent.protocol import (
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_UNAUTHENTICATED,
    ERROR_BAD_MESSAGE,
    ERROR_CONNECTION_REPLACED,
    ERROR_SERVER,
    ERROR_TOO_LARGE,
    ERROR_UNKNOWN_MESSAGE,
    HEADER_AGENT_VERSION,
    HEARTBEAT,
    HEARTBEAT_SECONDS,
    MAX_MESSAGE_BYTES,
    REPORT_TYPES,
    TASK,
    UPDATE,
    Ack,
    ErrorBody,
    ErrorMessage,
    Event,
    InvalidReport,
    InvalidUpdate,
    Report,
    TaskProgress,
    UnknownMessage,
    UpdateMessage,
    Welcome,
    message_id,
    unknown_type,
)
from common.exceptions import AuthenticationError, DomainError, ValidationFailed
from fedportal import sockets
from fedportal.events import agents_group, site_group
from jobs.exceptions import SlowDown
from jobs.selectors import job_for_site, task_for_site
from jobs.services.tasks import (
    socket_update_max_bytes,
    task_mark,
    tasks_model_delivered,
    update_from_socket,
)
from jobs.services.telemetry import report_record
from sites import services as site_services
from sites import signed_cache
from sites.authentication import (
    SiteIdentity,
    identity_check,
    identity_current,
    identity_recheck,
    verify_signed_handshake,
)
from sites.exceptions import CertificateRevoked

log = logging.getLogger(__name__)

# A revocation closes the socket at once (the site.revoked event); the certificate is also
# checked again (through the cache of verified certificates) before a message or event at
# most this often, in case that event was lost (and on every heartbeat, which is what keeps
# the site online).
RECHECK_SECONDS = sockets.EVENT_RECHECK_SECONDS
REPLACED = "agent.replaced"
AGENT_VERSION_HEADER = HEADER_AGENT_VERSION.lower().encode()  # as ASGI hands headers over


# A round's event goes to every site's socket at once; those of one portal process whose
# model came with it are marked training together after this long (jobs.services.tasks.
# tasks_model_delivered), not with a statement each. An upload takes a task in any open state,
# so one that comes first loses nothing.
MARK_GATHER_SECONDS = 0.02


class _DeliveredModels:
    """The round events with a model that this event loop's sockets sent, waiting to be marked
    (``(event, site id, site name)``)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[dict[str, Any], int, str]] = []
        self.gathering = False
        self.tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak ones

    def add(self, delivery: tuple[dict[str, Any], int, str]) -> None:
        self.waiting.append(delivery)
        if not self.gathering:
            self.gathering = True
            task = asyncio.get_running_loop().create_task(self._mark())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _mark(self) -> None:
        await asyncio.sleep(MARK_GATHER_SECONDS)
        waiting, self.waiting, self.gathering = self.waiting, [], False
        try:
            await database_sync_to_async(tasks_model_delivered)(waiting)
        except Exception:
            # The agents have their events and go on; their tasks show ``assigned`` until the
            # uploads come.
            sites = ", ".join(sorted({name for _, _, name in waiting}))
            log.exception("could not mark the tasks training: sites %s", sites)


_DELIVERED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _DeliveredModels] = (
    weakref.WeakKeyDictionary()
)


PerLoop = TypeVar("PerLoop")


def _of_this_loop(
    registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PerLoop],
    make: Callable[[], PerLoop],
) -> PerLoop:
    """The running event loop's entry of ``registry``, made on first use (a portal process
    runs one loop; tests run several)."""
    loop = asyncio.get_running_loop()
    entry = registry.get(loop)
    if entry is None:
        entry = registry[loop] = make()
    return entry


def _delivered_models() -> _DeliveredModels:
    """This event loop's gathering."""
    return _of_this_loop(_DELIVERED, _DeliveredModels)


# A round's event reaches a hundred sockets of a portal process at once, and each whose last
# check is older than RECHECK_SECONDS checks again before passing it on. Those checks were a
# trip each through the one thread that runs the sockets' database work, one after the
# other: the last agent of a hundred heard of its round a second late, every few rounds
# (bench/scale_out.py, with the events' times logged). Now the sockets of a moment share one
# read of the generation of verified certificates, made at most this long before, and only
# a socket whose certificate was verified in another generation checks it again in full.
GENERATION_SHARED_SECONDS = 0.25


class _SharedGeneration:
    """This event loop's latest read of the generation (``sites.signed_cache.generation``):
    the sockets that ask while it is under way, or within ``GENERATION_SHARED_SECONDS`` of
    its start, get the same answer."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.started_at = 0.0
        self.reading: asyncio.Task[str] | None = None

    async def current(self) -> str:
        if self.reading is None:
            fresh = time.monotonic() - self.started_at < GENERATION_SHARED_SECONDS
            if self.value is not None and fresh:
                return self.value
            self.started_at = time.monotonic()
            self.reading = asyncio.get_running_loop().create_task(self._read())
        return await asyncio.shield(self.reading)

    async def _read(self) -> str:
        try:
            self.value = await database_sync_to_async(signed_cache.generation)()
            return self.value
        except BaseException:
            self.value = None  # the next socket to ask reads again
            raise
        finally:
            self.reading = None


_GENERATIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SharedGeneration] = (
    weakref.WeakKeyDictionary()
)


def _shared_generation() -> _SharedGeneration:
    return _of_this_loop(_GENERATIONS, _SharedGeneration)


def _handle(
    identity: SiteIdentity, content: dict[str, Any], recheck: bool
) -> tuple[SiteIdentity, Ack | None]:
    """One agent message, in a worker thread: re-check the certificate (``recheck``), call the
    service, return the fresh identity and the acknowledgement to send (None: the message has
    no id to acknowledge)."""
    kind = content.get("type")
    if recheck or kind == HEARTBEAT:
        identity = identity_check(identity)
    site = identity.site
    answer_to = message_id(content)
    try:
        if kind == HEARTBEAT:
            site_services.site_agent_heartbeat(site=site)
            return identity, None if answer_to is None else Ack(id=answer_to)
        if kind == TASK:
            # The job first: an agent naming a job that is not its own hears that, whatever
            # else the message holds.
            job = job_for_site(job_uid=content.get("job"), site=site)
            progress = TaskProgress.parse(content)
            task = task_for_site(job=job, site=site, round_number=progress.round)
            task = task_mark(task=task, state=progress.state, reason=progress.reason)
            return identity, None if answer_to is None else Ack(id=answer_to, state=task.state)
        if kind in REPORT_TYPES:
            report = Report.parse(content)
            stored = report_record(
                job_uid=report.job, site=site, points=report.points, lines=report.lines
            )
            return identity, None if answer_to is None else Ack(id=answer_to, stored=stored)
        if kind == UPDATE:
            task = update_from_socket(site=site, update=UpdateMessage.parse(content))
            return identity, None if answer_to is None else Ack(id=answer_to, state=task.state)
        raise unknown_type(kind)
    except UnknownMessage as exc:
        raise _Unexpected(exc.message, field=exc.field) from None
    except (InvalidReport, InvalidUpdate) as exc:
        raise ValidationFailed(exc.message, field=exc.field) from None


# The sockets' messages take their turn on the one thread of their database work; updates (a
# file written, a task's row updated) go side by side on the loop's pool instead, as uploads
# over HTTP go on the requests' threads, so that a round's hundred updates do not queue.
_handle_in_turn = database_sync_to_async(_handle)
_handle_aside = database_sync_to_async(_handle, thread_sensitive=False)


class _Unexpected(DomainError):
    code = ERROR_UNKNOWN_MESSAGE
    status = 400


def _error_body(exc: DomainError) -> ErrorBody:
    """A domain error as the agent reads it (``retry_after`` too, for ``slow_down``), with the
    HTTP status the API gives it."""
    return ErrorBody.parse({**exc.as_dict(), "status": exc.status})


# How long a line report refused for slow-down holds back the later ones (below) at most: the
# agent sends it again within the wait it was told (at most a minute, client_agent.outbox),
# unless it dropped it meanwhile (its queue overflowed), and then it never comes.
REFUSED_LINES_KEPT_SECONDS = 120.0
# The wait a line report that would overtake a refused one is told: the agent sends the
# refused one first anyway (it keeps its reports in their order).
OVERTAKING_RETRY_SECONDS = 0.1


class AgentConsumer(
    sockets.DispatchMixin,
    sockets.EventBatchMixin,
    sockets.BoundedJSONMixin,
    AsyncJsonWebsocketConsumer,  # type: ignore[misc]
):
    identity: SiteIdentity | None = None
    groups: tuple[str, ...] = ()
    checked_at = 0.0
    watch: asyncio.Task[None] | None = None
    closing = False
    lines_held_until = 0.0  # monotonic; the site was told to slow down its line reports
    # The line reports told to slow down and not stored since, in the order they were refused
    # (the agent's order), with when (monotonic). The agent sends several reports before it
    # hears an answer: one sent after a refused report must wait for it, or a site's output
    # would be stored out of order (a flood of output under load showed it).
    lines_refused: dict[str | int | None, float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lines_refused = {}

    async def connect(self) -> None:
        try:
            self.identity = await verify_signed_handshake(self.scope)
        except AuthenticationError as exc:
            log.info("agent handshake refused: %s", exc.message)
            await self.accept()
            await self._send(ErrorMessage(_error_body(exc)))
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.checked_at = time.monotonic()
        site = self.identity.site
        headers = dict(self.scope.get("headers", []))
        version = headers.get(AGENT_VERSION_HEADER, b"").decode("latin-1")[:64]
        self.groups = (site_group(site.pk), agents_group(site.project_id))
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        replaced = await database_sync_to_async(site_services.site_agent_connect)(
            site=site, agent_version=version, channel=self.channel_name
        )
        if replaced:
            await self.channel_layer.send(replaced, {"type": REPLACED})
        await self.accept()
        await self._send(
            Welcome(
                site=site.name,
                project=site.project.slug,
                heartbeat_seconds=HEARTBEAT_SECONDS,
                update_max_bytes=socket_update_max_bytes(),
            )
        )
        self.watch = asyncio.create_task(self._watch())
        log.info("agent connected: site=%s version=%s", site.name, version or "?")

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Parse a frame, answering what cannot be parsed with an error instead of failing
        the connection (Daphne has bounded the frame at 1 MiB before this runs)."""
        if self.identity is None or self.closing:
            return
        if text_data is None:
            await self._error(ERROR_BAD_MESSAGE, "send JSON text frames, not binary ones")
            return
        size = len(text_data.encode("utf-8", "replace"))
        content = await self.decode_json(text_data)
        if not isinstance(content, dict):
            await self._error(ERROR_BAD_MESSAGE, "not a JSON object")
            return
        if size > MAX_MESSAGE_BYTES:
            await self._refuse_message(
                message_id(content),
                ErrorBody(
                    ERROR_TOO_LARGE, f"a message of {size} bytes; at most {MAX_MESSAGE_BYTES}"
                ),
            )
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if self.identity is None or self.closing or not isinstance(content, dict):
            return
        answer_to = message_id(content)
        lines = bool(content.get("lines"))
        now = time.monotonic()
        if lines and self._lines_wait(answer_to, now):
            held = max(self.lines_held_until - now, OVERTAKING_RETRY_SECONDS)
            self.lines_refused.setdefault(answer_to, now)
            await self._refuse_message(answer_to, _error_body(SlowDown(retry_after=held)))
            return
        update = content.get("type") == UPDATE
        # An update is taken only from a certificate that holds now, as an upload's signature
        # is checked on every request: against the generation of verified certificates the
        # process's sockets share (one read in GENERATION_SHARED_SECONDS), in full when it
        # changed. Refused, the socket is closed.
        if update and not await self._still_valid():
            return
        try:
            recheck = now - self.checked_at >= RECHECK_SECONDS
            handle = _handle_aside if update else _handle_in_turn
            self.identity, ack = await handle(self.identity, content, recheck)
            if recheck:
                self.checked_at = now
        except AuthenticationError as exc:
            await self._refuse(_error_body(exc))
            return
        except SlowDown as exc:
            self.lines_held_until = time.monotonic() + exc.retry_after
            if lines:
                self.lines_refused.setdefault(answer_to, now)
            await self._refuse_message(answer_to, _error_body(exc))
            return
        except DomainError as exc:
            # Refused for good (bad data, a job that ended): acknowledged with the error, so the
            # agent drops the batch instead of sending it again.
            self.lines_refused.pop(answer_to, None)
            await self._refuse_message(answer_to, _error_body(exc))
            return
        except Exception:
            # A fault of ours, not of the message's form: the agent still gets an answer, and
            # the socket (the site's other jobs) stays up.
            log.exception("agent message failed: site=%s", self.identity.site.name)
            self.lines_refused.pop(answer_to, None)  # the agent drops it
            await self._refuse_message(
                answer_to, ErrorBody(ERROR_SERVER, "the portal failed", status=500)
            )
            return
        if lines:
            self.lines_refused.pop(answer_to, None)  # stored
        if ack is not None:
            await self._send(ack)

    def _lines_wait(self, answer_to: str | int | None, now: float) -> bool:
        """Whether line report ``answer_to`` must be refused for now: the site was told to
        slow down and the wait is not over, or an earlier line report refused meanwhile has
        not come back (only the earliest refused one may be stored next)."""
        if now < self.lines_held_until:
            return True
        refused = self.lines_refused
        for report_id, at in list(refused.items()):
            if now - at > REFUSED_LINES_KEPT_SECONDS:
                del refused[report_id]  # dropped by the agent: it never comes back
        return bool(refused) and next(iter(refused)) != answer_to

    async def _send(self, message: Welcome | Event | Ack | ErrorMessage) -> None:
        await self.send_json(message.to_json())

    async def _refuse_message(self, answer_to: str | int | None, error: ErrorBody) -> None:
        """Acknowledge message ``answer_to`` with ``error``; a message without an id gets the
        error alone."""
        if answer_to is not None:
            await self._send(Ack(id=answer_to, error=error))
        else:
            await self._send(ErrorMessage(error))

    async def _error(self, code: str, message: str) -> None:
        await self._send(ErrorMessage(ErrorBody(code, message)))

    async def fedportal_event(self, message: dict[str, Any]) -> None:
        if self.identity is None or self.closing:
            return
        event = message["event"]
        if "site_ids" in event:
            # Sent to the project's agents (fedportal.events.agents_group): for the sites it
            # names, and without their ids, which are none of an agent's business.
            if self.identity.site.pk not in event["site_ids"]:
                return
            event = {key: value for key, value in event.items() if key != "site_ids"}
        if event.get("kind") == "site.revoked":
            # The site's group hears every certificate's revocation: a re-enrolment supersedes
            # the old certificate while the agent with the new one may be connected already.
            if event.get("serial") == self.identity.certificate.serial:
                await self._refuse(
                    ErrorBody(
                        CertificateRevoked.code,
                        f"certificate {event['serial']} was revoked: {event['reason']}",
                    )
                )
            return
        if time.monotonic() - self.checked_at >= RECHECK_SECONDS and not await self._still_valid():
            return
        await self._send(Event(event))
        if event.get("model") is not None:
            # The model came with the event: the task is training, as its download would have
            # marked it (with the other sockets' of this moment, in one transaction).
            site = self.identity.site
            _delivered_models().add((event, site.pk, site.name))

    async def agent_replaced(self, message: dict[str, Any]) -> None:
        if self.closing:
            return
        self.closing = True
        site = self.identity.site.name if self.identity else "?"
        await self._error(
            ERROR_CONNECTION_REPLACED, f"a newer connection of site {site!r} replaced this one"
        )
        await self.close(code=CLOSE_REPLACED)

    async def _recheck(
        self, check: Callable[[SiteIdentity], SiteIdentity] = identity_recheck
    ) -> bool:
        """Check the certificate again (from the database unless ``check`` says otherwise);
        refuse the socket (and return False) when it is gone."""
        assert self.identity is not None
        self.checked_at = time.monotonic()
        try:
            self.identity = await database_sync_to_async(check)(self.identity)
        except AuthenticationError as exc:
            await self._refuse(_error_body(exc))
            return False
        return True

    async def _still_valid(self) -> bool:
        """Before an event is passed on: whether the socket's certificate still holds, from the
        generation the process's sockets share (one read for the moment's events), checked in
        full only when it is not the one the certificate was verified in. Refuses the socket
        (and returns False) when the certificate is gone."""
        assert self.identity is not None
        generation = await _shared_generation().current()
        if identity_current(self.identity, generation, timezone.now()):
            self.checked_at = time.monotonic()
            return True
        return await self._recheck(identity_check)

    async def _watch(self) -> None:
        """The socket's safety net: its certificate is read again from the database every
        ``FEDPORTAL_SOCKET_RECHECK_SECONDS``, busy or idle (a change behind the services'
        back, which the cache cannot know of)."""
        while not self.closing:
            await asyncio.sleep(sockets.recheck_seconds())
            if not self.closing and not await self._recheck():
                return
            if self.groups:
                await sockets.groups_join_again(self.channel_layer, self.groups, self.channel_name)

    async def _refuse(self, error: ErrorBody) -> None:
        if self.closing:
            return
        self.closing = True
        await self._send(ErrorMessage(error))
        await self.close(code=CLOSE_REVOKED)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.watch is not None and self.watch is not asyncio.current_task():
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
        for group in self.groups:
            await self.channel_layer.group_discard(group, self.channel_name)
        if self.identity is not None:
            await database_sync_to_async(site_services.site_agent_disconnect)(
                site=self.identity.site, channel=self.channel_name
            )
            log.info("agent disconnected: site=%s code=%s", self.identity.site.name, code)
