"""Events sent from code with no event loop (a Celery worker) reuse the process's Redis
connections, rather than open one per event and group."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import pytest
import redis

from fedportal.events import send_after_commit
from tests.portal.fedportal.test_channel_capacity import REDIS, portal_channel_config, redis_answers

if TYPE_CHECKING:
    from pytest_django.fixtures import Settings

pytestmark = pytest.mark.skipif(not redis_answers(), reason="needs Redis at " + REDIS)


@pytest.mark.django_db(transaction=True)  # on_commit runs the sends
def test_a_worker_sending_many_events_opens_no_connection_per_event(settings: Settings) -> None:
    from channels_redis.core import RedisChannelLayer

    config = portal_channel_config()
    config["prefix"] = f"publisher-test-{os.getpid()}"
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": config}
    }
    listener = RedisChannelLayer(**config)
    loop = asyncio.new_event_loop()
    server = redis.Redis.from_url(REDIS)
    try:
        channel = loop.run_until_complete(listener.new_channel())
        for group in ("job.1", "site.1", "site.2"):
            loop.run_until_complete(listener.group_add(group, channel))

        def connections_opened() -> int:
            return int(server.info("stats")["total_connections_received"])

        send_after_commit(["job.1"], {"kind": "warm-up"})  # the process's first connection
        before = connections_opened()
        events = 40
        for number in range(events):
            send_after_commit(["job.1", "site.1", "site.2"], {"kind": "round.state", "n": number})
        opened = connections_opened() - before

        async def heard() -> list[int]:
            got: list[int] = []
            while len(got) < 1 + 3 * events:
                message = await asyncio.wait_for(listener.receive(channel), 5)
                got.append(message["event"].get("n", -1))
            return got

        numbers = loop.run_until_complete(heard())
        # Every event reached every group, in order (the listener's three groups each).
        assert [n for n in numbers if n >= 0] == [n for n in range(events) for _ in range(3)]
        # Before: a new event loop, and with it a new Redis connection, for each group of each
        # event (120 here). Other clients of this Redis may open a few meanwhile.
        assert opened < 20, f"{opened} Redis connections opened for {events} events"
    finally:
        loop.run_until_complete(listener.flush())
        loop.run_until_complete(listener.close_pools())
        loop.close()
        server.close()
