"""A site's output lines on the portal (``log_lines_record``): stored once, each cut to size,
within a per-job, per-site quota (the newest kept, the rest counted as dropped and shown),
at a bounded rate, and not at all once a finished job's grace period is over."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from common.exceptions import Conflict, ValidationFailed
from jobs.exceptions import SlowDown
from jobs.models import JobSite, JobState, LogLine
from jobs.services import telemetry
from jobs.services.participation import job_abort
from jobs.services.telemetry import log_lines_record
from tests.portal import jobs_api_world as jw

pytestmark = pytest.mark.django_db


def lines(*texts: str) -> list[dict]:
    return [{"id": text[:64], "text": text} for text in texts]


def kept(world: jw.World) -> list[str]:
    site = world.sites[0].site
    return list(
        LogLine.objects.filter(job=world.job, site=site)
        .order_by("id")
        .values_list("text", flat=True)
    )


def link_of(world: jw.World) -> JobSite:
    return JobSite.objects.get(job=world.job, site=world.sites[0].site)


def record(world: jw.World, batch: list[dict], **kw) -> int:
    assert world.job is not None
    return log_lines_record(job=world.job, site=world.sites[0].site, lines=batch, **kw)


def test_the_newest_lines_are_kept_within_the_line_quota_and_the_rest_counted(
    jobs_world: jw.World, settings
) -> None:
    settings.FEDPORTAL_LOG_MAX_LINES_PER_SITE = 5

    assert record(jobs_world, lines("1", "2", "3")) == 3
    assert record(jobs_world, lines("4", "5", "6", "7")) == 4

    assert kept(jobs_world) == ["3", "4", "5", "6", "7"]
    link = link_of(jobs_world)
    assert (link.log_lines, link.log_lines_dropped) == (5, 2)
    assert link.log_bytes == 5


def test_the_byte_quota_keeps_the_newest_lines_that_fit(jobs_world: jw.World, settings) -> None:
    settings.FEDPORTAL_LOG_MAX_BYTES_PER_SITE = 100
    texts = [f"{i:02d}" + "x" * 28 for i in range(6)]  # 30 bytes each

    record(jobs_world, lines(*texts[:2]))
    record(jobs_world, lines(*texts[2:]))

    assert kept(jobs_world) == texts[3:]
    link = link_of(jobs_world)
    assert (link.log_lines, link.log_bytes, link.log_lines_dropped) == (3, 90, 3)


def test_a_batch_larger_than_the_quota_keeps_its_newest_lines(
    jobs_world: jw.World, settings
) -> None:
    settings.FEDPORTAL_LOG_MAX_LINES_PER_SITE = 3
    record(jobs_world, lines("old"))

    assert record(jobs_world, lines(*"abcdefg")) == 3

    assert kept(jobs_world) == ["e", "f", "g"]
    assert link_of(jobs_world).log_lines_dropped == 5  # a-d of the batch, and "old"


def test_the_dropped_count_is_shown_by_the_api_and_on_the_job_page(
    jobs_world: jw.World, settings
) -> None:
    settings.FEDPORTAL_LOG_MAX_LINES_PER_SITE = 2
    record(jobs_world, lines("a", "b", "c", "d", "e"))

    sites = jobs_world.call(jw.MEMBER, "GET", f"{jobs_world.j}/sites/").json()["results"]
    (mine,) = [s for s in sites if s["site"] == "site-1"]
    assert (mine["log_lines"], mine["log_lines_dropped"]) == (2, 3)
    client = Client()
    client.force_login(jobs_world.users[jw.MEMBER])
    assert jobs_world.job is not None
    page = client.get(f"/jobs/{jobs_world.job.uid}/").content.decode()
    assert "3 older lines dropped" in page


def test_a_line_sent_again_is_stored_and_counted_once(jobs_world: jw.World) -> None:
    assert record(jobs_world, lines("a", "b")) == 2
    assert record(jobs_world, lines("a", "b", "c")) == 1

    assert kept(jobs_world) == ["a", "b", "c"]
    assert link_of(jobs_world).log_lines == 3


def test_a_line_repeated_within_one_report_is_stored_and_counted_once(jobs_world: jw.World) -> None:
    assert (
        record(jobs_world, [{"id": "1", "text": "a"}, {"id": "1", "text": "a"}, {"text": "b"}]) == 2
    )

    assert kept(jobs_world) == ["a", "b"]
    assert link_of(jobs_world).log_lines == 2


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"text": "a", "round": 2**31}, "lines[1].round"),
        ({"text": "a", "round": True}, "lines[1].round"),
        ({"text": "a", "id": "x" * 65}, "lines[1].id"),
        ({"text": 7}, "lines[1].text"),
        ("a", "lines[1]"),
    ],
    ids=["round 2**31", "round bool", "id too long", "text not a string", "not an object"],
)
def test_a_bad_line_is_refused_naming_its_field_and_nothing_is_stored(
    jobs_world: jw.World, line: Any, field: str
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        record(jobs_world, [{"text": "fine"}, line])  # the second line is at fault

    assert refused.value.field == field
    assert kept(jobs_world) == []


def test_a_long_line_is_cut_with_a_marker_and_bad_characters_replaced(jobs_world: jw.World) -> None:
    record(jobs_world, [{"id": "1", "text": "x" * 10_000}, {"id": "2", "text": "a\x00b\ud800c"}])

    long, odd = kept(jobs_world)
    assert len(long) == LogLine.MAX_LENGTH
    assert long.endswith("[line cut: 10000 bytes in all]")
    assert odd == "a\ufffdb?c"


def test_lines_faster_than_the_rate_wait_and_nothing_of_them_is_stored(
    jobs_world: jw.World, settings, monkeypatch
) -> None:
    settings.FEDPORTAL_LOG_BYTES_PER_SECOND = 100
    settings.FEDPORTAL_LOG_BURST_BYTES = 1000
    monkeypatch.setattr(telemetry, "MAX_MESSAGE_BYTES", 1000)
    start = timezone.now()

    record(jobs_world, lines("a" * 400, "b" * 400), now=start)  # 800 of the 1000 bytes
    with pytest.raises(SlowDown) as slowed:
        record(jobs_world, lines("c" * 300), now=start)

    assert slowed.value.retry_after == pytest.approx(1.0)  # 100 bytes short, at 100 a second
    assert slowed.value.as_dict()["code"] == "slow_down"
    assert [t[0] for t in kept(jobs_world)] == ["a", "b"]
    assert link_of(jobs_world).log_lines == 2


def test_the_rate_refills_with_time(jobs_world: jw.World, settings, monkeypatch) -> None:
    settings.FEDPORTAL_LOG_BYTES_PER_SECOND = 100
    settings.FEDPORTAL_LOG_BURST_BYTES = 1000
    monkeypatch.setattr(telemetry, "MAX_MESSAGE_BYTES", 1000)
    start = timezone.now()
    record(jobs_world, lines("a" * 1000), now=start)

    with pytest.raises(SlowDown):
        record(jobs_world, lines("b" * 300), now=start + dt.timedelta(seconds=2))
    assert record(jobs_world, lines("b" * 300), now=start + dt.timedelta(seconds=3)) == 1


@pytest.mark.parametrize(("after", "taken"), [(30, True), (61, False)])
def test_lines_of_a_finished_job_are_taken_only_for_its_grace_period(
    jobs_world: jw.World, settings, after: int, taken: bool
) -> None:
    settings.FEDPORTAL_LOG_GRACE_SECONDS = 60
    assert jobs_world.job is not None
    job = job_abort(job=jobs_world.job, actor=jobs_world.users[jw.LEAD], reason="test")
    assert job.state == JobState.ABORTED and job.finished_at is not None
    jobs_world.job = job
    when = job.finished_at + dt.timedelta(seconds=after)

    if taken:
        assert record(jobs_world, lines("last words"), now=when) == 1
    else:
        with pytest.raises(Conflict, match="aborted"):
            record(jobs_world, lines("too late"), now=when)
        assert kept(jobs_world) == []
