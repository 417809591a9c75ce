"""The portal drives any workflow through the protocol (``jobs.workflows.base``), with no
workflow-specific code: a test-only workflow, :class:`Probe`, uses every feature at once.

Probe's four rounds over sites 1-3 (``total_rounds`` is the site count plus one, not its
``num_rounds``):

0. per-site tasks: sites 1 and 2 train, site 3 submits its model, kept as the checkpoint
   ``site:site-3``; the next global model is the mean of the two trained ones;
1. a relay turn: site 2 alone trains from the global model (the plan's only task);
2. every site validates the checkpoint ``site:site-3``: the global model is kept;
3. every site validates the global model: kept again.

Its server state counts the closed rounds (a tensor) and lists their labels (JSON); each plan
is labelled from the count it was given, so a label proves the state was carried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from django.test import Client

from client_agent.fl_model import FLModel
from client_agent.runtime import TASK_SUBMIT_MODEL, TASK_TRAIN, TASK_VALIDATE
from client_agent.wire import load_state_dict, write_model_file
from jobs import events, storage
from jobs.aggregation import TensorSource
from jobs.aggregation.sources import tensors_of
from jobs.models import (
    Checkpoint,
    Evaluation,
    JobState,
    ModelVersion,
    Round,
    RoundState,
    SiteTask,
    TaskState,
)
from jobs.services import rounds
from jobs.services.plans import plan_from_json
from jobs.workflows import (
    EvalResult,
    ModelRef,
    PlannedTask,
    RoundOutcome,
    RoundPlan,
    ServerState,
    SubmittedModel,
    TaskResult,
    TaskSpec,
    TrainResult,
)
from jobs.workflows import base as workflow_base
from jobs.workflows.base import (
    KEY_METRIC_PARAMETERS,
    ROUND_COUNT_PARAMETERS,
    WorkflowDefaults,
    every_site,
    params_checked,
)
from jobs.workflows.base import (
    Evaluation as EvaluationCell,
)
from tests.portal.jobs_api_world import (
    ANONYMOUS,
    LEAD,
    OUTSIDER,
    SITE_IN,
    World,
    body_of,
    build_world,
)
from tests.portal.rounds_helpers import upload_bytes

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

SITES = ("site-1", "site-2", "site-3")
CHECKPOINT = "site:site-3"


@dataclass(frozen=True)
class Probe(WorkflowDefaults):
    min_clients: int
    num_rounds: int
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"

    name: ClassVar[str] = "probe"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients", "num_rounds"],
        "additionalProperties": False,
        "properties": {**ROUND_COUNT_PARAMETERS, **KEY_METRIC_PARAMETERS},
    }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Probe:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    def total_rounds(self, sites: Sequence[str]) -> int:
        return len(sites) + 1

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return ServerState(tensors={"count": torch.tensor([0])}, data={"labels": []})

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        count = int(state.tensors["count"].item())
        label = f"step {count}"

        def spec(task_name: str) -> TaskSpec:
            return TaskSpec(task_name, count, self.total_rounds(sites), meta={"step": count})

        if round_number == 0:
            names = (TASK_TRAIN, TASK_TRAIN, TASK_SUBMIT_MODEL)
            tasks = tuple(PlannedTask(s, spec(n)) for s, n in zip(sites, names, strict=True))
            return RoundPlan(tasks, min_results=3, label=label)
        if round_number == 1:
            return RoundPlan((PlannedTask(sites[1], spec(TASK_TRAIN)),), 0, label)
        model = ModelRef(CHECKPOINT) if round_number == 2 else ModelRef()
        return every_site(sites, spec(TASK_VALIDATE), min_results=3, label=label, model=model)

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        trained = [tensors_of(r.update.source) for r in results if isinstance(r, TrainResult)]
        global_params = None
        if trained:
            global_params = {
                "w": sum((t["w"] for t in trained), torch.zeros(2)) / len(trained),
                "n": trained[0]["n"],
            }
        scores = [float(r.metrics["accuracy"]) for r in results if "accuracy" in r.metrics]
        return RoundOutcome(
            global_params=global_params,
            state=ServerState(
                tensors={"count": state.tensors["count"] + 1},
                data={"labels": [*state.data["labels"], plan.label]},
            ),
            metrics={"accuracy": sum(scores) / len(scores)} if scores else {},
            site_metrics={r.site: dict(r.metrics) for r in results},
            sites=tuple(r.site for r in results),
            scores_start_model=bool(trained),
            checkpoints={
                f"site:{r.site}": r.update.source for r in results if isinstance(r, SubmittedModel)
            },
            evaluations=[
                EvaluationCell(str(r.model), r.site, dict(r.metrics))
                for r in results
                if isinstance(r, EvalResult)
            ],
        )


@dataclass(frozen=True)
class RelayProbe(Probe):
    """Probe's close over a relay: one round a site, in name order, each a train task."""

    name: ClassVar[str] = "relay-probe"

    def total_rounds(self, sites: Sequence[str]) -> int:
        return len(sites)

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        spec = TaskSpec(TASK_TRAIN, round_number, len(sites))
        turn = PlannedTask(sites[round_number], spec)
        return RoundPlan((turn,), 0, f"{sites[round_number]}'s turn")


