"""Projects, organisations, memberships and invitations: the people side of a federation."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from common.exceptions import AlreadyExists, InvalidTransition, ValidationFailed
from sites import ca, conf, events
from sites.exceptions import (
    InvitationNotForYou,
    LastProjectAdmin,
    TokenAlreadyUsed,
    TokenExpired,
    TokenInvalid,
)
from sites.models import AuditAction, Invitation, Membership, Organization, Project, Role
from sites.secret_tokens import INVITATION_TOKEN_PREFIX, hash_secret, new_secret
from sites.services._validation import clean_email, clean_name, clean_role
from sites.services.audit import audit_event_record

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

NAME_MAX = 64


# --- projects -------------------------------------------------------------------------------


def project_create(
    *,
    name: str,
    created_by: User,
    description: str = "",
    host_organization_name: str | None = None,
    source_address: str | None = None,
) -> Project:
    """Create a project with its CA and host organisation; ``created_by`` becomes its admin.

    The host organisation is named ``host_organization_name`` (default: the project's name).
    The CA key is encrypted with ``FEDPORTAL_CA_KEY_ENCRYPTION_KEY`` before it is stored.
    Raises ``ValidationFailed`` (name), ``AlreadyExists`` (name or its slug is taken),
    ``CAKeyUnavailable`` (no encryption key configured).
    """
    name = clean_name(name, field="name", max_length=NAME_MAX)
    slug = slugify(name)[:64]
    if not slug:
        raise ValidationFailed(
            f"name {name!r} needs at least one letter or digit (it gives the project's slug)",
            field="name",
        )
    host_name = clean_name(
        host_organization_name or name, field="host_organization_name", max_length=NAME_MAX
    )
    if not isinstance(description, str):
        raise ValidationFailed("description must be a string", field="description")
    keys = conf.ca_key_encryption_keys()
    # Made before the transaction: key generation needs no lock, and a failure here writes nothing.
    new_ca = ca.create_ca(project_name=name, validity_days=conf.ca_validity_days())
    encrypted = ca.encrypt_private_key(new_ca.private_key_pem, keys=keys)
    try:
        with transaction.atomic():
            if Project.objects.filter(name__iexact=name).exists():
                raise AlreadyExists(f"a project named {name!r} exists already", field="name")
            if Project.objects.filter(slug=slug).exists():
                raise AlreadyExists(
                    f"a project with the slug {slug!r} exists already; choose another name",
                    field="name",
                )
            project = Project.objects.create(
                name=name,
                slug=slug,
                description=description.strip(),
                created_by=created_by,
                ca_certificate_pem=new_ca.certificate_pem,
                ca_private_key_encrypted=encrypted,
                ca_fingerprint=new_ca.fingerprint,
            )
            host = Organization.objects.create(project=project, name=host_name, is_host=True)
            membership = Membership.objects.create(
                user=created_by, organization=host, role=Role.PROJECT_ADMIN
            )
            common: dict[str, Any] = {
                "actor": created_by,
                "project": project,
                "source_address": source_address,
            }
            audit_event_record(
                action=AuditAction.PROJECT_CREATED,
                target=project,
                details={"ca_fingerprint": new_ca.fingerprint, "host_organization": host_name},
                **common,
            )
            audit_event_record(
                action=AuditAction.ORGANIZATION_CREATED,
                target=host,
                details={"is_host": True},
                **common,
            )
            audit_event_record(
                action=AuditAction.MEMBERSHIP_ADDED,
                target=membership,
                details=_membership_details(membership),
                **common,
            )
    except IntegrityError as exc:  # a concurrent create with the same name won the race
        raise AlreadyExists(f"a project named {name!r} exists already", field="name") from exc
    logger.info("project created: project=%s ca=%s", project.slug, new_ca.fingerprint[:16])
    return project


def project_update(
    *,
    project: Project,
    updated_by: User,
    description: str | None = None,
    source_address: str | None = None,
) -> Project:
    """Change a project's description. The name is fixed: it is the O of every certificate."""
    changes: dict[str, object] = {}
    if description is not None:
        if not isinstance(description, str):
            raise ValidationFailed("description must be a string", field="description")
        if description.strip() != project.description:
            changes["description"] = description.strip()
    if not changes:
        return project
    with transaction.atomic():
        for field, value in changes.items():
            setattr(project, field, value)
        project.save(update_fields=list(changes))
        audit_event_record(
            action=AuditAction.PROJECT_UPDATED,
            target=project,
            project=project,
            actor=updated_by,
            source_address=source_address,
            details={"changed": sorted(changes)},
        )
    return project


# --- organisations --------------------------------------------------------------------------


def _check_organization_name_free(project: Project, name: str, *, exclude_pk: int | None) -> None:
    taken = Organization.objects.filter(project=project, name__iexact=name)
    if exclude_pk is not None:
        taken = taken.exclude(pk=exclude_pk)
    if taken.exists():
        raise AlreadyExists(
            f"project {project.name!r} already has an organisation named {name!r}", field="name"
        )


def organization_create(
    *,
    project: Project,
    name: str,
    created_by: User,
    source_address: str | None = None,
) -> Organization:
    """Add a participant organisation to a project (names are unique per project, any case)."""
    name = clean_name(name, field="name", max_length=NAME_MAX)
    try:
        with transaction.atomic():
            _check_organization_name_free(project, name, exclude_pk=None)
            organization = Organization.objects.create(project=project, name=name)
            audit_event_record(
                action=AuditAction.ORGANIZATION_CREATED,
                target=organization,
                project=project,
                actor=created_by,
                source_address=source_address,
            )
    except IntegrityError as exc:
        raise AlreadyExists(
            f"project {project.name!r} already has an organisation named {name!r}", field="name"
        ) from exc
    return organization


def organization_update(
    *,
    organization: Organization,
    name: str,
    updated_by: User,
    source_address: str | None = None,
) -> Organization:
    """Rename an organisation. Certificates issued earlier keep the old name in their OU,
    which nothing checks, so they stay valid."""
    name = clean_name(name, field="name", max_length=NAME_MAX)
    if name == organization.name:
        return organization
    old = organization.name
    try:
        with transaction.atomic():
            _check_organization_name_free(organization.project, name, exclude_pk=organization.pk)
            organization.name = name
            organization.save(update_fields=["name"])
            audit_event_record(
                action=AuditAction.ORGANIZATION_UPDATED,
                target=organization,
                project=organization.project,
                actor=updated_by,
                source_address=source_address,
                details={"name": [old, name]},
            )
    except IntegrityError as exc:
        raise AlreadyExists(f"an organisation named {name!r} exists already", field="name") from exc
    return organization


# --- memberships ----------------------------------------------------------------------------


def _membership_details(membership: Membership) -> dict[str, object]:
    return {
        "user": membership.user.get_username(),
        "organization": membership.organization.name,
        "role": membership.role,
    }


def _ensure_another_project_admin(membership: Membership) -> None:
    """Refuse to leave a project without a project admin (superusers do not count: a project
    must be manageable by its own people). Locks the host organisation's admin memberships so
    that two concurrent demotions cannot each see the other as the remaining admin."""
    if membership.role != Role.PROJECT_ADMIN:
        return
    admins = list(
        Membership.objects.select_for_update()
        .filter(organization_id=membership.organization_id, role=Role.PROJECT_ADMIN)
        .values_list("pk", flat=True)
    )
    if [pk for pk in admins if pk != membership.pk]:
        return
    raise LastProjectAdmin(
        f"{membership.user.get_username()} is the last project admin of "
        f"{membership.organization.project.name!r}; make someone else project admin first"
    )


def membership_add(
    *,
    organization: Organization,
    user: User,
    role: str,
    added_by: User,
    source_address: str | None = None,
) -> Membership:
    """Give ``user`` a role in ``organization``. ``project_admin`` only in the host organisation.

    Raises ``ValidationFailed`` (role) or ``AlreadyExists`` (already a member: change the role
    with :func:`membership_update_role` instead).
    """
    role = clean_role(role, host=organization.is_host)
    try:
        with transaction.atomic():
            if Membership.objects.filter(user=user, organization=organization).exists():
                raise AlreadyExists(
                    f"{user.get_username()} is already a member of {organization.name!r}",
                    field="user",
                )
            membership = Membership.objects.create(user=user, organization=organization, role=role)
            audit_event_record(
                action=AuditAction.MEMBERSHIP_ADDED,
                target=membership,
                project=organization.project,
                actor=added_by,
                source_address=source_address,
                details=_membership_details(membership),
            )
    except IntegrityError as exc:
        raise AlreadyExists(
            f"{user.get_username()} is already a member of {organization.name!r}", field="user"
        ) from exc
    return membership


def membership_update_role(
    *,
    membership: Membership,
    role: str,
    updated_by: User,
    source_address: str | None = None,
) -> Membership:
    """Change a member's role. Raises ``LastProjectAdmin`` when it would demote the last one."""
    new_role = clean_role(role, host=membership.organization.is_host)
    if new_role == membership.role:
        return membership
    with transaction.atomic():
        _ensure_another_project_admin(membership)
        old = membership.role
        membership.role = new_role
        membership.save(update_fields=["role"])
        audit_event_record(
            action=AuditAction.MEMBERSHIP_ROLE_CHANGED,
            target=membership,
            project=membership.organization.project,
            actor=updated_by,
            source_address=source_address,
            details={**_membership_details(membership), "previous_role": old},
        )
        # The person's open pages check whether they may still see them.
        events.access_changed(reason=events.MEMBERSHIP_CHANGED, user_ids=[membership.user_id])
    return membership


def membership_remove(
    *,
    membership: Membership,
    removed_by: User,
    source_address: str | None = None,
) -> None:
    """Remove a member. Raises ``LastProjectAdmin`` when it would remove the last one."""
    with transaction.atomic():
        _ensure_another_project_admin(membership)
        details = _membership_details(membership)
        project = membership.organization.project
        # Recorded before the delete so that the event can still name the row's primary key.
        audit_event_record(
            action=AuditAction.MEMBERSHIP_REMOVED,
            target=membership,
            project=project,
            actor=removed_by,
            source_address=source_address,
            details=details,
        )
        user_id = membership.user_id
        membership.delete()
        # The person's open pages of the project close unless another membership keeps it.
        events.access_changed(reason=events.MEMBERSHIP_CHANGED, user_ids=[user_id])


# --- invitations ----------------------------------------------------------------------------


def invitation_create(
    *,
    organization: Organization,
    role: str,
    invited_by: User,
    email: str = "",
    username: str = "",
    source_address: str | None = None,
) -> tuple[Invitation, str]:
    """Invite whoever has ``email`` (or ``username``) to ``organization`` with ``role``.

    Returns the invitation and its plaintext token, which is shown once and never stored.
    It expires after ``FEDPORTAL_INVITATION_TTL_HOURS``.
    """
    role = clean_role(role, host=organization.is_host)
    email = clean_email(email, field="email") if email else ""
    username = username.strip() if isinstance(username, str) else ""
    if not email and not username:
        raise ValidationFailed("give the invitee's email or username", field="email")
    plaintext, digest = new_secret(INVITATION_TOKEN_PREFIX)
    with transaction.atomic():
        invitation = Invitation.objects.create(
            organization=organization,
            email=email,
            username=username,
            role=role,
            token_hash=digest,
            created_by=invited_by,
            expires_at=timezone.now() + conf.invitation_ttl(),
        )
        audit_event_record(
            action=AuditAction.INVITATION_CREATED,
            target=invitation,
            project=organization.project,
            actor=invited_by,
            source_address=source_address,
            details={
                "email": email,
                "username": username,
                "role": role,
                "organization": organization.name,
                "expires_at": invitation.expires_at,
            },
        )
    return invitation, plaintext


def invitation_accept(
    *,
    token: str,
    user: User,
    source_address: str | None = None,
) -> Membership:
    """Accept an invitation as ``user``, who must be its addressee; returns the new membership.

    Raises ``TokenInvalid`` (unknown or revoked), ``TokenAlreadyUsed``, ``TokenExpired``,
    ``InvitationNotForYou`` or ``AlreadyExists`` (already a member); then nothing changes.
    """
    if not isinstance(token, str) or not token.strip():
        raise TokenInvalid("no invitation token was given", field="token")
    with transaction.atomic():
        invitation = (
            Invitation.objects.select_for_update()
            .select_related("organization__project")
            .filter(token_hash=hash_secret(token))
            .first()
        )
        if invitation is None:
            raise TokenInvalid("this invitation token is not known", field="token")
        now = timezone.now()
        status = invitation.status_at(now)
        if status == "accepted":
            raise TokenAlreadyUsed("this invitation has already been accepted", field="token")
        if status == "revoked":
            raise TokenInvalid("this invitation was withdrawn", field="token")
        if status == "expired":
            raise TokenExpired(
                f"this invitation expired at {invitation.expires_at:%Y-%m-%d %H:%M} UTC; "
                "ask for a new one",
                field="token",
            )
        user_email = (getattr(user, "email", "") or "").strip().lower()
        if invitation.email and invitation.email.lower() != user_email:
            raise InvitationNotForYou("this invitation is addressed to another email address")
        if invitation.username and invitation.username != user.get_username():
            raise InvitationNotForYou("this invitation is addressed to another user")
        organization = invitation.organization
        if Membership.objects.filter(user=user, organization=organization).exists():
            raise AlreadyExists(f"you are already a member of {organization.name!r}")
        membership = Membership.objects.create(
            user=user, organization=organization, role=invitation.role
        )
        invitation.accepted_at = now
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        common: dict[str, Any] = {
            "actor": user,
            "project": organization.project,
            "source_address": source_address,
        }
        audit_event_record(action=AuditAction.INVITATION_ACCEPTED, target=invitation, **common)
        audit_event_record(
            action=AuditAction.MEMBERSHIP_ADDED,
            target=membership,
            details={**_membership_details(membership), "invitation": invitation.pk},
            **common,
        )
    return membership


def invitation_revoke(
    *,
    invitation: Invitation,
    revoked_by: User,
    source_address: str | None = None,
) -> Invitation:
    """Withdraw a pending invitation. Raises ``InvalidTransition`` when it is not pending."""
    with transaction.atomic():
        invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
        status = invitation.status_at(timezone.now())
        if status != "pending":
            raise InvalidTransition(
                f"the invitation is {status}; only a pending one can be revoked"
            )
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        audit_event_record(
            action=AuditAction.INVITATION_REVOKED,
            target=invitation,
            project=invitation.organization.project,
            actor=revoked_by,
            source_address=source_address,
        )
    return invitation
