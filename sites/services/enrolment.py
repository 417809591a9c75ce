"""Sites: request, approval or denial, enrolment (CSR → certificate), revocation.

Certificate revocation and site revocation are different on purpose:

- :func:`certificate_revoke` withdraws one key (lost laptop, key rotation). The site stays
  ``enrolled`` but its agent can no longer authenticate with that certificate, from its very
  next request; the project admin reissues an enrolment token
  (:func:`enrolment_token_reissue`) and the agent enrols again with a new key.
- :func:`site_revoke` withdraws the site from the project for good: the site becomes
  ``revoked`` (terminal), and all its certificates and outstanding tokens are revoked with it.

Revocation takes effect on the next request because ``sites.authentication`` reads the
certificate row on every request; there is no cache to expire.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import IntegrityError, transaction
from django.utils import timezone

from common.exceptions import AlreadyExists, InvalidTransition, ValidationFailed
from sites import ca, conf, events
from sites.exceptions import (
    SiteNotApproved,
    TokenAlreadyUsed,
    TokenExpired,
    TokenInvalid,
    WrongProject,
)
from sites.models import (
    AuditAction,
    Certificate,
    EnrolmentToken,
    Organization,
    Project,
    Site,
    SiteState,
)
from sites.secret_tokens import ENROLMENT_TOKEN_PREFIX, hash_secret, new_secret
from sites.services._validation import clean_email, clean_reason, clean_resources, clean_site_name
from sites.services.audit import audit_event_record
from sites.signed_cache import site_heartbeat_due

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)


class Enrolment(NamedTuple):
    """What the agent gets back: its certificate and the project CA's certificate (PEM)."""

    certificate: Certificate
    ca_certificate_pem: str


def _locked(site: Site) -> Site:
    """The site row, re-read under a row lock: transitions check the state they change."""
    return (
        Site.objects.select_for_update().select_related("project", "organization").get(pk=site.pk)
    )


def _issue_token(site: Site, *, issued_by: User | None) -> tuple[EnrolmentToken, str]:
    plaintext, digest = new_secret(ENROLMENT_TOKEN_PREFIX)
    token = EnrolmentToken.objects.create(
        site=site,
        token_hash=digest,
        created_by=issued_by,
        expires_at=timezone.now() + conf.enrolment_token_ttl(),
    )
    return token, plaintext


def _void_tokens(site: Site, now: dt.datetime) -> int:
    """Withdraw the site's tokens that could still be used."""
    return EnrolmentToken.objects.filter(
        site=site, used_at__isnull=True, revoked_at__isnull=True
    ).update(revoked_at=now)


# --- request, update, approve, deny ---------------------------------------------------------


def site_request(
    *,
    organization: Organization,
    name: str,
    contact_email: str,
    requested_by: User,
    resources: dict[str, object] | None = None,
    source_address: str | None = None,
) -> Site:
    """Ask for a new site in ``organization``'s project; it starts ``requested``.

    ``name`` is a DNS label (it becomes the certificate's CN) and unique in the project, also
    against denied and revoked sites. Raises ``ValidationFailed`` (name, contact_email,
    resources) or ``AlreadyExists`` (name).
    """
    name = clean_site_name(name)
    contact_email = clean_email(contact_email, field="contact_email")
    clean = clean_resources(resources)
    project = organization.project
    try:
        with transaction.atomic():
            if Site.objects.filter(project=project, name=name).exists():
                raise AlreadyExists(
                    f"project {project.name!r} already has a site named {name!r}", field="name"
                )
            site = Site.objects.create(
                project=project,
                organization=organization,
                name=name,
                contact_email=contact_email,
                resources=clean,
                requested_by=requested_by,
            )
            audit_event_record(
                action=AuditAction.SITE_REQUESTED,
                target=site,
                project=project,
                actor=requested_by,
                source_address=source_address,
                details={"organization": organization.name, "resources": clean},
            )
    except IntegrityError as exc:
        raise AlreadyExists(
            f"project {project.name!r} already has a site named {name!r}", field="name"
        ) from exc
    return site


