"""Django admin for the sites app: an operator's view of every model.

Every change made here goes through ``sites.services``, exactly as through the API, so it is
validated the same way and leaves an audit event; the admin never writes a row itself.
Certificates, enrolment tokens, audit events and used nonces are read-only (no add, change or
delete); sites, invitations and API tokens change only through the actions listed on their
pages. The admin is for staff; it does not scope objects per project (superusers see all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from common.exceptions import DomainError
from sites import services
from sites.models import (
    ApiToken,
    AuditEvent,
    Certificate,
    EnrolmentToken,
    Invitation,
    Membership,
    Organization,
    Project,
    Role,
    Site,
)
from sites.services._validation import clean_resources, clean_role, clean_site_name

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def _client_ip(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR")


def _actor(request: HttpRequest) -> User:
    # The admin only serves logged-in staff, so request.user is never anonymous here.
    return cast("User", request.user)


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Viewable, never added, changed or deleted from the admin."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _run_each(
    modeladmin: admin.ModelAdmin,  # type: ignore[type-arg]
    request: HttpRequest,
    queryset: QuerySet[Any],
    call: Any,
    done: str,
) -> None:
    """Apply a service to each selected object; report each domain refusal, not a 500."""
    for obj in queryset:
        try:
            message = call(obj)
        except DomainError as exc:
            modeladmin.message_user(request, f"{obj}: {exc.message}", messages.ERROR)
        else:
            modeladmin.message_user(request, message or f"{obj}: {done}", messages.SUCCESS)


# --- projects and organisations -------------------------------------------------------------


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "slug", "created_by", "created_at", "ca_fingerprint")
    search_fields = ("name", "slug")
    # The encrypted CA key is never shown, not even encrypted.
    readonly_fields = ("slug", "created_by", "created_at", "ca_fingerprint", "ca_certificate_pem")

    def get_fields(self, request: HttpRequest, obj: Project | None = None) -> Any:
        if obj is None:
            return ["name", "description"]
        return [
            "name",
            "slug",
            "description",
            "created_by",
            "created_at",
            "ca_fingerprint",
            "ca_certificate_pem",
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Project | None = None) -> Any:
        # The name is the O of every certificate in the project: fixed once made.
        return (*self.readonly_fields, "name") if obj is not None else ()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a project's audit trail and certificates outlive it; nothing deletes one

    def save_model(self, request: HttpRequest, obj: Project, form: Any, change: bool) -> None:
        if change:
            services.project_update(
                project=obj,
                description=obj.description,
                updated_by=_actor(request),
                source_address=_client_ip(request),
            )
            return
        project = services.project_create(
            name=obj.name,
            description=obj.description,
            created_by=_actor(request),
            source_address=_client_ip(request),
        )
        # The admin goes on with ``obj`` (redirect, log entry): make it the created row.
        obj.pk = project.pk
        obj.refresh_from_db()
        obj._state.adding = False


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "project", "is_host", "created_at")
    list_filter = ("project", "is_host")
    search_fields = ("name",)

    def get_readonly_fields(self, request: HttpRequest, obj: Organization | None = None) -> Any:
        return ("project", "is_host", "created_at") if obj is not None else ()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Organization, form: Any, change: bool) -> None:
        actor = _actor(request)
        if change:
            services.organization_update(
                organization=obj,
                name=obj.name,
                updated_by=actor,
                source_address=_client_ip(request),
            )
            return
        org = services.organization_create(
            project=obj.project, name=obj.name, created_by=actor, source_address=_client_ip(request)
        )
        obj.pk = org.pk
        obj.refresh_from_db()
        obj._state.adding = False


# --- memberships and invitations ------------------------------------------------------------


class MembershipForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Membership
        fields = ("user", "organization", "role")

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        organization = data.get("organization") or getattr(self.instance, "organization", None)
        role = data.get("role")
        if organization is not None and role:
            try:
                clean_role(role, host=organization.is_host)
            except DomainError as exc:
                self.add_error("role", exc.message)
        instance = self.instance
        if instance.pk and instance.role == Role.PROJECT_ADMIN and role != Role.PROJECT_ADMIN:
            others = Membership.objects.filter(
                organization_id=instance.organization_id, role=Role.PROJECT_ADMIN
            ).exclude(pk=instance.pk)
            if not others.exists():
                self.add_error("role", "this is the project's last project admin")
        return data


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    form = MembershipForm
    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role", "organization__project")
    search_fields = ("user__username", "user__email", "organization__name")
    autocomplete_fields = ("organization",)

    def get_readonly_fields(self, request: HttpRequest, obj: Membership | None = None) -> Any:
        return ("user", "organization", "created_at") if obj is not None else ()

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # one at a time, so the last-admin rule holds
        return actions

    def has_delete_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        if obj is not None and obj.role == Role.PROJECT_ADMIN:
            others = Membership.objects.filter(
                organization_id=obj.organization_id, role=Role.PROJECT_ADMIN
            ).exclude(pk=obj.pk)
            if not others.exists():
                return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: Membership, form: Any, change: bool) -> None:
        actor = _actor(request)
        if change:
            services.membership_update_role(
                membership=Membership.objects.get(pk=obj.pk),
                role=obj.role,
                updated_by=actor,
                source_address=_client_ip(request),
            )
            return
        created = services.membership_add(
            organization=obj.organization,
            user=obj.user,
            role=obj.role,
            added_by=actor,
            source_address=_client_ip(request),
        )
        obj.pk = created.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def delete_model(self, request: HttpRequest, obj: Membership) -> None:
        services.membership_remove(
            membership=obj,
            removed_by=_actor(request),
            source_address=_client_ip(request),
        )


@admin.register(Invitation)
class InvitationAdmin(ReadOnlyAdmin):
    list_display = (
        "__str__",
        "role",
        "created_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "revoked_at",
    )
    list_filter = ("role", "organization__project")
    search_fields = ("email", "username")
    exclude = ("token_hash",)
    actions = ("revoke",)

    @admin.action(description="Revoke the selected pending invitations")
    def revoke(self, request: HttpRequest, queryset: QuerySet[Invitation]) -> None:
        def call(invitation: Invitation) -> None:
            services.invitation_revoke(
                invitation=invitation,
                revoked_by=_actor(request),
                source_address=_client_ip(request),
            )

        _run_each(self, request, queryset, call, "revoked")


# --- sites and their enrolment --------------------------------------------------------------


class SiteForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Site
        fields = ("organization", "name", "contact_email", "resources", "auto_accept_jobs")

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        try:
            if "resources" in data:
                data["resources"] = clean_resources(data["resources"])
            if not self.instance.pk and data.get("name") and data.get("organization"):
                clean_site_name(data["name"])
                if Site.objects.filter(
                    project=data["organization"].project, name=data["name"]
                ).exists():
                    self.add_error("name", "the project already has a site with this name")
        except DomainError as exc:
            self.add_error(exc.field, exc.message)
        return data


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    form = SiteForm
    list_display = ("name", "project", "organization", "state", "last_heartbeat", "agent_version")
    list_filter = ("state", "project")
    search_fields = ("name", "contact_email")
    actions = ("approve", "deny", "reissue_token", "revoke")
    _state_fields = (
        "project",
        "state",
        "state_reason",
        "state_changed_at",
        "requested_by",
        "created_at",
        "approved_at",
        "enrolled_at",
        "agent_version",
        "last_heartbeat",
        # The site's privacy policy is its agent's to report, never the portal's to change.
        "privacy_policy",
        "privacy_policy_reported_at",
        "privacy_project_history",
        "privacy_project_epsilon",
    )

    def get_fields(self, request: HttpRequest, obj: Site | None = None) -> Any:
        if obj is None:
            return SiteForm.Meta.fields
        return (*SiteForm.Meta.fields, *self._state_fields)

    def get_readonly_fields(self, request: HttpRequest, obj: Site | None = None) -> Any:
        return ("organization", "name", *self._state_fields) if obj is not None else ()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # sites are denied or revoked, never deleted: certificates refer to them

    def save_model(self, request: HttpRequest, obj: Site, form: Any, change: bool) -> None:
        actor = _actor(request)
        if change:
            services.site_update(
                site=obj,
                contact_email=obj.contact_email,
                resources=obj.resources,
                auto_accept_jobs=obj.auto_accept_jobs,
                updated_by=actor,
                source_address=_client_ip(request),
            )
            return
        site = services.site_request(
            organization=obj.organization,
            name=obj.name,
            contact_email=obj.contact_email,
            resources=obj.resources,
            requested_by=actor,
            source_address=_client_ip(request),
        )
        obj.pk = site.pk
        obj.refresh_from_db()
        obj._state.adding = False

    @admin.action(description="Approve the selected sites (shows each enrolment token once)")
    def approve(self, request: HttpRequest, queryset: QuerySet[Site]) -> None:
        def call(site: Site) -> str:
            _, token = services.site_approve(
                site=site, approved_by=_actor(request), source_address=_client_ip(request)
            )
            return f"{site}: approved; enrolment token (shown once): {token}"

        _run_each(self, request, queryset, call, "approved")

    @admin.action(description="Deny the selected sites")
    def deny(self, request: HttpRequest, queryset: QuerySet[Site]) -> None:
        reason = f"denied in the Django admin by {request.user}"

        def call(site: Site) -> None:
            services.site_deny(
                site=site,
                reason=reason,
                denied_by=_actor(request),
                source_address=_client_ip(request),
            )

        _run_each(self, request, queryset, call, "denied")

    @admin.action(description="Reissue an enrolment token (shows it once)")
    def reissue_token(self, request: HttpRequest, queryset: QuerySet[Site]) -> None:
        def call(site: Site) -> str:
            _, token = services.enrolment_token_reissue(
                site=site, issued_by=_actor(request), source_address=_client_ip(request)
            )
            return f"{site}: new enrolment token (shown once): {token}"

        _run_each(self, request, queryset, call, "token reissued")

    @admin.action(description="Revoke the selected sites and all their certificates")
    def revoke(self, request: HttpRequest, queryset: QuerySet[Site]) -> None:
        reason = f"revoked in the Django admin by {request.user}"

        def call(site: Site) -> None:
            services.site_revoke(
                site=site,
                reason=reason,
                revoked_by=_actor(request),
                source_address=_client_ip(request),
            )

        _run_each(self, request, queryset, call, "revoked")


@admin.register(EnrolmentToken)
class EnrolmentTokenAdmin(ReadOnlyAdmin):
    list_display = ("site", "created_by", "created_at", "expires_at", "used_at", "revoked_at")
    list_filter = ("site__project",)
    exclude = ("token_hash",)


@admin.register(Certificate)
class CertificateAdmin(ReadOnlyAdmin):
    list_display = ("subject_cn", "site", "serial", "not_before", "not_after", "revoked_at")
    list_filter = ("site__project", "revoked_at")
    search_fields = ("subject_cn", "serial", "fingerprint")


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "actor_repr",
        "actor_site",
        "action",
        "target_repr",
        "project",
        "source_address",
    )
    list_filter = ("action", "project", "target_type")
    search_fields = ("action", "actor_repr", "target_repr", "target_id")
    date_hierarchy = "created_at"


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "user",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    search_fields = ("name", "prefix", "user__username")
    exclude = ("key_hash",)
    actions = ("revoke",)

    @admin.action(description="Revoke the selected API tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        def call(token: ApiToken) -> None:
            services.api_token_revoke(
                token=token, revoked_by=_actor(request), source_address=_client_ip(request)
            )

        _run_each(self, request, queryset, call, "revoked")
