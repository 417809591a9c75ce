"""The portal's channel layer (Redis) holds a round's events for every socket of one process:
a round that opens for hundreds of sites on one portal drops none of them, and is one message
for that process."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
import redis

from tests.portal.settings_probe import portal_settings

REDIS = os.environ.get("TEST_CHANNELS_REDIS_URL", "redis://127.0.0.1:6379/11")


def portal_channel_config(**env: str) -> dict[str, Any]:
    """The channel layer's CONFIG of a portal process started with ``env``."""
    out = portal_settings("s.CHANNEL_LAYERS['default']['CONFIG']", REDIS_URL=REDIS, **env)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.skipif(not redis_answers(), reason="needs Redis at " + REDIS)
def test_a_round_opening_for_300_sites_on_one_portal_reaches_every_socket() -> None:
    from channels_redis.core import RedisChannelLayer

    config = portal_channel_config()
    config["prefix"] = f"capacity-test-{os.getpid()}"
    sites = 300

    async def round_opens() -> int:
        layer = RedisChannelLayer(**config)
        try:
            # One process's sockets: channels of one layer, which share one inbox in Redis.
            channels = [await layer.new_channel() for _ in range(sites)]
            for number, channel in enumerate(channels):
                await layer.group_add(f"site.{number}", channel)
            for number in range(sites):  # the round's open event, to each site's group
                await layer.group_send(f"site.{number}", {"type": "fedportal.event"})
            listening = [asyncio.create_task(layer.receive(channel)) for channel in channels]
            heard, missed = await asyncio.wait(listening, timeout=10)
            for task in missed:
                task.cancel()
            await asyncio.gather(*missed, return_exceptions=True)
            return len(heard)
        finally:
            await layer.flush()
            await layer.close_pools()

    assert asyncio.run(round_opens()) == sites


@pytest.mark.skipif(not redis_answers(), reason="needs Redis at " + REDIS)
def test_a_round_opening_for_300_sites_is_one_message_for_their_portal_process() -> None:
    # The round's event goes to the project's agents (fedportal.events.agents_group): one
    # message in the process's inbox, received once and handed to every socket, where one per
    # site's group took a receive each (a hundred took a second under load).
    from channels_redis.core import RedisChannelLayer

    from fedportal.events import agents_group

    config = portal_channel_config()
    config["prefix"] = f"agents-test-{os.getpid()}"
    sites = 300

    async def round_opens() -> tuple[int, int]:
        layer = RedisChannelLayer(**config)
        try:
            channels = [await layer.new_channel() for _ in range(sites)]
            for channel in channels:
                await layer.group_add(agents_group(1), channel)
            await layer.group_send(agents_group(1), {"type": "fedportal.event"})
            inbox = layer.non_local_name(channels[0])  # the process's, shared by its channels
            connection = layer.connection(layer.consistent_hash(inbox))
            stored = await connection.zcard(layer.prefix + inbox)
            listening = [asyncio.create_task(layer.receive(channel)) for channel in channels]
            heard, missed = await asyncio.wait(listening, timeout=10)
            for task in missed:
                task.cancel()
            await asyncio.gather(*missed, return_exceptions=True)
            return stored, len(heard)
        finally:
            await layer.flush()
            await layer.close_pools()

    assert asyncio.run(round_opens()) == (1, sites)


def test_the_capacity_is_set_from_the_environment() -> None:
    assert portal_channel_config()["capacity"] == 2000
    assert portal_channel_config(FEDPORTAL_CHANNEL_CAPACITY="5000")["capacity"] == 5000
