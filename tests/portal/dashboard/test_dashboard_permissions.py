"""Who may open each of a job's dashboard URLs, by status code: the project's people read them
(200), another project's admin gets 404 (as the API's), anonymous people are sent to sign in,
and actions need their role (403 otherwise). Adding a URL under ``jobs/<uid>/`` means adding a
row here; a route without one fails ``test_every_job_url_has_a_row``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from django.test import Client
from django.urls import URLPattern

from dashboard import urls
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

JOB_ROUTE = "jobs/<uuid:uid>/"
ANONYMOUS = jw.ANONYMOUS
LOGIN = 0  # sent to the sign-in page
PEOPLE = (jw.ADMIN, jw.LEAD, jw.OTHER_LEAD, jw.MEMBER, jw.ORG_ADMIN, jw.OUTSIDER)


def readers(ok: int = 200, **others: int) -> dict[str, int]:
    codes = {persona: ok for persona in PEOPLE}
    codes.update({jw.OUTSIDER: 404, ANONYMOUS: LOGIN, **others})
    return codes


SITE_ADMINS_ONLY = {jw.LEAD: 403, jw.OTHER_LEAD: 403, jw.MEMBER: 403}


@dataclass(frozen=True)
class Row:
    method: str
    suffix: str  # after /jobs/<uid>/
    expected: dict[str, int]


ROWS: dict[str, Row] = {
    "job": Row("GET", "", readers()),
    "job-rounds": Row("GET", "rounds/", readers()),
    "job-models": Row("GET", "models/", readers()),
    "job-logs": Row("GET", "logs/", readers()),
    "job-metrics": Row("GET", "metrics.json", readers()),
    "job-metrics-csv": Row("GET", "metrics.csv", readers()),
    "job-site-log": Row("GET", "sites/site-1/log.txt", readers()),
    "job-log-search": Row("GET", "logs/search/?q=x", readers()),
    "job-metric-table": Row("GET", "metric-table.csv", readers()),
    "job-round-sites": Row("GET", "round-sites/", readers()),
    "job-record": Row("GET", "record.json", readers()),
    "job-abort": Row(
        "POST", "abort/", readers(302, **{jw.OTHER_LEAD: 403, jw.MEMBER: 403, jw.ORG_ADMIN: 403})
    ),
    "job-labels": Row(
        "POST", "labels/", readers(302, **{jw.OTHER_LEAD: 403, jw.MEMBER: 403, jw.ORG_ADMIN: 403})
    ),
    "approval": Row("GET", "sites/site-2/review/", readers(**SITE_ADMINS_ONLY)),
    "approval-decide": Row("POST", "sites/site-2/decide/", readers(302, **SITE_ADMINS_ONLY)),
}


def test_every_job_url_has_a_row() -> None:
    routes = {
        pattern.name
        for pattern in urls.urlpatterns
        if isinstance(pattern, URLPattern) and str(pattern.pattern).startswith(JOB_ROUTE)
    }
    assert routes
    assert routes - set(ROWS) == set(), "add rows for these job URLs"
    for name, row in ROWS.items():
        assert set(row.expected) == {*PEOPLE, ANONYMOUS}, name


@pytest.mark.parametrize("name", sorted(ROWS))
def test_who_may_open_what(name: str, tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    row = ROWS[name]
    url = f"/jobs/{world.job.uid}/{row.suffix}"
    for persona, expected in row.expected.items():
        client = Client()
        if persona != ANONYMOUS:
            client.force_login(world.users[persona])
        response = client.generic(
            row.method,
            url,
            data="decision=accept" if row.method == "POST" else "",
            content_type="application/x-www-form-urlencoded",
        )
        if expected == LOGIN:
            assert response.status_code == 302, (persona, response.status_code)
            assert response["Location"].startswith("/login/"), persona
        else:
            assert response.status_code == expected, (persona, response.status_code)
            if expected == 302:
                assert not response["Location"].startswith("/login/"), persona
