"""What people see of a job under secure aggregation: the approval page tells the site admin
that the site's updates are masked or encrypted and what that costs; the job page says which
protection the job uses and each round's cost; the REST rounds listing has the phases and
cost, never a key or a share."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from jobs.models import Round
from jobs.workflows.fedavg import FedAvg
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

PARAMETERS = 3  # jobs_api_world.INITIAL: w (2 values) and n (1)


def protected_world(tmp_path: Path, kind: str, *, start: bool) -> jw.World:
    params = FedAvg(min_clients=3, num_rounds=2, secure_aggregation=kind).to_params()
    return jw.build_world(tmp_path, start=start, params=params)


def page_text(world: jw.World, persona: str, url: str) -> str:
    client = Client()
    client.force_login(world.users[persona])
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    return html.unescape(response.content.decode())


@pytest.mark.parametrize(
    ("kind", "verb", "extra"),
    [("masking", "masks", PARAMETERS * 4), ("he", "encrypts", round(PARAMETERS * 76.81))],
)
def test_the_approval_page_tells_the_site_admin_what_leaves_and_what_it_costs(
    tmp_path: Path, kind: str, verb: str, extra: int
) -> None:
    world = protected_world(tmp_path, kind, start=False)
    assert world.job is not None

    page = page_text(world, jw.ORG_ADMIN, f"/jobs/{world.job.uid}/sites/site-2/review/")

    section = page[page.index('id="protection"') :]
    assert "the portal and its workers see only the sum of the sites' updates" in section
    assert f"site-2's agent {verb} its update before it leaves" in section
    assert f"about {extra} bytes more than a plain update" in section


def test_a_plain_job_says_nothing_of_protection(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    page = page_text(world, jw.ORG_ADMIN, f"/jobs/{world.job.uid}/sites/site-2/review/")
    assert 'id="protection"' not in page
    assert 'id="protection"' not in page_text(world, jw.MEMBER, f"/jobs/{world.job.uid}/")


def test_the_job_page_and_api_show_the_protection_and_each_rounds_cost(tmp_path: Path) -> None:
    world = protected_world(tmp_path, "masking", start=True)
    assert world.job is not None
    rnd = Round.objects.get(job=world.job, number=0)
    assert rnd.protection["phase"] == "keys"  # the first round opened protected
    rnd.protection = {
        **rnd.protection,
        "phase": "done",
        "roster": {"sites": ["site-1", "site-2", "site-3"], "keys": {"site-1": {"x": "SECRET"}}},
        "shared": ["site-1", "site-2", "site-3"],
        "survivors": ["site-1", "site-3"],
        "requests": {"site-1": {"survivors": ["site-1", "site-3"], "dropped": ["site-2"]}},
        "cost": {"extra_bytes_per_site": 2048, "unmask_seconds": 0.25},
    }
    rnd.save(update_fields=["protection"])

    page = page_text(world, jw.MEMBER, f"/jobs/{world.job.uid}/")

    assert "This job uses secure aggregation by masking (SecAgg+)" in page
    line = page[page.index('data-round="0"') :]
    line = line[: line.index("</li>")]
    assert "protected: 2 of 3 sites summed, 2.0 KB extra per site, sum opened in 0.25 s" in line

    listing: Any = world.call(jw.MEMBER, "get", f"/api/v1/jobs/{world.job.uid}/rounds/").json()
    rounds = listing["results"] if isinstance(listing, dict) else listing
    protection = rounds[0]["protection"]
    assert protection == {
        "kind": "masking",
        "phase": "done",
        "roster": ["site-1", "site-2", "site-3"],
        "shared": ["site-1", "site-2", "site-3"],
        "survivors": ["site-1", "site-3"],
        "cost": {"extra_bytes_per_site": 2048, "unmask_seconds": 0.25},
    }
    assert "SECRET" not in str(listing)
