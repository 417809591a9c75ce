"""Settings of the portal process the browser tests start (Daphne): the test settings, with the
channel layer on Redis, so that events cross between the test process and the portal, and Celery
tasks run inline (no worker: a submitted job moves on as far as it can at once)."""

import os

from fedportal.settings.test import *  # noqa: F403

# A Redis database of the browser tests' own (15: the Celery worker tests, 14: a benchmark).
BROWSER_REDIS_URL = os.environ.get("BROWSER_TEST_REDIS_URL") or "redis://127.0.0.1:6379/13"
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # As fedportal.settings.base: redis-py 8's default 5 s read timeout would tear down the
        # layer's blocking pops (django/channels_redis#422).
        "CONFIG": {"hosts": [{"address": BROWSER_REDIS_URL, "socket_timeout": 30}]},
    }
}
CELERY_TASK_ALWAYS_EAGER = True
FEDPORTAL_SOCKETS_REDIS_URL = BROWSER_REDIS_URL
