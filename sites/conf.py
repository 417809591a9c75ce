"""Settings of the sites app, read at call time so that tests can override them.

``FEDPORTAL_CA_KEY_ENCRYPTION_KEY`` is the one that matters for safety:

    **DEVELOPMENT FALLBACK.** When it is unset in development mode (``FEDPORTAL_DEV=1``), the
    CA private keys are encrypted with a key derived from ``SECRET_KEY``. That keeps
    ``make portal`` working on a fresh checkout, but (1) anyone with the secret key and a
    database dump holds every project's CA, and (2) changing ``SECRET_KEY`` makes every
    existing CA key undecryptable. Outside development mode the settings refuse to load
    without it; should it still be empty (settings changed at run time), creating a project or
    enrolling a site raises :class:`~sites.exceptions.CAKeyUnavailable`, and
    ``manage.py check --deploy`` reports ``sites.E001``.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex

from django.conf import settings
from django.http import HttpRequest

from sites.exceptions import CAKeyUnavailable

logger = logging.getLogger(__name__)
_warned = False


def ca_key_encryption_keys() -> list[str]:
    """The secrets for the CA private keys at rest: the first encrypts, all may decrypt."""
    global _warned
    raw = getattr(settings, "FEDPORTAL_CA_KEY_ENCRYPTION_KEY", "") or ""
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if keys:
        return keys
    if getattr(settings, "FEDPORTAL_DEV", False):
        if not _warned:
            logger.warning(
                "FEDPORTAL_CA_KEY_ENCRYPTION_KEY is unset: CA private keys are encrypted with a "
                "key derived from SECRET_KEY. Development only; set it anywhere else."
            )
            _warned = True
        return [f"django-secret-key:{settings.SECRET_KEY}"]
    raise CAKeyUnavailable(
        "FEDPORTAL_CA_KEY_ENCRYPTION_KEY is not set; the project CA keys cannot be encrypted "
        "or decrypted (there is no fallback outside development mode, FEDPORTAL_DEV=1)"
    )


def ca_validity_days() -> int:
    return int(settings.FEDPORTAL_CA_VALIDITY_DAYS)


def site_certificate_validity_days() -> int:
    return int(settings.FEDPORTAL_SITE_CERT_VALIDITY_DAYS)


def enrolment_token_ttl() -> dt.timedelta:
    return dt.timedelta(hours=int(settings.FEDPORTAL_ENROLMENT_TOKEN_TTL_HOURS))


def invitation_ttl() -> dt.timedelta:
    return dt.timedelta(hours=int(settings.FEDPORTAL_INVITATION_TTL_HOURS))


def signature_window_seconds() -> int:
    return int(settings.FEDPORTAL_SIGNATURE_WINDOW_SECONDS)


def public_url() -> str:
    """The portal's address as sites reach it (``FEDPORTAL_PUBLIC_URL``), without a trailing
    slash; empty when unset, and the API then uses the address the request came to."""
    return str(getattr(settings, "FEDPORTAL_PUBLIC_URL", "") or "").rstrip("/")


def portal_url_for(request: HttpRequest) -> str:
    """The portal's address for sites: ``FEDPORTAL_PUBLIC_URL``, else the address ``request``
    came to. Behind a TLS proxy that address is ``https://…`` only when the proxy's scheme
    header is trusted (``DJANGO_SECURE_PROXY_SSL_HEADER``)."""
    return public_url() or request.build_absolute_uri("/").rstrip("/")


def enrol_command(request: HttpRequest, token: str) -> str:
    """The exact line a site admin runs to enrol with ``token``."""
    portal = shlex.quote(portal_url_for(request))
    return f"python -m client_agent enrol --portal {portal} --token {shlex.quote(token)}"
