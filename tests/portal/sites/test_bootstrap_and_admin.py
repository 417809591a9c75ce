"""``manage.py bootstrap`` and the Django admin of the sites app."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from sites import models, selectors
from sites.models import AuditEvent, Certificate, Membership, Project, Role, Site
from tests.portal.factories import UserFactory, approved_site, enrolled_site

pytestmark = pytest.mark.django_db
User = get_user_model()
PASSWORD = "a long enough bootstrap password"


def bootstrap(*args: str) -> str:
    out = StringIO()
    call_command("bootstrap", *args, stdout=out)
    return out.getvalue()


def test_bootstrap_creates_superuser_and_project_then_changes_nothing() -> None:
    args = ("--username", "root", "--email", "root@example.org", "--password", PASSWORD)

    first = bootstrap(*args, "--project", "Oncology")
    events = AuditEvent.objects.count()
    second = bootstrap(*args, "--project", "Oncology")

    assert "Created superuser 'root'" in first and "Created project 'Oncology'" in first
    root = User.objects.get(username="root")
    assert root.is_superuser and root.check_password(PASSWORD)
    project = Project.objects.get()
    assert selectors.is_project_admin(root, project)
    assert Membership.objects.get(user=root).role == Role.PROJECT_ADMIN
    assert second.startswith("Nothing to do") and "Nothing was changed" in second
    assert (User.objects.count(), Project.objects.count(), AuditEvent.objects.count()) == (
        1,
        1,
        events,
    )


def test_bootstrap_reads_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDPORTAL_BOOTSTRAP_PASSWORD", PASSWORD)

    bootstrap("--username", "root", "--email", "root@example.org")

    assert User.objects.get(username="root").check_password(PASSWORD)


def test_bootstrap_refuses_without_password_weak_password_or_to_promote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDPORTAL_BOOTSTRAP_PASSWORD", raising=False)
    with pytest.raises(CommandError, match="give --password"):
        bootstrap("--username", "root", "--email", "r@example.org")
    with pytest.raises(CommandError, match="password refused"):
        bootstrap("--username", "root", "--email", "r@example.org", "--password", "123")
    UserFactory.create(username="alice")
    with pytest.raises(CommandError, match="not a superuser"):
        bootstrap("--username", "alice", "--email", "a@example.org", "--password", PASSWORD)
    assert not User.objects.filter(is_superuser=True).exists()


def test_bootstrap_makes_an_existing_superuser_admin_of_an_existing_project() -> None:
    bootstrap("--username", "root", "--email", "r@example.org", "--password", PASSWORD)
    owner = UserFactory.create()
    from sites import services

    services.project_create(name="Oncology", created_by=owner)

    out = bootstrap("--username", "root", "--email", "r@example.org", "--project", "Oncology")

    assert "made 'root' project admin" in out.lower()
    root = User.objects.get(username="root")
    assert Membership.objects.get(user=root).role == Role.PROJECT_ADMIN


# --- admin ----------------------------------------------------------------------------------

READ_ONLY = [Certificate, AuditEvent, models.EnrolmentToken]


def test_every_model_is_in_the_admin() -> None:
    ours = {m for m in admin.site._registry if m._meta.app_label == "sites"}
    assert ours == {
        m
        for m in (
            models.Project,
            models.Organization,
            models.Membership,
            models.Invitation,
            models.Site,
            models.EnrolmentToken,
            models.Certificate,
            models.AuditEvent,
            models.ApiToken,
        )
    }


@pytest.fixture
def staff_client() -> Client:
    root = User.objects.create_superuser("root", "root@example.org", PASSWORD)
    client = Client()
    client.force_login(root)
    return client


@pytest.mark.parametrize("model", READ_ONLY, ids=lambda m: m.__name__)
def test_read_only_models_cannot_be_added_changed_or_deleted(
    staff_client: Client, model: type
) -> None:
    enrolled_site()
    model_admin = admin.site._registry[model]
    request = type("R", (), {"user": User.objects.get(username="root")})()
    obj = model.objects.first()  # type: ignore[attr-defined]

    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, obj)
    assert not model_admin.has_delete_permission(request, obj)
    meta = model._meta  # type: ignore[attr-defined]
    changelist = reverse(f"admin:sites_{meta.model_name}_changelist")
    assert staff_client.get(changelist).status_code == 200
    if obj is not None:
        change = reverse(f"admin:sites_{meta.model_name}_change", args=[obj.pk])
        page = staff_client.get(change)
        assert page.status_code == 200
        assert b'name="_save"' not in page.content
        before = model.objects.count()  # type: ignore[attr-defined]
        staff_client.post(
            reverse(f"admin:sites_{meta.model_name}_delete", args=[obj.pk]), {"post": "yes"}
        )
        assert model.objects.count() == before  # type: ignore[attr-defined]


def test_every_changelist_renders(staff_client: Client) -> None:
    enrolled_site()
    ours = [m for m in admin.site._registry if m._meta.app_label == "sites"]
    assert ours
    for model in ours:
        url = reverse(f"admin:sites_{model._meta.model_name}_changelist")
        assert staff_client.get(url).status_code == 200, url


def test_admin_creates_a_project_through_the_service(staff_client: Client) -> None:
    response = staff_client.post(
        reverse("admin:sites_project_add"), {"name": "Via Admin", "description": "d"}
    )

    assert response.status_code == 302
    project = Project.objects.get(name="Via Admin")
    assert project.ca_fingerprint and project.host_organization.is_host
    assert AuditEvent.objects.filter(action="project.created", project=project).exists()


def test_admin_action_approves_a_site_and_shows_the_token_once(staff_client: Client) -> None:
    site, _ = approved_site()
    requested = Site.objects.create(
        project=site.project, organization=site.organization, name="new", contact_email="a@b.org"
    )

    response = staff_client.post(
        reverse("admin:sites_site_changelist"),
        {"action": "approve", "_selected_action": [requested.pk, site.pk]},
        follow=True,
    )

    text = response.content.decode()
    assert "enrolment token (shown once): fpe_" in text
    assert f"site &#x27;{site.name}&#x27; is approved" in text  # the refusal, not a 500
    assert Site.objects.get(pk=requested.pk).state == "approved"
    assert AuditEvent.objects.filter(action="site.approved", target_id=str(requested.pk)).exists()


def test_admin_cannot_delete_the_last_project_admin(staff_client: Client) -> None:
    site, _ = approved_site()
    only = Membership.objects.get(organization=site.project.host_organization)
    url = reverse("admin:sites_membership_delete", args=[only.pk])

    response = staff_client.post(url, {"post": "yes"})

    assert response.status_code == 403
    assert Membership.objects.filter(pk=only.pk).exists()
