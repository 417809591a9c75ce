"""Test settings: base settings plus only what the test suite needs."""

import os
import uuid

# The base settings refuse to start without these secrets (they fail closed); tests are not a
# deployment. Set in the environment rather than here, so that the portal, worker and agent
# processes the tests start read the same ones.
os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-" + "t" * 40)
os.environ.setdefault("FEDPORTAL_CA_KEY_ENCRYPTION_KEY", "test-only-ca-key-encryption-key")

from .base import *  # noqa: F403

# Hashing passwords properly is slow on purpose; tests create many users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Each test process counts its own throttles (tests/conftest.py empties the cache per test):
# helpers running the suite at the same time share the Redis server.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Tests that start a real Celery worker use their own Redis database, so a developer's own
# worker on the default database never takes their tasks. Results are not stored (base).
CELERY_BROKER_URL = os.environ.get("TEST_CELERY_BROKER_URL") or "redis://127.0.0.1:6379/15"

# Dashboard sockets are counted in the tests' own Redis database, under a prefix of this run's
# own, so that runs side by side never share a count.
FEDPORTAL_SOCKETS_REDIS_URL = CELERY_BROKER_URL
FEDPORTAL_SOCKETS_KEY_PREFIX = f"test-{uuid.uuid4().hex[:12]}"

# An upload's check is enqueued when it commits, in the test's own thread, as the tests that
# collect or run the checks expect; gathering has tests of its own. (PocEnv's processes use
# the base settings: they gather.)
FEDPORTAL_UPDATE_CHECK_GATHER_SECONDS = 0.0
