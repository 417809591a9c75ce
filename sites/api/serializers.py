"""What the sites API reads and writes. Input serializers only parse (types, required fields,
references to visible objects); the rules live in the services, which name the field at fault.
Output serializers describe exactly what is sent, so that the OpenAPI schema is the contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from client_agent.privacy.policy import PrivacyPolicy
from sites import selectors
from sites.authentication import SiteIdentity
from sites.models import (
    ApiToken,
    AuditEvent,
    Certificate,
    Invitation,
    Membership,
    Organization,
    Project,
    Role,
    Site,
    SiteState,
)
from sites.services.enrolment import Enrolment

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# Names are checked again by the services; these bounds only keep absurd input out early.
NAME_MAX = 64
REASON_MAX = 2000
CSR_MAX = 64 * 1024
# Ids in query filters: larger ones cannot name a row, and SQLite refuses them outright.
MAX_ID = 2**63 - 1


@extend_schema_field(
    {
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {
            "oneOf": [
                {"type": "number", "minimum": 0},
                {"type": "boolean"},
                {"type": "string", "maxLength": 200},
            ]
        },
        "example": {"gpus": 1, "memory_gb": 32, "gpu_model": "A100"},
    }
)
class ResourcesField(serializers.DictField):
    """Declared resources: lowercase keys (letters, digits, '_') to numbers ≥ 0, booleans or
    short strings. The service checks each entry and names the one at fault."""


class ErrorSerializer(serializers.Serializer[dict[str, Any]]):
    """Every error the API returns (fedportal.api.exception_handler)."""

    code = serializers.CharField(help_text="Machine-readable reason, e.g. `token_expired`.")
    message = serializers.CharField(help_text="What went wrong, for a person.")
    field = serializers.CharField(required=False, help_text="The input field at fault, if any.")


# --- references --------------------------------------------------------------------------------


@extend_schema_field(OpenApiTypes.INT)
class ProjectOrganizationField(serializers.PrimaryKeyRelatedField[Organization]):
    """An organisation of the project in the serializer's context (``context["project"]``):
    an id from another project is "does not exist", whether or not it exists there."""

    def get_queryset(self) -> QuerySet[Organization]:
        return Organization.objects.filter(project=self.context["project"])


# --- projects and organisations ----------------------------------------------------------------


class ProjectSerializer(serializers.ModelSerializer[Project]):
    my_roles = serializers.SerializerMethodField(
        help_text="The roles the caller holds in this project."
    )

    class Meta:
        model = Project
        fields = [
            "id",
            "slug",
            "name",
            "description",
            "created_at",
            "ca_fingerprint",
            "ca_certificate_pem",
            "my_roles",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_my_roles(self, project: Project) -> list[str]:
        request = self.context.get("request")
        user = getattr(request, "user", None)
        return sorted(selectors.role_in_project(user, project))


class ProjectCreateSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(max_length=NAME_MAX)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    host_organization_name = serializers.CharField(
        max_length=NAME_MAX,
        required=False,
        help_text="The operator's organisation, whose members are project admins "
        "(default: the project's name).",
    )


class ProjectUpdateSerializer(serializers.Serializer[dict[str, Any]]):
    """Only the description changes: the name is the O of every certificate in the project."""

    description = serializers.CharField(allow_blank=True, required=False)


class OrganizationSerializer(serializers.ModelSerializer[Organization]):
    class Meta:
        model = Organization
        fields = ["id", "name", "is_host", "created_at"]
        read_only_fields = fields


class OrganizationWriteSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(max_length=NAME_MAX)


# --- memberships and invitations ---------------------------------------------------------------


class MembershipSerializer(serializers.ModelSerializer[Membership]):
    username = serializers.CharField(source="user.username", read_only=True)
    organization_name = serializers.CharField(source="organization.name", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "username", "organization", "organization_name", "role", "created_at"]
        read_only_fields = fields


@extend_schema_field(OpenApiTypes.STR)
class ProjectPersonField(serializers.SlugRelatedField["User"]):
    """A person who already has a role in the project in the serializer's context (by
    username). Anyone else gets the same answer as a name nobody has: adding people from
    outside the project goes through an invitation they accept, and no answer tells whether
    an account exists."""

    default_error_messages = {
        "does_not_exist": "nobody in this project is named {value}; invite people from outside "
        "it (POST …/invitations/), who join by accepting",
        "invalid": "must be a username",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("slug_field", "username")
        super().__init__(**kwargs)

    def get_queryset(self) -> QuerySet[User]:
        return selectors.people_of_project(self.context["project"])

    def to_internal_value(self, data: Any) -> User:
        # No username holds a NUL, and PostgreSQL refuses one even in a lookup (a 500).
        if not isinstance(data, str) or "\x00" in data:
            self.fail("invalid")
        return super().to_internal_value(data)


class MembershipCreateSerializer(serializers.Serializer[dict[str, Any]]):
    organization = ProjectOrganizationField()
    username = ProjectPersonField(
        help_text="Someone who already has a role in this project (in another organisation, "
        "say); invite anyone else."
    )
    role = serializers.ChoiceField(Role.choices)


class MembershipUpdateSerializer(serializers.Serializer[dict[str, Any]]):
    role = serializers.ChoiceField(Role.choices)


class MembershipQuerySerializer(serializers.Serializer[dict[str, Any]]):
    organization = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)


class ShownOnceField(serializers.CharField):
    """A secret made with the object and never stored in clear (an API token's key, an
    invitation's token): the view passes it in the serializer's context under the field's
    name, as the object has no attribute for it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(read_only=True, **kwargs)

    def get_attribute(self, instance: Any) -> str:
        assert self.field_name is not None  # the serializer names its fields before reading
        secret: str = self.context[self.field_name]
        return secret


class InvitationSerializer(serializers.ModelSerializer[Invitation]):
    organization_name = serializers.CharField(source="organization.name", read_only=True)
    status = serializers.SerializerMethodField()
    invited_by = serializers.CharField(source="created_by.username", default=None, read_only=True)
    accepted_by = serializers.CharField(source="accepted_by.username", default=None, read_only=True)

    class Meta:
        model = Invitation
        fields = [
            "id",
            "organization",
            "organization_name",
            "email",
            "username",
            "role",
            "status",
            "invited_by",
            "created_at",
            "expires_at",
            "accepted_at",
            "accepted_by",
            "revoked_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(["pending", "accepted", "revoked", "expired"]))
    def get_status(self, invitation: Invitation) -> str:
        return invitation.status_at(timezone.now())


class InvitationCreatedSerializer(InvitationSerializer):
    token = ShownOnceField(
        help_text="Shown once: the invitee accepts with it (POST /api/v1/invitations/accept/).",
    )

    class Meta(InvitationSerializer.Meta):
        fields = [*InvitationSerializer.Meta.fields, "token"]
        read_only_fields = fields


class InvitationCreateSerializer(serializers.Serializer[dict[str, Any]]):
    organization = ProjectOrganizationField()
    email = serializers.EmailField(required=False, allow_blank=True, default="")
    username = serializers.CharField(required=False, allow_blank=True, default="", max_length=150)
    role = serializers.ChoiceField(Role.choices)


class InvitationAcceptSerializer(serializers.Serializer[dict[str, Any]]):
    token = serializers.CharField(max_length=200)


# --- sites and enrolment -----------------------------------------------------------------------


class PrivacyRuleSerializer(serializers.Serializer[tuple[str, str]]):
    rule = serializers.CharField()
    setting = serializers.CharField()


def privacy_rules_of(policy: PrivacyPolicy | None) -> list[dict[str, str]]:
    """A policy's rules in words (``PrivacyPolicy.describe``) as the API sends them."""
    if policy is None:
        return []
    return [{"rule": rule, "setting": setting} for rule, setting in policy.describe()]


class SiteSerializer(serializers.ModelSerializer[Site]):
    organization_name = serializers.CharField(source="organization.name", read_only=True)
    requested_by = serializers.CharField(
        source="requested_by.username", default=None, read_only=True
    )

    class Meta:
        model = Site
        fields = [
            "id",
            "name",
            "organization",
            "organization_name",
            "contact_email",
            "resources",
            "state",
            "state_reason",
            "state_changed_at",
            "requested_by",
            "created_at",
            "approved_at",
            "enrolled_at",
            "agent_version",
            "last_heartbeat",
            "auto_accept_jobs",
            "privacy_policy",
            "privacy_rules",
            "privacy_policy_reported_at",
            "privacy_project_epsilon",
        ]
        read_only_fields = fields

    privacy_policy = serializers.JSONField(
        read_only=True,
        help_text="The privacy policy the site's agent enforces, as it reported it "
        "(null: never reported). The portal shows it and never changes it.",
    )
    privacy_rules = serializers.SerializerMethodField(
        help_text="The policy's rules in words; empty when the agent never reported one."
    )
    privacy_project_epsilon = serializers.FloatField(
        read_only=True,
        help_text="ε the project has spent at this site, by the site's ledger (null: none "
        "accounted, or unbounded: releases without noise).",
    )

    @extend_schema_field(PrivacyRuleSerializer(many=True))
    def get_privacy_rules(self, site: Site) -> list[dict[str, str]]:
        return privacy_rules_of(selectors.site_privacy_policy(site))


class SiteRequestSerializer(serializers.Serializer[dict[str, Any]]):
    organization = ProjectOrganizationField()
    name = serializers.CharField(max_length=63, help_text=Site._meta.get_field("name").help_text)
    contact_email = serializers.EmailField()
    resources = ResourcesField(required=False, default=dict)


class SiteUpdateSerializer(serializers.Serializer[dict[str, Any]]):
    contact_email = serializers.EmailField(required=False)
    resources = ResourcesField(required=False)
    auto_accept_jobs = serializers.BooleanField(required=False)


class SiteQuerySerializer(serializers.Serializer[dict[str, Any]]):
    organization = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
    state = serializers.ChoiceField(SiteState.choices, required=False)


class ReasonSerializer(serializers.Serializer[dict[str, Any]]):
    reason = serializers.CharField(max_length=REASON_MAX)


class EnrolmentSecretSerializer(serializers.Serializer[dict[str, Any]]):
    token = serializers.CharField(help_text="The one-time enrolment token. Shown only here, once.")
    expires_at = serializers.DateTimeField()
    command = serializers.CharField(help_text="What the site admin runs at the site.")


class SiteEnrolmentSerializer(serializers.Serializer[dict[str, Any]]):
    """A site together with a fresh enrolment token (approval, token reissue)."""

    site = SiteSerializer()
    enrolment = EnrolmentSecretSerializer()


class EnrolRequestSerializer(serializers.Serializer[dict[str, Any]]):
    token = serializers.CharField(max_length=200, help_text="The one-time enrolment token.")
    csr_pem = serializers.CharField(
        max_length=CSR_MAX,
        trim_whitespace=False,
        help_text="PEM PKCS#10 request with CN=<site name>, O=<project name>, "
        "made with a key that never leaves the site.",
    )
    project = serializers.CharField(
        required=False,
        max_length=64,
        help_text="The project's slug, when the agent knows it; must be the token's project.",
    )


class EnrolCheckRequestSerializer(serializers.Serializer[dict[str, Any]]):
    token = serializers.CharField(max_length=200, help_text="The one-time enrolment token.")


class EnrolCheckResponseSerializer(serializers.Serializer[Site]):
    """The site a token would enrol: what the agent puts in its CSR's subject."""

    site = serializers.CharField(source="name")
    organization = serializers.CharField(source="organization.name")
    project = serializers.CharField(source="project.slug")
    project_name = serializers.CharField(source="project.name")


class EnrolResponseSerializer(serializers.Serializer[Enrolment]):
    site = serializers.CharField(source="certificate.site.name")
    organization = serializers.CharField(source="certificate.site.organization.name")
    project = serializers.CharField(source="certificate.site.project.slug")
    project_name = serializers.CharField(source="certificate.site.project.name")
    serial = serializers.CharField(source="certificate.serial")
    fingerprint = serializers.CharField(source="certificate.fingerprint")
    not_before = serializers.DateTimeField(source="certificate.not_before")
    not_after = serializers.DateTimeField(source="certificate.not_after")
    certificate_pem = serializers.CharField(source="certificate.pem")
    ca_certificate_pem = serializers.CharField()


class WhoamiSerializer(serializers.Serializer[SiteIdentity]):
    """The identity a signed agent request proved (and its heartbeat)."""

    site = serializers.CharField(source="site.name")
    site_id = serializers.IntegerField(source="site.pk")
    state = serializers.ChoiceField(SiteState.choices, source="site.state")
    organization = serializers.CharField(source="site.organization.name")
    project = serializers.CharField(source="site.project.slug")
    project_name = serializers.CharField(source="site.project.name")
    certificate_serial = serializers.CharField(source="certificate.serial")
    certificate_fingerprint = serializers.CharField(source="certificate.fingerprint")
    certificate_not_after = serializers.DateTimeField(source="certificate.not_after")
    last_heartbeat = serializers.DateTimeField(source="site.last_heartbeat")


class PrivacyPolicyReportSerializer(serializers.Serializer[dict[str, Any]]):
    """What a site's agent reports of its privacy: checked in full by the service, which names
    the field at fault (``policy.budget.delta``, ``project_history[3][1]``)."""

    policy = serializers.JSONField(help_text="The site's policy, as PrivacyPolicy.to_json().")
    project_history = serializers.JSONField(
        required=False,
        help_text="What the project has spent at the site: the accountant's history entries "
        "[noise_multiplier, sample_rate, steps] (at most 10,000).",
    )
    project_epsilon = serializers.JSONField(
        required=False,
        allow_null=True,  # what an agent sends before any spend, or with no noise: no ε
        help_text="ε of the history by the agent (null: none); the portal recomputes it.",
    )


class SitePrivacySerializer(serializers.Serializer[Site]):
    """The privacy policy the portal holds for a site, and the project's spending there."""

    site = serializers.CharField(source="name")
    policy = serializers.JSONField(source="privacy_policy", allow_null=True)
    rules = serializers.SerializerMethodField()
    reported_at = serializers.DateTimeField(source="privacy_policy_reported_at", allow_null=True)
    project_history = serializers.JSONField(source="privacy_project_history")
    project_epsilon = serializers.FloatField(source="privacy_project_epsilon", allow_null=True)

    @extend_schema_field(PrivacyRuleSerializer(many=True))
    def get_rules(self, site: Site) -> list[dict[str, str]]:
        return privacy_rules_of(selectors.site_privacy_policy(site))


# --- certificates ------------------------------------------------------------------------------


class CertificateSerializer(serializers.ModelSerializer[Certificate]):
    site_name = serializers.CharField(source="site.name", read_only=True)

    class Meta:
        model = Certificate
        fields = [
            "id",
            "site",
            "site_name",
            "serial",
            "subject_cn",
            "fingerprint",
            "not_before",
            "not_after",
            "created_at",
            "revoked_at",
            "revocation_reason",
            "pem",
        ]
        read_only_fields = fields


class CertificateQuerySerializer(serializers.Serializer[dict[str, Any]]):
    site = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
    revoked = serializers.BooleanField(required=False, allow_null=True, default=None)


# --- audit events ------------------------------------------------------------------------------


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = serializers.CharField(source="actor_repr", read_only=True)
    actor_site = serializers.CharField(source="actor_site.name", default=None, read_only=True)
    project = serializers.CharField(source="project.slug", default=None, read_only=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "action",
            "actor",
            "actor_site",
            "target_type",
            "target_id",
            "target_repr",
            "project",
            "source_address",
            "details",
        ]
        read_only_fields = fields


class AuditEventQuerySerializer(serializers.Serializer[dict[str, Any]]):
    actor = serializers.CharField(
        required=False, max_length=150, help_text="Username of the person who acted."
    )
    actor_site = serializers.CharField(
        required=False, max_length=63, help_text="Name of the site whose agent acted."
    )
    action = serializers.CharField(
        required=False,
        max_length=64,
        help_text="Exact action (`site.approved`), or a prefix ending in '.' (`site.`).",
    )
    target_type = serializers.CharField(
        required=False, max_length=64, help_text="e.g. `site`, `certificate`."
    )
    target_id = serializers.CharField(required=False, max_length=64)
    since = serializers.DateTimeField(required=False, help_text="Events at or after this time.")
    until = serializers.DateTimeField(required=False, help_text="Events before this time.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and until < since:
            raise serializers.ValidationError({"until": "until must not be before since"})
        return attrs


# --- API tokens --------------------------------------------------------------------------------


class ApiTokenSerializer(serializers.ModelSerializer[ApiToken]):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
        read_only_fields = fields


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    key = ShownOnceField(help_text="Shown once. Send it as `Authorization: Bearer <key>`.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "key"]
        read_only_fields = fields


class ApiTokenCreateSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(max_length=100)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
