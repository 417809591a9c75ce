"""The Django admin of the jobs app: jobs, rounds and model versions, viewable only."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import Model
from django.test import Client
from django.urls import reverse

from jobs.models import Job, JobState, ModelVersion, Round
from tests.portal import jobs_api_world as jw

# Committed for real: the job opens its first round in an on-commit hook.
pytestmark = pytest.mark.django_db(transaction=True)

READ_ONLY = [Job, Round, ModelVersion]


@pytest.fixture
def staff_client(jobs_world: jw.World) -> Client:
    """A superuser's browser, beside a running job with its first round and initial model."""
    assert Job.objects.get().state == JobState.RUNNING
    root = get_user_model().objects.create_superuser("root", "root@example.org", "a password")
    client = Client()
    client.force_login(root)
    return client


@pytest.mark.parametrize("model", READ_ONLY, ids=lambda m: m.__name__)
def test_jobs_rounds_and_models_are_listed_and_shown_but_never_added_changed_or_deleted(
    staff_client: Client, model: type[Model]
) -> None:
    model_admin = admin.site._registry[model]
    request: Any = type("R", (), {"user": get_user_model().objects.get(username="root")})()
    obj = model._default_manager.get()
    name = model._meta.model_name

    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, obj)
    assert not model_admin.has_delete_permission(request, obj)
    changelist = staff_client.get(reverse(f"admin:jobs_{name}_changelist"))
    assert changelist.status_code == 200
    assert reverse(f"admin:jobs_{name}_add").encode() not in changelist.content  # no add button
    page = staff_client.get(reverse(f"admin:jobs_{name}_change", args=[obj.pk]))
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    staff_client.post(reverse(f"admin:jobs_{name}_delete", args=[obj.pk]), {"post": "yes"})
    assert model._default_manager.filter(pk=obj.pk).exists()


def test_the_job_list_filters_by_state_and_finds_a_job_by_name(staff_client: Client) -> None:
    url = reverse("admin:jobs_job_changelist")

    running = staff_client.get(url, {"state__exact": JobState.RUNNING, "q": "api-job"})
    aborted = staff_client.get(url, {"state__exact": JobState.ABORTED})

    assert running.context["cl"].result_count == 1
    assert aborted.context["cl"].result_count == 0
