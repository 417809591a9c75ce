"""Projects, organisations, people's roles, sites, their enrolment and certificates, the audit log.

How the pieces relate:

- A **Project** is a federation. It owns a certificate authority (made with it, private key
  encrypted at rest, see :mod:`sites.ca`) that signs every site certificate in the project.
- An **Organization** belongs to exactly one project, as a participant's ``org`` does in
  NVFlare's ``project.yml``: the same real-world institution in two projects is two rows, so
  nothing about one project (members, roles, sites) can leak into another. Each project has one
  *host* organisation (``is_host``), created with the project: the operator's organisation.
- A **Membership** gives a user one role in one organisation. The project admin role exists
  only in the host organisation: a user is project admin of P exactly when they hold a
  ``project_admin`` membership in P's host organisation (or are a Django superuser, who
  administers every project). A user may belong to several organisations; their roles in a
  project are the union (``sites.selectors.role_in_project``).
- A **Site** is one place where data lives and an agent runs. It belongs to one organisation
  and, denormalised for the uniqueness of its name, to that organisation's project
  (invariant: ``site.project_id == site.organization.project_id``). Its state machine is on the
  model; the name stays reserved after denial or revocation, so audit history and certificate
  subjects never become ambiguous.
- An **EnrolmentToken** lets the agent exchange a CSR for a certificate once; a **Certificate**
  is what the agent then signs requests with. Revoking a certificate withdraws that key only;
  revoking the site withdraws the site and all its certificates (see ``sites.services``).
- **AuditEvent** rows are append-only: the model refuses to update or delete one.
- **ApiToken** lets a person's scripts call the REST API; stored hashed, shown once.

Every one-time secret (enrolment token, invitation token, API token key) is stored only as its
SHA-256: they are 256-bit random strings, so a plain hash is as good as a slow one here.

Writes go through ``sites.services``, reads through ``sites.selectors``.
"""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import RegexValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from common.exceptions import InvalidTransition

SITE_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
SITE_NAME_HELP = (
    "1 to 63 lowercase letters, digits and '-', not starting or ending with '-' (a DNS label); "
    "it becomes the CN of the site's certificate."
)
site_name_validator = RegexValidator(SITE_NAME_PATTERN, SITE_NAME_HELP)


class Role(models.TextChoices):
    """Roles, after NVFlare's: project admin > org admin > lead > member."""

    PROJECT_ADMIN = "project_admin", "Project admin"
    ORG_ADMIN = "org_admin", "Organisation admin"
    LEAD = "lead", "Lead"
    MEMBER = "member", "Member"


