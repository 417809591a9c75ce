"""System checks of the sites app (``manage.py check --deploy``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register


@register(Tags.security, deploy=True)
def check_ca_key_encryption_key(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Without its own key, a deployment would fall back to nothing (DEBUG off) and fail at the
    first project; with DEBUG on it would encrypt CA keys with SECRET_KEY. Say so up front."""
    if getattr(settings, "FEDPORTAL_CA_KEY_ENCRYPTION_KEY", ""):
        return []
    return [
        Error(
            "FEDPORTAL_CA_KEY_ENCRYPTION_KEY is not set.",
            hint="Set it to a long random secret; project CA private keys are encrypted with it.",
            id="sites.E001",
        )
    ]


# Caches every portal process shares, with an atomic add: what replay protection needs.
SHARED_CACHES = (
    "fedportal.cache.SharedPoolRedisCache",
    "django.core.cache.backends.redis.RedisCache",
    "django.core.cache.backends.memcached.PyMemcacheCache",
    "django.core.cache.backends.memcached.PyLibMCCache",
)


@register(Tags.security, deploy=True)
def check_cache_is_shared(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A signed request's nonce is claimed in Django's cache (sites.signed_cache): a cache of
    each process's own would let a request replayed to another portal process through."""
    backend = str(settings.CACHES.get("default", {}).get("BACKEND", ""))
    if backend in SHARED_CACHES:
        return []
    return [
        Error(
            f"The default cache ({backend}) is not shared by the portal's processes.",
            hint="Replay protection of signed requests claims each nonce in it: use Redis "
            "(the default: REDIS_URL, or FEDPORTAL_CACHE_URL) or Memcached.",
            id="sites.E002",
        )
    ]
