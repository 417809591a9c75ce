"""A job's records: each site's whole log, the log search, the metric table."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from django.test import AsyncClient, Client
from django.utils import timezone

from jobs import selectors
from jobs.models import JobState, LogLine, MetricPoint, Round, RoundState, SiteTask, TaskState
from jobs.services.participation import site_job_decide
from sites.models import Site, SiteState
from tests.portal import jobs_api_world as jw

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]


def as_user(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _store_lines(world: jw.World, site: Site, count: int) -> None:
    job = world.job
    assert job is not None
    LogLine.objects.bulk_create(
        LogLine(
            job=job,
            site=site,
            round_number=None if i == 0 else i // 100,
            stream=LogLine.Stream.AGENT if i == 0 else LogLine.Stream.SCRIPT,
            text=f"line {i}" if i != 5 else "two\nrows <b>",
        )
        for i in range(count)
    )


def test_the_whole_log_downloads_every_line_in_order(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    site, other = jobs_world.sites[0].site, jobs_world.sites[1].site
    _store_lines(jobs_world, site, 4500)  # more than the 200-line tail and two batches
    _store_lines(jobs_world, other, 3)
    url = f"/jobs/{job.uid}/sites/{site.name}/log.txt"

    response = as_user(jobs_world.users[jw.MEMBER]).get(url)
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/plain")
    assert "attachment;" in response["Content-Disposition"]
    rows = jw.body_of(response).decode().split("\n")
    assert rows[-1] == ""  # each row ends with a newline
    rows = rows[:-1]
    assert len(rows) == 4500
    assert rows[0].endswith(" round - agent | line 0")
    assert rows[1].endswith(" round 1 script | line 1")
    assert rows[5].endswith(" round 1 script | two\\nrows <b>")
    assert rows[4499].endswith(" round 45 script | line 4499")
    texts = [row.split(" | ", 1)[1] for row in rows]
    assert texts[6:] == [f"line {i}" for i in range(6, 4500)]

    page = as_user(jobs_world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/logs/").content.decode()
    assert f'href="{url}"' in page and "Download the whole log (4500 lines)" in page
    assert "Download the whole log (3 lines)" in page


def test_the_whole_log_streams_under_asgi_too(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    site = jobs_world.sites[0].site
    _store_lines(jobs_world, site, 2500)
    client = AsyncClient()
    client.force_login(jobs_world.users[jw.LEAD])

    async def fetch() -> tuple[int, bytes, bool]:
        response = await client.get(f"/jobs/{job.uid}/sites/{site.name}/log.txt")
        assert isinstance(response, StreamingHttpResponse)
        content = response.streaming_content
        assert isinstance(content, AsyncIterator)
        chunks = [chunk async for chunk in content]
        return response.status_code, b"".join(chunks), response.is_async

    status, body, is_async = async_to_sync(fetch)()
    assert status == 200 and is_async
    assert body.decode().count("\n") == 2500


def test_only_the_jobs_viewers_get_a_participants_log(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    site = jobs_world.sites[0].site
    url = f"/jobs/{job.uid}/sites/{site.name}/log.txt"
    assert as_user(jobs_world.users[jw.OUTSIDER]).get(url).status_code == 404
    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]
    member = as_user(jobs_world.users[jw.MEMBER])
    assert member.get(f"/jobs/{job.uid}/sites/no-such-site/log.txt").status_code == 404
    assert member.post(url).status_code == 405


def test_search_finds_exactly_the_lines_holding_the_text_and_escapes_them(
    jobs_world: jw.World,
) -> None:
    job = jobs_world.job
    assert job is not None
    one, two = jobs_world.sites[0].site, jobs_world.sites[1].site
    LogLine.objects.bulk_create(
        [
            LogLine(job=job, site=one, round_number=0, text="Loss <script>alert(1)</script>"),
            LogLine(job=job, site=one, round_number=1, text="accuracy 0.9"),
            LogLine(job=job, site=two, round_number=None, text="LOSS is 100%_done"),
            LogLine(job=job, site=two, round_number=2, text="nothing here"),
        ]
    )
    member = as_user(jobs_world.users[jw.MEMBER])
    url = f"/jobs/{job.uid}/logs/search/"

    page = member.get(url, {"q": "loss"}).content.decode()
    assert "2 lines match." in page
    assert "Loss &lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "LOSS is 100%_done" in page and "accuracy" not in page and "nothing here" not in page
    assert "<td>site-1</td>\n          <td>1</td>" in page  # rounds counted from 1

    page = member.get(url, {"q": "loss", "site": two.name}).content.decode()
    assert "1 line matches." in page and "LOSS is" in page and "Loss &lt;" not in page

    # LIKE's wildcards are plain text; no input breaks the page.
    assert "0 lines match." in member.get(url, {"q": "%_x"}).content.decode()
    assert "1 line matches." in member.get(url, {"q": "%_"}).content.decode()
    bad = member.get(url, {"q": "a\x00b", "site": "nowhere"})
    assert bad.status_code == 200
    assert (
        'id="id_q-error"' in bad.content.decode() and 'id="id_site-error"' in bad.content.decode()
    )
    assert "Matching lines" not in bad.content.decode()
    assert "Matching lines" not in member.get(url).content.decode()  # no search yet
    assert 'id="id_q-error"' in member.get(url, {"q": ""}).content.decode()
    assert as_user(jobs_world.users[jw.OUTSIDER]).get(url, {"q": "loss"}).status_code == 404


def test_search_says_how_many_match_beyond_the_first_500(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    _store_lines(jobs_world, jobs_world.sites[0].site, 700)
    page = as_user(jobs_world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/logs/search/", {"q": "LINE"})
    text = page.content.decode()
    assert "699 lines match; the first 500 are shown." in text
    assert text.count("<code>line ") == 500


# --- the metric table -----------------------------------------------------------------------


def _table_cells(page: str) -> list[list[str]]:
    """The metric table's rows as cell texts, header row first (a plain parse of our HTML)."""
    body = page.split('id="metric-table"', 1)[1].split("</table>", 1)[0]
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in body.split("<tr")[1:]]


