"""What the dashboard's tables show beside each model (``dashboard.presenters``), read off the
pages: a project's roles and counts, a site's online badge, an API token's state, and a job's
grid, models and logs."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone

from jobs.models import Job, JobSite
from jobs.services.participation import job_abort
from jobs.services.submission import job_submit
from jobs.services.telemetry import log_lines_record
from sites import services
from sites.models import ApiToken, Role, Site
from tests.portal import api_world as sw
from tests.portal import jobs_api_world as jw
from tests.portal.factories import MembershipFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]


def page(user, url: str) -> str:
    client = Client()
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 200, url
    return response.content.decode()


def row_cells(html: str, marker: str) -> list[str]:
    """The text of each cell after ``marker`` in its table row, tags dropped."""
    row = html.split(marker, 1)[1].split("</tr>", 1)[0]
    found = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
    return [" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in found]


def test_the_projects_list_shows_my_roles_and_each_projects_live_counts() -> None:
    world = sw.build_world()
    # The member of org A is also a lead in org B: both roles, sorted.
    MembershipFactory.create(user=world.users[sw.MEMBER], organization=world.org_b, role=Role.LEAD)
    services.site_revoke(site=world.site_b.site, reason="left", revoked_by=world.users[sw.ADMIN])

    mine = page(world.users[sw.MEMBER], "/")
    # site-a still enrolled (site-b revoked, site-r only requested); no job yet.
    assert row_cells(mine, ">Hospital Net</a>") == ["lead, member", "1", "0"]
    assert "Other Net" not in mine
    theirs = page(world.users[sw.OUTSIDER], "/")
    assert row_cells(theirs, ">Other Net</a>") == ["project_admin", "1", "0"]


@pytest.mark.django_db(transaction=True)
def test_the_projects_list_counts_only_active_jobs(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)  # the lead's job runs
    made = jw.make_bundle(tmp_path)
    for name in ("second", "stopped"):
        job_submit(
            project=world.project,
            submitted_by=world.users[jw.LEAD],
            spec={**made.spec, "name": name},
            initial_model=io.BytesIO(made.model),
            app_archive=io.BytesIO(made.app),
            sites=[s.site.name for s in world.sites],
        )
    job_abort(job=Job.objects.get(name="stopped"), actor=None, reason="test")
    # Sites 1 to 3 and the spare site-4 are enrolled.
    assert row_cells(page(world.users[jw.LEAD], "/"), ">Hospital Net</a>") == ["lead", "4", "2"]


def test_the_sites_page_shows_each_enrolled_sites_agent_online_or_offline() -> None:
    world = sw.build_world()
    now = timezone.now()
    Site.objects.filter(pk=world.site_a.site.pk).update(last_heartbeat=now)
    Site.objects.filter(pk=world.site_b.site.pk).update(last_heartbeat=now - dt.timedelta(days=1))
    html = page(world.users[sw.ADMIN], f"/projects/{world.project.slug}/sites/")
    listing = html.split('id="all-sites-heading"', 1)[1]
    assert row_cells(listing, 'data-site="site-a">')[3] == "online"
    assert row_cells(listing, 'data-site="site-b">')[3] == "offline"
    assert row_cells(listing, 'data-site="site-r">')[3] == "—"  # not enrolled: no agent
    rows = page(world.users[sw.ADMIN], f"/projects/{world.project.slug}/sites-status/")
    assert row_cells(rows, 'data-site="site-a"')[3] == "online"
    assert row_cells(rows, 'data-site="site-b"')[3] == "offline"


def test_the_api_tokens_page_shows_each_tokens_state() -> None:
    world = sw.build_world()
    user = world.users[sw.MEMBER]
    for name in ("live", "old", "gone"):
        services.api_token_create(user=user, name=name)
    ApiToken.objects.filter(user=user, name="old").update(
        expires_at=timezone.now() - dt.timedelta(minutes=1)
    )
    services.api_token_revoke(token=ApiToken.objects.get(user=user, name="gone"), revoked_by=user)
    html = page(user, "/api-tokens/")
    assert row_cells(html, '<th scope="row">live</th>')[-1] == "active Revoke"
    assert row_cells(html, '<th scope="row">old</th>')[-1] == "expired"
    assert row_cells(html, '<th scope="row">gone</th>')[-1].startswith("revoked 2")


@pytest.mark.django_db(transaction=True)
def test_the_job_page_shows_each_sites_agent_decision_tasks_and_dropped_log_lines(
    tmp_path: Path,
) -> None:
    world = jw.build_world(tmp_path)  # round 0 open, every site accepted and online
    job = world.job
    assert job is not None
    site_1, site_2 = world.sites[0].site, world.sites[1].site
    later = timezone.now() + dt.timedelta(seconds=1)
    Site.objects.filter(pk=site_1.pk).update(agent_disconnected_at=later)
    JobSite.objects.filter(job=job, site=site_2).update(log_lines_dropped=3)
    log_lines_record(job=job, site=site_2, lines=[{"text": "epoch 4"}])
    member = world.users[jw.MEMBER]

    grid = page(member, f"/jobs/{job.uid}/rounds/")
    assert row_cells(grid, '<tr data-site="site-1">') == [
        "site-1",
        "accepted",
        "offline",
        "assigned",
    ]
    assert row_cells(grid, '<tr data-site="site-2">') == [
        "site-2",
        "accepted",
        "online",
        "assigned",
    ]

    logs = page(member, f"/jobs/{job.uid}/logs/")
    site_2_log = logs.split('data-site="site-2"', 1)[1].split("</div>", 1)[0]
    assert "3 older lines dropped" in site_2_log and "epoch 4" in site_2_log
    site_1_log = logs.split('data-site="site-1"', 1)[1].split("</div>", 1)[0]
    assert "dropped" not in site_1_log

    models = page(member, f"/jobs/{job.uid}/models/")
    download = f'href="/api/v1/jobs/{job.uid}/models/0/download/"'
    assert download in models.split('data-model="0"', 1)[1].split("</tr>", 1)[0]

    whole = page(member, f"/jobs/{job.uid}/")
    assert row_cells(whole, '<tr data-site="site-1">')[2] == "offline"
    assert "3 older lines dropped" in whole and download in whole
