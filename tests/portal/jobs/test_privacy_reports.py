"""What a site's agent reports of its privacy enforcement in a job, as the portal keeps and
shows it: the ledger's report in an uploaded result, a round the site declines for its budget,
and the acceptance of a job the site's policy refuses. Sites sign their requests; Celery runs
inline, so a job moves on as a worker would move it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant

from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import BUDGET_EXHAUSTED, PrivacyPolicy
from client_agent.privacy.release import json_report
from client_agent.wire import write_model_file
from jobs.models import JobSite, JobState, SiteTask, TaskState
from sites.models import AuditEvent
from tests.portal.jobs_api_world import (
    LEAD,
    MEMBER,
    ORG_ADMIN,
    SITE_IN,
    World,
    build_world,
    make_bundle,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

POLICY = PrivacyPolicy(
    clip_norm=1.0, noise_multiplier=1.1, max_epsilon=30.0, exclude_tensors=("n",), sha256="c" * 64
)


def ledger_report(tmp: Path, policy: PrivacyPolicy, releases: int) -> dict[str, Any]:
    """The report a site's ledger gives after ``releases`` rounds, as the wire carries it."""
    ledger = PrivacyLedger(tmp / f"ledger-{releases}.json")
    report: dict[str, Any] = {}
    for number in range(releases):
        report = ledger.record("a-job", round=number, policy=policy)
    return json_report(report)


def opacus_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The accountant's ε for (σ, q = 1, steps, δ), computed here apart from the portal."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    return float(accountant.get_epsilon(delta=delta))


def private_update(tmp: Path, privacy: Any, *, w: float = 1.0) -> bytes:
    """An update whose tensor ``n`` stayed at the site, carrying ``privacy`` in its meta."""
    path = tmp / "private-update.safetensors"
    meta = {"NUM_STEPS_CURRENT_ROUND": 1.0, PRIVACY_META_KEY: privacy}
    write_model_file(path, FLModel(params={"w": torch.tensor([w, w])}, meta=meta))
    data = path.read_bytes()
    path.unlink()
    return data


def upload(world: World, site: Any, number: int, data: bytes) -> Any:
    return world.agent(site, "PUT", f"{world.a}/rounds/{number}/update/", raw=data)


def report_policy(world: World, site: Any, policy: PrivacyPolicy, history: Any = ()) -> None:
    body = {"policy": policy.to_json(), "project_history": [list(s) for s in history]}
    response = world.agent(site, "POST", "/api/v1/agent/privacy-policy/", body)
    assert response.status_code == 200, response.json()


def participant(world: World, name: str) -> dict[str, Any]:
    listed = world.call(MEMBER, "GET", f"{world.j}/sites/").json()["results"]
    return next(entry for entry in listed if entry["site"] == name)


def test_the_report_an_upload_carries_is_kept_and_shown_with_the_accountants_epsilon(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, min_clients=3, num_rounds=2)
    site = world.sites[0]
    for number in (0, 1):
        privacy = {**ledger_report(tmp_path, POLICY, number + 1), "excluded": ["n"]}
        assert upload(world, site, number, private_update(tmp_path, privacy)).status_code == 202
        for other in world.sites[1:]:
            assert upload(world, other, number, _plain_update(tmp_path)).status_code == 202

    assert world.job is not None
    world.job.refresh_from_db()
    assert world.job.state == JobState.COMPLETED
    tasks = SiteTask.objects.filter(site=site.site, round__job=world.job).order_by("round__number")
    assert [t.state for t in tasks] == [TaskState.ACCEPTED, TaskState.ACCEPTED]
    shown = participant(world, "site-1")
    expected = opacus_epsilon(1.1, 2, POLICY.delta)
    assert shown["privacy"]["epsilon"] == pytest.approx(expected, abs=1e-6)
    assert shown["privacy"]["releases"] == 2
    assert (shown["privacy"]["max_epsilon"], shown["privacy"]["excluded"]) == (30.0, 1)
    assert [t["privacy_epsilon"] for t in shown["tasks"]] == pytest.approx(
        [opacus_epsilon(1.1, 1, POLICY.delta), expected], abs=1e-6
    )
    assert participant(world, "site-2")["privacy"] is None
    site.site.refresh_from_db()
    assert site.site.privacy_project_history == [[1.1, 1.0, 2]]
    assert site.site.privacy_project_epsilon == pytest.approx(expected, abs=1e-6)
    # The first excluded tensor of the job at the site is audited; the second round's not again.
    (event,) = AuditEvent.objects.filter(action="privacy.tensors_excluded")
    assert event.details == {
        "site": "site-1",
        "job": str(world.job.uid),
        "round": 0,
        "names": ["n"],
        "count": 1,
    }
    assert event.actor_site_id == site.site.pk


