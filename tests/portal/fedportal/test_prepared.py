"""``fedportal.prepared``: a query compiled once gives what its queryset gives, for every value;
one it cannot prepare falls back to the queryset, and says so."""

from __future__ import annotations

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


def test_only_int_and_uuid_values_are_taken() -> None:
    prepared = PreparedQuery(lambda name: Job.objects.filter(name=name), name="example")
    with pytest.raises(TypeError, match="int and UUID values, not str"):
        prepared.first(name="x")


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
