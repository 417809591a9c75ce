"""The portal's Redis cache keeps its connections for the process. Under ASGI, Django makes a
cache object per request context; with the stock RedisCache each one opened a Redis
connection of its own, which a signed request (its nonce and certificate entry are in the
cache) paid every time."""

from __future__ import annotations

import pytest
import redis
from django.core.cache.backends.redis import RedisCache

from fedportal.cache import SharedPoolRedisCache
from tests.portal.fedportal.test_channel_capacity import REDIS, redis_answers

pytestmark = pytest.mark.skipif(not redis_answers(), reason="needs Redis at " + REDIS)


def connections_opened(backend: type[RedisCache], requests: int) -> int:
    server = redis.Redis.from_url(REDIS)
    before = int(server.info("stats")["total_connections_received"])
    for number in range(requests):
        cache = backend(REDIS, {"KEY_PREFIX": "cache-connections-test"})  # one per request
        cache.set(f"k{number}", number, 5)
        assert cache.get(f"k{number}") == number
    opened = int(server.info("stats")["total_connections_received"]) - before
    server.close()
    return opened


def test_a_cache_per_request_reuses_the_process_connections() -> None:
    # Other clients of this Redis may connect meanwhile: bounds, not exact counts.
    assert connections_opened(SharedPoolRedisCache, 50) < 10
    assert connections_opened(RedisCache, 50) >= 50  # what it was
