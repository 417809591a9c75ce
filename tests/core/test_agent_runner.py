"""A job's rounds at a site (``client_agent.agent.JobRunner``) against a portal that answers
from the test: which failures are retried, which end the round here, and what is said."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from client_agent.agent import Agent, JobRunner
from client_agent.portal import PortalError, PortalUnreachable, RoundClosed
from tests.site_folders import enrolled_folder

TASK = {
    "round": 2,
    "state": "assigned",
    "task": {},
    "model_url": "/rounds/2/model/",
    "status_url": "/rounds/2/status/",
    "update_url": "/rounds/2/update/",
}


def runner_for(tmp_path: Path, said: list[str] | None = None) -> JobRunner:
    agent = Agent(
        enrolled_folder(tmp_path / "site"),
        python="/nonexistent/python",
        say=(said if said is not None else []).append,
    )
    job = {
        "uid": "u-1",
        "name": "job",
        "num_rounds": 5,
        "spec_url": "/spec/",
        "bundle_url": "/bundle/",
    }
    return JobRunner(agent, job)


def test_an_update_the_portal_cannot_take_now_is_sent_again_not_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk (507), a restarting portal (unreachable, 503) or a throttle (429): the same
    # file goes again after a pause, and the script's work is not redone.
    runner = runner_for(tmp_path)
    answers: list[Exception | None] = [
        PortalError(507, "storage_full", "the portal's storage is full"),
        PortalUnreachable("connection refused"),
        PortalError(503, "unavailable", "restarting"),
        PortalError(429, "throttled", "later"),
        None,
    ]
    sent: list[str] = []

    def upload(url: str, path: Path) -> None:
        sent.append(url)
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    pauses: list[float] = []

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(runner.agent.client, "upload", upload)
    monkeypatch.setattr(asyncio, "sleep", no_wait)

    asyncio.run(runner._upload("/update/", tmp_path / "u.safetensors", 0))

    assert sent == ["/update/"] * 5 and answers == []
    assert len(pauses) == 4 and pauses[1] > pauses[0]  # backing off


def test_an_update_for_a_closed_round_is_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runner_for(tmp_path)
    sent: list[str] = []

    def upload(url: str, path: Path) -> None:
        sent.append(url)
        raise PortalError(409, "conflict", "this task is already accepted")

    monkeypatch.setattr(runner.agent.client, "upload", upload)

    with pytest.raises(RoundClosed, match="already accepted"):
        asyncio.run(runner._upload("/update/", tmp_path / "u.safetensors", 0))
    assert sent == ["/update/"]


def test_a_round_that_closed_meanwhile_ends_here_without_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    runner = runner_for(tmp_path, said)
    posted: list[Any] = []
    monkeypatch.setattr(runner, "_prepare", lambda: None)

    def download(path: str, dest: Path) -> str:
        raise PortalError(409, "conflict", "this task is already late")

    monkeypatch.setattr(runner.agent.client, "download", download)
    monkeypatch.setattr(runner.agent.client, "post", lambda *a: posted.append(a))

    asyncio.run(runner._round(dict(TASK)))

    assert runner.finished_round == 2 and posted == []
    assert said[-1] == "[site-1] job job: round 3: this task is already late"


def test_a_portal_away_leaves_the_round_to_be_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    runner = runner_for(tmp_path, said)
    monkeypatch.setattr(runner, "_prepare", lambda: None)

    def download(path: str, dest: Path) -> str:
        raise PortalUnreachable("connection refused")

    monkeypatch.setattr(runner.agent.client, "download", download)

    asyncio.run(runner._round(dict(TASK)))

    assert runner.finished_round is None
    assert said[-1].endswith("round 3: portal unreachable (connection refused); will retry")


def test_an_app_archive_that_does_not_match_its_digest_fails_the_round_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    runner = runner_for(tmp_path, said)
    client = runner.agent.client
    posted: list[tuple[str, Any]] = []
    archive = b"PK damaged on the portal's disk"
    expected = hashlib.sha256(b"what was submitted").hexdigest()

    def download(path: str, dest: Path) -> str:
        dest.write_bytes(archive)
        return hashlib.sha256(archive).hexdigest()

    monkeypatch.setattr(client, "get", lambda path: {"spec": {}, "app_sha256": expected})
    monkeypatch.setattr(client, "download", download)
    monkeypatch.setattr(client, "post", lambda path, payload: posted.append((path, payload)))

    asyncio.run(runner._round(dict(TASK)))

    ((path, payload),) = posted
    assert path == TASK["status_url"] and payload["state"] == "failed"
    assert "damaged" in payload["reason"] and expected in payload["reason"]
    assert runner.finished_round == 2  # not offered again this round
    assert not (runner.workspace / "app.zip").exists()
    assert not any("will retry" in s for s in said)
