"""What every WebSocket of the portal shares: its close codes, how often an open socket checks
its access again, and the per-person cap on open dashboard sockets.

Close codes (4000-4999 are the application's own, RFC 6455 §7.4.2):

====  ===================  =====================================================================
code  who                  why
====  ===================  =====================================================================
4401  agent, dashboard     not (or no longer) authenticated: a refused handshake, a session that
                           ended (signed out, expired, password changed, account deactivated)
4403  agent                its certificate was revoked or superseded (re-enrolment)
4404  dashboard            the job or project is not (or no longer) visible to the person: the
                           page would be 404
4409  agent                a newer connection of the same site replaced this one
4429  dashboard            the person already holds ``FEDPORTAL_MAX_SOCKETS_PER_USER`` sockets
====  ===================  =====================================================================

**Checking again.** A socket is authorised at its handshake; the services that end a grant
send an event that closes it at once (``sites.events``). In case such an event is lost (a
channel layer hiccup, a portal process that was down), every open socket checks again from the
database every ``FEDPORTAL_SOCKET_RECHECK_SECONDS`` (default 30) while idle, and before
forwarding an event when its last check is older than :data:`EVENT_RECHECK_SECONDS`.

**The cap.** Each open dashboard socket holds a claim in the Redis sorted set
``<prefix>:sockets:user:<id>`` (``FEDPORTAL_SOCKETS_REDIS_URL``, default ``REDIS_URL``; the
prefix is ``FEDPORTAL_CHANNELS_PREFIX``), scored with the time the claim lapses. The socket
renews its claim at every idle check and removes it when it closes; a claim of a portal process
that died lapses after :func:`claim_seconds` (three checks), so no count stays stuck after a
restart. Claiming is one Lua script (drop lapsed claims, count, add), so two sockets opening at
once cannot both take the last place. When Redis cannot be reached the socket is refused (the
channel layer lives there too, so live updates would not work anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from channels.consumer import get_handler_name
from django.conf import settings

from client_agent import jsonlimits, protocol
from fedportal.events import MESSAGE_TYPE

log = logging.getLogger(__name__)

# The codes an agent also meets are defined where the agent reads them.
CLOSE_UNAUTHENTICATED = protocol.CLOSE_UNAUTHENTICATED
CLOSE_REVOKED = protocol.CLOSE_REVOKED
CLOSE_NOT_FOUND = 4404
CLOSE_REPLACED = protocol.CLOSE_REPLACED
CLOSE_TOO_MANY = 4429

# Before forwarding an event, a socket whose last check is older than this checks again: a
# lost "access changed" event leaks at most this long while events flow.
EVENT_RECHECK_SECONDS = 5.0

# KEYS[1]: the person's set. ARGV: member, limit, lifetime (s). Returns 1 when claimed.
_CLAIM = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""


def recheck_seconds() -> float:
    return float(settings.FEDPORTAL_SOCKET_RECHECK_SECONDS)


def claim_seconds() -> float:
    """How long a claim lives without being renewed."""
    return 3 * recheck_seconds()


def max_sockets_per_user() -> int:
    return int(settings.FEDPORTAL_MAX_SOCKETS_PER_USER)


def _key(user_id: int) -> str:
    return f"{settings.FEDPORTAL_SOCKETS_KEY_PREFIX}:sockets:user:{user_id}"


def _client() -> aioredis.Redis:
    # One short-lived connection per call: a claim is taken, renewed every half minute and
    # dropped, so a pool tied to one event loop would buy nothing and break under tests'
    # per-call event loops.
    return aioredis.Redis.from_url(settings.FEDPORTAL_SOCKETS_REDIS_URL, socket_timeout=5)


async def socket_claim(user_id: int, channel: str) -> bool:
    """Take (or renew) the claim of ``channel`` among ``user_id``'s open sockets; False when
    the person holds the maximum already, or Redis cannot be reached."""
    try:
        async with _client() as client:
            claimed = await client.eval(
                _CLAIM, 1, _key(user_id), channel, max_sockets_per_user(), claim_seconds()
            )
    except (aioredis.RedisError, OSError) as exc:
        log.warning("socket count unavailable, refusing user=%s: %s", user_id, exc)
        return False
    return bool(claimed)


async def socket_release(user_id: int, channel: str) -> None:
    try:
        async with _client() as client:
            await client.zrem(_key(user_id), channel)
    except (aioredis.RedisError, OSError) as exc:  # the claim lapses by itself
        log.warning("could not release socket claim user=%s: %s", user_id, exc)


async def socket_count(user_id: int) -> int:
    """The person's claims that have not lapsed (for tests and diagnostics)."""
    async with _client() as client:
        now = await client.time()
        return int(await client.zcount(_key(user_id), now[0] + now[1] / 1e6, "+inf"))


async def groups_join_again(layer: Any, groups: Iterable[str], channel: str) -> None:
    """Join ``groups`` again. A channel layer forgets a channel ``group_expiry`` seconds after
    it joined a group (``CHANNEL_LAYERS``): that is how the channels of a portal process that
    died leave them. A live socket calls this at every recheck to keep its place."""
    for group in groups:
        await layer.group_add(group, channel)


class DispatchMixin:
    """For a consumer whose database work all goes through ``database_sync_to_async`` (which
    closes stale connections before and after each call, in the thread that holds them):
    messages are dispatched to their handlers at once.

    Channels' own ``dispatch`` (4.2 and later) first hands every message to the one thread of
    thread-sensitive work to close old connections (``aclose_old_connections``): a round trip
    to that thread for every event a socket passes on and every message an agent sends, queued
    behind the sockets' database work. None of it is needed here: no handler uses the ORM
    outside ``database_sync_to_async``. (py-spy put a quarter of a busy portal's samples in
    those trips; runs with and without them, in turn, differed by less than this VM's noise:
    README, "Many agents", ninth session.)"""

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)


class BoundedJSONMixin:
    """For a Channels JSON consumer: messages are parsed by ``client_agent.jsonlimits``, so
    JSON nested deeper than any of ours is refused before Python's parser recurses into it.
    A message that is not JSON, or is too deep, decodes to None: the consumer answers it as
    "not a JSON object" instead of failing the connection."""

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        try:
            return jsonlimits.loads(text_data)
        except ValueError:
            return None


class EventBatchMixin:
    """For a consumer with a ``fedportal_event`` handler: a ``fedportal.events`` message
    (``fedportal.events.send_all_after_commit``) is handed to it one event at a time, in
    order, as if each event had come in a message of its own."""

    async def fedportal_events(self, message: dict[str, Any]) -> None:
        for event in message["events"]:
            await self.fedportal_event({"type": MESSAGE_TYPE, "event": event})  # type: ignore[attr-defined]
