"""Who is calling: site agents by signed request, people by API token.

**Site agents.** Every agent request carries the ``X-FedPortal-*`` headers made by
``client_agent.signing.sign_request`` (see that module for the exact canonical string).
:func:`verify_signed_request` checks, in this order, and refuses with a specific
:class:`~common.exceptions.AuthenticationError` (HTTP 401) whose message names the cause:

1. all four headers present and well-formed (``SignatureMissing``, ``SignatureMalformed``);
2. the timestamp within ± ``FEDPORTAL_SIGNATURE_WINDOW_SECONDS`` (``SignatureExpired``);
3. a certificate with that fingerprint exists (``UnknownCertificate``), is not revoked
   (``CertificateRevoked``) and is within its validity (``CertificateExpired``);
4. it chains to *its own project's* CA: issuer equals the CA subject and the CA key signed it,
   and the stored PEM matches its record and names its site (``CertificateUntrusted``) — a
   certificate made by another project's CA never authenticates a site here, whatever its
   subject;
5. the site is ``enrolled`` (``SiteNotEnrolled``);
6. the signature verifies over the canonical string with the body's SHA-256
   (``SignatureInvalid``): a tampered method, path, body, timestamp or nonce fails here;
7. the nonce was not used before with this certificate (``ReplayDetected``): claimed in the
   cache (Redis, shared by every portal process) with an atomic set-if-absent that expires
   when the request's timestamp leaves the window, so two concurrent replays cannot both pass.

Steps 3 and 4 are kept in the cache for a certificate that passed them
(``sites.signed_cache``), in a generation that every change of a certificate, site or project
ends: revoking a certificate or a site still takes effect on the very next request. A verified
request counts as a heartbeat (``site.last_heartbeat``), written at most once every
``FEDPORTAL_HEARTBEAT_WRITE_SECONDS`` per site.

- HTTP: :class:`SiteSignatureAuthentication` (DRF). It sets ``request.auth`` to a
  :class:`SiteIdentity` and ``request.user`` to ``AnonymousUser``; a permission for agent-only
  endpoints checks ``isinstance(request.auth, SiteIdentity)``. Requests without the signature
  headers are left to the next authentication class.
- HTTP with a streamed body (a model update, too big to read whole): the same signature, but
  verified against the digest the request claims in ``X-Content-SHA256`` (``body_sha256``);
  the view hashes the body as it streams it to storage and refuses it on a mismatch
  (``jobs.api.authentication.StreamedBodySignatureAuthentication``).
- WebSocket: in a Channels consumer's ``connect()``::

      try:
          identity = await verify_signed_handshake(self.scope)
      except AuthenticationError as exc:
          await self.close(code=4401, reason=exc.message)  # reason: channels ≥ 4.2
          return

  The agent signs ``GET`` with the WebSocket URL's path and query and an empty body.
  :func:`verify_signed_handshake` runs :func:`verify_signed_request` through
  ``database_sync_to_async``; any other async caller can do the same.

**People.** :class:`ApiTokenAuthentication` accepts ``Authorization: Bearer fpt_…`` (or
``Token fpt_…``) made by ``sites.services.api_token_create``; ``request.user`` is the token's
owner and ``request.auth`` the :class:`~sites.models.ApiToken`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser
from django.dispatch import Signal
from django.utils import timezone
from django.utils.encoding import escape_uri_path, iri_to_uri
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from client_agent.signing import (
    HEADER_FINGERPRINT,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SIGNATURE_HEADERS,
    canonical_string,
    verify_signature,
)
from common.exceptions import AuthenticationError
from fedportal.throttling import CredentialFailures
from sites import ca, conf, events, signed_cache
from sites.exceptions import (
    ApiTokenInvalid,
    CertificateExpired,
    CertificateRevoked,
    CertificateUntrusted,
    ReplayDetected,
    SignatureExpired,
    SignatureInvalid,
    SignatureMalformed,
    SignatureMissing,
    SiteNotEnrolled,
    UnknownCertificate,
)
from sites.models import ApiToken, Certificate, Project, Site, SiteState
from sites.secret_tokens import API_TOKEN_PREFIX, hash_secret
from sites.selectors import online_at, site_is_online

if TYPE_CHECKING:
    from cryptography import x509
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
MAX_SIGNATURE_B64 = 1024  # RSA-4096 is 684 base64 characters; anything longer is not ours
# last_used_at is informational; writing it at most this often spares a write per request.
API_TOKEN_TOUCH_INTERVAL = dt.timedelta(seconds=60)


site_heartbeat = Signal()
"""Sent after every heartbeat written (see :func:`site_heartbeat_record`) with ``site`` and
``was_online`` (whether the site counted as online just before). The jobs app listens: a site
coming online may let a job start."""


@dataclass(frozen=True)
class SiteIdentity:
    """A verified site agent: the site and the certificate it signed with."""

    site: Site
    certificate: Certificate
    # The generation of verified certificates (sites.signed_cache) that the certificate was
    # checked in: while it is the current one, no certificate, site or project changed since.
    generation: str = field(default="", compare=False)

    @property
    def project(self) -> Project:
        return self.site.project

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint


def _header(headers: Mapping[str, str], name: str) -> str:
    return headers[name.lower()].strip()


def verify_signed_request(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes = b"",
    body_sha256: str | None = None,
    now: dt.datetime | None = None,
    record: bool = True,
) -> SiteIdentity:
    """Check a signed agent request (see the module docstring) and return who sent it.

    ``path`` is the request target as signed: path plus ``?query``. ``headers`` may use any
    letter case. Records the nonce and the site's heartbeat; raises an
    ``AuthenticationError`` subclass naming the cause otherwise.

    ``record=False`` checks everything, the nonce's being unused included, but records
    neither the nonce nor a heartbeat: the server's look at an upload's headers before it
    reads the body (``fedportal.server``), which the view's own authentication then records
    (:func:`checked_request_record`).

    ``body_sha256`` (lowercase hex), given instead of ``body``, is the digest the request
    *claims* for a body that is streamed to storage rather than read here (a model update):
    the signed string holds only the body's SHA-256 anyway, so the signature then proves the
    claim, and the caller must refuse the body unless it hashes to that digest.
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    missing = [name for name in SIGNATURE_HEADERS if name.lower() not in lowered]
    if missing:
        raise SignatureMissing(f"the request lacks the header(s) {', '.join(missing)}")
    fingerprint = _header(lowered, HEADER_FINGERPRINT).lower()
    raw_ts = _header(lowered, HEADER_TIMESTAMP)
    nonce = _header(lowered, HEADER_NONCE)
    raw_sig = _header(lowered, HEADER_SIGNATURE)
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise SignatureMalformed(f"{HEADER_FINGERPRINT} must be 64 hexadecimal digits (SHA-256)")
    if not _TIMESTAMP.fullmatch(raw_ts):
        raise SignatureMalformed(f"{HEADER_TIMESTAMP} must be an integer number of Unix seconds")
    if not _NONCE.fullmatch(nonce):
        raise SignatureMalformed(f"{HEADER_NONCE} must be 32 lowercase hexadecimal digits")
    if len(raw_sig) > MAX_SIGNATURE_B64:
        raise SignatureMalformed(f"{HEADER_SIGNATURE} is too long")
    try:
        signature = base64.b64decode(raw_sig, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureMalformed(f"{HEADER_SIGNATURE} is not valid base64") from exc

    now = now or timezone.now()
    window = conf.signature_window_seconds()
    timestamp = int(raw_ts)
    # Whole seconds on both sides: the header has no fraction, so neither has the comparison.
    skew = timestamp - int(now.timestamp())
    if abs(skew) > window:
        direction = "ahead of" if skew > 0 else "behind"
        raise SignatureExpired(
            f"timestamp is {abs(skew)} s {direction} the portal clock; allowed ±{window} s"
        )

    row, cert, generation = _certificate_verified(fingerprint, now)
    site = row.site

    if body_sha256 is None:
        message = canonical_string(
            method=method, path=path, timestamp=timestamp, nonce=nonce, body=body
        )
    else:
        message = canonical_string_for_digest(
            method=method, path=path, timestamp=timestamp, nonce=nonce, digest=body_sha256
        )
    if not verify_signature(cert.public_key(), signature, message):
        raise SignatureInvalid(
            "the signature does not match this request: the method, path, body, timestamp or "
            "nonce differ from what was signed, or it was not made with the certificate's key"
        )

    identity = SiteIdentity(site=site, certificate=row, generation=generation)
    if not record:
        if signed_cache.nonce_used(fingerprint=fingerprint, nonce=nonce):
            raise _replayed(nonce)
        return identity
    _record(identity, nonce=nonce, timestamp=timestamp, now=now, window=window)
    return identity


def checked_request_record(
    identity: SiteIdentity, *, headers: Mapping[str, str], now: dt.datetime | None = None
) -> bool:
    """Record a request that :func:`verify_signed_request` checked without recording
    (``record=False``: the server's look at an upload's headers) and returned ``identity``
    for: claim its nonce and record the site's heartbeat, what the check that records adds.

    The certificate and the signature are not checked again while nothing they were checked
    against changed: ``identity``'s generation of verified certificates is still the current
    one. Otherwise (a certificate, site or project changed since: a revocation meanwhile)
    this records nothing and returns False, and the caller verifies the request again, from
    the start. ``headers`` are the request's, as checked (any letter case)."""
    if not identity.generation or not signed_cache.generation_is(identity.generation):
        return False
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    _record(
        identity,
        nonce=_header(lowered, HEADER_NONCE),
        timestamp=int(_header(lowered, HEADER_TIMESTAMP)),
        now=now or timezone.now(),
        window=conf.signature_window_seconds(),
    )
    return True


def _record(
    identity: SiteIdentity, *, nonce: str, timestamp: int, now: dt.datetime, window: int
) -> None:
    """A verified request's nonce claimed (``ReplayDetected`` if it was claimed before), and
    its site's heartbeat."""
    if not signed_cache.nonce_claim(
        fingerprint=identity.fingerprint,
        nonce=nonce,
        expires_in=signed_cache.nonce_expires_in(timestamp, now, window),
    ):
        raise _replayed(nonce)
    site_heartbeat_record(identity.site, now=now)


def _replayed(nonce: str) -> ReplayDetected:
    return ReplayDetected(
        f"nonce {nonce} was already used with this certificate: a replayed request "
        "(every request needs a fresh nonce)"
    )


def _certificate_verified(
    fingerprint: str, now: dt.datetime
) -> tuple[Certificate, x509.Certificate, str]:
    """The certificate with ``fingerprint``, its site and project attached, once it passed
    :func:`_certificate_check`, and the generation it was checked in; from the cache when it
    passed under the current generation (only its validity period, which time alone ends, is
    checked again)."""
    # The generation before the database: see sites.signed_cache.
    current, row = signed_cache.certificate_lookup(fingerprint)
    if row is not None:
        _validity_check(row, now)
        return row, _certificate_loaded(row.pem), current
    row = (
        Certificate.objects.select_related("site__project").filter(fingerprint=fingerprint).first()
    )
    if row is None:
        raise UnknownCertificate(f"no certificate with fingerprint {fingerprint[:16]}… is known")
    cert = _certificate_check(row, now)
    signed_cache.certificate_remember(row, current)
    return row, cert, current


@functools.lru_cache(maxsize=1024)
def _certificate_loaded(pem: str) -> x509.Certificate:
    """A PEM certificate, parsed once per process (the text is the whole of it)."""
    return ca.load_certificate(pem)


def _valid_at(row: Certificate, now: dt.datetime) -> bool:
    return bool(row.not_before <= now <= row.not_after)


def _validity_check(row: Certificate, now: dt.datetime) -> None:
    if not _valid_at(row, now):
        raise CertificateExpired(
            f"certificate {row.serial} is valid from {row.not_before:%Y-%m-%d %H:%M} to "
            f"{row.not_after:%Y-%m-%d %H:%M} UTC; the agent must enrol again"
        )


def _certificate_check(row: Certificate, now: dt.datetime) -> x509.Certificate:
    """Refuse a certificate that is revoked, expired, not the project CA's, or whose site is
    no longer enrolled; return it loaded. Raises an ``AuthenticationError`` naming the cause."""
    if row.revoked_at is not None:
        raise CertificateRevoked(
            f"certificate {row.serial} was revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
            + (f": {row.revocation_reason}" if row.revocation_reason else "")
        )
    _validity_check(row, now)
    site = row.site
    project = site.project
    try:
        cert = _certificate_loaded(row.pem)
        ca_cert = _certificate_loaded(project.ca_certificate_pem)
    except ValueError as exc:
        raise CertificateUntrusted(f"certificate {row.serial} cannot be read: {exc}") from exc
    if ca.fingerprint(cert) != row.fingerprint:
        raise CertificateUntrusted(f"certificate {row.serial} does not match its fingerprint")
    # Defence in depth: a record can only name the site its certificate was issued to.
    if ca.subject_common_names(cert) != [site.name]:
        raise CertificateUntrusted(f"certificate {row.serial} was not issued to site '{site.name}'")
    if not ca.is_issued_by(cert, ca_cert):
        raise CertificateUntrusted(
            f"certificate {row.serial} was not issued by project {project.name!r}'s CA"
        )
    if site.state != SiteState.ENROLLED:
        raise SiteNotEnrolled(f"site '{site.name}' is {site.state}, not enrolled")
    return cert


def identity_check(identity: SiteIdentity, *, now: dt.datetime | None = None) -> SiteIdentity:
    """Check again that a connection verified earlier may go on, as a signed request is
    checked: from the cache of verified certificates when it holds the certificate under the
    current generation (no SQL), else from the database.

    A WebSocket is verified once, at its handshake; its messages and the events it forwards
    call this, so a certificate revoked (or a site whose state changed) through the services
    while the agent is connected is refused at its next message, even when the revocation's
    event was lost: every such change starts a new generation (``sites.signed_cache``). A
    change made behind the services' back is for :func:`identity_recheck`.
    """
    row, _, generation = _certificate_verified(
        identity.certificate.fingerprint, now or timezone.now()
    )
    return SiteIdentity(site=row.site, certificate=row, generation=generation)


def identity_current(identity: SiteIdentity, generation: str, now: dt.datetime) -> bool:
    """Whether ``identity`` holds as it was verified, without reading anything: it was checked
    in ``generation`` of verified certificates (read from the cache just now), so no
    certificate, site or project changed since, and its certificate is within its validity
    period, which time alone ends. When not, :func:`identity_check` tells."""
    return (
        bool(identity.generation)
        and identity.generation == generation
        and _valid_at(identity.certificate, now)
    )


def identity_recheck(identity: SiteIdentity, *, now: dt.datetime | None = None) -> SiteIdentity:
    """Check again, from the database, that a connection verified earlier may go on.

    It reads the database, never the cache: it is the socket's periodic safety net
    (``FEDPORTAL_SOCKET_RECHECK_SECONDS``) for a change made behind the services' back, which
    starts no new generation of the cache (a queryset ``update`` of a certificate's row).
    """
    row = Certificate.objects.select_related("site__project").get(pk=identity.certificate.pk)
    _certificate_check(row, now or timezone.now())
    return SiteIdentity(site=row.site, certificate=row)


def site_heartbeat_record(
    site: Site, *, now: dt.datetime | None = None, notify: bool = True
) -> bool:
    """The site was heard from now: store it and tell the listeners of ``site_heartbeat``.

    Returns whether the site came online with it (it was offline: never heard, heard too long
    ago, or cut off since); then the pages showing the site are told too, unless ``notify`` is
    off (the caller sends its own ``site.status``).

    Written at most once every ``FEDPORTAL_HEARTBEAT_WRITE_SECONDS`` per site, in all
    processes together (``sites.signed_cache``): a heartbeat within that time of the last
    written one finds the site online (the interval is under half the online window, and a
    cut-off makes the next heartbeat due) and changes nothing a reader could tell apart.
    """
    now = now or timezone.now()
    if not signed_cache.heartbeat_write_claim(site.pk):
        return False
    # The usual heartbeat, of a site online until now, in one statement: the row's own test
    # of site_is_online, made by the update that stores it (and not if it would store a time
    # before a cut-off: another process's clock may run ahead of this one's).
    usual = Site.objects.filter(online_at(now), pk=site.pk).exclude(agent_disconnected_at__gte=now)
    if usual.update(last_heartbeat=now):
        site.last_heartbeat = now
        site_heartbeat.send(sender=Site, site=site, was_online=True)
        return False
    # The row as it is now: ``site`` may come from the certificate cache, without these.
    site.refresh_from_db(fields=["state", "last_heartbeat", "agent_disconnected_at"])
    was_online = site_is_online(site, now)
    gone = site.agent_disconnected_at
    if gone is not None and now <= gone:
        # Heard after being cut off, within the clock's resolution: still later than the cut.
        now = gone + dt.timedelta(microseconds=1)
    Site.objects.filter(pk=site.pk).update(last_heartbeat=now)
    site.last_heartbeat = now
    site_heartbeat.send(sender=Site, site=site, was_online=was_online)
    if not was_online and notify:
        events.site_status(site, online=True)
    return not was_online


def canonical_string_for_digest(
    *, method: str, path: str, timestamp: int, nonce: str, digest: str
) -> bytes:
    """``client_agent.signing.canonical_string`` with the body's SHA-256 hex in place of the
    body (what the agent signs for a streamed upload), once the digest's shape is checked."""
    if not _FINGERPRINT.fullmatch(digest):  # the same shape: 64 lowercase hex digits
        raise SignatureMalformed("the body digest must be 64 lowercase hexadecimal digits")
    return canonical_string(
        method=method, path=path, timestamp=timestamp, nonce=nonce, body=b"", digest=digest
    )


def signed_target(path: str, query: bytes) -> str:
    """The request target a signature covers, from a decoded path and a raw query: the same
    string Django's ``request.get_full_path()`` gives, so that one signing rule serves HTTP
    requests, WebSocket handshakes and the server's look at an upload's headers."""
    target = escape_uri_path(path)
    raw_query = query.decode("latin-1")
    return f"{target}?{iri_to_uri(raw_query)}" if raw_query else target


def _scope_path(scope: Mapping[str, Any]) -> str:
    return signed_target(scope.get("path", "/"), scope.get("query_string", b""))


async def verify_signed_handshake(scope: Mapping[str, Any]) -> SiteIdentity:
    """:func:`verify_signed_request` for a Channels WebSocket (or HTTP) scope, from async code."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    method = "GET" if scope.get("type") == "websocket" else str(scope.get("method", "GET"))
    verify = database_sync_to_async(verify_signed_request)
    identity: SiteIdentity = await verify(
        method=method, path=_scope_path(scope), headers=headers, body=b""
    )
    return identity


class SiteSignatureAuthentication(BaseAuthentication):
    """DRF authentication for site agents' signed requests (``request.auth``: SiteIdentity)."""

    def authenticate(self, request: Request) -> tuple[AnonymousUser, SiteIdentity] | None:
        headers = request.headers
        if HEADER_SIGNATURE not in headers and HEADER_FINGERPRINT not in headers:
            return None
        try:
            identity = verify_signed_request(
                method=request.method or "GET",
                path=request.get_full_path(),
                headers=headers,
                body=request.body,
            )
        except AuthenticationError as exc:
            logger.info("signed request refused: %s %s: %s", request.method, request.path, exc)
            raise exceptions.AuthenticationFailed(detail=exc.message, code=exc.code) from exc
        return AnonymousUser(), identity

    def authenticate_header(self, request: Request) -> str:
        # A WWW-Authenticate value makes DRF answer 401 rather than 403 to a refused agent.
        return 'FedPortal-Signature realm="fedportal"'


def api_token_authenticate(key: str, *, now: dt.datetime | None = None) -> tuple[User, ApiToken]:
    """The (user, token) for an API token key; raises ``ApiTokenInvalid`` naming the cause."""
    now = now or timezone.now()
    token = ApiToken.objects.select_related("user").filter(key_hash=hash_secret(key)).first()
    if token is None:
        raise ApiTokenInvalid("this API token is not known")
    if token.revoked_at is not None:
        raise ApiTokenInvalid(f"API token {token.prefix}… was revoked")
    if token.expires_at is not None and token.expires_at <= now:
        raise ApiTokenInvalid(f"API token {token.prefix}… expired")
    user: User = token.user
    if not user.is_active:
        raise ApiTokenInvalid("the API token's user account is inactive")
    if token.last_used_at is None or now - token.last_used_at >= API_TOKEN_TOUCH_INTERVAL:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return user, token


class ApiTokenAuthentication(BaseAuthentication):
    """DRF authentication for people's API tokens: ``Authorization: Bearer fpt_…``.

    A wrong token (unknown, revoked, expired) counts against the client address's
    ``credential_failures`` throttle; an address over it is refused (429) before its token is
    looked at (``fedportal.throttling``).
    """

    def authenticate(self, request: Request) -> tuple[User, ApiToken] | None:
        parts = request.META.get("HTTP_AUTHORIZATION", "").split()
        if not parts or parts[0].lower() not in {"bearer", "token"}:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "the Authorization header must be 'Bearer <token>'", code="api_token_invalid"
            )
        if not parts[1].startswith(API_TOKEN_PREFIX):
            return None  # someone else's bearer token scheme; let another class try
        failures = CredentialFailures()
        failures.refuse_if_over(request)
        try:
            return api_token_authenticate(parts[1])
        except AuthenticationError as exc:
            failures.record(request)
            raise exceptions.AuthenticationFailed(detail=exc.message, code=exc.code) from exc

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="fedportal"'
