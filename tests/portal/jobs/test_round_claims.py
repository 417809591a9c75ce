"""A round's aggregation is done by one worker at a time, and handed on when that worker dies.

The claim is a lease in the round's row (``jobs.services.claims``): renewed while the worker
works, lapsed when it stops, and the workers' watchdog kicks the round whose claim lapsed.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from fedportal.settings.base import env_float
from jobs.models import Job, JobState, Round, RoundState
from jobs.services import claims, rounds
from tests.portal.rounds_helpers import submit, three_sites, upload

if TYPE_CHECKING:
    from pytest_django.fixtures import Settings

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

ONE = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}


def aggregating(tmp_path: Path) -> tuple[Job, Round]:
    """A job whose first round has two of three updates in and is due for aggregation, which
    no worker has started."""
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=2, num_rounds=1)
    for site in sites[:-1]:
        upload(job, site, 0, ONE)
    rnd = job.rounds.get()
    Round.objects.filter(pk=rnd.pk).update(state=RoundState.AGGREGATING)
    return job, rnd


def held_by(rnd: Round, holder: str, seconds_left: float) -> None:
    Round.objects.filter(pk=rnd.pk).update(
        claim_holder=holder, claim_expires_at=timezone.now() + timedelta(seconds=seconds_left)
    )


def test_a_second_worker_leaves_a_round_another_is_aggregating(tmp_path: Path) -> None:
    job, rnd = aggregating(tmp_path)
    held_by(rnd, "other-host:4242:live", seconds_left=60)

    assert rounds.job_advance(job_id=job.pk) == rounds.Advance(
        rounds.Step.NOTHING, "nothing: another worker is aggregating the round"
    )
    rnd.refresh_from_db()
    assert rnd.aggregation_attempts == 0
    assert rnd.claim_holder == "other-host:4242:live"  # untouched


def test_a_round_whose_holder_stopped_renewing_is_taken_over(tmp_path: Path) -> None:
    job, rnd = aggregating(tmp_path)
    held_by(rnd, "other-host:4242:dead", seconds_left=-0.1)

    assert rounds.job_advance(job_id=job.pk) == rounds.Advance(rounds.Step.CLOSED, "closed round 1")
    rnd.refresh_from_db()
    assert rnd.state == RoundState.CLOSED
    assert rnd.aggregation_attempts == 1
    assert (rnd.claim_holder, rnd.claim_expires_at) == ("", None)  # given back


def test_the_lease_is_renewed_while_the_worker_works(tmp_path: Path, settings: Settings) -> None:
    settings.FEDPORTAL_CLAIM_LEASE_SECONDS = 0.3
    _, rnd = aggregating(tmp_path)

    with claims.round_claim(rnd.pk) as claimed:
        assert claimed
        holder = Round.objects.get(pk=rnd.pk).claim_holder
        assert holder
        time.sleep(1.2)  # four leases: only renewals keep it
        row = Round.objects.get(pk=rnd.pk)
        assert row.claim_holder == holder
        assert row.claim_expires_at is not None and row.claim_expires_at > timezone.now()
        with claims.round_claim(rnd.pk) as second:
            assert not second  # another worker, meanwhile
        assert claims.lapsed_claims_kick() == []

    # Given back, still aggregating (as after an error a retry takes up): nobody holds it,
    # and the watchdog kicks it after one lease if nothing did meanwhile.
    row = Round.objects.get(pk=rnd.pk)
    assert row.claim_holder == ""
    assert row.claim_expires_at is not None and row.claim_expires_at > timezone.now()


def test_a_claim_given_back_on_an_open_round_leaves_no_deadline(tmp_path: Path) -> None:
    # A protected round's summing is claimed while the round is open: given back, the
    # watchdog has nothing to kick there.
    _, rnd = aggregating(tmp_path)
    Round.objects.filter(pk=rnd.pk).update(state=RoundState.OPEN)
    with claims.round_claim(rnd.pk) as claimed:
        assert claimed
    row = Round.objects.get(pk=rnd.pk)
    assert (row.claim_holder, row.claim_expires_at) == ("", None)


def test_an_ended_round_cannot_be_claimed(tmp_path: Path) -> None:
    _, rnd = aggregating(tmp_path)
    Round.objects.filter(pk=rnd.pk).update(state=RoundState.CLOSED)
    with claims.round_claim(rnd.pk) as claimed:
        assert not claimed


def test_the_watchdog_hands_on_a_round_whose_worker_died_once(tmp_path: Path) -> None:
    job, rnd = aggregating(tmp_path)
    held_by(rnd, "other-host:4242:dead", seconds_left=-0.1)

    assert claims.lapsed_claims_kick() == [job.pk]  # eager: the kick closed the round

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    assert Round.objects.get(pk=rnd.pk).state == RoundState.CLOSED
    assert claims.lapsed_claims_kick() == []


def test_the_watchdog_kicks_a_lapse_once_whichever_worker_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import tasks as job_tasks

    job, rnd = aggregating(tmp_path)
    held_by(rnd, "other-host:4242:dead", seconds_left=-0.1)
    kicked: list[int] = []
    monkeypatch.setattr(job_tasks.job_advance_task, "delay", kicked.append)

    assert claims.lapsed_claims_kick() == [job.pk]
    assert claims.lapsed_claims_kick() == []  # re-armed: the next look is a lease later
    assert kicked == [job.pk]
    row = Round.objects.get(pk=rnd.pk)
    assert row.claim_holder == ""  # claimable at once by the kicked task
    assert row.claim_expires_at is not None and row.claim_expires_at > timezone.now()

    # Nobody took it up (the kick was lost): one lease later it is kicked again.
    Round.objects.filter(pk=rnd.pk).update(claim_expires_at=timezone.now() - timedelta(seconds=1))
    assert claims.lapsed_claims_kick() == [job.pk]
    assert kicked == [job.pk, job.pk]


def test_the_watchdog_leaves_live_claims_and_rounds_not_due(tmp_path: Path) -> None:
    job, rnd = aggregating(tmp_path)
    held_by(rnd, "other-host:4242:live", seconds_left=60)
    assert claims.lapsed_claims_kick() == []

    # An open round nobody holds is waiting for its sites, not for a worker.
    Round.objects.filter(pk=rnd.pk).update(
        state=RoundState.OPEN,
        claim_holder="",
        claim_expires_at=timezone.now() - timedelta(seconds=1),
    )
    assert claims.lapsed_claims_kick() == []

    # A job that ended is nobody's business.
    Round.objects.filter(pk=rnd.pk).update(state=RoundState.AGGREGATING)
    Job.objects.filter(pk=job.pk).update(state=JobState.ABORTED)
    assert claims.lapsed_claims_kick() == []


def test_a_round_moved_to_aggregating_carries_a_deadline_for_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker that moves the round dies before it claims it: the watchdog sees a lapse.
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    died = RuntimeError("the worker died between the move and the claim")

    def dies(round_id: int) -> rounds.Advance:
        raise died

    monkeypatch.setattr(rounds, "_round_aggregate", dies)
    for site in sites:
        try:
            upload(job, site, 0, ONE)
        except RuntimeError as exc:
            assert exc is died
    rnd = job.rounds.get()
    assert rnd.state == RoundState.AGGREGATING
    assert rnd.claim_holder == ""
    assert rnd.claim_expires_at is not None
    assert rnd.claim_expires_at > timezone.now() - timedelta(seconds=1)


def test_the_watchdog_thread_looks_every_few_seconds(tmp_path: Path, settings: Settings) -> None:
    settings.FEDPORTAL_CLAIM_CHECK_SECONDS = 0.05
    job, rnd = aggregating(tmp_path)
    held_by(rnd, "other-host:4242:dead", seconds_left=0.2)
    watchdog = claims.Watchdog()
    watchdog.start()
    try:
        deadline = time.monotonic() + 20
        while Round.objects.get(pk=rnd.pk).state != RoundState.CLOSED:
            assert time.monotonic() < deadline, "the watchdog did not hand the round on"
            time.sleep(0.05)
    finally:
        watchdog.stop()
        watchdog.join(timeout=5)
    assert not any(t.name == "claim-watchdog" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize(
    ("value", "fault"),
    [("soon", "must be a number, got 'soon'"), ("0.5", "must be at least 1, got '0.5'")],
)
def test_a_lease_setting_that_makes_no_sense_stops_the_portal_naming_it(
    monkeypatch: pytest.MonkeyPatch, value: str, fault: str
) -> None:
    monkeypatch.setenv("FEDPORTAL_CLAIM_LEASE_SECONDS", value)
    with pytest.raises(ImproperlyConfigured, match=f"FEDPORTAL_CLAIM_LEASE_SECONDS {fault}"):
        env_float("FEDPORTAL_CLAIM_LEASE_SECONDS", 6.0, least=1.0)
