"""One rule for the project a URL names (``sites.selectors.project_visible_to``): the sites API,
the jobs API, the dashboard's pages and its live socket all take the project's slug or its
numeric id, and all answer "not found" alike for another project and for junk."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from django.test import Client

from dashboard.consumers import groups_for
from fedportal.events import project_group, sites_group
from tests.portal.api_world import LEAD, World

pytestmark = pytest.mark.django_db


def answers(world: World, ref: str) -> dict[str, object]:
    """What each surface answers the lead (a member of project P) for ``ref``."""
    path = quote(ref, safe="")
    page = Client()
    page.force_login(world.users[LEAD])
    sites = world.call(LEAD, "GET", f"/api/v1/projects/{path}/sites/")
    return {
        "sites API": sites.status_code,
        "sites": sorted(s["name"] for s in sites.json()["results"])
        if sites.status_code == 200
        else None,
        "jobs API": world.call(LEAD, "GET", f"/api/v1/projects/{path}/jobs/").status_code,
        "dashboard": page.get(f"/projects/{path}/").status_code,
        "socket": groups_for(world.users[LEAD], {"slug": ref}),
    }


@pytest.mark.parametrize("by", ["slug", "id"])
def test_the_project_is_found_by_its_slug_or_its_id_everywhere(sites_world: World, by: str) -> None:
    p = sites_world.project
    ref = p.slug if by == "slug" else str(p.pk)

    assert answers(sites_world, ref) == {
        "sites API": 200,
        "sites": ["site-a", "site-b", "site-r"],
        "jobs API": 200,
        "dashboard": 200,
        "socket": [project_group(p.pk), sites_group(p.pk)],
    }


NOT_FOUND = {"sites API": 404, "sites": None, "jobs API": 404, "dashboard": 404, "socket": None}


@pytest.mark.parametrize(
    "ref",
    [
        "another project's slug",
        "another project's id",
        "no-such-project",
        "not a slug",
        "x" * 65,
        "9" * 30,  # past the database's integer range
        "-1",
    ],
)
def test_another_project_and_junk_are_not_found_everywhere(sites_world: World, ref: str) -> None:
    named = {
        "another project's slug": sites_world.other.slug,
        "another project's id": str(sites_world.other.pk),
    }

    assert answers(sites_world, named.get(ref, ref)) == NOT_FOUND
