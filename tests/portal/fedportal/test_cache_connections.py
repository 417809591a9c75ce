"""The portal's Redis cache keeps its connections for the process. Under ASGI, Django makes a
cache object per request context; with the stock RedisCache each one opened a Redis
connection of its own, which a signed request (its nonce and certificate entry are in the
cache) paid every time."""

from __future__ import annotations

from typing import Any

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


def test_more_requests_at_once_than_connections_wait_for_one_rather_than_fail() -> None:
    # 150 agents enrolling at once failed with redis-py's "Too many connections" (its pools
    # hold at most 100) once the pool was the process's; the portal's settings make it wait.
    import json
    from concurrent.futures import ThreadPoolExecutor

    from tests.portal.settings_probe import portal_settings

    out = portal_settings("s.CACHES['default']['OPTIONS']")
    assert out.returncode == 0, out.stderr
    options = json.loads(out.stdout)
    options["max_connections"] = 8  # few, so that 64 threads surely queue for them
    cache = SharedPoolRedisCache(REDIS, {"KEY_PREFIX": "cache-wait-test", "OPTIONS": options})

    def request(number: int) -> int:
        cache.set(f"k{number}", number, 5)
        return int(cache.get(f"k{number}"))

    with ThreadPoolExecutor(max_workers=64) as pool:
        assert sorted(pool.map(request, range(256))) == list(range(256))
    client: Any = cache._cache
    pool_of = client._get_connection_pool(True)
    assert len(pool_of._connections) <= 8


def test_the_client_on_a_pool_is_built_once() -> None:
    # Django builds a redis.Redis for every cache call: 2.5% of a busy portal's CPU.
    first = SharedPoolRedisCache(REDIS, {"KEY_PREFIX": "cache-client-test"})
    second = SharedPoolRedisCache(REDIS, {"KEY_PREFIX": "cache-client-test"})
    clients: Any = (first._cache, second._cache)  # Django's private attribute
    assert clients[0].get_client(write=True) is clients[1].get_client(write=False)
    assert clients[0].get_client().connection_pool is clients[1]._get_connection_pool(True)
