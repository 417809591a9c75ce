"""What a site admin and a job's people see of a site's privacy policy: the policy its agent
reported, on the site page, with ε each job spent of the site's cap; what a waiting job would
spend, on the approval pages (fits, fits partly, refused); each site's spend, kept tensors and
budget refusals on the job page; and a job's server-side (ε, δ)."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from client_agent.privacy import accounting
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import BUDGET_EXHAUSTED, PrivacyPolicy
from jobs.models import Job, JobSite, MetricPoint, Round
from jobs.services.submission import job_submit
from sites.models import Site
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

HOSPITAL_POLICY = """\
[update]
clip_norm = 1.0
noise_multiplier = 1.1
exclude_tensors = ["*.bias", "head.*"]

[budget]
delta = 1e-5
max_epsilon = 8.0
max_project_epsilon = 20.0

[output]
send_lines = false
"""


def _client(world: jw.World, persona: str) -> Client:
    client = Client()
    client.force_login(world.users[persona])
    return client


def site_policy(tmp: Path, text: str) -> PrivacyPolicy:
    """A policy as the agent reads it from the site's folder (with its file's sha256)."""
    folder = tmp / "site-folder"
    folder.mkdir(exist_ok=True)
    (folder / "privacy.toml").write_text(text)
    return PrivacyPolicy.in_folder(folder)


def report_policy(site: Site, policy: PrivacyPolicy) -> None:
    """What the portal stores when the site's agent reports its policy."""
    site.privacy_policy = policy.to_json()
    site.privacy_policy_reported_at = timezone.now()
    site.save(update_fields=["privacy_policy", "privacy_policy_reported_at"])


def _site(world: jw.World, name: str) -> Site:
    return Site.objects.get(project=world.project, name=name)


def record_spend(
    world: jw.World, tmp: Path, site: Site, policy: PrivacyPolicy, *, rounds: int, excluded: int
) -> dict[str, Any]:
    """The site's ledger after ``rounds`` releases of the world's job, stored on its link and
    the site as the portal stores the report an accepted upload carries."""
    assert world.job is not None
    folder = tmp / f"ledger-{site.name}"
    folder.mkdir(exist_ok=True)
    ledger = PrivacyLedger.in_folder(folder)
    report: dict[str, Any] = {}
    for number in range(rounds):
        report = ledger.record(str(world.job.uid), round=number, policy=policy)
    report["excluded"] = [f"layer{i}.bias" for i in range(excluded)]
    JobSite.objects.filter(job=world.job, site=site).update(privacy=report)
    site.privacy_project_history = report["project_history"]
    site.privacy_project_epsilon = report["project_epsilon"]
    site.save(update_fields=["privacy_project_history", "privacy_project_epsilon"])
    return report


def _text(response: Any) -> str:
    """The page as a reader sees its text: entities decoded."""
    return html.unescape(response.content.decode())


def _meter_values(html: str) -> list[float]:
    return [float(v) for v in re.findall(r'<meter class="budget-bar"[^>]* value="([^"]+)"', html)]


def _job(world: jw.World, tmp: Path, *, name: str, num_rounds: int) -> Job:
    made = jw.make_bundle(tmp, name=name, num_rounds=num_rounds)
    return job_submit(
        project=world.project,
        submitted_by=world.users[jw.LEAD],
        spec=made.spec,
        initial_model=io.BytesIO(made.model),
        app_archive=io.BytesIO(made.app),
        sites=[s.site.name for s in world.sites],
    )


