"""A job's rounds at a site (``client_agent.agent.JobRunner``) against a portal that answers
from the test: which failures are retried, which end the round here, and what is said."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from client_agent.agent import Agent, JobRunner, event_model_write
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


def _task(number: int) -> dict[str, Any]:
    return {**TASK, "round": number, "update_url": f"/rounds/{number}/update/"}


def _scripted_rounds(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch, training: asyncio.Event
) -> list[str]:
    """The runner's rounds with the script's work replaced: training ends when ``training`` is
    set; round 2's update never gets through (the portal is unreachable for it)."""
    sent: list[str] = []
    monkeypatch.setattr(runner, "_prepare", lambda: None)

    async def fetch_model(task: dict[str, Any], number: int) -> Path:
        return runner.workspace / f"model-{number}"

    async def train(task: dict[str, Any], number: int, model_path: Path) -> Path:
        await training.wait()
        return runner.workspace / f"update-{number}"

    async def nothing_to_deliver() -> None:
        return None

    def round_update(url: str, path: Path) -> None:
        if url == "/rounds/2/update/":
            raise PortalUnreachable("connection refused")
        sent.append(url)

    monkeypatch.setattr(runner, "_fetch_model", fetch_model)
    monkeypatch.setattr(runner, "_train", train)
    monkeypatch.setattr(runner, "_deliver_points", nothing_to_deliver)
    monkeypatch.setattr(runner.agent.client, "round_update", round_update)
    return sent


async def _until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def test_a_later_round_offered_while_an_update_waits_to_be_sent_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cut off past its deadline, the site kept trying to send round 2's update with growing
    # pauses. The portal closed round 2 without it and now offers round 3: the site takes it
    # at once, instead of missing round 3 while it waits to send an update that would be
    # refused anyway.
    said: list[str] = []
    runner = runner_for(tmp_path, said)

    async def scenario() -> list[str]:
        training = asyncio.Event()
        training.set()
        sent = _scripted_rounds(runner, monkeypatch, training)
        runner.offer(_task(2))
        round_2 = runner.current
        await _until(lambda: runner.sending_round == 2 and any("again in" in s for s in said))
        runner.offer(_task(3))
        assert runner.current is not round_2
        assert runner.current is not None
        await runner.current
        assert round_2 is not None and round_2.cancelled()
        return sent

    sent = asyncio.run(scenario())

    assert sent == ["/rounds/3/update/"]
    assert runner.finished_round == 3 and runner.sending_round is None
    assert "round 3 closed before its update could be sent; round 4 starts" in said[-2]


def test_a_later_round_offered_while_the_script_still_trains_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The script is mid-task: a second task cannot be handed to it, so the round in hand
    # finishes (its update is refused if the round closed) before the next one starts.
    runner = runner_for(tmp_path)

    async def scenario() -> None:
        training = asyncio.Event()
        _scripted_rounds(runner, monkeypatch, training)
        runner.offer(_task(4))
        round_4 = runner.current
        await asyncio.sleep(0.05)
        runner.offer(_task(5))
        assert runner.current is round_4
        training.set()
        assert round_4 is not None
        await round_4
        assert not round_4.cancelled()

    asyncio.run(scenario())

    assert runner.finished_round == 4


def _event_model(data: bytes) -> dict[str, Any]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "data": base64.b64encode(data).decode("ascii"),
    }


def test_a_model_that_came_with_the_round_event_is_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runner_for(tmp_path)
    downloads: list[str] = []
    monkeypatch.setattr(runner.client, "round_model", lambda url, dest: downloads.append(url))
    event = {
        "kind": "round.state",
        "state": "open",
        "job_uid": runner.uid,
        "round": 2,
        "task": {"task_name": "train"},
        "model": _event_model(b"the model's bytes"),
    }
    offered: list[dict[str, Any]] = []
    runner.agent.runners[runner.uid] = runner
    monkeypatch.setattr(runner, "offer", offered.append)

    assert runner.agent._start_round_from(event)
    path = asyncio.run(runner._fetch_model(offered[0], 2))

    assert downloads == []
    assert path.read_bytes() == b"the model's bytes"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left


@pytest.mark.parametrize(
    ("model", "why"),
    [
        ({**_event_model(b"abc"), "sha256": "0" * 64}, "does not match its SHA-256"),
        ({**_event_model(b"abc"), "size": 4}, "has 3 bytes where it names 4"),
        ({**_event_model(b"abc"), "data": "not base64!"}, "is not base64"),
    ],
)
def test_a_damaged_model_in_the_round_event_is_downloaded_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: dict[str, Any], why: str
) -> None:
    runner = runner_for(tmp_path)
    downloads: list[str] = []

    def download(url: str, dest: Path) -> str:
        downloads.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"downloaded")
        return ""

    monkeypatch.setattr(runner.client, "round_model", download)
    dest = tmp_path / "m.safetensors"
    assert why in str(event_model_write(model, dest)) and not dest.exists()

    path = asyncio.run(runner._fetch_model({**TASK, "model": model}, 2))

    assert downloads == ["/rounds/2/model/?then=training"]
    assert path.read_bytes() == b"downloaded"