def _plain_update(tmp: Path) -> bytes:
    path = tmp / "plain-update.safetensors"
    params = {"w": torch.tensor([3.0, 3.0]), "n": torch.tensor(4)}
    write_model_file(path, FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1.0}))
    data = path.read_bytes()
    path.unlink()
    return data


def test_a_malformed_report_is_not_kept_and_the_update_is_still_judged(tmp_path: Path) -> None:
    world = build_world(tmp_path, min_clients=3, num_rounds=1)
    bad = {**ledger_report(tmp_path, POLICY, 1), "delta": 2.0}
    site = world.sites[0]
    path = tmp_path / "bad.safetensors"
    params = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(4)}
    write_model_file(path, FLModel(params=params, meta={PRIVACY_META_KEY: bad}))

    assert upload(world, site, 0, path.read_bytes()).status_code == 202

    task = SiteTask.objects.get(site=site.site, round__job=world.job)
    assert (task.state, task.privacy) == (TaskState.ACCEPTED, {})
    assert JobSite.objects.get(job=world.job, site=site.site).privacy == {}
    site.site.refresh_from_db()
    assert site.site.privacy_project_history == []


def test_a_round_declined_for_the_budget_is_audited_and_the_job_completes_on_the_others(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, min_clients=2, num_rounds=1)
    spent = ledger_report(tmp_path, POLICY, 3)
    reason = f"{BUDGET_EXHAUSTED}: one more round would bring this job's ε here past 30"
    status = f"{world.a}/rounds/0/status/"
    declining = world.sites[2]

    bad = world.agent(
        declining, "POST", status, {"state": "failed", "reason": reason, "privacy": {"delta": 0}}
    )
    wrong_state = world.agent(declining, "POST", status, {"state": "training", "privacy": spent})
    declined = world.agent(
        declining, "POST", status, {"state": "failed", "reason": reason, "privacy": spent}
    )
    for site in world.sites[:2]:
        assert upload(world, site, 0, _plain_update(tmp_path)).status_code == 202

    assert (bad.status_code, bad.json()["field"]) == (400, "privacy.delta")
    assert (wrong_state.status_code, wrong_state.json()["field"]) == (400, "privacy")
    assert declined.status_code == 200 and declined.json()["state"] == TaskState.FAILED
    assert world.job is not None
    world.job.refresh_from_db()
    assert world.job.state == JobState.COMPLETED
    task = SiteTask.objects.get(site=declining.site, round__job=world.job)
    assert (task.state, task.reason) == (TaskState.FAILED, reason)
    assert task.privacy["releases"] == 3
    (event,) = AuditEvent.objects.filter(action="privacy.round_declined")
    assert event.details == {
        "site": "site-3",
        "job": str(world.job.uid),
        "round": 0,
        "reason": reason,
    }
    assert event.actor_site_id == declining.site.pk
    shown = participant(world, "site-3")["privacy"]
    assert shown["epsilon"] == pytest.approx(opacus_epsilon(1.1, 3, POLICY.delta), abs=1e-6)


