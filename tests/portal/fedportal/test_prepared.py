"""``fedportal.prepared``: a query compiled once gives what its queryset gives, for every value;
one it cannot prepare falls back to the queryset, and says so."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

import pytest
from django.db.models import QuerySet

from fedportal.prepared import PreparedQuery
from jobs import selectors
from jobs.models import Job, ModelVersion, SiteTask
from tests.portal.jobs_api_world import World

pytestmark = [
    pytest.mark.django_db(transaction=True),  # the job starts from a commit (kicks on commit)
    pytest.mark.usefixtures("eager_celery", "media"),
]

# Every field of a task as an agent's request reads it, and of what comes with it.
READ = (
    "pk",
    "state",
    "reason",
    "task_name",
    "model_ref",
    "spec",
    "update_size",
    "round.pk",
    "round.number",
    "round.state",
    "round.deadline",
    "round.job.pk",
    "round.job.uid",
    "round.job.state",
    "round.job.project_id",
    "site.pk",
    "site.name",
    "site.state",
)


def read(task: SiteTask | None, names: tuple[str, ...] = READ) -> dict[str, Any] | None:
    if task is None:
        return None
    values = {}
    for name in names:
        value: Any = task
        for part in name.split("."):
            value = getattr(value, part)
        values[name] = value
    return values


def plain(prepared: PreparedQuery[SiteTask], **values: Any) -> SiteTask | None:
    """What the prepared query's own queryset gives for ``values``."""
    return next(iter(prepared.build(**values)[:1]), None)


@pytest.mark.parametrize("start", [False, True], ids=["task", "with its start model"])
def test_the_prepared_task_lookup_gives_what_its_queryset_gives(
    jobs_world: World, django_assert_num_queries: Any, start: bool
) -> None:
    job = jobs_world.job
    assert job is not None
    prepared = selectors._TASK_OF_SITE_IN_JOB[start]
    sites = [entry.site.pk for entry in jobs_world.sites]
    asked = [
        (site_id, number, uid)
        for site_id in [*sites, 10**9]
        for number in (0, 1)
        for uid in (job.uid, uuid.uuid4())
    ]
    found = 0
    for site_id, number, uid in asked:
        ours = prepared.first(site_id=site_id, round_number=number, job_uid=uid)
        theirs = plain(prepared, site_id=site_id, round_number=number, job_uid=uid)
        assert read(ours) == read(theirs), (site_id, number, uid)
        if ours is not None:
            found += 1
            assert ours.site_id == site_id and ours.round.job.uid == uid
            # The fields that grow with the sites are left to a later read, as the queryset's.
            assert ours.round.get_deferred_fields() == theirs.round.get_deferred_fields()  # type: ignore[union-attr]
            if start:
                model = selectors.start_model_of(ours)
                assert model is not None
                stored = ModelVersion.objects.get(job=job, round_number=0)
                assert (model.pk, model.file, model.sha256) == (
                    stored.pk,
                    stored.file,
                    stored.sha256,
                )
    assert found == len(sites)  # each site's task in round 0; none elsewhere
    # Prepared on this database indeed, not served by the fallback.
    assert prepared._compiled and None not in prepared._compiled.values()
    with django_assert_num_queries(1):
        prepared.first(site_id=sites[0], round_number=0, job_uid=job.uid)


def test_a_query_is_compiled_once_per_database(jobs_world: World) -> None:
    job = jobs_world.job
    assert job is not None
    built: list[dict[str, Any]] = []

    def build(job_id: int) -> QuerySet[Job]:
        built.append({"job_id": job_id})
        return Job.objects.filter(pk=job_id).order_by()

    prepared = PreparedQuery(build, job_id=2_000_000_003)
    for _ in range(3):
        found = prepared.first(job_id=job.pk)
        assert found is not None and found.uid == job.uid
    assert prepared.first(job_id=job.pk + 1000) is None
    # Compiled with the example, then with the example changed; then never built again.
    assert len(built) == 2


