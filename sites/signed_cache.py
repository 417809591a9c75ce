"""What the signed-request check keeps in Django's cache (Redis, shared by every portal
process) instead of writing to the database on every request.

- **Replay nonces**: a nonce is claimed with ``cache.add`` (Redis ``SET NX EX``: atomic, so
  two processes given the same request cannot both claim it) and kept until the request's
  timestamp leaves the signature window, after which the timestamp check refuses a replay
  anyway.
- **Verified certificates**: the certificate → site → project lookup and the chain check of a
  certificate that passed them, by fingerprint. Every entry carries the *generation* it was
  read under; :func:`certificates_changed` (called whenever a certificate, site or project
  row is saved or deleted: ``sites.apps``) starts a new generation, at once and again when
  the transaction commits, so a revocation or a site's change of state is seen by the very
  next request in every process. The generation is read *before* the database, so an entry
  made from a row read before a change commits is already stale when it is stored. Only what
  the check needs is kept; any other field of the site is read from the database when used.
- **Heartbeat writes**: a site's heartbeat row is written at most once every
  ``FEDPORTAL_HEARTBEAT_WRITE_SECONDS`` (a key that expires after it), less than the
  online window, so a site heard from stays online without a write per request.
  :func:`site_heartbeat_due` makes the next heartbeat be written whenever it comes (the
  site's agent was cut off, and must come online again with it).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, TypeVar

from django.conf import settings
from django.core.cache import cache
from django.db import DEFAULT_DB_ALIAS, transaction

from sites.models import Certificate, Project, Site

_GENERATION = "sites:signed:generation"
_CERTIFICATE = "sites:signed:certificate:{}"
_NONCE = "sites:signed:nonce:{}:{}"
_HEARTBEAT = "sites:signed:heartbeat:{}"
# A backstop only: generations end entries as soon as anything they hold changes.
CERTIFICATE_TTL_SECONDS = 600

# The fields of each row an entry keeps: what the signature check and its callers use. The
# rest are deferred, and loaded from the database on first use.
_CERTIFICATE_FIELDS = ("id", "site_id", "serial", "pem", "fingerprint", "not_before", "not_after")
_SITE_FIELDS = ("id", "project_id", "organization_id", "name", "state")
_PROJECT_FIELDS = ("id", "name", "slug")


# --- replay nonces ---------------------------------------------------------------------------


def nonce_claim(*, fingerprint: str, nonce: str, expires_in: int) -> bool:
    """Claim ``nonce`` for the certificate for ``expires_in`` seconds; False when it was
    claimed before (a replay)."""
    return bool(cache.add(_NONCE.format(fingerprint, nonce), 1, timeout=max(1, expires_in)))


def nonce_used(*, fingerprint: str, nonce: str) -> bool:
    """Whether ``nonce`` was claimed with the certificate and is still remembered."""
    return cache.get(_NONCE.format(fingerprint, nonce)) is not None


# --- verified certificates -------------------------------------------------------------------


def generation() -> str:
    """The current generation of certificate entries (a new one when the cache lost it)."""
    current = cache.get(_GENERATION)
    if current is None:
        cache.add(_GENERATION, uuid.uuid4().hex, timeout=None)
        current = cache.get(_GENERATION)
    return str(current)


def generation_is(current: str) -> bool:
    """Whether ``current`` is still the generation of certificate entries: no certificate,
    site or project changed since it was read."""
    return bool(cache.get(_GENERATION) == current)


# Fields of a site that no check of a signed request reads and no entry keeps: a save of
# these alone (the privacy report every agent makes when it connects) leaves every entry
# true. Only fields listed here are let through; a save of any other field ends them all.
_SITE_FIELDS_NEVER_CHECKED = frozenset(
    {
        "privacy_policy",
        "privacy_policy_reported_at",
        "privacy_project_history",
        "privacy_project_epsilon",
    }
)


def certificates_changed(
    *, sender: Any = None, update_fields: frozenset[str] | None = None, **_: Any
) -> None:
    """A certificate, site or project changed: every entry made before is stale. Now, and
    once the transaction commits (an entry made meanwhile read the row as it was before).
    Not for a site saved with only fields no check reads: a hundred agents connecting would
    otherwise end each other's entries, and every request would read the database again."""
    if sender is Site and update_fields and update_fields <= _SITE_FIELDS_NEVER_CHECKED:
        return
    _new_generation()
    transaction.on_commit(_new_generation)