# A budget no round fits: one release at σ = 0.5 costs far more than ε = 0.5.
TIGHT = PrivacyPolicy(clip_norm=1.0, noise_multiplier=0.5, max_epsilon=0.5, sha256="d" * 64)


def test_auto_accept_declines_a_job_the_sites_policy_refuses(tmp_path: Path) -> None:
    world = build_world(tmp_path, start=False, submit=False)
    auto = world.sites[0]  # accepts jobs automatically
    report_policy(world, auto, TIGHT)

    submitted = world.call(LEAD, "POST", f"{world.p}/jobs/", multipart=make_bundle(tmp_path).form())

    assert submitted.status_code == 201, submitted.json()
    link = JobSite.objects.get(job__uid=submitted.json()["uid"], site=auto.site)
    assert link.decision == JobSite.Decision.DECLINED
    assert link.decision_reason.startswith(BUDGET_EXHAUSTED)
    event = AuditEvent.objects.get(action="job.site_decided", details__site="site-1")
    assert event.details["decision"] == "declined"
    assert event.details["reason"] == link.decision_reason


def test_a_person_accepting_a_job_the_sites_policy_refuses_gets_409_with_the_reason(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, start=False)
    other_project_only = PrivacyPolicy(projects=("cardiology",), sha256="e" * 64)
    report_policy(world, world.sites[1], other_project_only)
    report_policy(world, world.sites[2], TIGHT)

    by_project = world.call(
        ORG_ADMIN, "POST", f"{world.j}/sites/site-2/decision/", {"accept": True}
    )
    by_budget = world.call(ORG_ADMIN, "POST", f"{world.j}/sites/site-3/decision/", {"accept": True})
    declined = world.call(ORG_ADMIN, "POST", f"{world.j}/sites/site-3/decision/", {"accept": False})

    assert by_project.status_code == 409
    assert by_project.json()["code"] == "privacy_policy_refuses"
    assert "allows jobs of cardiology only" in by_project.json()["message"]
    assert by_budget.status_code == 409 and BUDGET_EXHAUSTED in by_budget.json()["message"]
    assert declined.status_code == 200
    decisions = dict(JobSite.objects.filter(job=world.job).values_list("site__name", "decision"))
    assert decisions["site-2"] == "pending" and decisions["site-3"] == "declined"
    # The job's page shows what the policy expects of the job at each site.
    expected = participant(world, "site-3")["privacy_expected"]
    assert expected["rounds_within"] == 0 and expected["refused"].startswith(BUDGET_EXHAUSTED)
    assert participant(world, "site-1")["privacy_expected"] is None


def test_the_expected_spend_of_a_job_that_fits(tmp_path: Path) -> None:
    world = build_world(tmp_path, start=False, num_rounds=2)
    report_policy(world, world.sites[1], POLICY, history=[(1.1, 1.0, 4)])

    expected = participant(world, "site-2")["privacy_expected"]

    assert expected["refused"] is None
    assert expected["expected_epsilon"] == pytest.approx(
        opacus_epsilon(1.1, 2, POLICY.delta), abs=1e-6
    )
    assert expected["rounds_within"] >= 2


def test_a_site_that_clips_without_noise_expects_an_unbounded_spend_shown_as_null(
    tmp_path: Path,
) -> None:
    # ε is unbounded there; JSON has no infinity, and the page must not fail for it.
    world = build_world(tmp_path, start=False, num_rounds=2)
    report_policy(world, world.sites[1], PrivacyPolicy(clip_norm=1.0, sha256="d" * 64))

    expected = participant(world, "site-2")["privacy_expected"]

    assert expected == {"expected_epsilon": None, "rounds_within": None, "refused": None}


def test_an_agent_sees_who_submitted_its_jobs_and_their_project(tmp_path: Path) -> None:
    world = build_world(tmp_path)

    (entry,) = world.call(SITE_IN, "GET", "/api/v1/agent/jobs/").json()

    assert (entry["submitter"], entry["project"]) == (LEAD, world.project.slug)