def test_the_metric_table_shows_each_sites_value_by_round_and_downloads_the_same(
    jobs_world: jw.World,
) -> None:
    job = jobs_world.job
    assert job is not None
    job.num_rounds, job.total_rounds = 3, None
    job.save(update_fields=["num_rounds", "total_rounds"])
    one, two = jobs_world.sites[0].site, jobs_world.sites[1].site
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(job=job, site=one, round_number=0, key="loss", value=0.9),
            MetricPoint(job=job, site=one, round_number=1, key="loss", value=0.7),
            MetricPoint(job=job, site=one, round_number=1, key="loss", value=0.5),  # the later
            MetricPoint(job=job, site=two, round_number=0, key="loss", value=1.25),
            MetricPoint(job=job, site=None, round_number=0, key="loss", value=1.0),
            MetricPoint(job=job, site=one, round_number=0, key="acc", value=0.1),
            MetricPoint(job=job, site=one, round_number=4, key="=cmd", value=2.0),
            MetricPoint(job=job, site=one, key="loss", value=9.0, step=3),  # by step: not here
        ]
    )
    member = as_user(jobs_world.users[jw.MEMBER])
    sites = sorted(link.site.name for link in job.participants.select_related("site"))

    page = member.get(f"/jobs/{job.uid}/", {"metric": "loss"}).content.decode()
    rows = _table_cells(page)
    assert rows[0] == ["Site", "Round 1", "Round 2", "Round 3"]
    by_site = {row[0]: row[1:] for row in rows[1:]}
    assert list(by_site) == [*sites, "all sites"]
    assert by_site["site-1"] == ["0.9", "0.5", "—"]
    assert by_site["site-2"] == ["1.25", "—", "—"]
    assert by_site["all sites"] == ["1.0", "—", "—"]
    assert '<option value="acc">' in page and '<option value="loss" selected>' in page

    response = member.get(f"/jobs/{job.uid}/metric-table.csv", {"metric": "loss"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    downloaded = list(csv.reader(io.StringIO(response.content.decode())))
    assert downloaded[0] == ["site", "round 1", "round 2", "round 3"]
    assert downloaded[1:] == [
        [row[0], *("" if cell == "—" else cell for cell in row[1:])] for row in rows[1:]
    ]

    # A key that starts like a formula is written safe; an unknown key shows the first one.
    formula = list(
        csv.reader(
            io.StringIO(
                member.get(f"/jobs/{job.uid}/metric-table.csv", {"metric": "=cmd"}).content.decode()
            )
        )
    )
    assert formula[0][-1] == "round 5" and formula[1][1:] == ["", "", "", "", "2.0"]
    assert 'data-key="=cmd"' in member.get(f"/jobs/{job.uid}/", {"metric": "nope"}).content.decode()

    outsider = as_user(jobs_world.users[jw.OUTSIDER])
    assert outsider.get(f"/jobs/{job.uid}/metric-table.csv").status_code == 404


# --- a job that can never start -------------------------------------------------------------


def test_a_job_that_can_never_reach_min_clients_says_so(
    tmp_path: Path, media: Path, eager_celery: None
) -> None:
    world = jw.build_world(tmp_path, start=False)  # waits: site 1 accepted, 2 and 3 undecided
    job = world.job
    assert job is not None and job.state == JobState.WAITING and job.min_clients == 3
    member = as_user(world.users[jw.MEMBER])
    assert 'id="quorum-shortfall"' not in member.get(f"/jobs/{job.uid}/").content.decode()

    site_job_decide(
        job=job, site=world.sites[1].site, accept=False, decided_by=world.users[jw.ADMIN]
    )
    page = member.get(f"/jobs/{job.uid}/").content.decode()
    assert 'id="quorum-shortfall"' in page
    assert "only 2 sites can still take part" in page and "it needs 3 (min_clients)" in page

    # A revoked site cannot take part either, though it has not declined.
    Site.objects.filter(pk=world.sites[2].site.pk).update(state=SiteState.REVOKED)
    assert "only 1 site can still take part" in member.get(f"/jobs/{job.uid}/").content.decode()
    assert selectors.quorum_shortfall_of(job) == selectors.QuorumShortfall(possible=1, needed=3)

    job.move_to(JobState.ABORTED)
    job.save()
    assert selectors.quorum_shortfall_of(job) is None  # only while it waits to start


# --- who is holding a round; lagging --------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
DEADLINE = T0 + dt.timedelta(minutes=10)


def lag(
    state: str = "training", *, online: bool = True, minutes: float = 1, others: bool = False
) -> str:
    return selectors.lag_of(
        state=state,
        online=online,
        opened_at=T0,
        deadline=DEADLINE,
        others_answered=others,
        now=T0 + dt.timedelta(minutes=minutes),
    )


def test_the_lagging_rule() -> None:
    # An open task whose agent is offline lags at once, in any of the open states.
    for state in ("assigned", "downloaded", "training"):
        assert lag(state, online=False) == selectors.LAG_OFFLINE
    # Online: only after half the round's time, and only once another site answered.
    assert lag(minutes=4.9, others=True) == ""
    assert lag(minutes=5, others=True) == selectors.LAG_SLOW
    assert lag(minutes=9, others=False) == ""
    # A site that uploaded or answered holds nothing, online or not.
    for state in ("uploaded", "accepted", "rejected", "failed", "late"):
        assert lag(state, online=False, minutes=9, others=True) == ""


def test_the_job_and_project_pages_show_who_holds_the_round_and_who_lags(
    jobs_world: jw.World,
) -> None:
    job = jobs_world.job
    assert job is not None and job.state == JobState.RUNNING
    current = job.rounds.get(state=RoundState.OPEN)
    member = as_user(jobs_world.users[jw.MEMBER])
    one, two, three = (s.site for s in jobs_world.sites)

    page = member.get(f"/jobs/{job.uid}/").content.decode()
    assert 'id="round-sites"' in page and 'class="countdown" data-deadline="' in page
    rows = member.get(f"/jobs/{job.uid}/round-sites/").content.decode()
    assert rows.count("waiting to download") == 3 and "Lagging</strong>" not in rows
    assert "No site is lagging." in member.get(f"/projects/{job.project.slug}/").content.decode()

    # Site 2 answers; site 3's agent goes away; half the round passes.
    SiteTask.objects.filter(round=current, site=two).update(state=TaskState.ACCEPTED)
    Site.objects.filter(pk=three.pk).update(agent_disconnected_at=timezone.now())
    rows = member.get(f"/jobs/{job.uid}/round-sites/").content.decode()
    site_rows = dict(re.findall(r'<tr data-site="([^"]+)"(.*?)</tr>', rows, re.S))
    assert "answered: accepted" in site_rows["site-2"] and "Lagging" not in site_rows["site-2"]
    assert (
        html.escape(selectors.LAG_OFFLINE) in site_rows["site-3"]
        and "offline" in site_rows["site-3"]
    )
    assert "Lagging" not in site_rows["site-1"]  # online, and not half the round yet

    Round.objects.filter(pk=current.pk).update(
        opened_at=timezone.now() - dt.timedelta(minutes=6),
        deadline=timezone.now() + dt.timedelta(minutes=4),
    )
    project_page = member.get(f"/projects/{job.project.slug}/").content.decode()
    lagging = member.get(f"/projects/{job.project.slug}/lagging/").content.decode()
    for text in (project_page, lagging):
        listed = re.findall(r'<tr data-site="([^"]+)" data-job="([^"]+)"', text)
        assert listed == [("site-1", str(job.uid)), ("site-3", str(job.uid))]
    assert "6 min 0" in lagging and "waiting to download" in lagging
    assert html.escape(selectors.LAG_SLOW) in lagging

    outsider = as_user(jobs_world.users[jw.OUTSIDER])
    assert outsider.get(f"/jobs/{job.uid}/round-sites/").status_code == 404
    assert outsider.get(f"/projects/{job.project.slug}/lagging/").status_code == 404


# --- the whole record -----------------------------------------------------------------------


def _record(client: Client, job_uid: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_uid}/record.json")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/json"
    assert "attachment;" in response["Content-Disposition"]
    parsed: dict[str, Any] = json.loads(jw.body_of(response))
    return parsed


def test_the_whole_record_downloads_as_one_json_document(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    one = jobs_world.sites[0].site
    MetricPoint.objects.bulk_create(
        [MetricPoint(job=job, site=one, round_number=0, key="loss", value=0.25)]
        + [MetricPoint(job=job, site=None, key="acc", value=i / 4, step=i) for i in range(6000)]
    )
    SiteTask.objects.filter(round__job=job, site=one).update(
        state=TaskState.ACCEPTED, weight=12.0, metrics={"loss": 0.25}
    )
    admin = as_user(jobs_world.users[jw.ADMIN])
    record = _record(admin, str(job.uid))

    assert set(record) == {
        "format", "note", "job", "participants", "rounds", "model_versions", "evaluations",
        "cross_site", "audit_events", "metric_points",
    }  # fmt: skip
    assert "count from 0" in record["note"]
    assert record["job"]["uid"] == str(job.uid) and record["job"]["state"] == "running"
    assert record["job"]["params"] == job.params and record["job"]["spec"] == job.spec
    assert [p["site"] for p in record["participants"]] == ["site-1", "site-2", "site-3"]
    assert all(p["decision"] == "accepted" for p in record["participants"])
    first = record["rounds"][0]
    assert first["number"] == 0 and first["state"] == "open"
    task = next(t for t in first["tasks"] if t["site"] == "site-1")
    assert task["state"] == "accepted" and task["weight"] == 12.0
    assert task["metrics"] == {"loss": 0.25}
    assert record["model_versions"][0]["round_number"] == 0
    assert len(record["model_versions"][0]["sha256"]) == 64
    assert isinstance(record["model_versions"][0]["size"], int)
    points = record["metric_points"]
    assert len(points) == 6001  # more than one batch
    assert points[0] == {
        "site": "site-1", "round_number": 0, "step": None, "key": "loss", "value": 0.25,
        "source": "log", "recorded_at": points[0]["recorded_at"],
    }  # fmt: skip
    assert points[-1]["site"] == "all sites" and points[-1]["value"] == 1499.75
    actions = [event["action"] for event in record["audit_events"]]
    assert actions[0] == "job.submitted" and "job.site_decided" in actions

    # A member sees the job, and of the audit only their own events (as the audit page).
    member_record = _record(as_user(jobs_world.users[jw.MEMBER]), str(job.uid))
    assert member_record["audit_events"] == [] and len(member_record["metric_points"]) == 6001
    assert (
        as_user(jobs_world.users[jw.OUTSIDER]).get(f"/jobs/{job.uid}/record.json").status_code
        == 404
    )
