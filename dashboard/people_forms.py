"""Forms for the people side of a project: a new project, its settings, organisations, members
and invitations. They only parse; every rule (names, slugs, who may do what) stays in
``sites.services``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django import forms
from django.db.models import QuerySet

from sites.models import Organization, Role
from sites.services.projects import NAME_MAX


class ProjectNewForm(forms.Form):
    name = forms.CharField(
        max_length=NAME_MAX,
        help_text="Fixed once created: it names the project's certificate authority and its slug.",
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    host_organization_name = forms.CharField(
        label="Host organisation",
        max_length=NAME_MAX,
        required=False,
        help_text="The organisation you belong to as project admin (default: the project's name).",
    )


class ProjectSettingsForm(forms.Form):
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 4}))


class OrganizationForm(forms.Form):
    name = forms.CharField(label="Organisation name", max_length=NAME_MAX)


def _role_field(roles: Sequence[tuple[str, str]]) -> forms.ChoiceField:
    return forms.ChoiceField(choices=list(roles))


class _RoleInOrganizationForm(forms.Form):
    """A role in an organisation, each offered only where the person may give it (the view
    passes the organisations and roles ``sites.selectors.can_grant_role`` allows)."""

    organization = forms.ModelChoiceField(
        queryset=Organization.objects.none(), label="Organisation", empty_label=None
    )
    role = forms.ChoiceField()

    def __init__(
        self,
        data: Any = None,
        *,
        organizations: QuerySet[Organization],
        roles: Sequence[tuple[str, str]],
    ) -> None:
        super().__init__(data)
        org_field = self.fields["organization"]
        assert isinstance(org_field, forms.ModelChoiceField)
        org_field.queryset = organizations
        self.fields["role"] = _role_field(roles)


class MemberAddForm(_RoleInOrganizationForm):
    """Someone who already has a role in the project, by username or email (as the API, which
    takes a username: people from outside the project are invited)."""

    prefix = "add"
    field_order = ("organization", "person", "role")
    person = forms.CharField(
        label="Username or email",
        max_length=254,
        help_text="Someone who already has a role in this project; invite anyone else.",
    )


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class InvitationForm(_RoleInOrganizationForm):
    prefix = "invite"
    field_order = ("organization", "email", "role")
    email = forms.EmailField(label="Email of the invitee", max_length=254)


class InvitationAcceptForm(forms.Form):
    token = forms.CharField(max_length=200, widget=forms.HiddenInput)
