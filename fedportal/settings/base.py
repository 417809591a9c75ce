"""FedPortal settings.

Every setting comes from the environment, with a default that works on one machine:
SQLite and file storage under FEDPORTAL_DATA_DIR (default: <project root>/data) and
Redis at redis://127.0.0.1:6379/0.
"""

import os
from pathlib import Path

import dj_database_url


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = Path(os.environ.get("FEDPORTAL_DATA_DIR") or BASE_DIR / "data")
# SQLite and file storage write here; create it so a fresh checkout works without a setup step.
DATA_DIR.mkdir(parents=True, exist_ok=True)

# DEVELOPMENT DEFAULT ONLY: anyone who knows it can forge sessions. Set DJANGO_SECRET_KEY
# (and DJANGO_DEBUG=false) anywhere other than your own machine.
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "dev-only-insecure-secret-key-set-DJANGO_SECRET_KEY-in-production"
)
DEBUG = env_bool("DJANGO_DEBUG", True)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

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
    "sites",
    "jobs",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"

# Celery reads the CELERY_* names below (see fedportal/celery.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or REDIS_URL
# JSON only: nothing a worker receives is ever unpickled.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
# The queue the portal enqueues to and its workers consume; deployments sharing a broker keep
# apart by name (PocEnv gives each run its own).
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("FEDPORTAL_CELERY_QUEUE", "celery")
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = TIME_ZONE

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
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "FedPortal",
    "DESCRIPTION": "Federated learning across organisations whose data may not move.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
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
# Unset with DEBUG on, a key derived from SECRET_KEY is used (see sites.conf); unset with DEBUG
# off, creating a project or enrolling a site fails with a message saying to set it.
FEDPORTAL_CA_KEY_ENCRYPTION_KEY = os.environ.get("FEDPORTAL_CA_KEY_ENCRYPTION_KEY", "")
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
# A site is online when it made a signed request (a heartbeat) this recently.
FEDPORTAL_SITE_ONLINE_SECONDS = int(os.environ.get("FEDPORTAL_SITE_ONLINE_SECONDS", "90"))
# Upload limits: a model file (initial model or a site's update), and a zipped app folder.
FEDPORTAL_MAX_MODEL_BYTES = int(os.environ.get("FEDPORTAL_MAX_MODEL_BYTES", str(4 * 1024**3)))
FEDPORTAL_MAX_APP_ARCHIVE_BYTES = int(
    os.environ.get("FEDPORTAL_MAX_APP_ARCHIVE_BYTES", str(50 * 1024**2))
)
# Output lines a site's script prints, per job and site (jobs.services.sites.log_lines_record):
# the newest are kept within these bounds, older ones are deleted and counted as dropped; a
# site may send them at this rate in bytes per second, after a first burst (more waits: the
# agent is told to slow down); lines of a finished job are taken for its grace period only.
FEDPORTAL_LOG_MAX_LINES_PER_SITE = int(os.environ.get("FEDPORTAL_LOG_MAX_LINES_PER_SITE", "20000"))
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
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Torch threads in a Celery worker (see jobs.tasks); one is fastest on a shared machine.
FEDPORTAL_WORKER_TORCH_THREADS = int(os.environ.get("FEDPORTAL_WORKER_TORCH_THREADS", "1"))