class Project(models.Model):
    name = models.CharField(
        max_length=64, unique=True, help_text="Also the O of every certificate in the project."
    )
    slug = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    ca_certificate_pem = models.TextField(editable=False)
    # A Fernet token (see sites.ca): never the PEM itself.
    ca_private_key_encrypted = models.TextField(editable=False)
    ca_fingerprint = models.CharField(max_length=64, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def host_organization(self) -> Organization:
        return self.organizations.get(is_host=True)


class Organization(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="organizations")
    name = models.CharField(max_length=64, help_text="Also the OU of its sites' certificates.")
    is_host = models.BooleanField(
        default=False,
        editable=False,
        help_text="The project operator's organisation; project admins are its members.",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["project_id", "name"]
        constraints = [
            models.UniqueConstraint(
                Lower("name"), "project", name="sites_organization_name_unique_in_project"
            ),
            models.UniqueConstraint(
                fields=["project"],
                condition=models.Q(is_host=True),
                name="sites_organization_one_host_per_project",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=20, choices=Role.choices)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["organization_id", "user_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "organization"], name="sites_membership_unique_user_organization"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} as {self.role}"


class Invitation(models.Model):
    """An invitation to join an organisation with a role, addressed to an email or username.

    Accepting it (``sites.services.invitation_accept``) needs the plaintext token, which is
    returned once when the invitation is made; the invitee must be the addressee.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField(blank=True)
    username = models.CharField(max_length=150, blank=True)
    role = models.CharField(max_length=20, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(email="", username=""),
                name="sites_invitation_has_addressee",
            ),
        ]

    def __str__(self) -> str:
        return f"invitation of {self.email or self.username} to {self.organization}"

    def status_at(self, now: dt.datetime) -> str:
        """``accepted``, ``revoked``, ``expired`` or ``pending``."""
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        return "pending"


class SiteState(models.TextChoices):
    REQUESTED = "requested", "Requested"
    APPROVED = "approved", "Approved"
    ENROLLED = "enrolled", "Enrolled"
    DENIED = "denied", "Denied"
    REVOKED = "revoked", "Revoked"


class Site(models.Model):
    """A data-holding site and its enrolment state.

    ::

        requested ──approve()──▶ approved ──enrol()──▶ enrolled ──revoke()──▶ revoked
            │                       │                   ╰─enrol()─╯ (new key)
            ╰──────deny()───────────┴──▶ denied

    ``enrolled → enrolled`` is a re-enrolment: a new key and certificate after the project admin
    reissued a token (certificate expiry, a lost or revoked key). ``denied`` and ``revoked`` are
    terminal. Callers hold the row lock (``select_for_update``) around a transition, so that two
    concurrent approvals cannot both pass the check.
    """

    State = SiteState
    ACTIVE_STATES: ClassVar[frozenset[str]] = frozenset(
        {SiteState.REQUESTED, SiteState.APPROVED, SiteState.ENROLLED}
    )
    TERMINAL_STATES: ClassVar[frozenset[str]] = frozenset({SiteState.DENIED, SiteState.REVOKED})

    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="sites")
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="sites")
    name = models.CharField(
        max_length=63, validators=[site_name_validator], help_text=SITE_NAME_HELP
    )
    contact_email = models.EmailField()
    resources = models.JSONField(
        default=dict, blank=True, help_text='Declared resources, e.g. {"gpus": 1, "memory_gb": 32}.'
    )
    state = models.CharField(
        max_length=16, choices=SiteState.choices, default=SiteState.REQUESTED, db_index=True
    )
    state_reason = models.TextField(blank=True, help_text="Why the site was denied or revoked.")
    state_changed_at = models.DateTimeField(default=timezone.now)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    approved_at = models.DateTimeField(null=True, blank=True)
    enrolled_at = models.DateTimeField(null=True, blank=True, help_text="The latest enrolment.")
    agent_version = models.CharField(max_length=64, blank=True)
    # Every verified signed request from the site's agent updates this.
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # The agent's open WebSocket (its Channels name): one per site, a newer one replaces it.
    agent_channel = models.CharField(max_length=200, blank=True, editable=False)
    # When the site's agent was last cut off: its WebSocket closed, or its certificate was
    # revoked or superseded. The site is offline from then until it is heard from again.
    agent_disconnected_at = models.DateTimeField(null=True, blank=True, editable=False)
    auto_accept_jobs = models.BooleanField(
        default=False, help_text="Run the project's jobs without asking the site admin each time."
    )
    # The site's privacy policy as its agent reported it (PrivacyPolicy.to_json): the portal
    # shows it and plans with it, and never changes it; the file at the site is what rules.
    privacy_policy = models.JSONField(
        null=True, blank=True, editable=False, help_text="null: the agent never reported one"
    )
    privacy_policy_reported_at = models.DateTimeField(null=True, blank=True, editable=False)
    # What the site's ledger says the project has spent here: Opacus history entries
    # [noise_multiplier, sample_rate, steps], and the ε they come to at the policy's δ.
    privacy_project_history = models.JSONField(default=list, blank=True, editable=False)
    privacy_project_epsilon = models.FloatField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["project_id", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "name"], name="sites_site_name_unique_in_project"
            ),
            models.CheckConstraint(
                condition=models.Q(state__in=SiteState.values), name="sites_site_state_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL_STATES

    def _move(
        self, to: SiteState, *, allowed_from: frozenset[str], reason: str = "", stamp: str = ""
    ) -> None:
        """Move to ``to`` or raise :class:`InvalidTransition`; ``stamp``: a time field to set."""
        if self.state not in allowed_from:
            froms = " or ".join(sorted(allowed_from))
            raise InvalidTransition(
                f"site '{self.name}' is {self.state}; it can become {to} only when {froms}"
            )
        now = timezone.now()
        self.state = to
        self.state_reason = reason
        self.state_changed_at = now
        fields = ["state", "state_reason", "state_changed_at"]
        if stamp:
            setattr(self, stamp, now)
            fields.append(stamp)
        self.save(update_fields=fields)

    def approve(self) -> None:
        self._move(
            SiteState.APPROVED, allowed_from=frozenset({SiteState.REQUESTED}), stamp="approved_at"
        )

    def deny(self, reason: str) -> None:
        self._move(
            SiteState.DENIED,
            allowed_from=frozenset({SiteState.REQUESTED, SiteState.APPROVED}),
            reason=reason,
        )

    def enrol(self) -> None:
        self._move(
            SiteState.ENROLLED,
            allowed_from=frozenset({SiteState.APPROVED, SiteState.ENROLLED}),
            stamp="enrolled_at",
        )

    def revoke(self, reason: str) -> None:
        self._move(SiteState.REVOKED, allowed_from=frozenset({SiteState.ENROLLED}), reason=reason)


class EnrolmentToken(models.Model):
    """A one-time secret that lets a site's agent exchange its CSR for a certificate.

    Usable when not used, not revoked (a newer token, denial or revocation withdraws it) and not
    expired. Only its SHA-256 is stored; the plaintext is returned once, by the service.
    """

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="enrolment_tokens")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"enrolment token for {self.site} ({self.status_at(timezone.now())})"

    def status_at(self, now: dt.datetime) -> str:
        """``used``, ``revoked``, ``expired`` or ``usable``."""
        if self.used_at is not None:
            return "used"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        return "usable"


class Certificate(models.Model):
    """A site certificate issued by its project's CA. Never edited except to revoke it."""

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="certificates")
    serial = models.CharField(max_length=40, unique=True, help_text="Lowercase hex.")
    subject_cn = models.CharField(max_length=64)
    pem = models.TextField()
    fingerprint = models.CharField(
        max_length=64, unique=True, help_text="SHA-256 of the DER certificate, lowercase hex."
    )
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.subject_cn} #{self.serial[:12]}"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_valid_at(self, now: dt.datetime) -> bool:
        return not self.is_revoked and self.not_before <= now <= self.not_after


class AuditEvent(models.Model):
    """Who did what to which object, when and from where. Append-only.

    ``action`` is a dotted string (``site.approved``; see :class:`AuditAction` for this app's).
    ``actor`` is the person, ``actor_site`` the site agent, when the change was made by one;
    ``actor_repr`` keeps the username should the user be deleted later. ``target_*`` name the
    changed object by model name, primary key and a readable label, so an event outlives it.
    """

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_repr = models.CharField(max_length=150, blank=True)
    actor_site = models.ForeignKey(
        Site, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    target_repr = models.CharField(max_length=200)
    # PROTECT: a project with history is never deleted, so its audit trail stays whole.
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_events"
    )
    source_address = models.GenericIPAddressField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["project", "-created_at"], name="sites_audit_project_time"),
            models.Index(fields=["target_type", "target_id"], name="sites_audit_target"),
        ]

    def __str__(self) -> str:
        who = self.actor_repr or (f"site {self.actor_site}" if self.actor_site_id else "system")
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {who} {self.action} {self.target_repr}"

    def save(self, *args: object, **kwargs: object) -> None:
        if not self._state.adding:
            raise TypeError("audit events are append-only; this one exists already")
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        raise TypeError("audit events are append-only and cannot be deleted")


