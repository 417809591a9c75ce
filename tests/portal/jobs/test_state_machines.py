"""The job's, the round's and the site task's state machines: every allowed move, and every
other one refused (the services rely on ``move_to`` raising, or on conditional updates from
``SiteTask.states_that_move_to``, rather than checking states themselves)."""

from __future__ import annotations

import itertools

import pytest

from jobs.models import (
    InvalidJobTransition,
    Job,
    JobState,
    Round,
    RoundState,
    SiteTask,
    TaskState,
)

JOB_MOVES = {
    (JobState.SUBMITTED, JobState.WAITING),
    (JobState.SUBMITTED, JobState.FAILED),
    (JobState.SUBMITTED, JobState.ABORTED),
    (JobState.WAITING, JobState.RUNNING),
    (JobState.WAITING, JobState.FAILED),
    (JobState.WAITING, JobState.ABORTED),
    (JobState.RUNNING, JobState.COMPLETED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.ABORTED),
}
ROUND_MOVES = {
    (RoundState.OPEN, RoundState.AGGREGATING),
    (RoundState.OPEN, RoundState.FAILED),
    (RoundState.AGGREGATING, RoundState.CLOSED),
    (RoundState.AGGREGATING, RoundState.FAILED),
}

OPEN = (TaskState.ASSIGNED, TaskState.DOWNLOADED, TaskState.TRAINING)
TASK_MOVES = {
    # The site reports progress, or failure, while the task is open.
    (TaskState.ASSIGNED, TaskState.DOWNLOADED),
    (TaskState.ASSIGNED, TaskState.TRAINING),
    (TaskState.DOWNLOADED, TaskState.TRAINING),
    *((state, TaskState.FAILED) for state in OPEN),
    # Its upload; late when the round closed before it came, or without it.
    *((state, TaskState.UPLOADED) for state in OPEN),
    *((state, TaskState.LATE) for state in (*OPEN, TaskState.UPLOADED)),
    # The check.
    (TaskState.UPLOADED, TaskState.ACCEPTED),
    (TaskState.UPLOADED, TaskState.REJECTED),
}


@pytest.mark.parametrize("current, wanted", list(itertools.product(JobState, JobState)))
def test_a_job_moves_only_as_its_state_machine_allows(current: str, wanted: str) -> None:
    job = Job(state=current)
    if (current, wanted) in JOB_MOVES:
        job.move_to(wanted, "why")
        assert job.state == wanted
        ended = wanted in (JobState.COMPLETED, JobState.FAILED, JobState.ABORTED)
        assert (job.finished_at is not None) == ended
        assert job.failure_reason == ("why" if ended else "")
    else:
        with pytest.raises(InvalidJobTransition, match=f"a job that is {current} cannot"):
            job.move_to(wanted)
        assert job.state == current


@pytest.mark.parametrize("current, wanted", list(itertools.product(RoundState, RoundState)))
def test_a_round_moves_only_as_its_state_machine_allows(current: str, wanted: str) -> None:
    rnd = Round(state=current)
    if (current, wanted) in ROUND_MOVES:
        rnd.move_to(wanted)
        assert rnd.state == wanted
        assert (rnd.closed_at is not None) == (wanted in (RoundState.CLOSED, RoundState.FAILED))
    else:
        with pytest.raises(InvalidJobTransition, match=f"a round that is {current} cannot"):
            rnd.move_to(wanted)
        assert rnd.state == current
        assert rnd.closed_at is None


@pytest.mark.parametrize("current, wanted", list(itertools.product(TaskState, TaskState)))
def test_a_site_task_moves_only_as_its_state_machine_allows(current: str, wanted: str) -> None:
    task = SiteTask(state=current)
    allowed = (current, wanted) in TASK_MOVES
    assert (current in SiteTask.states_that_move_to(wanted)) == allowed
    if allowed:
        task.move_to(wanted, "why")
        assert (task.state, task.reason) == (wanted, "why")
    else:
        with pytest.raises(InvalidJobTransition, match=f"a task that is {current} cannot"):
            task.move_to(wanted)
        assert task.state == current
