"""Input checks shared by the services. Each returns the cleaned value or raises
:class:`ValidationFailed` naming the field and the reason, before anything is written."""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from common.exceptions import ValidationFailed
from common.validators import has_control_characters, is_number
from sites.models import SITE_NAME_HELP, SITE_NAME_PATTERN, Role

MAX_REASON_LENGTH = 2000
MAX_RESOURCE_KEYS = 32
_RESOURCE_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SITE_NAME = re.compile(SITE_NAME_PATTERN)


def clean_name(value: object, *, field: str, max_length: int) -> str:
    """A display name: trimmed, 1..max_length characters, no control characters."""
    if not isinstance(value, str):
        raise ValidationFailed(f"{field} must be a string", field=field)
    value = value.strip()
    if not value:
        raise ValidationFailed(f"{field} must not be blank", field=field)
    if len(value) > max_length:
        raise ValidationFailed(
            f"{field} is {len(value)} characters long; at most {max_length} are allowed",
            field=field,
        )
    # Names end up in certificate subjects and log lines, where control characters do harm.
    if has_control_characters(value):
        raise ValidationFailed(f"{field} must not contain control characters", field=field)
    return value


def clean_site_name(value: object) -> str:
    if not isinstance(value, str) or not _SITE_NAME.fullmatch(value):
        raise ValidationFailed(
            f"name {value!r} is not a valid site name: {SITE_NAME_HELP}", field="name"
        )
    return value


def clean_email(value: object, *, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationFailed(f"{field} must be a string", field=field)
    value = value.strip()
    try:
        validate_email(value)
    except ValidationError as exc:
        raise ValidationFailed(
            f"{field} {value!r} is not a valid email address", field=field
        ) from exc
    return value


def clean_reason(value: object, *, field: str = "reason") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed(f"{field} must be given and not blank", field=field)
    value = value.strip()
    if len(value) > MAX_REASON_LENGTH:
        raise ValidationFailed(
            f"{field} is {len(value)} characters long; at most {MAX_REASON_LENGTH} are allowed",
            field=field,
        )
    return value


def clean_role(value: object, *, host: bool) -> Role:
    """A valid role; ``project_admin`` only in the host organisation (``host=True``)."""
    if value not in Role.values:
        raise ValidationFailed(
            f"role {value!r} is not one of {', '.join(Role.values)}", field="role"
        )
    role = Role(value)
    if role == Role.PROJECT_ADMIN and not host:
        raise ValidationFailed(
            "project_admin can only be given in the project's host organisation", field="role"
        )
    return role


def clean_resources(value: object) -> dict[str, Any]:
    """Declared resources: a flat JSON object of lowercase keys to numbers ≥ 0, booleans or
    short strings, e.g. ``{"gpus": 1, "memory_gb": 32, "gpu_model": "A100"}``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationFailed("resources must be a JSON object", field="resources")
    if len(value) > MAX_RESOURCE_KEYS:
        raise ValidationFailed(
            f"resources has {len(value)} keys; at most {MAX_RESOURCE_KEYS} are allowed",
            field="resources",
        )
    for key, item in value.items():
        if not isinstance(key, str) or not _RESOURCE_KEY.fullmatch(key):
            raise ValidationFailed(
                f"resources key {key!r} must be lowercase letters, digits and '_', "
                "starting with a letter",
                field="resources",
            )
        if isinstance(item, bool):
            continue
        if is_number(item):
            if not (item >= 0 and item != float("inf")):
                raise ValidationFailed(
                    f"resources.{key} must be a finite number ≥ 0, got {item!r}", field="resources"
                )
            continue
        # No control characters: PostgreSQL's jsonb cannot even store NUL, and these values are
        # shown to people.
        if isinstance(item, str) and len(item) <= 200 and not has_control_characters(item):
            continue
        raise ValidationFailed(
            f"resources.{key} must be a number, a boolean or a string of ≤ 200 characters "
            "without control characters",
            field="resources",
        )
    return dict(value)
