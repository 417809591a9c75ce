"""A job's experiment and tags: set in ``job.json`` at submission or by a recipe, changed later
by whoever manages the job (service, REST API and the job page, the same rule everywhere), each
change audited; the jobs list filters by them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from common.exceptions import ValidationFailed
from jobs.models import Job
from jobs.recipes import FedAvgRecipe
from jobs.services.labels import job_label
from jobs.services.submission import job_submit
from sites.models import AuditEvent
from tests.portal import jobs_api_world as jw

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]


@pytest.fixture
def world(tmp_path: Path) -> jw.World:
    return jw.build_world(tmp_path, start=False)


def labelled_events(job: Job) -> list[AuditEvent]:
    return list(
        AuditEvent.objects.filter(action="job.labelled", target_id=str(job.pk)).order_by("id")
    )


def submit(world: jw.World, **spec: Any) -> Job:
    made = jw.make_bundle(world.tmp, **spec)
    return job_submit(
        project=world.project,
        submitted_by=world.users[jw.LEAD],
        spec=made.spec,
        initial_model=io.BytesIO(made.model),
        app_archive=io.BytesIO(made.app),
        sites=[s.site.name for s in world.sites],
    )


# --- the service -------------------------------------------------------------------------------


def test_labelling_stores_the_labels_and_audits_the_change(world: jw.World) -> None:
    job = world.job
    assert job is not None and (job.experiment, job.tags) == ("", [])
    lead = world.users[jw.LEAD]
    job_label(
        job=job,
        experiment="  baseline ",
        tags=["cnn", " lr-0.1", "cnn"],
        actor=lead,
        source_address="10.0.0.9",
    )
    job.refresh_from_db()
    assert (job.experiment, job.tags) == ("baseline", ["cnn", "lr-0.1"])  # trimmed, no repeats
    [event] = labelled_events(job)
    assert event.actor == lead and event.source_address == "10.0.0.9"
    assert event.details == {
        "experiment": {"from": "", "to": "baseline"},
        "tags": {"from": [], "to": ["cnn", "lr-0.1"]},
    }
    # None keeps a label; the same labels again change nothing and record nothing.
    job_label(job=job, experiment=None, tags=["cnn", "lr-0.1"], actor=lead)
    assert len(labelled_events(job)) == 1
    job_label(job=job, experiment=None, tags=[], actor=lead)
    job.refresh_from_db()
    assert (job.experiment, job.tags) == ("baseline", [])
    assert labelled_events(job)[-1].details == {"tags": {"from": ["cnn", "lr-0.1"], "to": []}}


@pytest.mark.parametrize(
    ("experiment", "tags", "field", "reason"),
    [
        ("x" * 101, None, "experiment", "at most 100"),
        ("bad\x00name", None, "experiment", "control characters"),
        (None, [f"t{i}" for i in range(21)], "tags", "at most 20"),
        (None, ["x" * 51], "tags", "1 to 50 characters"),
        (None, ["  "], "tags", "1 to 50 characters"),
        (None, ["a,b"], "tags", "no comma"),
        (None, ["tab\there"], "tags", "control character"),
        (None, [3], "tags", "strings only"),
        (None, "cnn", "tags", "must be a list"),
    ],
)
def test_bad_labels_are_refused_naming_the_field_and_nothing_changes(
    world: jw.World, experiment: Any, tags: Any, field: str, reason: str
) -> None:
    job = world.job
    assert job is not None
    with pytest.raises(ValidationFailed) as caught:
        job_label(job=job, experiment=experiment, tags=tags, actor=world.users[jw.LEAD])
    assert caught.value.field == field and reason in caught.value.message
    job.refresh_from_db()
    assert (job.experiment, job.tags) == ("", []) and labelled_events(job) == []


# --- at submission -----------------------------------------------------------------------------


def test_job_json_may_carry_the_labels_and_they_are_checked(world: jw.World) -> None:
    job = submit(world, name="tagged", experiment="sweep-1", tags=["a", "b"])
    assert (job.experiment, job.tags) == ("sweep-1", ["a", "b"])
    with pytest.raises(ValidationFailed) as caught:
        submit(world, name="bad", tags=["ok", "no,comma"])
    assert caught.value.field == "spec.tags"
    assert not Job.objects.filter(name="bad").exists()


def test_a_recipe_sets_the_labels_into_its_spec(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text("print('hi')\n")
    recipe = FedAvgRecipe(
        name="r", min_clients=1, num_rounds=1, model={"w": jw.INITIAL["w"]}, train_script=script
    )
    assert "experiment" not in recipe.spec() and "tags" not in recipe.spec()
    recipe.set_labels(experiment="sweep", tags=["lr-0.1"])
    assert (recipe.spec()["experiment"], recipe.spec()["tags"]) == ("sweep", ["lr-0.1"])
    with pytest.raises(ValueError, match="tags"):
        recipe.set_labels(tags=["x" * 51])


# --- the REST API ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("persona", "status"),
    [
        (jw.LEAD, 200),
        (jw.ADMIN, 200),
        (jw.OTHER_LEAD, 403),
        (jw.MEMBER, 403),
        (jw.ORG_ADMIN, 403),
        (jw.OUTSIDER, 404),
        (jw.ANONYMOUS, 401),
    ],
)
def test_patching_a_jobs_labels_follows_the_abort_rule(
    world: jw.World, persona: str, status: int
) -> None:
    response = world.call(persona, "PATCH", f"{world.j}/", {"experiment": "e", "tags": ["t"]})
    assert response.status_code == status, response.content
    assert world.job is not None
    world.job.refresh_from_db()
    changed = (world.job.experiment, world.job.tags) == ("e", ["t"])
    assert changed == (status == 200)
    if status == 200:
        assert response.json()["experiment"] == "e" and response.json()["tags"] == ["t"]
        assert labelled_events(world.job)[0].actor == world.users[persona]


def test_the_api_refuses_bad_labels_with_the_field_and_filters_by_them(world: jw.World) -> None:
    bad = world.call(jw.LEAD, "PATCH", f"{world.j}/", {"tags": ["x" * 51]})
    assert bad.status_code == 400 and bad.json()["field"] == "tags"
    empty = world.call(jw.LEAD, "PATCH", f"{world.j}/", {})
    assert empty.status_code == 400
    assert world.call(jw.LEAD, "PATCH", f"{world.j}/", {"tags": ["x", "cnn"]}).status_code == 200
    other = submit(world, name="other", experiment="Sweep")

    def names(query: str) -> list[str]:
        response = world.call(jw.MEMBER, "GET", f"{world.p}/jobs/?{query}")
        assert response.status_code == 200
        return [job["name"] for job in response.json()["results"]]

    assert names("tag=cnn") == ["api-job"]
    assert names("experiment=sweep") == [other.name]
    assert names("tag=cn") == []
    detail = world.call(jw.MEMBER, "GET", f"{world.j}/").json()
    assert (detail["experiment"], detail["tags"]) == ("", ["x", "cnn"])


# --- the job page ------------------------------------------------------------------------------


def test_the_job_page_form_labels_the_job_for_managers_only(world: jw.World) -> None:
    job = world.job
    assert job is not None
    lead, member = Client(), Client()
    lead.force_login(world.users[jw.LEAD])
    member.force_login(world.users[jw.MEMBER])
    page = lead.get(f"/jobs/{job.uid}/").content.decode()
    assert f'action="/jobs/{job.uid}/labels/"' in page
    assert 'action="/jobs/' + str(job.uid) + '/labels/"' not in (
        member.get(f"/jobs/{job.uid}/").content.decode()
    )

    refused = member.post(f"/jobs/{job.uid}/labels/", {"experiment": "x", "tags": "a"})
    assert refused.status_code == 403
    saved = lead.post(
        f"/jobs/{job.uid}/labels/", {"experiment": "Sweep", "tags": "cnn, lr-0.1,"}, follow=True
    )
    job.refresh_from_db()
    assert (job.experiment, job.tags) == ("Sweep", ["cnn", "lr-0.1"])
    assert "The labels of job api-job were saved." in saved.content.decode()
    assert 'value="cnn, lr-0.1"' in saved.content.decode()
    too_many = ",".join(f"t{i}" for i in range(21))
    bad = lead.post(f"/jobs/{job.uid}/labels/", {"experiment": "", "tags": too_many}, follow=True)
    assert "The labels were not saved: tags: 21 tags; at most 20 are allowed" in (
        bad.content.decode()
    )
    job.refresh_from_db()
    assert (job.experiment, job.tags) == ("Sweep", ["cnn", "lr-0.1"])
