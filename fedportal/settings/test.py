"""Test settings: base settings plus only what the test suite needs."""

import os
import uuid

from .base import *  # noqa: F403

# Hashing passwords properly is slow on purpose; tests create many users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# pytest-django runs with DEBUG off, where the CA key encryption key has no fallback.
FEDPORTAL_CA_KEY_ENCRYPTION_KEY = "test-only-ca-key-encryption-key"

# Tests that start a real Celery worker use their own Redis database, so a developer's own
# worker on the default database never takes their tasks. Results are not needed.
CELERY_BROKER_URL = os.environ.get("TEST_CELERY_BROKER_URL") or "redis://127.0.0.1:6379/15"
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None

# Dashboard sockets are counted in the tests' own Redis database, under a prefix of this run's
# own, so that runs side by side never share a count.
FEDPORTAL_SOCKETS_REDIS_URL = CELERY_BROKER_URL
FEDPORTAL_SOCKETS_KEY_PREFIX = f"test-{uuid.uuid4().hex[:12]}"