def test_a_query_that_cannot_be_prepared_is_served_by_its_queryset(
    jobs_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    job = jobs_world.job
    assert job is not None

    def build(job_id: int) -> QuerySet[Job]:
        # Its SQL changes with the value: nothing to prepare.
        jobs = Job.objects.filter(pk=job_id)
        return (jobs.filter(num_rounds__gte=0) if job_id % 2 else jobs).order_by()

    prepared = PreparedQuery(build, job_id=2_000_000_003)
    with caplog.at_level(logging.WARNING, logger="fedportal.prepared"):
        found = prepared.first(job_id=job.pk)
    assert found is not None and found.pk == job.pk
    assert "not prepared (its SQL changes with job_id)" in caplog.text


def test_only_int_str_datetime_and_uuid_values_are_taken() -> None:
    prepared = PreparedQuery(lambda weight: Job.objects.filter(pk=weight), weight=1.5)
    with pytest.raises(TypeError, match="int, str, datetime and UUID values, not float"):
        prepared.first(weight=2.5)


def test_the_prepared_upload_changes_what_its_update_would_change(jobs_world: World) -> None:
    # The upload's conditional update, prepared: the same rows changed to the same values as
    # the queryset's update, and none when the task moved on or its round closed.
    from jobs.models import Round
    from jobs.services import tasks as task_services

    prepared = task_services._UPLOAD_TO_OPEN_ROUND
    first, second, third = SiteTask.objects.order_by("pk")
    when = dt.datetime(2026, 11, 29, 21, 0, 0, 123456, tzinfo=dt.UTC)

    def stored(n: int) -> dict[str, Any]:
        return {
            "update": f"jobs/x/site-{n}.safetensors",
            "update_sha256": f"{n}" * 64,
            "update_size": 1000 + n,
            "updated_at": when + dt.timedelta(seconds=n),
        }

    assert prepared.update(task_id=first.pk, **stored(1)) == 1
    queryset, fields = prepared.build(task_id=second.pk, **stored(2))
    assert queryset.update(**fields) == 1
    assert prepared.update(task_id=first.pk, **stored(1)) == 0  # uploaded already
    Round.objects.filter(pk=third.round_id).update(state="closed")
    assert prepared.update(task_id=third.pk, **stored(3)) == 0  # the round closed
    assert prepared._compiled and None not in prepared._compiled.values()

    changed = {
        task.pk: (
            task.state,
            str(task.update),
            task.update_sha256,
            task.update_size,
            task.updated_at,
        )
        for task in SiteTask.objects.all()
    }
    assert changed[first.pk] == ("uploaded", *stored(1).values())
    assert changed[second.pk] == ("uploaded", *stored(2).values())
    assert changed[third.pk][0] == "assigned"


def test_an_update_across_a_relation_is_not_prepared_but_still_made(
    jobs_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    from fedportal.prepared import PreparedUpdate

    def build(job_id: int) -> tuple[QuerySet[SiteTask], dict[str, Any]]:
        return SiteTask.objects.filter(round__job_id=job_id), {"reason": "looked at"}

    prepared = PreparedUpdate(build, job_id=2_000_000_003)
    assert jobs_world.job is not None
    with caplog.at_level(logging.WARNING, logger="fedportal.prepared"):
        assert prepared.update(job_id=jobs_world.job.pk) == len(jobs_world.sites)
    assert "not prepared (it reaches across a relation)" in caplog.text
    assert set(SiteTask.objects.values_list("reason", flat=True)) == {"looked at"}


def test_the_prepared_lookup_of_an_update_check_gives_what_its_queryset_gives(
    jobs_world: World,
) -> None:
    from jobs.services import rounds

    prepared = rounds._TASK_TO_CHECK
    tasks = list(SiteTask.objects.all())
    assert len(tasks) == len(jobs_world.sites)  # round 0's
    for task in tasks:
        ours = prepared.first(task_id=task.pk)
        theirs = prepared.build(task_id=task.pk).get()
        assert read(ours) == read(theirs)
        assert ours is not None and "plan" in ours.round.get_deferred_fields()
        assert ours.round.protection == theirs.round.protection  # read: it says how to check
    assert prepared.first(task_id=10**9) is None
    assert prepared._compiled and None not in prepared._compiled.values()