@pytest.fixture(autouse=True)
def probes_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = workflow_base.workflow_registry
    probes = {"probe": Probe, "relay-probe": RelayProbe}
    monkeypatch.setattr(workflow_base, "workflow_registry", lambda: {**registry(), **probes})


@pytest.fixture
def world(tmp_path: Path, media: Path) -> World:
    return build_world(tmp_path, workflow="probe", params={"min_clients": 3, "num_rounds": 2})


def answer(world: World, site: str, number: int, **model: Any) -> SiteTask:
    """``site``'s answer to its task in round ``number``: an FLModel file, stored as the
    update API stores it."""
    path = world.tmp / f"answer-{site}-{number}.safetensors"
    write_model_file(path, FLModel(**model))
    assert world.job is not None
    enrolled = next(e for e in world.sites if e.site.name == site)
    task = upload_bytes(world.job, enrolled.site, number, path.read_bytes())
    task.refresh_from_db()  # checked on commit, after the upload returned
    return task


def train_answer(w: list[float], n: int, accuracy: float) -> dict[str, Any]:
    return {
        "params": {"w": torch.tensor(w), "n": torch.tensor(n)},
        "metrics": {"accuracy": accuracy},
        "meta": {"NUM_STEPS_CURRENT_ROUND": 1},
    }


def model_of(world: World, completed: int) -> dict[str, torch.Tensor]:
    version = ModelVersion.objects.get(job=world.job, round_number=completed)
    return load_state_dict(Path(version.file.path))


def state_after(world: World, completed: int) -> ServerState:
    rnd = Round.objects.get(job=world.job, number=completed - 1)
    return ServerState.load(storage.local_path(rnd.server_state))


def agent_task(world: World, site: str) -> dict[str, Any] | None:
    enrolled = next(e for e in world.sites if e.site.name == site)
    jobs = world.agent(enrolled, "GET", "/api/v1/agent/jobs/").json()
    found: dict[str, Any] | None = jobs[0]["current_task"]
    return found


def run_rounds_0_and_1(world: World) -> None:
    answer(world, "site-1", 0, **train_answer([2.0, 3.0], 5, 0.2))
    answer(world, "site-2", 0, **train_answer([4.0, 5.0], 5, 0.4))
    answer(world, "site-3", 0, **train_answer([10.0, 20.0], 4, 0.6))
    answer(world, "site-2", 1, **train_answer([4.0, 5.0], 6, 0.5))


