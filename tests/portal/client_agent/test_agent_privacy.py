"""The site agent under its privacy policy against the real portal (Daphne in a subprocess on
the test database): what its wire log shows leaving the site. A script that sends an update
far over the clip and prints what it must not: the upload the portal stores is clipped, the
excluded tensor and the script's lines never cross the wire, the agent's own lines do."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from client_agent import cli
from client_agent.agent import PRIVACY_POLICY_PATH, Agent
from client_agent.config import PRIVACY_META_KEY
from client_agent.portal import WireLog
from client_agent.privacy import accounting
from client_agent.privacy.policy import POLICY_FILE, PrivacyPolicy
from client_agent.wire import read_model_file
from jobs.envs.poc.env import _redis_answers
from jobs.models import SiteTask, TaskState
from tests import daphne_portal
from tests.portal import jobs_api_world as jw
from tests.portal.client_agent.test_agent_live import one_sync
from tests.portal.client_agent.test_agent_socket import deliver
from tests.site_folders import site_folder

if TYPE_CHECKING:
    from pytest_django.fixtures import Settings

REDIS_URL = daphne_portal.REDIS_URL
media_root = daphne_portal.media_root
portal_url = daphne_portal.portal_url

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not _redis_answers(REDIS_URL), reason=f"needs Redis at {REDIS_URL}"),
]

SECRET = "patient 4711: glucose 9.1"
# Moves w by 100 (norm 141: far over the clip) and the integer n by one; prints a secret.
CLIENT = f"""
import client_agent.api as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    print({SECRET!r}, flush=True)
    params = {{"w": model.params["w"] + 100.0, "n": model.params["n"] + 1}}
    flare.send(flare.FLModel(params=params, meta={{"NUM_STEPS_CURRENT_ROUND": 1}}))
"""
POLICY = PrivacyPolicy(clip_norm=1.0, exclude_tensors=("n",), send_lines=False)


@pytest.fixture
def world(settings: Settings, media_root: Path, tmp_path: Path, eager_celery: None) -> jw.World:
    """The jobs world with its files where the portal process reads them, and a client
    script that trains (the world's own only prints)."""
    settings.MEDIA_ROOT = str(media_root)
    built = jw.build_world(tmp_path)
    job = built.job
    assert job is not None
    app = jw.zip_bytes({jw.TRAIN_SCRIPT: textwrap.dedent(CLIENT).encode()})
    with open(job.app_archive.path, "wb") as fh:
        fh.write(app)
    job.app_sha256 = hashlib.sha256(app).hexdigest()
    job.save(update_fields=["app_sha256"])
    return built


def entries(wire_log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in wire_log.read_text().splitlines()]


def test_what_leaves_is_clipped_and_the_excluded_tensor_and_output_lines_stay_home(
    world: jw.World, portal_url: str, tmp_path: Path
) -> None:
    site = world.sites[0]
    folder = site_folder(tmp_path / "site-1", site, portal_url)
    (folder.path / POLICY_FILE).write_text(POLICY.to_toml())
    wire_log = tmp_path / "wire.jsonl"
    agent = Agent(folder, python=sys.executable, say=lambda _: None, wire=WireLog(wire_log))

    async def one_round_then_reports() -> None:
        assert agent.loop is asyncio.get_running_loop()  # as run() does: round threads use it
        await one_sync(agent)
        for runner in agent.runners.values():
            await runner.finish(grace=5.0)  # the script's last lines are read (and kept)
        await deliver(agent)

    asyncio.run(one_round_then_reports())

    task = SiteTask.objects.get(site=site.site, round__number=0)
    assert task.state in (TaskState.UPLOADED, TaskState.ACCEPTED), task.reason
    stored = read_model_file(task.update.path)
    assert stored.params is not None and sorted(stored.params) == ["w"]
    delta = stored.params["w"] - jw.INITIAL["w"]
    assert float(torch.linalg.vector_norm(delta)) <= 1.0
    assert stored.meta[PRIVACY_META_KEY]["excluded"] == ["n"]

    sent = entries(wire_log)
    updates = [e["safetensors"] for e in sent if "safetensors" in e]
    assert len(updates) == 1 and not any(name.startswith("n") for name in updates[0])
    assert SECRET not in wire_log.read_text()
    line_reports = [
        e["json"] for e in sent if e["channel"] == "ws" and "lines" in e.get("json", {})
    ]
    texts = [line["text"] for report in line_reports for line in report["lines"]]
    assert any(text.startswith("started client.py") for text in texts)  # the agent's own
    assert all(line["stream"] == "agent" for r in line_reports for line in r["lines"])
    (reported,) = [e["json"] for e in sent if e["path"] == PRIVACY_POLICY_PATH]
    assert PrivacyPolicy.from_json(reported["policy"]) == POLICY


def test_policy_check_with_a_job_prints_what_it_would_spend_here(
    live_server: Any,
    jobs_world: jw.World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = jobs_world.job
    assert job is not None
    folder = site_folder(tmp_path / "site-1", jobs_world.sites[0], live_server.url)
    only_lead = PrivacyPolicy(
        clip_norm=1.0, noise_multiplier=1.1, max_epsilon=8.0, submitters=(jw.LEAD,)
    )
    (folder.path / POLICY_FILE).write_text(only_lead.to_toml())
    check = ["policy", "check", "--dir", str(folder.path), "--job", str(job.uid)]

    assert cli.main(check) == 0

    out = capsys.readouterr().out
    fit = accounting.steps_within(8.0, 1.1, only_lead.delta)
    runs = min(job.num_rounds, fit)
    expected = accounting.epsilon_after(1.1, runs, only_lead.delta)
    assert f"job {job.name} ({job.uid}): {job.num_rounds} round(s)" in out
    assert f"expected spend: ε {expected:.4g} of 8 over {runs} round(s)" in out

    someone_else = PrivacyPolicy(submitters=("alice",))
    (folder.path / POLICY_FILE).write_text(someone_else.to_toml())
    assert cli.main(check) == 0
    assert "declined here: the site's privacy policy allows jobs submitted by alice" in (
        capsys.readouterr().out
    )
    unknown = ["policy", "check", "--dir", str(folder.path), "--job", "no-such-job"]
    assert cli.main(unknown) == 1
    assert "--job: the portal lists no job no-such-job" in capsys.readouterr().err