class AuditAction(models.TextChoices):
    """The actions this app records. Other apps add their own (``job.submitted``…); the field
    is a plain string so that they need no migration here."""

    PROJECT_CREATED = "project.created"
    PROJECT_UPDATED = "project.updated"
    ORGANIZATION_CREATED = "organization.created"
    ORGANIZATION_UPDATED = "organization.updated"
    MEMBERSHIP_ADDED = "membership.added"
    MEMBERSHIP_ROLE_CHANGED = "membership.role_changed"
    MEMBERSHIP_REMOVED = "membership.removed"
    INVITATION_CREATED = "invitation.created"
    INVITATION_ACCEPTED = "invitation.accepted"
    INVITATION_REVOKED = "invitation.revoked"
    SITE_REQUESTED = "site.requested"
    SITE_UPDATED = "site.updated"
    SITE_APPROVED = "site.approved"
    SITE_DENIED = "site.denied"
    SITE_ENROLLED = "site.enrolled"
    SITE_REVOKED = "site.revoked"
    ENROLMENT_TOKEN_REISSUED = "enrolment_token.reissued"
    CERTIFICATE_ISSUED = "certificate.issued"
    CERTIFICATE_REVOKED = "certificate.revoked"
    API_TOKEN_CREATED = "api_token.created"
    API_TOKEN_REVOKED = "api_token.revoked"
    SITE_PRIVACY_POLICY_REPORTED = "site.privacy_policy_reported"


class ApiToken(models.Model):
    """A person's token for the REST API (``Authorization: Bearer fpt_…``), acting as them."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The key's first characters, to recognise it."
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def is_usable_at(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)