def test_every_round_runs_as_planned_to_the_hand_computed_models(world: World) -> None:
    job = world.job
    assert job is not None and job.state == JobState.RUNNING
    assert job.round_sites == list(SITES) and job.total_rounds == 4  # not num_rounds (2)
    first = Round.objects.get(job=job, number=0)
    probe = Probe(3, 2)
    assert plan_from_json(first.plan) == probe.plan(0, SITES, probe.initial_state(SITES))
    assert list(first.tasks.order_by("site__name").values_list("task_name", "model_ref")) == [
        (TASK_TRAIN, "global"),
        (TASK_TRAIN, "global"),
        (TASK_SUBMIT_MODEL, "global"),
    ]
    # Each agent gets its own task, as the plan gave it.
    spec = {"current_round": 0, "total_rounds": 4, "start_round": 0, "meta": {"step": 0}}
    assert agent_task(world, "site-1")["task"] == {"task_name": TASK_TRAIN, **spec}  # type: ignore[index]
    assert agent_task(world, "site-3")["task"] == {"task_name": TASK_SUBMIT_MODEL, **spec}  # type: ignore[index]

    run_rounds_0_and_1(world)

    # Round 0: the mean of the two trained models; site 3's model kept as a checkpoint.
    assert torch.equal(model_of(world, 1)["w"], torch.tensor([3.0, 4.0]))
    checkpoint = Checkpoint.objects.get(job=job, name=CHECKPOINT)
    assert torch.equal(load_state_dict(Path(checkpoint.file.path))["w"], torch.tensor([10.0, 20.0]))
    # Round 1: a relay turn, one task, site 2's only; the state carried counts one round.
    relay = Round.objects.get(job=job, number=1)
    assert relay.label == "step 1"
    assert list(relay.tasks.values_list("site__name", flat=True)) == ["site-2"]
    assert torch.equal(model_of(world, 2)["w"], torch.tensor([4.0, 5.0]))
    assert state_after(world, 1).tensors["count"].tolist() == [1]

    # Round 2: every site evaluates the checkpoint; sites 1 and 3 had no task in round 1.
    task = agent_task(world, "site-1")
    assert task is not None and task["round"] == 2 and task["model"] == CHECKPOINT
    assert task["task"]["task_name"] == TASK_VALIDATE and task["task"]["meta"] == {"step": 2}
    download = world.agent(world.sites[0], "GET", task["model_url"])
    data = body_of(download)
    assert download.status_code == 200
    assert hashlib.sha256(data).hexdigest() == checkpoint.sha256
    assert data == Path(checkpoint.file.path).read_bytes()
    for site, accuracy in zip(SITES, (0.7, 0.8, 0.9), strict=True):
        # A validate answer: metrics, no tensors.
        assert answer(world, site, 2, metrics={"accuracy": accuracy}).state == TaskState.ACCEPTED
    # Round 3: every site evaluates the global model.
    for site, accuracy in zip(SITES, (0.5, 0.6, 0.75), strict=True):
        answer(world, site, 3, metrics={"accuracy": accuracy})

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    assert job.completed_rounds == 4
    # Evaluation rounds keep the global model: the same file, no copy.
    versions = ModelVersion.objects.filter(job=job).order_by("round_number")
    assert versions[2].file.name == versions[3].file.name == versions[4].file.name
    final = state_after(world, 4)
    assert final.tensors["count"].tolist() == [4]
    assert final.data == {"labels": ["step 0", "step 1", "step 2", "step 3"]}
    assert sorted(Evaluation.objects.filter(job=job).values_list("model", "site_name")) == [
        ("global", s) for s in SITES
    ] + [(CHECKPOINT, s) for s in SITES]
    # The best model: round 0's train metrics (0.3) scored the initial model; round 1's (0.5)
    # the model after one round. Evaluation rounds score no start model.
    assert job.best_round == 1 and job.best_score == pytest.approx(0.5)


def test_the_cross_site_matrix_is_served_to_members_only(world: World) -> None:
    run_rounds_0_and_1(world)
    for site, accuracy in zip(SITES, (0.7, 0.8, 0.9), strict=True):
        answer(world, site, 2, metrics={"accuracy": accuracy})
    for site, accuracy in zip(SITES, (0.5, 0.6, 0.75), strict=True):
        answer(world, site, 3, metrics={"accuracy": accuracy})

    reply = world.call(LEAD, "GET", f"{world.j}/cross-site/")
    assert reply.status_code == 200
    assert reply.json() == {
        "models": ["global", CHECKPOINT],
        "sites": list(SITES),
        "matrix": {
            "global": {s: {"accuracy": a} for s, a in zip(SITES, (0.5, 0.6, 0.75), strict=True)},
            CHECKPOINT: {s: {"accuracy": a} for s, a in zip(SITES, (0.7, 0.8, 0.9), strict=True)},
        },
    }
    detail = world.call(LEAD, "GET", f"{world.j}/").json()
    assert detail["cross_site"] == reply.json()["matrix"]
    assert detail["total_rounds"] == 4
    labels = [r["label"] for r in world.call(LEAD, "GET", f"{world.j}/rounds/").json()["results"]]
    assert labels == ["step 0", "step 1", "step 2", "step 3"]
    for persona, code in ((OUTSIDER, 404), (ANONYMOUS, 401), (SITE_IN, 401)):
        assert world.call(persona, "GET", f"{world.j}/cross-site/").status_code == code


def test_a_train_answer_without_tensors_is_rejected_and_the_relay_turn_skipped(
    world: World,
) -> None:
    answer(world, "site-1", 0, **train_answer([2.0, 3.0], 5, 0.2))
    answer(world, "site-2", 0, **train_answer([4.0, 5.0], 5, 0.4))
    answer(world, "site-3", 0, **train_answer([10.0, 20.0], 4, 0.6))

    turn = answer(world, "site-2", 1, metrics={"accuracy": 0.9})

    assert turn.state == TaskState.REJECTED and "w" in turn.reason
    relay = Round.objects.get(job=world.job, number=1)
    assert relay.state == RoundState.CLOSED  # min_results 0: skipped, not failed
    assert model_of(world, 2)["w"].tolist() == [3.0, 4.0]  # unchanged


class WorkerKilled(BaseException):
    """A worker's death in the middle of the closing transaction: not an Exception, so no
    handler of the round controller catches it."""


