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
