"""Django's Redis cache, with one connection pool per process rather than one per request.

Django keeps cache objects in an asgiref ``Local``: under ASGI (Daphne) that is per request
context, so the stock ``RedisCache`` made a new client, a new connection pool and a new
Redis connection (TCP, and redis-py's handshake, which reads package metadata from disk) for
every request that touched the cache. Profiled at 100 agents, that was the largest single
cost of a signed request, whose replay nonce and certificate entry live in the cache. Here
the pools live in the process, keyed by server and options; redis-py's pool notices a fork
and starts afresh in the child.

The client on each pool is kept too: Django builds a ``redis.Redis`` for every cache call
(2.5% of a portal's CPU at 100 agents, profiled), and a client without a pipeline or pubsub
of its own only borrows connections from its pool, from any thread.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

# Per server and pool options: the pool, and the client on it.
_pools_and_clients: dict[tuple[str, str], tuple[Any, Any]] = {}
_lock = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def _pool_and_client(self, write: bool) -> tuple[Any, Any]:
        client: Any = self  # Django's private attributes, which its stubs do not declare
        index = client._get_connection_pool_index(write)
        server, options = client._servers[index], client._pool_options
        key = (server, repr(sorted(options.items(), key=str)))
        shared = _pools_and_clients.get(key)
        if shared is None:
            with _lock:
                shared = _pools_and_clients.get(key)
                if shared is None:
                    pool = client._pool_class.from_url(server, **options)
                    shared = _pools_and_clients[key] = (pool, client._client(connection_pool=pool))
        return shared

    def _get_connection_pool(self, write: bool) -> Any:
        return self._pool_and_client(write)[0]

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        return self._pool_and_client(write)[1]


class SharedPoolRedisCache(RedisCache):
    """``django.core.cache.backends.redis.RedisCache`` whose connections outlive a request."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