def test_a_close_killed_before_its_transaction_writes_the_same_bits_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = world.job
    assert job is not None
    aggregate = rounds._round_aggregate
    held = rounds.Advance(rounds.Step.NOTHING, "held: aggregation not started yet")
    monkeypatch.setattr(rounds, "_round_aggregate", lambda round_id: held)
    answer(world, "site-1", 0, **train_answer([2.0, 3.0], 5, 0.2))
    answer(world, "site-2", 0, **train_answer([4.0, 5.0], 5, 0.4))
    answer(world, "site-3", 0, **train_answer([10.0, 20.0], 4, 0.6))
    assert Round.objects.get(job=job, number=0).state == RoundState.AGGREGATING
    monkeypatch.setattr(rounds, "_round_aggregate", aggregate)

    written: dict[str, bytes] = {}
    round_state = events.round_state

    def killed_at_commit(rnd: Round, **kwargs: Any) -> None:
        if rnd.state == RoundState.CLOSED:  # inside the closing transaction: files written
            media = Path(storage.local_path("jobs"))
            for path in sorted(media.rglob("*.safetensors")):
                if "/updates/" not in str(path):
                    written[str(path)] = path.read_bytes()
            raise WorkerKilled
        round_state(rnd, **kwargs)

    monkeypatch.setattr(events, "round_state", killed_at_commit)
    with pytest.raises(WorkerKilled):
        rounds.job_advance(job_id=job.pk)
    assert Round.objects.get(job=job, number=0).state == RoundState.AGGREGATING
    assert not ModelVersion.objects.filter(job=job, round_number=1).exists()
    assert not Checkpoint.objects.filter(job=job).exists()
    monkeypatch.setattr(events, "round_state", round_state)

    rounds.job_advance(job_id=job.pk)  # the next worker

    assert Round.objects.get(job=job, number=0).state == RoundState.CLOSED
    again = {path: Path(path).read_bytes() for path in written}
    assert again == written
    assert any("/checkpoints/" in p for p in written) and any("/state/" in p for p in written)
    assert model_of(world, 1)["w"].tolist() == [3.0, 4.0]
    assert state_after(world, 1).data == {"labels": ["step 0"]}
    # The next round was planned from the stored state: its label counts one closed round.
    assert Round.objects.get(job=job, number=1).label == "step 1"


def test_the_job_page_shows_the_turns_the_heat_map_and_the_parameters(world: World) -> None:
    page = Client()
    page.force_login(world.users[LEAD])
    answer(world, "site-1", 0, **train_answer([2.0, 3.0], 5, 0.2))
    answer(world, "site-2", 0, **train_answer([4.0, 5.0], 5, 0.4))
    answer(world, "site-3", 0, **train_answer([10.0, 20.0], 4, 0.6))
    assert world.job is not None
    html = page.get(f"/jobs/{world.job.uid}/").content.decode()
    # Round 0 had three tasks: no relay yet. The parameters, described by the schema.
    assert 'id="relay"' not in html and 'id="cross-site"' not in html
    assert 'data-param="min_clients"' in html and "sites a round needs" in html

    answer(world, "site-2", 1, **train_answer([4.0, 5.0], 6, 0.5))
    for site, accuracy in zip(SITES, (0.7, 0.8, 0.9), strict=True):
        answer(world, site, 2, metrics={"accuracy": accuracy})
    html = page.get(f"/jobs/{world.job.uid}/").content.decode()
    # Worst (0.7) red, best (0.9) green, the middle between; every value written out.
    assert 'data-site="site-1" class="heat-0">0.7<' in html
    assert 'data-site="site-2" class="heat-5">0.8<' in html
    assert 'data-site="site-3" class="heat-10">0.9<' in html
    assert f'data-model="{CHECKPOINT}"' in html
    assert "Step 2" in html and "submit_model" in html  # labels and task names in the grid


def test_a_relay_shows_its_turns_and_the_site_holding_the_model(
    tmp_path: Path, media: Path
) -> None:
    world = build_world(
        tmp_path, workflow="relay-probe", params={"min_clients": 3, "num_rounds": 1}
    )
    assert world.job is not None
    answer(world, "site-1", 0, **train_answer([2.0, 3.0], 5, 0.2))
    page = Client()
    page.force_login(world.users[LEAD])

    html = page.get(f"/jobs/{world.job.uid}/").content.decode()

    turns = html[html.index('id="relay"') : html.index("</ol>", html.index('id="relay"'))]
    assert turns.index('data-site="site-1"') < turns.index('data-site="site-2"')
    assert "site-1&#x27;s turn: accepted" in turns
    assert '<li data-site="site-2" aria-current="step" class="holder">' in turns
    assert 'data-site="site-3"' not in turns  # not its turn yet