def _new_generation() -> None:
    cache.set(_GENERATION, uuid.uuid4().hex, timeout=None)


def certificate_lookup(fingerprint: str) -> tuple[str, Certificate | None]:
    """The current generation, and the certificate's entry if it was made under it (as
    :func:`certificate_cached`): both in one round trip to the cache, for a signed request's
    check. The generation is read with the entry, so before the database, as it must be."""
    key = _CERTIFICATE.format(fingerprint)
    found = cache.get_many([_GENERATION, key])
    current = found.get(_GENERATION)
    if current is None:
        return generation(), None
    return str(current), _certificate_of(found.get(key), str(current))


def certificate_cached(fingerprint: str, current: str) -> Certificate | None:
    """The verified certificate of an entry of generation ``current`` (its site and project
    attached), or None."""
    return _certificate_of(cache.get(_CERTIFICATE.format(fingerprint)), current)


def _certificate_of(entry: Any, current: str) -> Certificate | None:
    if not isinstance(entry, dict) or entry.get("generation") != current:
        return None
    row = _loaded(Certificate, entry["certificate"])
    site = _loaded(Site, entry["site"])
    site.project = _loaded(Project, entry["project"])
    row.site = site
    # Stored only for certificates that were not revoked.
    row.revoked_at, row.revocation_reason = None, ""
    return row


def certificate_remember(row: Certificate, read_under: str) -> None:
    """Keep a certificate that passed every check, as read under generation ``read_under``."""
    site, project = row.site, row.site.project
    entry = {
        "generation": read_under,
        "certificate": {name: getattr(row, name) for name in _CERTIFICATE_FIELDS},
        "site": {name: getattr(site, name) for name in _SITE_FIELDS},
        "project": {name: getattr(project, name) for name in _PROJECT_FIELDS},
    }
    cache.set(_CERTIFICATE.format(row.fingerprint), entry, timeout=CERTIFICATE_TTL_SECONDS)


_M = TypeVar("_M", Certificate, Site, Project)


def _loaded(model: type[_M], values: dict[str, Any]) -> _M:
    """A row of ``model`` as the database would give it with only ``values``' fields loaded
    (``from_db`` takes them in the model's field order); the others load on first use."""
    names = [f.attname for f in model._meta.concrete_fields if f.attname in values]
    return model.from_db(DEFAULT_DB_ALIAS, names, [values[name] for name in names])


# --- heartbeat writes ------------------------------------------------------------------------


def heartbeat_write_seconds() -> int:
    """How often at most a site's heartbeat is written: ``FEDPORTAL_HEARTBEAT_WRITE_SECONDS``
    (30), and never as long as half the online window, so that a site heard from all along
    never reads as offline between two writes."""
    online = int(settings.FEDPORTAL_SITE_ONLINE_SECONDS)
    wanted = int(settings.FEDPORTAL_HEARTBEAT_WRITE_SECONDS)
    return max(1, min(wanted, online // 2))


def heartbeat_write_claim(site_id: int) -> bool:
    """Whether this heartbeat of the site is the one to write (none was within the interval,
    in any process)."""
    return bool(cache.add(_HEARTBEAT.format(site_id), 1, timeout=heartbeat_write_seconds()))


def site_heartbeat_due(site_id: int) -> None:
    """The site's next heartbeat is written whenever it comes: its agent was cut off (the row
    says offline), and must count as online again with its next request. Now and once the
    transaction commits (a heartbeat in between saw the site as it was before)."""

    def forget() -> None:
        cache.delete(_HEARTBEAT.format(site_id))

    forget()
    transaction.on_commit(forget)


def nonce_expires_in(timestamp: int, now: dt.datetime, window: int) -> int:
    """Seconds until a request stamped ``timestamp`` is outside the signature window."""
    return timestamp + window - int(now.timestamp()) + 1
