"""The site agent (``client_agent.agent``) against the real portal views, served by Django's
live server: what the agent does with what the portal hands it."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.agent import Agent
from jobs.models import JobState, SiteTask, TaskState
from tests.archives import lying_crc
from tests.portal import jobs_api_world as jw
from tests.portal.factories import EnrolledSite
from tests.site_folders import site_folder

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


class Sent(list[tuple[str, str, str]]):
    """A wire recorder for the test's agents: what they send, as (channel, method, path)."""

    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        self.append((channel, method, path))


@pytest.fixture
def sent() -> Sent:
    return Sent()


async def one_sync(agent: Agent) -> None:
    """What the agent's work loop does on a wake-up: list the jobs, run what is due."""
    await agent.sync()
    for runner in agent.runners.values():
        if runner.current is not None:
            await runner.current


def task_of(site: EnrolledSite, number: int) -> SiteTask:
    return SiteTask.objects.get(site=site.site, round__number=number)


def test_an_archive_that_lies_fails_the_task_once_and_is_not_fetched_again(
    live_server: Any, tmp_path: Path, sent: Sent
) -> None:
    world = jw.build_world(tmp_path, min_clients=2)
    job = world.job
    assert job is not None and job.state == JobState.RUNNING
    # An archive stored before the portal checked members (the check now refuses it).
    bad = lying_crc()
    with open(job.app_archive.path, "wb") as fh:
        fh.write(bad)
    job.app_sha256 = hashlib.sha256(bad).hexdigest()
    job.save(update_fields=["app_sha256"])
    site = world.sites[0]
    folder = site_folder(tmp_path / "site-1", site, live_server.url)

    asyncio.run(one_sync(Agent(folder, python=sys.executable, wire=sent)))

    failed = task_of(site, 0)
    assert failed.state == TaskState.FAILED
    assert "util.py" in failed.reason and "cannot be read" in failed.reason
    bundle = f"/api/v1/agent/jobs/{job.uid}/bundle/"
    assert sent.count(("http", "GET", bundle)) == 1

    # The other sites answer; round 1 opens with a task for site 1, whose agent restarted.
    for other in world.sites[1:]:
        data = jw.update_bytes({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}, tmp_path)
        uploaded = world.agent(other, "PUT", f"{world.a}/rounds/0/update/", raw=data)
        assert uploaded.status_code == 202, uploaded.json()
    assert task_of(site, 1).state == TaskState.ASSIGNED

    asyncio.run(one_sync(Agent(folder, python=sys.executable, wire=sent)))

    again = task_of(site, 1)
    assert again.state == TaskState.FAILED and again.reason == failed.reason
    assert sent.count(("http", "GET", bundle)) == 1  # not fetched again
    statuses = [c for c in sent if c[1] == "POST" and c[2].endswith("/status/")]
    assert len(statuses) == 2  # one failure report a round
