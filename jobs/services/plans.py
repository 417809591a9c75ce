"""A round's plan as the portal stores it, and where the workflow's files live in storage.

The round controller stores the plan a workflow made when the round opened (``Round.plan``)
and rebuilds the same :class:`~jobs.workflows.RoundPlan` from it for the close decision and
the close: the workflow is asked once per round, so a job resumed after a crash closes the
round it planned, whatever the workflow would plan now.

The JSON of a plan::

    {"label": "round 1", "min_results": 2,
     "tasks": [{"site": "site-1", "model": "global",
                "spec": {"task_name": "train", "current_round": 0, "total_rounds": 2,
                         "start_round": 0, "meta": {}}}, ...]}
"""

from __future__ import annotations

from typing import Any

from jobs.models import Job
from jobs.workflows import ModelRef, PlannedTask, RoundPlan, TaskSpec
from jobs.workflows.base import checkpoint_file_stem


def task_spec_payload(spec: TaskSpec) -> dict[str, Any]:
    """A task as agents get it (the script's FLModel fields), in events and the API."""
    return {
        "task_name": spec.task_name,
        "current_round": spec.current_round,
        "total_rounds": spec.total_rounds,
        "start_round": spec.start_round,
        "meta": dict(spec.meta),
    }


def task_spec_from_payload(data: dict[str, Any]) -> TaskSpec:
    return TaskSpec(
        task_name=str(data["task_name"]),
        current_round=int(data["current_round"]),
        total_rounds=int(data["total_rounds"]),
        start_round=int(data.get("start_round", 0)),
        meta=dict(data.get("meta") or {}),
    )


def plan_to_json(plan: RoundPlan) -> dict[str, Any]:
    return {
        "label": plan.label,
        "min_results": plan.min_results,
        "tasks": [
            {"site": t.site, "model": str(t.model), "spec": task_spec_payload(t.spec)}
            for t in plan.tasks
        ],
    }


def plan_from_json(data: dict[str, Any]) -> RoundPlan:
    """The plan :func:`plan_to_json` stored, equal to the one the workflow made."""
    return RoundPlan(
        tasks=tuple(
            PlannedTask(
                site=str(t["site"]),
                spec=task_spec_from_payload(t["spec"]),
                model=ModelRef.parse(str(t["model"])),
            )
            for t in data["tasks"]
        ),
        min_results=int(data["min_results"]),
        label=str(data["label"]),
    )


# --- storage names -----------------------------------------------------------------------------


def job_folder(job: Job) -> str:
    return f"jobs/{job.project_id}/{job.uid}"


def global_model_name(job: Job, completed_rounds: int) -> str:
    """The global model after ``completed_rounds`` rounds (a count, not an index)."""
    return f"{job_folder(job)}/models/round-{completed_rounds:03d}.safetensors"


def server_state_name(job: Job, completed_rounds: int) -> str:
    """The workflow's server state after ``completed_rounds`` rounds."""
    return f"{job_folder(job)}/state/state-{completed_rounds:03d}.safetensors"


def protected_total_name(job: Job, round_number: int) -> str:
    """The encrypted sum of round ``round_number``'s updates (HE: a site decrypts it)."""
    return f"{job_folder(job)}/secure/round-{round_number:03d}-total.bin"


def secure_data_name(job: Job, round_number: int, phase: str, site: str) -> str:
    """What a site sent with its ``phase`` message of a protected round (a decrypted sum)."""
    return f"{job_folder(job)}/secure/round-{round_number:03d}-{phase}-{site}.bin"


def checkpoint_name(job: Job, name: str) -> str:
    """The file of the checkpoint ``name`` (``"site:site-2"`` → ``…/site--site-2``)."""
    return f"{job_folder(job)}/checkpoints/{checkpoint_file_stem(name)}.safetensors"
