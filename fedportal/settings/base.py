"""FedPortal settings.

Every setting comes from the environment, with a default that works on one machine:
SQLite and file storage under FEDPORTAL_DATA_DIR (default: <project root>/data) and
Redis at redis://127.0.0.1:6379/0.

The portal fails closed. Without ``FEDPORTAL_DEV=1`` (a developer's machine, ``make portal``,
PocEnv, the browser tests) it refuses to start unless ``DJANGO_SECRET_KEY`` and
``FEDPORTAL_CA_KEY_ENCRYPTION_KEY`` are set, DEBUG is off unless ``DJANGO_DEBUG=true`` says
otherwise, and cookies are ``Secure``. README.md ("Security settings") lists every variable.
"""

import datetime as dt
import os
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {value!r}") from None


def env_float(name: str, default: float, *, least: float) -> float:
    """A number of seconds (or the like) from the environment, at least ``least``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if not number >= least:  # NaN too
        raise ImproperlyConfigured(f"{name} must be at least {least:g}, got {value!r}")
    return number


# A developer's own machine (make portal, make demo's PocEnv, the browser tests): the built-in
# development secrets are allowed, DEBUG defaults to on, cookies are not Secure (plain HTTP on
# 127.0.0.1) and the portal serves its own static files. Never set it on a reachable host.
FEDPORTAL_DEV = env_bool("FEDPORTAL_DEV", False)


def env_secret(name: str, dev_default: str) -> str:
    """A secret the portal cannot run without, except in development mode."""
    value = os.environ.get(name, "")
    if value:
        return value
    if FEDPORTAL_DEV:
        return dev_default
    raise ImproperlyConfigured(
        f'{name} is not set. Set it to a long random secret (python -c "import secrets; '
        f'print(secrets.token_urlsafe(50))"), or FEDPORTAL_DEV=1 on a development machine.'
    )


BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = Path(os.environ.get("FEDPORTAL_DATA_DIR") or BASE_DIR / "data")
# SQLite and file storage write here; create it so a fresh checkout works without a setup step.
DATA_DIR.mkdir(parents=True, exist_ok=True)

# Signs sessions, CSRF tokens and password reset links. The development default is public:
# anyone who knows it can forge sessions, so it exists only with FEDPORTAL_DEV=1.
SECRET_KEY = env_secret(
    "DJANGO_SECRET_KEY", "dev-only-insecure-secret-key-set-DJANGO_SECRET_KEY-in-production"
)
DEBUG = env_bool("DJANGO_DEBUG", FEDPORTAL_DEV)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# --- HTTPS and security headers ---------------------------------------------------------------
# Behind a reverse proxy that terminates TLS, name the header it sets to the request's scheme
# (DJANGO_SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto): the portal then treats a request as HTTPS
# when that header says "https" (secure redirects, the enrol command's address). Opt-in only: a
# portal reached directly would otherwise believe any client that sends the header.
_proxy_ssl_header = os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER", "").strip()
if _proxy_ssl_header:
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + _proxy_ssl_header.upper().replace("-", "_"),
        os.environ.get("DJANGO_SECURE_PROXY_SSL_VALUE", "https"),
    )
# The Host the proxy received, from X-Forwarded-Host (again only when the proxy sets it).
USE_X_FORWARDED_HOST = env_bool("DJANGO_USE_X_FORWARDED_HOST", False)
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
# /healthz answers over plain HTTP, for load balancers and container health checks.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
# Cookies go only over HTTPS, except on a developer's machine (plain HTTP on 127.0.0.1).
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", not FEDPORTAL_DEV)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", not FEDPORTAL_DEV)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# A session ends after this many seconds (default two weeks, Django's) and at browser close
# when DJANGO_SESSION_EXPIRE_AT_BROWSER_CLOSE is true.
SESSION_COOKIE_AGE = env_int("DJANGO_SESSION_COOKIE_AGE", 14 * 24 * 3600)
SESSION_EXPIRE_AT_BROWSER_CLOSE = env_bool("DJANGO_SESSION_EXPIRE_AT_BROWSER_CLOSE", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = os.environ.get("DJANGO_SECURE_REFERRER_POLICY", "same-origin")
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Sent with every response (fedportal.middleware). The pages load scripts, styles and images
# from the portal only and hold no inline script or style; Swagger UI's icons are data: URLs.
FEDPORTAL_CONTENT_SECURITY_POLICY = os.environ.get(
    "FEDPORTAL_CONTENT_SECURITY_POLICY",
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'",
)

INSTALLED_APPS = [
    # daphne first: its runserver serves HTTP and WebSocket through fedportal.asgi.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI's files, served from /static/ by the portal (no CDN).
    "drf_spectacular_sidecar",
    # Sign-in throttling by account and address (see the AXES_* settings below).
    "axes",
    "sites",
    "jobs",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "fedportal.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into the lockout page.
    "axes.middleware.AxesMiddleware",
]

# django-axes first: a locked-out account or address is refused before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "fedportal.urls"
WSGI_APPLICATION = "fedportal.wsgi.application"
ASGI_APPLICATION = "fedportal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# DATABASE_URL, e.g. postgres://user:password@host:5432/name; unset means SQLite in DATA_DIR.
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "0")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The portal, its worker and PocEnv's set-up write at once on one machine: WAL lets
    # readers go on during a write, IMMEDIATE takes the write lock when a transaction starts
    # (so two never deadlock upgrading), and a writer waits up to 30 s for its turn.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
# PostgreSQL through a pool of connections in each process (Django's own pool, psycopg_pool):
# a request or task borrows a connection and gives it back, instead of opening one (Daphne
# runs each request on its own thread, so without a pool every request, WebSocket message
# and task step opened and closed a connection of its own, and a hundred agents at once ran
# PostgreSQL out of connections). A process holds at most DATABASE_POOL_MAX_SIZE; one that
# needs more waits up to DATABASE_POOL_TIMEOUT seconds for one to come back, rather than
# failing the request. Size PostgreSQL's max_connections for the sum over the portal and
# worker processes (docker/README.md, "Settings"). DATABASE_POOL_MAX_SIZE=0 turns it off.
DATABASE_POOL_MIN_SIZE = env_int("DATABASE_POOL_MIN_SIZE", 1)
DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 10)
DATABASE_POOL_TIMEOUT = env_int("DATABASE_POOL_TIMEOUT", 30)
if DATABASE_POOL_MAX_SIZE < 0 or DATABASE_POOL_MIN_SIZE < 0 or DATABASE_POOL_TIMEOUT <= 0:
    raise ImproperlyConfigured(
        "DATABASE_POOL_MIN_SIZE and DATABASE_POOL_MAX_SIZE must be 0 or more and "
        "DATABASE_POOL_TIMEOUT more than 0, got "
        f"{DATABASE_POOL_MIN_SIZE}, {DATABASE_POOL_MAX_SIZE} and {DATABASE_POOL_TIMEOUT}"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DATABASE_POOL_MAX_SIZE:
    if DATABASES["default"].get("CONN_MAX_AGE"):
        raise ImproperlyConfigured(
            "DATABASE_CONN_MAX_AGE keeps each thread's own connection open, and a pool shares "
            "them: set DATABASE_POOL_MAX_SIZE=0 to use it, or leave it unset"
        )
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": min(DATABASE_POOL_MIN_SIZE, DATABASE_POOL_MAX_SIZE),
        "max_size": DATABASE_POOL_MAX_SIZE,
        "timeout": DATABASE_POOL_TIMEOUT,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The dashboard's sign-in page, and where signing in leads.
LOGIN_URL = "dashboard:login"
LOGIN_REDIRECT_URL = "home"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Files (model weights, job bundles) go to Django's default storage under DATA_DIR/media.
STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT") or DATA_DIR / "static")
# The dashboard's front-end libraries, installed from the npm registry by `make assets` (never
# copied into the repository) and served as /static/vendor/<package>/.
NODE_MODULES = BASE_DIR / "dashboard" / "static_build" / "node_modules"
STATICFILES_DIRS = [("vendor/chart.js", NODE_MODULES / "chart.js" / "dist")]
MEDIA_URL = "media/"
MEDIA_ROOT = Path(os.environ.get("DJANGO_MEDIA_ROOT") or DATA_DIR / "media")
STORAGES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Object storage: with a bucket named, job bundles, models and updates go to an S3-compatible
# store (AWS S3, MinIO, Ceph, …) through django-storages, and every portal and worker, on any
# host, reads them there (jobs.storage). Credentials come from boto3's usual places
# (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an instance role, ~/.aws).
FEDPORTAL_S3_BUCKET = os.environ.get("FEDPORTAL_S3_BUCKET", "").strip()
if FEDPORTAL_S3_BUCKET:
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": FEDPORTAL_S3_BUCKET,
            # Another S3-compatible server (MinIO, Ceph): its address.
            "endpoint_url": os.environ.get("FEDPORTAL_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("FEDPORTAL_S3_REGION") or None,
            # A key prefix, for a bucket shared with other things.
            "location": os.environ.get("FEDPORTAL_S3_PREFIX", ""),
            # The portal names its files itself, and a retry writes the same bits again.
            "file_overwrite": True,
            "default_acl": None,
        },
    }
# With an object store, the local copies a worker aggregates from (jobs.storage).
FEDPORTAL_STORAGE_CACHE_DIR = Path(
    os.environ.get("FEDPORTAL_STORAGE_CACHE_DIR") or DATA_DIR / "storage-cache"
)

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"

# Django's cache holds the request throttles' counters (REST_FRAMEWORK below): on Redis, so that
# every portal process counts together. Deployments sharing a Redis database keep apart by
# prefix, as the channel layer does (default: the channel layer's prefix).
CACHES = {
    "default": {
        # Django's RedisCache, with its connections kept for the process (fedportal.cache).
        "BACKEND": "fedportal.cache.SharedPoolRedisCache",
        "LOCATION": os.environ.get("FEDPORTAL_CACHE_URL") or REDIS_URL,
        "KEY_PREFIX": os.environ.get("FEDPORTAL_CACHE_PREFIX")
        or os.environ.get("FEDPORTAL_CHANNELS_PREFIX", "asgi"),
        # At most this many Redis connections a process; a request that finds them all busy
        # waits for one (up to 20 s) rather than failing, as with the database's pool.
        "OPTIONS": {
            "pool_class": "redis.BlockingConnectionPool",
            "max_connections": env_int("FEDPORTAL_CACHE_MAX_CONNECTIONS", 50),
            "timeout": 20,
        },
    }
}

# Celery reads the CELERY_* names below (see fedportal/celery.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
# Nothing reads a task's result (the services store what a task did), so none is stored and
# there is no result backend unless CELERY_RESULT_BACKEND names one. A stored result cost every
# task a write to Redis, and under ASGI every request that enqueued a task built a Redis
# result backend of its own (Celery keeps one per thread): about 4% of a portal's CPU at 100
# agents, profiled.
CELERY_RESULT_BACKEND: str | None = os.environ.get("CELERY_RESULT_BACKEND") or None
CELERY_TASK_IGNORE_RESULT = True
# JSON only: nothing a worker receives is ever unpickled.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
# The queue the portal enqueues to and its workers consume; deployments sharing a broker keep
# apart by name (PocEnv gives each run its own).
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("FEDPORTAL_CELERY_QUEUE", "celery")
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = TIME_ZONE

FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS = env_int("FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS", 180)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # redis-py 8 reads with a 5 s socket timeout by default, which tears down every
        # consumer waiting in the layer's blocking pop (also 5 s) about every 5 s
        # (django/channels_redis#422). Reads may block longer than the pop; a dead Redis is
        # still noticed through the connect timeout and the next write.
        "CONFIG": {
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
            # Deployments (or PocEnvs) sharing one Redis database keep apart by prefix.
            "prefix": os.environ.get("FEDPORTAL_CHANNELS_PREFIX", "asgi"),
            # Messages a channel holds before the layer drops what is sent to it. Every socket
            # of one portal process reads from one shared inbox, so a round that opens for
            # every site that process serves puts one message each in it at once: channels'
            # default of 100 dropped round events at 150 agents, who then waited for their
            # safety poll. Size it above the sites (and pages) one portal process serves.
            "capacity": env_int("FEDPORTAL_CHANNEL_CAPACITY", 2000),
            # A channel leaves its groups this long after it last joined them. Every open
            # socket joins again at each recheck (FEDPORTAL_SOCKET_RECHECK_SECONDS), so only
            # the channels of a portal process that died (SIGKILL, out of memory, its host
            # gone) fall out: in minutes, rather than channels' default of a day during which
            # every event was also written to each dead channel.
            "group_expiry": FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS,
        },
    },
}

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # People: a browser session, or an API token (`Authorization: Token <key>`). Agents sign
    # their requests (sites.authentication.SiteSignatureAuthentication), set per view.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "sites.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "EXCEPTION_HANDLER": "fedportal.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "fedportal.api.Pagination",
    "PAGE_SIZE": 100,
    # JSON only: no browsable API (its forms would list related objects, such as every user).
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # JSON bodies are bounded in depth and size before they are parsed (fedportal.jsonlimits).
    "DEFAULT_PARSER_CLASSES": [
        "fedportal.api.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # Rates per client address (see fedportal.throttling): the anonymous enrolment endpoints,
    # and failed attempts at a credential (an enrolment token, an API token).
    "DEFAULT_THROTTLE_RATES": {
        "enrol": os.environ.get("FEDPORTAL_THROTTLE_ENROL", "120/minute"),
        "credential_failures": os.environ.get(
            "FEDPORTAL_THROTTLE_CREDENTIAL_FAILURES", "20/10minute"
        ),
    },
}

# --- Sign-in throttling (django-axes: /login/ and /admin/login/) ---------------------------------
# An account is locked after FEDPORTAL_SIGNIN_ACCOUNT_FAILURES wrong passwords, and an address
# after FEDPORTAL_SIGNIN_ADDRESS_FAILURES (many accounts tried from one place), until
# FEDPORTAL_SIGNIN_COOLOFF_MINUTES passed since the last failure; meanwhile even the right
# password is refused (429, a page saying when to try again). Counted in the database, so every
# portal process shares them.
FEDPORTAL_SIGNIN_ACCOUNT_FAILURES = env_int("FEDPORTAL_SIGNIN_ACCOUNT_FAILURES", 5)
FEDPORTAL_SIGNIN_ADDRESS_FAILURES = env_int("FEDPORTAL_SIGNIN_ADDRESS_FAILURES", 20)
AXES_HANDLER = "fedportal.signin.SignInAttemptHandler"
AXES_FAILURE_LIMIT = FEDPORTAL_SIGNIN_ACCOUNT_FAILURES
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_COOLOFF_TIME = dt.timedelta(minutes=env_int("FEDPORTAL_SIGNIN_COOLOFF_MINUTES", 15))
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "fedportal.signin.locked_out"
AXES_CLIENT_IP_CALLABLE = "fedportal.signin.client_address"
AXES_HTTP_RESPONSE_CODE = 429

SPECTACULAR_SETTINGS = {
    "TITLE": "FedPortal",
    "DESCRIPTION": "Federated learning across organisations whose data may not move.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from drf-spectacular-sidecar's pinned copy, served by the portal.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several models have a field named `state`; name each enum after its own choices.
    "ENUM_NAME_OVERRIDES": {
        "JobStateEnum": "jobs.models.JobState",
        "RoundStateEnum": "jobs.models.RoundState",
        "TaskStateEnum": "jobs.models.TaskState",
        "TaskReportEnum": "jobs.api.serializers.TASK_REPORTS",
        "SiteStateEnum": "sites.models.SiteState",
    },
}

# --- Projects, sites and the project certificate authorities (sites app) ---------------------
# Each project's CA private key is stored encrypted with a key derived from this secret. Give a
# long random string (python -c "import secrets; print(secrets.token_urlsafe(32))"). To rotate,
# put the new secret first and keep the old one after a comma until every CA key was re-saved.
# Required: the portal does not start without it, except with FEDPORTAL_DEV=1, where a key
# derived from SECRET_KEY is used (see sites.conf).
FEDPORTAL_CA_KEY_ENCRYPTION_KEY = env_secret("FEDPORTAL_CA_KEY_ENCRYPTION_KEY", "")
FEDPORTAL_CA_VALIDITY_DAYS = int(os.environ.get("FEDPORTAL_CA_VALIDITY_DAYS", "3650"))
FEDPORTAL_SITE_CERT_VALIDITY_DAYS = int(os.environ.get("FEDPORTAL_SITE_CERT_VALIDITY_DAYS", "365"))
FEDPORTAL_ENROLMENT_TOKEN_TTL_HOURS = int(
    os.environ.get("FEDPORTAL_ENROLMENT_TOKEN_TTL_HOURS", "72")
)
FEDPORTAL_INVITATION_TTL_HOURS = int(os.environ.get("FEDPORTAL_INVITATION_TTL_HOURS", "168"))
# A signed agent request is accepted when its timestamp is within ± this many seconds of the
# portal's clock; its nonce is remembered for as long.
FEDPORTAL_SIGNATURE_WINDOW_SECONDS = int(
    os.environ.get("FEDPORTAL_SIGNATURE_WINDOW_SECONDS", "300")
)
# The portal's address as sites reach it, e.g. https://portal.example.org: it goes into the
# `python -m client_agent enrol --portal …` line shown on approval. Unset: the address the
# project admin's request came to.
FEDPORTAL_PUBLIC_URL = os.environ.get("FEDPORTAL_PUBLIC_URL", "")

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "console": {"format": "%(asctime)s %(levelname)-8s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "console"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
}

# --- Jobs (jobs app) ---------------------------------------------------------------------------
# A round closes when every site answered, or at this deadline if min_clients sites did.
FEDPORTAL_ROUND_TIMEOUT_SECONDS = int(os.environ.get("FEDPORTAL_ROUND_TIMEOUT_SECONDS", "3600"))
# A worker that dies while aggregating a round (out of memory, killed) leaves it to the next
# worker; a round whose aggregation was started this many times without finishing fails, with
# the reason, instead of taking down every worker that tries it.
FEDPORTAL_ROUND_MAX_AGGREGATION_ATTEMPTS = int(
    os.environ.get("FEDPORTAL_ROUND_MAX_AGGREGATION_ATTEMPTS", "3")
)
# The claim on a round's aggregation is a lease (jobs.services.claims): renewed every third of
# it while the worker works, and lapsed when the worker died, whereupon another worker takes the
# round. The watchdog in every worker looks for lapsed claims this often. A worker that died is
# replaced within about lease + check seconds.
FEDPORTAL_CLAIM_LEASE_SECONDS = env_float("FEDPORTAL_CLAIM_LEASE_SECONDS", 6.0, least=1.0)
FEDPORTAL_CLAIM_CHECK_SECONDS = env_float("FEDPORTAL_CLAIM_CHECK_SECONDS", 1.0, least=0.1)
# Secure aggregation: how long a protected round waits for the sites' keys, their sealed
# shares, and their finish answers (the uploads wait for the round's own deadline).
FEDPORTAL_SECURE_PHASE_SECONDS = int(os.environ.get("FEDPORTAL_SECURE_PHASE_SECONDS", "60"))
# A site is online when it made a signed request (a heartbeat) this recently.
FEDPORTAL_SITE_ONLINE_SECONDS = int(os.environ.get("FEDPORTAL_SITE_ONLINE_SECONDS", "90"))
# A site's heartbeat is written at most this often (seconds), by all portal processes together,
# and never more than half of FEDPORTAL_SITE_ONLINE_SECONDS (sites.signed_cache): not a row
# write for every signed request.
FEDPORTAL_HEARTBEAT_WRITE_SECONDS = env_int("FEDPORTAL_HEARTBEAT_WRITE_SECONDS", 30)
# A round's start model no larger than this (bytes; 0: never) goes to the sites' agents with
# the round's event, so they start without downloading it (jobs.services.rounds.event_model;
# at most 1 MiB whatever is set). A larger model is downloaded as before.
FEDPORTAL_EVENT_MODEL_MAX_BYTES = env_int("FEDPORTAL_EVENT_MODEL_MAX_BYTES", 64 * 1024)
# A site's update no larger than this (bytes; 0: never) may come over the agent's open socket
# instead of a signed HTTP upload (jobs.consumers; at most what one message carries,
# client_agent.protocol.SOCKET_UPDATE_MOST_BYTES, whatever is set). The welcome tells each agent.
FEDPORTAL_SOCKET_UPDATE_MAX_BYTES = env_int("FEDPORTAL_SOCKET_UPDATE_MAX_BYTES", 64 * 1024)
# The uploads a portal process stores within this many seconds of the first enqueue one check
# of their round, not a check each (jobs.services.tasks; 0: a check each, at once); sooner,
# once no upload came for FEDPORTAL_UPDATE_CHECK_QUIET_SECONDS (0: never sooner). An upload
# whose check was lost with its process is checked by the beat's resume. A steady stream of
# uploads (a hundred sites) is thus gathered for 60 ms, and a check's fixed cost (about 7 ms
# of the worker's CPU) comes less than half as often as with 20 ms; a burst that is over (a
# few sites) is checked 20 ms after its last upload (README, "Many agents").
FEDPORTAL_UPDATE_CHECK_GATHER_SECONDS = env_float(
    "FEDPORTAL_UPDATE_CHECK_GATHER_SECONDS", 0.06, least=0.0
)
FEDPORTAL_UPDATE_CHECK_QUIET_SECONDS = env_float(
    "FEDPORTAL_UPDATE_CHECK_QUIET_SECONDS", 0.02, least=0.0
)
# --- WebSockets (fedportal.sockets) -------------------------------------------------------------
# Open dashboard sockets one person may hold (a browser tab holds one per live page); the next
# is closed with code 4429. Counted in Redis across portal processes.
FEDPORTAL_MAX_SOCKETS_PER_USER = int(os.environ.get("FEDPORTAL_MAX_SOCKETS_PER_USER", "20"))
# How often an open socket checks again that its person (or agent's certificate) may still
# listen, in case the event that ends a grant was lost; a socket's count lapses after 3 times.
FEDPORTAL_SOCKET_RECHECK_SECONDS = float(os.environ.get("FEDPORTAL_SOCKET_RECHECK_SECONDS", "30"))
if FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS < 3 * FEDPORTAL_SOCKET_RECHECK_SECONDS:
    raise ImproperlyConfigured(
        "FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS must be at least 3 times "
        f"FEDPORTAL_SOCKET_RECHECK_SECONDS ({FEDPORTAL_SOCKET_RECHECK_SECONDS:g}): open sockets "
        "join their groups again at every recheck, and would fall out of them between two"
    )
FEDPORTAL_SOCKETS_REDIS_URL = os.environ.get("FEDPORTAL_SOCKETS_REDIS_URL") or REDIS_URL
FEDPORTAL_SOCKETS_KEY_PREFIX = os.environ.get("FEDPORTAL_CHANNELS_PREFIX", "asgi")

# Upload limits: a model file (initial model or a site's update), and a zipped app folder.
FEDPORTAL_MAX_MODEL_BYTES = int(os.environ.get("FEDPORTAL_MAX_MODEL_BYTES", str(4 * 1024**3)))
FEDPORTAL_MAX_APP_ARCHIVE_BYTES = int(
    os.environ.get("FEDPORTAL_MAX_APP_ARCHIVE_BYTES", str(50 * 1024**2))
)

# --- Request bodies and slow clients (fedportal.bodylimits, fedportal.server) -----------------
# Every route's body is bounded before it is read: the uploads by the limits above, the sign-in
# pages and the anonymous enrolment endpoints by small limits of their own, every other route
# by this one.
FEDPORTAL_MAX_REQUEST_BYTES = env_int("FEDPORTAL_MAX_REQUEST_BYTES", 1024**2)
# The request line and headers must arrive within this many seconds of the connection opening
# (or of the previous response, on a kept-alive connection).
FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS = env_int("FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS", 10)
# A body must arrive within this many seconds of its headers; an upload's deadline grows by a
# second for every FEDPORTAL_HTTP_UPLOAD_MIN_RATE bytes received (at least that many bytes a
# second on average, after the first FEDPORTAL_HTTP_BODY_TIMEOUT_SECONDS).
FEDPORTAL_HTTP_BODY_TIMEOUT_SECONDS = env_int("FEDPORTAL_HTTP_BODY_TIMEOUT_SECONDS", 30)
FEDPORTAL_HTTP_UPLOAD_MIN_RATE = env_int("FEDPORTAL_HTTP_UPLOAD_MIN_RATE", 64 * 1024)
# The portal process serves /static/ itself (Django's static files handler): on in development
# mode; a deployment serves collectstatic's folder from its reverse proxy instead.
FEDPORTAL_SERVE_STATIC = env_bool("FEDPORTAL_SERVE_STATIC", FEDPORTAL_DEV)

# Output lines a site's script prints, per job and site (jobs.services.telemetry.log_lines_record):
# the newest are kept within these bounds, older ones are deleted and counted as dropped; a
# site may send them at this rate in bytes per second, after a first burst (more waits: the
# agent is told to slow down); lines of a finished job are taken for its grace period only.
FEDPORTAL_LOG_MAX_LINES_PER_SITE = env_int("FEDPORTAL_LOG_MAX_LINES_PER_SITE", 20000)
FEDPORTAL_LOG_MAX_BYTES_PER_SITE = int(
    os.environ.get("FEDPORTAL_LOG_MAX_BYTES_PER_SITE", str(16 * 1024**2))
)
FEDPORTAL_LOG_BYTES_PER_SECOND = int(
    os.environ.get("FEDPORTAL_LOG_BYTES_PER_SECOND", str(256 * 1024))
)
FEDPORTAL_LOG_BURST_BYTES = int(os.environ.get("FEDPORTAL_LOG_BURST_BYTES", str(4 * 1024**2)))
FEDPORTAL_LOG_GRACE_SECONDS = int(os.environ.get("FEDPORTAL_LOG_GRACE_SECONDS", "60"))
# Redis redelivers a task whose worker died once this many seconds passed; every task is
# idempotent, so a task running longer than this and delivered twice does no harm.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "300"))
}
# Every this many seconds the beat (`celery worker -B`, or a `celery beat` of its own)
# re-enqueues the next step of every active job: the safety net for round kicks and deadline
# countdowns lost with the broker (Redis keeps nothing on disk: a restart empties its queues).
# Idempotent, so an extra beat does no harm but load.
FEDPORTAL_RESUME_SECONDS = float(os.environ.get("FEDPORTAL_RESUME_SECONDS", "60"))
CELERY_BEAT_SCHEDULE = {
    "jobs-resume": {"task": "jobs.tasks.jobs_resume_task", "schedule": FEDPORTAL_RESUME_SECONDS}
}
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Torch threads in a Celery worker (see jobs.tasks); one is fastest on a shared machine.
FEDPORTAL_WORKER_TORCH_THREADS = int(os.environ.get("FEDPORTAL_WORKER_TORCH_THREADS", "1"))