def test_the_site_page_shows_the_reported_policy_and_the_budget_spent(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    site = _site(world, "site-2")
    policy = site_policy(tmp_path, HOSPITAL_POLICY)
    report_policy(site, policy)
    record_spend(world, tmp_path, site, policy, rounds=1, excluded=2)
    url = f"/projects/{world.project.slug}/sites/{site.pk}/"

    page = _text(_client(world, jw.MEMBER).get(url))

    # The policy in words, when it was reported and which file it was.
    assert "Gaussian, std 1.1 × clip norm" in page
    assert "whole update to L2 norm 1" in page
    assert "*.bias, head.*" in page
    assert "stay at the site" in page
    assert policy.sha256[:12] in page
    assert "only the site admin can change it, in <code>privacy.toml</code> at the site" in page
    # ε of one release at σ = 1.1, q = 1, δ = 1e-5, of the site's caps: the job's and the
    # project's, equal to the accountant's value.
    spent = accounting.epsilon_after(1.1, 1, 1e-5)
    assert f"ε {spent:.1f} of 8.0" in page
    assert f"ε {spent:.1f} of 20.0" in page
    assert all(abs(value - spent) < 1e-6 for value in _meter_values(page))
    assert len(_meter_values(page)) == 2
    budget = page[page.index('id="privacy-budget"') :]
    assert re.search(r"<td>1</td>\s*<td>2</td>", budget)  # one release, two tensors kept

    other = _client(world, jw.MEMBER).get(
        f"/projects/{world.project.slug}/sites/{_site(world, 'site-3').pk}/"
    )
    text = _text(other)
    assert "The site's agent has not reported a privacy policy." in text
    assert "No job has released an update under this site's privacy policy yet." in text


def test_a_spend_past_the_cap_is_marked(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    site = _site(world, "site-2")
    policy = site_policy(
        tmp_path, HOSPITAL_POLICY.replace("max_epsilon = 8.0", "max_epsilon = 4.0")
    )
    report_policy(site, policy)
    record_spend(world, tmp_path, site, policy, rounds=1, excluded=0)

    page = _text(
        _client(world, jw.ORG_ADMIN).get(f"/projects/{world.project.slug}/sites/{site.pk}/")
    )

    spent = accounting.epsilon_after(1.1, 1, 1e-5)
    assert spent > 4.0
    assert '<span class="budget over">' in page
    assert f"ε {spent:.1f} of 4.0" in page


def test_the_approval_page_says_what_the_job_will_spend(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    site = _site(world, "site-2")
    report_policy(
        site,
        site_policy(
            tmp_path,
            "[update]\nclip_norm = 1.0\nnoise_multiplier = 3.0\n[budget]\nmax_epsilon = 8.0\n",
        ),
    )
    assert world.job is not None and world.job.num_rounds == 2
    client = _client(world, jw.ORG_ADMIN)

    page = _text(client.get(f"/jobs/{world.job.uid}/sites/site-2/review/"))

    expected = accounting.epsilon_after(3.0, 2, 1e-5)
    assert f"This job will spend about ε = {expected:.1f} of your 8.0." in page
    assert "rounds fit this site" not in page
    assert "The project's jobs together have spent" not in page  # no project cap, no spend
    assert '<button type="submit" name="decision" value="accept">Accept for site-2</button>' in (
        page
    )
    listing = _text(client.get(f"/projects/{world.project.slug}/approvals/"))
    assert f"ε ≈ {expected:.1f} of 8.0" in listing
    # A site whose agent never reported a policy: nothing can be said.
    assert "no privacy policy reported" in listing
    unknown = _text(client.get(f"/jobs/{world.job.uid}/sites/site-3/review/"))
    assert "site-3's agent has not reported a privacy policy" in unknown


def test_a_job_that_fits_partly_says_which_rounds_will_be_declined(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    site = _site(world, "site-2")
    report_policy(
        site,
        site_policy(
            tmp_path,
            "[update]\nclip_norm = 1.0\nnoise_multiplier = 2.0\n[budget]\nmax_epsilon = 4.5\n",
        ),
    )
    job = _job(world, tmp_path, name="long-job", num_rounds=5)
    fit = accounting.steps_within(4.5, 2.0, 1e-5)
    assert 0 < fit < 5

    page = _text(_client(world, jw.ORG_ADMIN).get(f"/jobs/{job.uid}/sites/site-2/review/"))

    expected = accounting.epsilon_after(2.0, fit, 1e-5)
    assert f"This job will spend about ε = {expected:.1f} of your 4.5." in page
    assert f"Only {fit} of 5 rounds fit this site's budget; later rounds will be declined." in page


def test_a_job_the_policy_refuses_cannot_be_accepted(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    site = _site(world, "site-2")
    report_policy(
        site,
        site_policy(tmp_path, '[jobs]\nprojects = ["oncology"]\n[update]\nclip_norm = 1.0\n'),
    )
    assert world.job is not None
    client = _client(world, jw.ORG_ADMIN)
    url = f"/jobs/{world.job.uid}/sites/site-2/review/"

    page = _text(client.get(url))

    reason = "the site's privacy policy allows jobs of oncology only"
    assert f"site-2's privacy policy refuses this job: {reason}." in page
    assert re.search(r'<button[^>]*value="accept"[^>]*disabled[^>]*>Accept for site-2<', page)
    listing = _text(client.get(f"/projects/{world.project.slug}/approvals/"))
    assert f"refused by the site's privacy policy: {reason}" in listing

    # The portal refuses the accept itself (a form sent anyway), and says why.
    answer = client.post(
        f"/jobs/{world.job.uid}/sites/site-2/decide/",
        {"decision": "accept", "reason": ""},
        follow=True,
    )
    assert reason in _text(answer)
    assert JobSite.objects.get(job=world.job, site=site).decision == "pending"


def test_the_job_page_shows_each_sites_spend_and_its_budget_refusals(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)
    assert world.job is not None
    site_1, site_2 = _site(world, "site-1"), _site(world, "site-2")
    policy = site_policy(tmp_path, HOSPITAL_POLICY)
    for site in (site_1, site_2):
        report_policy(site, policy)
    record_spend(world, tmp_path, site_1, policy, rounds=1, excluded=3)
    # Site 2's agent declines round 1 for the project's budget, with its ledger's report.
    folder = tmp_path / "ledger-site-2"
    folder.mkdir()
    report = PrivacyLedger.in_folder(folder).report(str(world.job.uid), policy)
    declined = f"{BUDGET_EXHAUSTED}: one more round would bring the project's ε here to 21, over 20"
    answer = world.agent(
        world.sites[1],
        "POST",
        f"{world.a}/rounds/0/status/",
        {"state": "failed", "reason": declined, "privacy": {**report, "excluded": []}},
    )
    assert answer.status_code == 200, answer.json()

    page = _text(_client(world, jw.MEMBER).get(f"/jobs/{world.job.uid}/"))

    grid = page[page.index('id="task-grid"') :]
    row_1 = grid[grid.index('data-site="site-1"') : grid.index('data-site="site-2"')]
    spent = accounting.epsilon_after(1.1, 1, 1e-5)
    assert f"ε {spent:.1f} of 8.0" in row_1
    assert "3 tensors kept at the site" in row_1
    row_2 = grid[grid.index('data-site="site-2"') :]
    assert f"{declined}</small>" in row_2
    assert "ε 0 of 8.0" in row_2  # declined before its first release: nothing spent
    assert "Server-side DP" not in page
    # The refusal is in the audit log, with the site as its actor and the reason.
    audit = _text(_client(world, jw.ADMIN).get("/audit/?action=privacy.round_declined"))
    assert "1 event." in audit
    assert "site site-2" in audit
    assert declined in audit


def test_a_job_without_privacy_reports_has_no_privacy_columns(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)
    assert world.job is not None
    page = _text(_client(world, jw.MEMBER).get(f"/jobs/{world.job.uid}/"))
    assert 'data-field="privacy"' not in page
    assert "Tensors kept at the site" not in page


def test_the_job_page_states_the_server_side_epsilon_and_delta(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)
    assert world.job is not None
    Round.objects.filter(job=world.job, number=0).update(
        metrics={"privacy/epsilon": 2.4816, "privacy/delta": 1e-5, "privacy/clip_norm": 0.5}
    )

    page = _text(_client(world, jw.MEMBER).get(f"/jobs/{world.job.uid}/"))

    assert "Server-side DP: (ε, δ) after round 1 = (2.5, 1e-05)" in page
    # The aggregate's points chart ε round by round, as every round metric is charted.
    MetricPoint.objects.create(
        job=world.job,
        site=None,
        round_number=0,
        key="privacy/epsilon",
        value=2.4816,
        source=MetricPoint.Source.AGGREGATE,
    )
    charts = _client(world, jw.MEMBER).get(f"/jobs/{world.job.uid}/metrics.json").json()["charts"]
    assert charts["privacy/epsilon · by round"]["series"] == {"all sites": [[1, 2.4816]]}
