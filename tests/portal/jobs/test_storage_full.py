"""A full disk on the portal: an upload or a submission is refused with 507 and nothing kept,
and a round whose new model cannot be stored waits for room instead of failing.

The disk fills for real in the chaos suite (``tests/chaos``, a small tmpfs); here the write
that hits it raises ``ENOSPC`` as the kernel would, so the API's answer is checked everywhere.
"""

from __future__ import annotations

import builtins
import errno
from pathlib import Path
from typing import Any

import pytest
import torch

import jobs.services.rounds as rounds_module
import jobs.services.tasks as tasks_module
from jobs.exceptions import StorageFull
from jobs.models import JobState, Round, RoundState, SiteTask, TaskState
from jobs.services import rounds
from tests.portal.jobs_api_world import (
    LEAD,
    SITE_IN,
    build_world,
    make_bundle,
    stored_files,
    update_bytes,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


def disk_full(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def full_when_writing(real_open: Any = builtins.open) -> Any:
    """``open`` that fails as a full disk does when a file is opened to be written."""

    def fake(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            disk_full()
        return real_open(file, mode, *args, **kwargs)

    return fake


def test_an_update_on_a_full_disk_is_refused_with_507_and_nothing_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = build_world(tmp_path)
    data = update_bytes({"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}, world.tmp)
    monkeypatch.setattr(tasks_module, "open", full_when_writing(), raising=False)

    refused = world.call(SITE_IN, "PUT", f"{world.a}/rounds/0/update/", raw=data)

    assert refused.status_code == 507, refused.content
    assert refused.json()["code"] == "storage_full"
    assert "send it again later" in refused.json()["message"]
    task = SiteTask.objects.get(round__job=world.job, site=world.sites[0].site)
    assert task.state == TaskState.ASSIGNED and not task.update
    assert not [f for f in stored_files() if "/updates/" in f]

    monkeypatch.undo()  # room again: the same upload is taken
    again = world.call(SITE_IN, "PUT", f"{world.a}/rounds/0/update/", raw=data)
    assert again.status_code == 202, again.json()


def test_a_submission_on_a_full_disk_is_refused_with_507_and_nothing_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = build_world(tmp_path, submit=False)
    bundle = make_bundle(tmp_path)
    monkeypatch.setattr("jobs.services.submission.open", full_when_writing(), raising=False)

    refused = world.call(LEAD, "POST", f"{world.p}/jobs/", multipart=bundle.form())

    assert refused.status_code == 507, refused.content
    assert refused.json()["code"] == "storage_full"
    assert stored_files() == []


def test_a_round_whose_model_cannot_be_stored_waits_for_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = build_world(tmp_path, num_rounds=1)
    job = world.job
    assert job is not None
    monkeypatch.setattr(rounds_module, "write_global_model", disk_full)
    data = update_bytes({"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}, world.tmp)
    for site in world.sites:
        world.agent(site, "PUT", f"{world.a}/rounds/0/update/", raw=data)

    with pytest.raises(StorageFull):  # for Celery to retry later, not a failure
        rounds.job_advance(job_id=job.pk)
    job.refresh_from_db()
    rnd = Round.objects.get(job=job)
    assert (job.state, rnd.state, rnd.aggregation_attempts) == (
        JobState.RUNNING,
        RoundState.AGGREGATING,
        0,
    )

    monkeypatch.undo()
    rounds.job_advance_while_due(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
