"""Kicks gathered per process (``jobs.services.kicks.GatheredKicks``): the uploads of a moment
enqueue one check of their round, not one each, and nothing gathered is lost by the process
that gathered it, short of its being killed (the beat's resume then checks what waits)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from jobs import tasks as job_tasks
from jobs.models import TaskState
from jobs.services import rounds
from jobs.services import tasks as task_services
from jobs.services.kicks import GatheredKicks
from tests.portal.rounds_helpers import submit, three_sites, upload

if TYPE_CHECKING:
    from pytest_django.fixtures import Settings

GOOD = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}


class Kicked:
    """The keys kicked, in order, with the thread each was kicked in; ``wait`` for a count."""

    def __init__(self) -> None:
        self.keys: list[object] = []
        self.threads: list[threading.Thread] = []
        self.times: list[float] = []  # time.monotonic() of each key's kick
        self.changed = threading.Condition()

    def __call__(self, key: object) -> None:
        with self.changed:
            self.keys.append(key)
            self.threads.append(threading.current_thread())
            self.times.append(time.monotonic())
            self.changed.notify_all()

    def wait(self, count: int) -> list[object]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.keys) >= count, timeout=10)
            return list(self.keys)


def test_the_kicks_of_a_moment_go_once_for_each_key_after_the_wait() -> None:
    kicked = Kicked()
    gathered = GatheredKicks(kicked, lambda: 0.1)
    started = time.monotonic()
    for key in (7, 8, 7, 7, 8, 9):
        gathered.add(key)
    assert kicked.keys == []  # the callers never wait for the enqueue

    assert kicked.wait(3) == [7, 8, 9]  # in the order of their first kick
    assert time.monotonic() - started >= 0.1
    assert threading.current_thread() not in kicked.threads

    gathered.add(7)  # a kick after the flush starts a new gathering
    assert kicked.wait(4) == [7, 8, 9, 7]


def test_a_burst_that_is_over_goes_after_the_quiet_gap_not_the_whole_wait() -> None:
    kicked = Kicked()
    gathered = GatheredKicks(kicked, lambda: 5.0, quiet=lambda: 0.1)
    started = time.monotonic()
    for key in (7, 8, 7):
        gathered.add(key)
    assert kicked.wait(2) == [7, 8]
    waited = time.monotonic() - started
    assert 0.1 <= waited < 2.0  # the quiet gap after the last kick, not the 5 s


def test_a_steady_stream_is_gathered_until_the_whole_wait() -> None:
    kicked = Kicked()
    gathered = GatheredKicks(kicked, lambda: 0.8, quiet=lambda: 0.2)
    # A kick every 0.05 s for 1.5 s, never 0.2 s apart: the gathering ends 0.8 s after its
    # first kick (not 0.2 s after it), and the kicks after that start the next one.
    started = time.monotonic()
    for key in range(30):
        gathered.add(key)
        time.sleep(0.05)
    assert kicked.wait(30) == list(range(30))
    first_flush = kicked.times[0] - started
    assert 0.8 <= first_flush < 1.5, first_flush
    assert kicked.times[-1] - kicked.times[0] >= 0.1  # the last kicks went in a later one


def test_with_no_wait_each_kick_is_enqueued_at_once_in_the_callers_thread() -> None:
    kicked = Kicked()
    gathered = GatheredKicks(kicked, lambda: 0.0)
    gathered.add(7)
    gathered.add(7)
    assert kicked.keys == [7, 7]
    assert kicked.threads == [threading.current_thread()] * 2


def test_a_kick_the_broker_refuses_is_logged_and_the_others_still_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kicked = Kicked()

    def broker_down_for_8(key: object) -> None:
        if key == 8:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        kicked(key)

    gathered = GatheredKicks(broker_down_for_8, lambda: 0.01)
    with caplog.at_level(logging.WARNING, logger="jobs.services.kicks"):
        for key in (8, 9):
            gathered.add(key)
        assert kicked.wait(1) == [9]
    assert "a kick was not enqueued" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("eager_celery", "media")
def test_the_uploads_of_a_moment_enqueue_one_check_of_their_round_which_decides_them_all(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)  # its round 1 opens
    settings.FEDPORTAL_UPDATE_CHECK_GATHER_SECONDS = 0.5  # longer than three uploads take
    kicked = Kicked()
    monkeypatch.setattr(job_tasks.round_updates_check_task, "delay", kicked)

    stored = [upload(job, site, 0, GOOD) for site in sites]
    assert {task.state for task in stored} == {TaskState.UPLOADED}
    (round_id,) = kicked.wait(1)
    assert round_id == stored[0].round_id
    time.sleep(0.2)
    assert kicked.keys == [round_id]  # one check for the three

    decided = rounds.round_updates_check(round_id=round_id)  # the worker's run of it
    assert decided == {task.pk: TaskState.ACCEPTED for task in stored}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("eager_celery", "media")
def test_uploads_whose_gathered_check_was_lost_are_checked_once_by_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    # The portal process is killed while it gathers: its kicks never go.
    lost: GatheredKicks[int] = GatheredKicks(lambda round_id: None, lambda: 0.0)
    monkeypatch.setattr(task_services, "UPDATE_CHECKS", lost)
    enqueued: list[int] = []
    monkeypatch.setattr(job_tasks.round_updates_check_task, "delay", enqueued.append)
    stored = [upload(job, site, 0, GOOD) for site in sites[:2]]
    assert enqueued == []

    rounds.jobs_resume()  # what the beat does every FEDPORTAL_RESUME_SECONDS

    assert enqueued == [stored[0].round_id]  # one check for the round's two waiting uploads
