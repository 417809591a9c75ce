"""A site admin in the dashboard: bulk accept/decline with a reason (each row on its own), a
declined job accepted after all until it starts, where each job's quorum stands, the site page
with its policy summary and the auto-accept setting, and the same rules through the API."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from common.exceptions import Conflict, ValidationFailed
from jobs.models import Job, JobSite
from jobs.services.participation import job_abort, site_job_decide
from jobs.services.submission import job_submit
from sites.models import AuditEvent, Site
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


def _client(world: jw.World, persona: str) -> Client:
    client = Client()
    client.force_login(world.users[persona])
    return client


def _second_job(world: jw.World, tmp: Path) -> Job:
    made = jw.make_bundle(tmp, name="second-job")
    return job_submit(
        project=world.project,
        submitted_by=world.users[jw.LEAD],
        spec=made.spec,
        initial_model=io.BytesIO(made.model),
        app_archive=io.BytesIO(made.app),
        sites=[s.site.name for s in world.sites],
    )


def _link(job: Job, site: str) -> JobSite:
    return JobSite.objects.get(job=job, site__name=site)


def _decide(
    client: Client, world: jw.World, links: list[JobSite], decision: str, reason: str
) -> Any:
    return client.post(
        f"/projects/{world.project.slug}/approvals/decide/",
        {"link": [str(link.pk) for link in links], "decision": decision, "reason": reason},
        follow=True,
    )


def test_bulk_decline_with_a_reason_then_accept_one_after_all(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    second = _second_job(world, tmp_path)
    client = _client(world, jw.ORG_ADMIN)
    page = client.get(f"/projects/{world.project.slug}/approvals/").content.decode()
    # Every pending decision at the org admin's sites is a row; the first job's site 1
    # accepted automatically, sites 2 and 3 wait.
    pending = JobSite.objects.filter(decision="pending").count()
    assert pending >= 4
    assert page.count('name="link"') == pending
    assert "1 / 2 / 0 (needs 3)" in page

    chosen = [_link(world.job, "site-2"), _link(second, "site-2")]
    response = _decide(client, world, chosen, "decline", "  no GPU free this week ")

    text = response.content.decode()
    assert "Declined: api-job at site-2, second-job at site-2." in text
    for link in chosen:
        link.refresh_from_db()
        assert (link.decision, link.decision_reason) == ("declined", "no GPU free this week")
        assert link.decided_by == world.users[jw.ORG_ADMIN]
    events = AuditEvent.objects.filter(action="job.site_decided", actor=world.users[jw.ORG_ADMIN])
    assert [e.details for e in events.order_by("id")] == [
        {"site": "site-2", "decision": "declined", "reason": "no GPU free this week"}
    ] * 2
    # Both are now in "Declined, not started yet", with the reason, and the job that needs 3
    # of its 3 sites can no longer start.
    assert "Declined, not started yet" in text
    assert "“no GPU free this week”" in text
    assert "1 / 1 / 1 (needs 3)" in text
    assert "cannot start" in text
    assert _link(world.job, "site-3").decision == "pending"

    after_all = _decide(client, world, [_link(second, "site-2")], "accept", "")
    assert "Accepted: second-job at site-2." in after_all.content.decode()
    assert _link(second, "site-2").decision == "accepted"
    assert _link(world.job, "site-2").decision == "declined"
    last = AuditEvent.objects.filter(action="job.site_decided").latest("id")
    assert last.details == {"site": "site-2", "decision": "accepted"}


def test_one_row_that_fails_leaves_the_others_decided(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    second = _second_job(world, tmp_path)
    job_abort(job=world.job, actor=world.users[jw.ADMIN], reason="wrong data")
    client = _client(world, jw.ORG_ADMIN)

    response = _decide(
        client, world, [_link(world.job, "site-3"), _link(second, "site-3")], "accept", ""
    )

    text = response.content.decode()
    assert "Accepted: second-job at site-3." in text
    assert "Not decided: api-job at site-3: the job is aborted; sites decide before it starts" in (
        text
    )
    assert _link(second, "site-3").decision == "accepted"
    assert _link(world.job, "site-3").decision == "pending"


def test_who_may_decide_in_bulk(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    link = _link(world.job, "site-2")
    url = f"/projects/{world.project.slug}/approvals/decide/"
    body = {"link": [str(link.pk)], "decision": "decline", "reason": ""}

    member = _client(world, jw.MEMBER).post(url, body, follow=True).content.decode()
    assert "Not decided: api-job at site-2: Only the site&#x27;s org admins" in member
    assert _client(world, jw.OUTSIDER).post(url, body).status_code == 404
    anonymous = Client().post(url, body)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    # A row id of a job the person cannot see is not decided, and said so.
    other = _client(world, jw.ADMIN).post(
        url, {"link": ["999999"], "decision": "decline"}, follow=True
    )
    assert "1 ticked row(s) are not jobs of this project you can see" in other.content.decode()
    link.refresh_from_db()
    assert link.decision == "pending"


def test_a_bad_reason_decides_nothing(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    client = _client(world, jw.ORG_ADMIN)
    links = [_link(world.job, "site-2"), _link(world.job, "site-3")]

    too_long = _decide(client, world, links, "decline", "x" * 1001)

    assert "Nothing was decided" in too_long.content.decode()
    assert {link.decision for link in JobSite.objects.filter(pk__in=[x.pk for x in links])} == {
        "pending"
    }
    with pytest.raises(ValidationFailed) as control:
        site_job_decide(job=world.job, site=links[0].site, accept=False, reason="a\x1b[2Jb")
    assert control.value.field == "reason"


def test_a_decision_changes_both_ways_until_the_job_starts_and_never_after(
    tmp_path: Path,
) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    site = _link(world.job, "site-2").site
    admin = world.users[jw.ORG_ADMIN]
    for accept in (True, False, True):
        site_job_decide(job=world.job, site=site, accept=accept, decided_by=admin)
        assert _link(world.job, "site-2").decision == ("accepted" if accept else "declined")
    assert AuditEvent.objects.filter(action="job.site_decided", actor=admin).count() == 3


def test_no_decision_changes_once_the_job_runs(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=True)
    assert world.job is not None and world.job.state == "running"
    link = _link(world.job, "site-2")

    with pytest.raises(Conflict):
        site_job_decide(job=world.job, site=link.site, accept=False, decided_by=None)
    assert _link(world.job, "site-2").decision == "accepted"


def test_the_api_takes_a_reason_and_shows_it(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    path = f"{world.j}/sites/site-2/decision/"

    bad = world.call(jw.ORG_ADMIN, "POST", path, {"accept": False, "reason": "a\x07b"})
    assert bad.status_code == 400 and bad.json()["field"] == "reason"
    assert _link(world.job, "site-2").decision == "pending"

    done = world.call(jw.ORG_ADMIN, "POST", path, {"accept": False, "reason": "audit pending"})
    assert done.status_code == 200
    assert (done.json()["decision"], done.json()["decision_reason"]) == (
        "declined",
        "audit pending",
    )


def test_the_site_page_shows_its_policy_and_its_admins_change_auto_accept(
    tmp_path: Path,
) -> None:
    world = jw.build_world(tmp_path, start=False)
    site = Site.objects.get(project=world.project, name="site-2")
    url = f"/projects/{world.project.slug}/sites/{site.pk}/"

    member_page = _client(world, jw.MEMBER).get(url).content.decode()
    assert "a site admin, job by job" in member_page
    assert "api-job" in member_page  # the site's jobs, with its decision
    assert "Save the settings" not in member_page
    assert _client(world, jw.OUTSIDER).get(url).status_code == 404
    foreign = Site.objects.get(name="site-q")
    assert (
        _client(world, jw.ADMIN)
        .get(f"/projects/{world.project.slug}/sites/{foreign.pk}/")
        .status_code
        == 404
    )

    settings_url = f"{url}settings/"
    assert _client(world, jw.MEMBER).post(settings_url, {"auto_accept_jobs": "on"}).status_code == (
        403
    )
    site.refresh_from_db()
    assert site.auto_accept_jobs is False

    org_admin = _client(world, jw.ORG_ADMIN)
    assert "Save the settings of site-2" in org_admin.get(url).content.decode()
    saved = org_admin.post(settings_url, {"auto_accept_jobs": "on"}, follow=True)
    assert "The settings of site-2 were saved." in saved.content.decode()
    assert "the site&#x27;s agent, automatically" in saved.content.decode()
    site.refresh_from_db()
    assert site.auto_accept_jobs is True
    event = AuditEvent.objects.filter(action="site.updated").latest("id")
    assert event.actor == world.users[jw.ORG_ADMIN]
    assert event.details == {"changes": {"auto_accept_jobs": True}}
    # Unticked: off again.
    org_admin.post(settings_url, {})
    site.refresh_from_db()
    assert site.auto_accept_jobs is False


def test_the_waiting_decisions_come_a_page_at_a_time_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dashboard.views import approvals

    monkeypatch.setattr(approvals, "DECISIONS_PAGE", 1)
    world = jw.build_world(tmp_path, start=False)
    client = _client(world, jw.ORG_ADMIN)
    url = f"/projects/{world.project.slug}/approvals/"

    first = client.get(url)
    second = client.get(f"{url}?page=2")

    assert [row.link.site.name for row in first.context["pending"]] == ["site-2"]
    assert [row.link.site.name for row in second.context["pending"]] == ["site-3"]
    assert "2 decisions waiting, oldest first; page 1 of 2." in first.content.decode()
    assert 'href="?page=2"' in first.content.decode()
