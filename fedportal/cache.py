"""Django's Redis cache, with one connection pool per process rather than one per request.

Django keeps cache objects in an asgiref ``Local``: under ASGI (Daphne) that is per request
context, so the stock ``RedisCache`` made a new client, a new connection pool and a new
Redis connection (TCP, and redis-py's handshake, which reads package metadata from disk) for
every request that touched the cache. Profiled at 100 agents, that was the largest single
cost of a signed request, whose replay nonce and certificate entry live in the cache. Here
the pools live in the process, keyed by server and options; redis-py's pool notices a fork
and starts afresh in the child.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_pools: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def _get_connection_pool(self, write: bool) -> Any:
        client: Any = self  # Django's private attributes, which its stubs do not declare
        index = client._get_connection_pool_index(write)
        server, options = client._servers[index], client._pool_options
        key = (server, repr(sorted(options.items(), key=str)))
        pool = _pools.get(key)
        if pool is None:
            with _lock:
                pool = _pools.get(key)
                if pool is None:
                    pool = client._pool_class.from_url(server, **options)
                    _pools[key] = pool
        return pool


class SharedPoolRedisCache(RedisCache):
    """``django.core.cache.backends.redis.RedisCache`` whose connections outlive a request."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
