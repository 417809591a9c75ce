"""Job, round and task state changes reach the job's and project's Channels groups, typed,
and only after the transaction commits."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from fedportal.events import BATCH_MESSAGE_TYPE, agents_group
from jobs import events
from jobs.models import Job, MetricPoint, ModelVersion
from jobs.services import rounds
from jobs.services.telemetry import metrics_record
from jobs.workflows import ModelRef, PlannedTask, RoundPlan, TaskSpec
from tests.portal.rounds_helpers import make_bundle, submit, three_sites, upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]


def subscribe(group: str) -> str:
    layer = get_channel_layer()
    channel: str = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(group, channel)
    return channel


def test_state_changes_are_published_to_the_job_and_project_groups(tmp_path: Path) -> None:
    project, sites = three_sites()
    project_channel = subscribe(f"project.{project.pk}")

    job = submit(tmp_path, project, num_rounds=1)
    job_channel = subscribe(f"job.{job.pk}")
    for site in sites:
        upload(
            job,
            site,
            0,
            {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(5)},
            metrics={"accuracy": 0.5},
        )

    layer = get_channel_layer()
    kinds = []
    for _ in range(40):
        try:
            message = async_to_sync(_receive_now)(layer, job_channel)
        except TimeoutError:
            break
        assert message["type"] == events.MESSAGE_TYPE
        kinds.append((message["event"]["kind"], message["event"].get("state")))
    assert ("task.state", "uploaded") in kinds
    assert ("task.state", "accepted") in kinds
    assert ("round.state", "closed") in kinds
    assert kinds[-1] == ("job.state", "completed")
    project_kinds = []
    for _ in range(40):
        try:
            message = async_to_sync(_receive_now)(layer, project_channel)
        except TimeoutError:
            break
        project_kinds.append(message["event"]["kind"])
    assert project_kinds[0] == "job.state"
    assert "round.state" in project_kinds
    # A project's page follows jobs and rounds; metric points and tasks go to the job's page.
    assert set(project_kinds) == {"job.state", "round.state"}


def test_a_check_that_decides_several_updates_tells_the_jobs_page_in_one_message(
    tmp_path: Path,
) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, num_rounds=2)
    job_channel = subscribe(f"job.{job.pk}")
    # The uploads' checks are enqueued when the transaction commits: the first takes all three.
    with transaction.atomic():
        for site in sites:
            upload(job, site, 0, {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(5)})

    layer = get_channel_layer()
    messages = []
    for _ in range(40):
        try:
            messages.append(async_to_sync(_receive_now)(layer, job_channel))
        except TimeoutError:
            break
    batches = [m["events"] for m in messages if m["type"] == BATCH_MESSAGE_TYPE]
    accepted = [
        [event["site"] for event in batch if event.get("state") == "accepted"] for batch in batches
    ]
    assert [sorted(names) for names in accepted] == [sorted(site.name for site in sites)]


async def _receive_now(layer, channel: str) -> dict:
    import asyncio

    return await asyncio.wait_for(layer.receive(channel), timeout=0.5)


def test_nothing_is_published_when_the_transaction_rolls_back(tmp_path: Path) -> None:
    project, _ = three_sites()
    job = submit(tmp_path, project)
    channel = subscribe(f"job.{job.pk}")
    layer = get_channel_layer()

    with pytest.raises(RuntimeError), transaction.atomic():
        events.job_state(Job.objects.get(pk=job.pk))
        raise RuntimeError("roll back")

    with pytest.raises(TimeoutError):
        async_to_sync(_receive_now)(layer, channel)


def test_a_sites_batch_of_points_is_one_event_with_every_new_point(tmp_path: Path) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project)
    channel = subscribe(f"job.{job.pk}")
    layer = get_channel_layer()
    metrics_record(job=job, site=sites[0], points=[{"key": "loss", "value": 1.0, "id": "a"}])
    async_to_sync(_receive_now)(layer, channel)

    stored = metrics_record(
        job=job,
        site=sites[0],
        points=[
            {"key": "loss", "value": 1.0, "id": "a"},  # sent again: not new
            {"key": "loss", "value": 0.5, "step": 2, "round": 0, "id": "b"},
            {"key": "acc", "value": 0.75, "id": "c"},
        ],
    )

    assert stored == 2
    event = async_to_sync(_receive_now)(layer, channel)["event"]
    assert (event["kind"], event["site"], event["job_id"]) == ("metrics", sites[0].name, job.pk)
    ids = dict(MetricPoint.objects.filter(job=job).values_list("client_id", "pk"))
    assert event["points"] == [
        {"id": ids["b"], "key": "loss", "value": 0.5, "step": 2, "round": 0, "source": "log"},
        {"id": ids["c"], "key": "acc", "value": 0.75, "step": None, "round": None, "source": "log"},
    ]
    with pytest.raises(TimeoutError):
        async_to_sync(_receive_now)(layer, channel)


def test_a_sites_agent_hears_of_a_round_when_it_opens_and_of_the_job_only(
    tmp_path: Path,
) -> None:
    # An agent acts on a round that opens and on the job's state; the round's other states
    # would only fill the portal's channel-layer inbox (a hundred agents, three events each).
    # The job's state goes to each site's group; a round that opens to the project's agents
    # at once (one message per portal process), naming its sites.
    project, sites = three_sites()
    site_channel = subscribe(f"site.{sites[0].pk}")
    agents_channel = subscribe(agents_group(project.pk))
    job = submit(tmp_path, project, num_rounds=2)
    for round_number in (0, 1):
        for site in sites:
            upload(job, site, round_number, {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(5)})
    assert Job.objects.get(pk=job.pk).state == "completed"

    layer = get_channel_layer()

    def heard_on(channel: str) -> list[tuple[Any, ...]]:
        heard: list[tuple[Any, ...]] = []
        for _ in range(40):
            try:
                event = async_to_sync(_receive_now)(layer, channel)["event"]
            except TimeoutError:
                return heard
            heard.append(
                (event["kind"], event.get("state"), event.get("round"), event.get("site_ids"))
            )
        raise AssertionError("too many events")

    site_heard = heard_on(site_channel)
    assert {h[0] for h in site_heard} == {"job.state"}  # no round event on the site's own
    assert site_heard[-1][1] == "completed"
    in_round = sorted(site.pk for site in sites)
    assert [(*h[:3], sorted(h[3])) for h in heard_on(agents_channel)] == [
        ("round.state", "open", 0, in_round),
        ("round.state", "open", 1, in_round),
    ]


def _round_opened(layer, channel: str) -> dict:
    for _ in range(40):
        event: dict = async_to_sync(_receive_now)(layer, channel)["event"]
        if event["kind"] == "round.state" and event["state"] == "open":
            return event
    raise AssertionError("no round opened")


def test_a_small_model_goes_with_the_round_event_to_the_sites_agents_only(
    tmp_path: Path,
) -> None:
    # The agent starts the round from the event, without downloading the model; the pages
    # that follow the job and the project get the event without the model's bytes.
    project, _ = three_sites()
    agents_channel = subscribe(agents_group(project.pk))
    project_channel = subscribe(f"project.{project.pk}")
    job = submit(tmp_path, project, num_rounds=1)
    layer = get_channel_layer()

    heard = _round_opened(layer, agents_channel)
    start = ModelVersion.objects.get(job=job, round_number=0)
    data = Path(start.file.path).read_bytes()
    assert heard["task"]["task_name"] == "train"
    assert heard["model"] == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "data": base64.b64encode(data).decode("ascii"),
    }
    assert start.sha256 == heard["model"]["sha256"]
    assert "model" not in _round_opened(layer, project_channel)


@pytest.mark.parametrize("most", [0, "one byte short"])
def test_a_model_larger_than_the_setting_is_downloaded_not_sent_with_the_event(
    tmp_path: Path, settings, most
) -> None:
    project, _ = three_sites()
    agents_channel = subscribe(agents_group(project.pk))
    _, model, _ = make_bundle(tmp_path, num_rounds=1)  # the job's own is the same size
    settings.FEDPORTAL_EVENT_MODEL_MAX_BYTES = (
        model.stat().st_size - 1 if most == "one byte short" else most
    )
    (tmp_path / "job").mkdir()
    submit(tmp_path / "job", project, num_rounds=1)

    heard = _round_opened(get_channel_layer(), agents_channel)
    assert heard["task"]["task_name"] == "train"  # the task still comes with the event
    assert "model" not in heard


def test_a_round_whose_tasks_start_from_checkpoints_sends_no_model() -> None:
    # A cross-site evaluation sends each site another site's submitted model: not the round's
    # start model, so none goes with the event.
    start = ModelVersion(file="jobs/x/models/round-000.safetensors", sha256="0" * 64, size=10)
    spec = TaskSpec(task_name="validate", current_round=0, total_rounds=1)
    plan = RoundPlan(
        tasks=(
            PlannedTask("site-1", spec, ModelRef("site:site-2")),
            PlannedTask("site-2", spec, ModelRef()),
        ),
        min_results=0,
        label="round 1",
    )
    assert not rounds._all_global(plan)
    assert rounds._all_global(RoundPlan(tasks=(plan.tasks[1],), min_results=0, label="round 1"))
    assert rounds.event_model(None) is None
    assert rounds.event_model(start) is None  # no such file: downloaded, which says why