def site_update(
    *,
    site: Site,
    updated_by: User,
    contact_email: str | None = None,
    resources: dict[str, object] | None = None,
    auto_accept_jobs: bool | None = None,
    source_address: str | None = None,
) -> Site:
    """Change a site's contact, declared resources or job acceptance. ``None`` leaves a field.

    A denied or revoked site cannot be changed (``InvalidTransition``).
    """
    changes: dict[str, object] = {}
    if contact_email is not None:
        changes["contact_email"] = clean_email(contact_email, field="contact_email")
    if resources is not None:
        changes["resources"] = clean_resources(resources)
    if auto_accept_jobs is not None:
        if not isinstance(auto_accept_jobs, bool):
            raise ValidationFailed(
                "auto_accept_jobs must be true or false", field="auto_accept_jobs"
            )
        changes["auto_accept_jobs"] = auto_accept_jobs
    with transaction.atomic():
        site = _locked(site)
        if site.is_terminal:
            raise InvalidTransition(f"site '{site.name}' is {site.state}; it cannot be changed")
        changes = {k: v for k, v in changes.items() if getattr(site, k) != v}
        if not changes:
            return site
        for field, value in changes.items():
            setattr(site, field, value)
        site.save(update_fields=list(changes))
        audit_event_record(
            action=AuditAction.SITE_UPDATED,
            target=site,
            project=site.project,
            actor=updated_by,
            source_address=source_address,
            details={"changes": changes},
        )
    return site


def site_approve(
    *,
    site: Site,
    approved_by: User,
    source_address: str | None = None,
) -> tuple[Site, str]:
    """Approve a requested site and issue its one-time enrolment token.

    Returns the site and the token's plaintext, which is shown once (give it to the site's
    admin; the agent enrols with it). Raises ``InvalidTransition`` unless ``requested``.
    """
    with transaction.atomic():
        site = _locked(site)
        site.approve()
        token, plaintext = _issue_token(site, issued_by=approved_by)
        audit_event_record(
            action=AuditAction.SITE_APPROVED,
            target=site,
            project=site.project,
            actor=approved_by,
            source_address=source_address,
            details={"enrolment_token": token.pk, "token_expires_at": token.expires_at},
        )
    return site, plaintext


def site_deny(
    *,
    site: Site,
    reason: str,
    denied_by: User,
    source_address: str | None = None,
) -> Site:
    """Deny a requested (or approved, not yet enrolled) site; its tokens stop working.

    Raises ``ValidationFailed`` (blank reason) or ``InvalidTransition``.
    """
    reason = clean_reason(reason)
    with transaction.atomic():
        site = _locked(site)
        site.deny(reason)
        voided = _void_tokens(site, site.state_changed_at)
        audit_event_record(
            action=AuditAction.SITE_DENIED,
            target=site,
            project=site.project,
            actor=denied_by,
            source_address=source_address,
            details={"reason": reason, "tokens_voided": voided},
        )
    return site


def enrolment_token_reissue(
    *,
    site: Site,
    issued_by: User,
    source_address: str | None = None,
) -> tuple[EnrolmentToken, str]:
    """A new enrolment token for an approved or enrolled site; earlier unused ones stop working.

    For an enrolled site this lets its agent enrol again with a new key (expiring certificate,
    lost or revoked key). Returns the token and its plaintext, shown once. Raises
    ``InvalidTransition`` for a requested, denied or revoked site.
    """
    with transaction.atomic():
        site = _locked(site)
        if site.state not in {SiteState.APPROVED, SiteState.ENROLLED}:
            raise InvalidTransition(
                f"site '{site.name}' is {site.state}; enrolment tokens exist only for approved "
                "or enrolled sites"
            )
        voided = _void_tokens(site, timezone.now())
        token, plaintext = _issue_token(site, issued_by=issued_by)
        audit_event_record(
            action=AuditAction.ENROLMENT_TOKEN_REISSUED,
            target=token,
            project=site.project,
            actor=issued_by,
            source_address=source_address,
            details={"site": site.name, "tokens_voided": voided, "expires_at": token.expires_at},
        )
    return token, plaintext


# --- enrolment ------------------------------------------------------------------------------


