"""API tokens: a person's key for scripts and automation. It acts as that person, with their
roles, in every project; it is stored hashed and its plaintext is shown once."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from common.exceptions import InvalidTransition, ValidationFailed
from sites.models import ApiToken, AuditAction
from sites.secret_tokens import API_TOKEN_PREFIX, new_secret
from sites.services._validation import clean_name
from sites.services.audit import audit_event_record

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# Enough to tell tokens apart in a list ("fpt_" plus 8 characters), far too little to guess.
DISPLAY_PREFIX_LENGTH = 12


def api_token_create(
    *,
    user: User,
    name: str,
    expires_at: dt.datetime | None = None,
    created_with: ApiToken | None = None,
    source_address: str | None = None,
) -> tuple[ApiToken, str]:
    """A new API token for ``user``; returns the row and the plaintext key, shown once.

    ``created_with`` is the API token the request was made with, if any: a token made with an
    expiring token expires no later than it (at the same time when ``expires_at`` is not
    given), so a short-lived token cannot mint a lasting one. A session may make any token.

    Raises ``ValidationFailed`` (blank name, or ``expires_at`` not in the future or past the
    expiry of ``created_with``).
    """
    name = clean_name(name, field="name", max_length=100)
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationFailed("expires_at must be in the future", field="expires_at")
    if created_with is not None and created_with.expires_at is not None:
        ceiling = created_with.expires_at
        if expires_at is None:
            expires_at = ceiling
        elif expires_at > ceiling:
            raise ValidationFailed(
                f"a token made with API token {created_with.prefix}… must expire no later than "
                f"it does ({ceiling:%Y-%m-%d %H:%M:%S} UTC)",
                field="expires_at",
            )
    plaintext, digest = new_secret(API_TOKEN_PREFIX)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user,
            name=name,
            key_hash=digest,
            prefix=plaintext[:DISPLAY_PREFIX_LENGTH],
            expires_at=expires_at,
        )
        audit_event_record(
            action=AuditAction.API_TOKEN_CREATED,
            target=token,
            project=None,
            actor=user,
            source_address=source_address,
            details={"name": name, "prefix": token.prefix, "expires_at": expires_at},
        )
    return token, plaintext


def api_token_revoke(
    *,
    token: ApiToken,
    revoked_by: User,
    source_address: str | None = None,
) -> ApiToken:
    """Revoke an API token at once. Raises ``InvalidTransition`` when already revoked."""
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().get(pk=token.pk)
        if token.revoked_at is not None:
            raise InvalidTransition(f"API token {token.prefix}… is already revoked")
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_event_record(
            action=AuditAction.API_TOKEN_REVOKED,
            target=token,
            project=None,
            actor=revoked_by,
            source_address=source_address,
            details={"prefix": token.prefix, "owner": token.user.get_username()},
        )
    return token
