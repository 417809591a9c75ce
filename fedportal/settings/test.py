"""Test settings: base settings plus only what the test suite needs."""

import os

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