def _usable_token(token: object, *, project: Project | None, lock: bool) -> EnrolmentToken:
    """The enrolment token row for ``token`` if it can enrol its site now; raises naming why
    not (see :func:`site_enrol`). ``lock``: select it for update (inside a transaction)."""
    if not isinstance(token, str) or not token.strip():
        raise TokenInvalid("no enrolment token was given", field="token")
    rows = EnrolmentToken.objects.select_related("site__project", "site__organization")
    if lock:
        rows = rows.select_for_update()
    row = rows.filter(token_hash=hash_secret(token)).first()
    if row is None:
        raise TokenInvalid("this enrolment token is not known", field="token")
    now = timezone.now()
    site = row.site
    if project is not None and site.project_id != project.pk:
        raise WrongProject(
            f"this enrolment token is not for project {project.name!r}", field="token"
        )
    status = row.status_at(now)
    if status == "used":
        raise TokenAlreadyUsed(
            f"this enrolment token was used at {row.used_at:%Y-%m-%d %H:%M:%S} UTC; "
            "ask the project admin for a new one",
            field="token",
        )
    if site.state in Site.TERMINAL_STATES or site.state == SiteState.REQUESTED:
        raise SiteNotApproved(
            f"site '{site.name}' is {site.state}; its enrolment token is void", field="token"
        )
    if status == "revoked":
        raise TokenInvalid(
            "this enrolment token was replaced by a newer one or withdrawn", field="token"
        )
    if status == "expired":
        raise TokenExpired(
            f"this enrolment token expired at {row.expires_at:%Y-%m-%d %H:%M} UTC; "
            "ask the project admin to reissue it",
            field="token",
        )
    return row


def enrolment_token_check(*, token: str) -> Site:
    """The site an enrolment token would enrol, without using the token up.

    The agent asks this first, to put the site's name in its CSR's subject: the token is all
    a site admin is given. Raises as :func:`site_enrol` does for a token that cannot enrol.
    """
    return _usable_token(token, project=None, lock=False).site


def site_enrol(
    *,
    token: str,
    csr_pem: str | bytes,
    project: Project | None = None,
    source_address: str | None = None,
) -> Enrolment:
    """Exchange a one-time enrolment token and a CSR for the site's certificate.

    Called by the agent, unauthenticated but for the token. ``project``, when the agent named
    one (e.g. in the URL), must be the token's project. The CSR's CN must be the site's name
    (and its O, if any, the project's name). On success the token is used up, the site is
    ``enrolled`` and, on re-enrolment, its earlier certificates are revoked as superseded.

    Raises ``TokenInvalid`` (unknown, superseded or withdrawn), ``TokenAlreadyUsed``,
    ``TokenExpired``, ``WrongProject``, ``SiteNotApproved`` (requested, denied or revoked site),
    or a ``CSRError`` (``InvalidCSR``, ``CSRSignatureInvalid``, ``WeakKey``,
    ``UnsupportedKeyType``, ``SubjectMismatch``). Everything happens in one transaction, so on
    any of these nothing at all has changed.
    """
    keys = conf.ca_key_encryption_keys()
    with transaction.atomic():
        row = _usable_token(token, project=project, lock=True)
        now = timezone.now()
        site = _locked(row.site)  # re-read under lock: the state may have changed meanwhile
        if site.state not in {SiteState.APPROVED, SiteState.ENROLLED}:
            raise SiteNotApproved(f"site '{site.name}' is {site.state}; it cannot enrol")
        proj = site.project
        issued = ca.sign_csr(
            csr_pem=csr_pem,
            ca_certificate_pem=proj.ca_certificate_pem,
            ca_private_key_pem=ca.decrypt_private_key(proj.ca_private_key_encrypted, keys=keys),
            site_name=site.name,
            project_name=proj.name,
            organization_name=site.organization.name,
            validity_days=conf.site_certificate_validity_days(),
        )
        # Conditional update: of two concurrent enrolments with one token, only one wins.
        claimed = EnrolmentToken.objects.filter(pk=row.pk, used_at__isnull=True).update(used_at=now)
        if claimed != 1:
            raise TokenAlreadyUsed("this enrolment token was used a moment ago", field="token")
        re_enrolment = site.state == SiteState.ENROLLED
        superseded = list(
            Certificate.objects.select_for_update().filter(site=site, revoked_at__isnull=True)
        )
        certificate = Certificate.objects.create(
            site=site,
            serial=issued.serial,
            subject_cn=issued.subject_cn,
            pem=issued.pem,
            fingerprint=issued.fingerprint,
            not_before=issued.not_before,
            not_after=issued.not_after,
        )
        site.enrol()
        common: dict[str, Any] = {
            "actor_site": site,
            "project": proj,
            "source_address": source_address,
        }
        audit_event_record(
            action=AuditAction.CERTIFICATE_ISSUED,
            target=certificate,
            details={
                "serial": issued.serial,
                "fingerprint": issued.fingerprint,
                "not_after": issued.not_after,
            },
            **common,
        )
        for old in superseded:
            old.revoked_at = now
            old.revocation_reason = f"superseded by certificate {issued.serial}"
            old.save(update_fields=["revoked_at", "revocation_reason"])
            # The agent still connected with the old key is closed, as on a revocation.
            events.certificate_revoked(old, old.revocation_reason)
            audit_event_record(
                action=AuditAction.CERTIFICATE_REVOKED,
                target=old,
                details={"serial": old.serial, "reason": old.revocation_reason},
                **common,
            )
        if superseded:
            _agent_cut_off(site, now)
        audit_event_record(
            action=AuditAction.SITE_ENROLLED,
            target=site,
            details={"certificate": issued.serial, "re_enrolment": re_enrolment},
            **common,
        )
    logger.info("site enrolled: project=%s site=%s serial=%s", proj.slug, site.name, issued.serial)
    return Enrolment(certificate=certificate, ca_certificate_pem=proj.ca_certificate_pem)


