"""``fedportal.bulk.rows_update``: what ``bulk_update`` writes, in one statement, on this
database (PostgreSQL in CI, SQLite for PocEnv's default)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fedportal.bulk import rows_update
from jobs.models import Job, SiteTask, TaskState
from sites.models import Site
from tests.portal.rounds_helpers import submit, three_sites

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

FIELDS = ["state", "reason", "weight", "metrics"]
# Values a check writes, and the awkward ones: quotes, a percent sign (the driver's
# placeholder character), no weight at all, nested and non-ASCII JSON.
VALUES = [
    (TaskState.ACCEPTED, "", 3.5, {"accuracy": 0.5, "loss": 1e-12}),
    (TaskState.REJECTED, 'it\'s 100% "wrong": %s %(x)s', None, {}),
    (TaskState.ACCEPTED, "ümlaut ✓", 0.0, {"nested": {"list": [1, 2.5, "x"]}, "ß": -1}),
]


@pytest.fixture
def tasks(tmp_path: Path) -> list[SiteTask]:
    """The three tasks of a running job's first round."""
    project, _sites = three_sites()
    job: Job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    found = list(SiteTask.objects.filter(round__job=job).order_by("pk"))
    assert len(found) == 3
    return found


def stored(tasks: list[SiteTask]) -> list[tuple[object, ...]]:
    rows = SiteTask.objects.filter(pk__in=[t.pk for t in tasks]).order_by("pk")
    return list(rows.values_list(*FIELDS))


def assign(tasks: list[SiteTask]) -> None:
    for task, (state, reason, weight, metrics) in zip(tasks, VALUES, strict=True):
        task.state, task.reason, task.weight, task.metrics = state, reason, weight, metrics


def test_rows_update_writes_what_bulk_update_writes_in_one_statement(
    tasks: list[SiteTask],
) -> None:
    untouched = stored(tasks)
    assign(tasks)
    SiteTask.objects.bulk_update(tasks, FIELDS)
    by_bulk_update = stored(tasks)
    assert by_bulk_update != untouched

    # Back to how they were, then the same values again by rows_update.
    for task, row in zip(tasks, untouched, strict=True):
        for name, value in zip(FIELDS, row, strict=True):
            setattr(task, name, value)
    SiteTask.objects.bulk_update(tasks, FIELDS)
    assert stored(tasks) == untouched

    assign(tasks)
    with CaptureQueriesContext(connection) as captured:
        changed = rows_update(tasks, FIELDS)
    assert changed == 3
    assert len(captured.captured_queries) == 1
    assert stored(tasks) == by_bulk_update
    assert [v[2] for v in stored(tasks)] == [3.5, None, 0.0]


def test_rows_update_changes_only_the_given_rows_and_fields(tasks: list[SiteTask]) -> None:
    before = stored(tasks)
    first = tasks[0]
    first.state, first.reason = TaskState.REJECTED, "only this one"
    first.weight = 7.0  # not among the fields written: stays as stored
    assert rows_update([first], ["state", "reason"]) == 1
    after = stored(tasks)
    assert after[0] == (TaskState.REJECTED, "only this one", before[0][2], before[0][3])
    assert after[1:] == before[1:]
    assert rows_update([], FIELDS) == 0


def test_rows_update_refuses_what_it_cannot_write(tasks: list[SiteTask]) -> None:
    site = Site.objects.first()
    assert site is not None
    with pytest.raises(ValueError, match="same model"):
        rows_update([tasks[0], site], ["name"])
    with pytest.raises(ValueError, match="must be saved"):
        rows_update([SiteTask(state=TaskState.ACCEPTED)], ["state"])
    with pytest.raises(ValueError, match="id is not a column that can be updated"):
        rows_update(tasks, ["id"])