# --- revocation -----------------------------------------------------------------------------


def _agent_cut_off(site: Site, now: dt.datetime) -> None:
    """The site's agent can no longer be connected (its certificate was revoked or
    superseded): the site is offline from ``now`` until an agent with a valid certificate is
    heard, and the pages showing it are told. The socket itself is closed by the
    ``site.revoked`` event sent with the revocation."""
    Site.objects.filter(pk=site.pk).update(agent_channel="", agent_disconnected_at=now)
    site_heartbeat_due(site.pk)  # offline now: its next heartbeat must be written
    site.agent_channel = ""
    site.agent_disconnected_at = now
    events.site_status(site, online=False)


def _revoke_certificate(
    certificate: Certificate,
    *,
    reason: str,
    now: dt.datetime,
    actor: User,
    project: Project,
    source_address: str | None,
) -> None:
    certificate.revoked_at = now
    certificate.revocation_reason = reason
    certificate.save(update_fields=["revoked_at", "revocation_reason"])
    events.certificate_revoked(certificate, reason)  # a connected agent is cut off at once
    audit_event_record(
        action=AuditAction.CERTIFICATE_REVOKED,
        target=certificate,
        project=project,
        actor=actor,
        source_address=source_address,
        details={"serial": certificate.serial, "site": certificate.site.name, "reason": reason},
    )


def certificate_revoke(
    *,
    certificate: Certificate,
    reason: str,
    revoked_by: User,
    source_address: str | None = None,
) -> Certificate:
    """Revoke one certificate; the agent using it is refused from its next request on.

    The site stays ``enrolled`` (see the module docstring). Raises ``ValidationFailed`` (blank
    reason) or ``InvalidTransition`` (already revoked).
    """
    reason = clean_reason(reason)
    with transaction.atomic():
        certificate = (
            Certificate.objects.select_for_update()
            .select_related("site__project")
            .get(pk=certificate.pk)
        )
        if certificate.revoked_at is not None:
            raise InvalidTransition(
                f"certificate {certificate.serial} was already revoked at "
                f"{certificate.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        now = timezone.now()
        _revoke_certificate(
            certificate,
            reason=reason,
            now=now,
            actor=revoked_by,
            project=certificate.site.project,
            source_address=source_address,
        )
        _agent_cut_off(certificate.site, now)
    return certificate


def site_revoke(
    *,
    site: Site,
    reason: str,
    revoked_by: User,
    source_address: str | None = None,
) -> Site:
    """Revoke an enrolled site for good: its certificates and unused tokens are revoked too.

    Raises ``ValidationFailed`` (blank reason) or ``InvalidTransition`` (not enrolled; deny a
    site that never enrolled instead).
    """
    reason = clean_reason(reason)
    with transaction.atomic():
        site = _locked(site)
        site.revoke(reason)
        now = site.state_changed_at
        certificates = list(
            Certificate.objects.select_for_update().filter(site=site, revoked_at__isnull=True)
        )
        for certificate in certificates:
            _revoke_certificate(
                certificate,
                reason=f"site revoked: {reason}",
                now=now,
                actor=revoked_by,
                project=site.project,
                source_address=source_address,
            )
        _agent_cut_off(site, now)
        voided = _void_tokens(site, now)
        audit_event_record(
            action=AuditAction.SITE_REVOKED,
            target=site,
            project=site.project,
            actor=revoked_by,
            source_address=source_address,
            details={
                "reason": reason,
                "certificates_revoked": [c.serial for c in certificates],
                "tokens_voided": voided,
            },
        )
    return site
