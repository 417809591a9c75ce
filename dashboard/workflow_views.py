"""What the job page shows of a job's workflow, read generically from the protocol's records:
its parameters (``job.params`` with each one's ``PARAMETERS`` description), the cross-site
heat map (``Evaluation`` rows), and a relay's turns (rounds whose plan has one task). No
workflow is named here: a new workflow shows up with its parameters, matrix and turns."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from jobs import selectors
from jobs.models import Job, Round, RoundState
from jobs.workflows import base as workflow_base


@dataclass(frozen=True)
class ParameterRow:
    name: str
    value: str
    description: str


def workflow_parameter_rows(job: Job) -> list[ParameterRow]:
    """The job's workflow parameters in the order its schema lists them (then any others),
    objects as compact JSON (FedOpt's optimizer settings, an aggregator's arguments)."""
    cls = workflow_base.workflow_registry().get(job.workflow)
    properties: dict[str, Any] = cls.PARAMETERS.get("properties", {}) if cls is not None else {}
    params = dict(job.params or {})
    names = [n for n in properties if n in params] + sorted(set(params) - set(properties))
    rows = []
    for name in names:
        value = params[name]
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        description = str(properties.get(name, {}).get("description", ""))
        rows.append(ParameterRow(name=name, value=shown, description=description))
    return rows


@dataclass(frozen=True)
class HeatCell:
    site: str
    value: float | None  # the key metric; None: not evaluated, or no such metric
    text: str
    css_class: str  # the cell's step on the colour scale (heat-0 … heat-10)


@dataclass(frozen=True)
class HeatRow:
    model: str
    cells: list[HeatCell]


@dataclass(frozen=True)
class HeatMap:
    metric: str
    higher_is_better: bool
    sites: list[str]
    rows: list[HeatRow]
    low: float
    high: float


def _key_metric(job: Job, matrix: dict[str, dict[str, dict[str, float]]]) -> str | None:
    """The workflow's key metric when the cells have it; else the first metric name in them."""
    wanted = (job.params or {}).get("key_metric")
    names = sorted({key for row in matrix.values() for cell in row.values() for key in cell})
    if isinstance(wanted, str) and wanted in names:
        return wanted
    return names[0] if names else None


HEAT_STEPS = 10  # the colour scale's steps: classes heat-0 (worst) to heat-10 (best)


def _heat_class(value: float, low: float, high: float, higher_is_better: bool) -> str:
    """The cell's step on the red (worst) to green (best) scale of ``dashboard.css``, light
    enough for dark text to stay readable. A class, not a style: the pages' CSP allows no
    inline style."""
    share = 0.5 if high == low else (value - low) / (high - low)
    if not higher_is_better:
        share = 1 - share
    return f"heat-{round(HEAT_STEPS * share)}"


def cross_site_heat_map(job: Job) -> HeatMap | None:
    """The cross-site matrix as a heat map of its key metric (models × sites); None when the
    job evaluated nothing."""
    found = selectors.cross_site_of(job)
    metric = _key_metric(job, found.matrix)
    if metric is None:
        return None
    higher_is_better = (job.params or {}).get("key_metric_mode", "max") != "min"
    values = [
        float(cell[metric])
        for row in found.matrix.values()
        for cell in row.values()
        if isinstance(cell.get(metric), int | float) and math.isfinite(cell[metric])
    ]
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    rows = []
    for model in found.models:
        cells = []
        for site in found.sites:
            raw = found.matrix[model].get(site, {}).get(metric)
            if isinstance(raw, int | float) and math.isfinite(raw):
                value = float(raw)
                step = _heat_class(value, low, high, higher_is_better)
                cells.append(HeatCell(site, value, f"{value:.4g}", step))
            else:
                cells.append(HeatCell(site, None, "—", ""))
        rows.append(HeatRow(model=model, cells=cells))
    return HeatMap(metric, higher_is_better, found.sites, rows, low, high)


@dataclass(frozen=True)
class RelayTurn:
    label: str
    site: str
    state: str  # the task's state
    is_current: bool


def relay_turns(job: Job, rounds: list[Round]) -> list[RelayTurn]:
    """A relay's turns in order, when every round so far planned one task (a site at a
    time); the holder is the site of the round that is open. Empty for other workflows."""
    plans = [rnd.plan.get("tasks", []) for rnd in rounds if rnd.plan]
    if not plans or len(plans) != len(rounds) or any(len(tasks) != 1 for tasks in plans):
        return []
    states = {
        (task.round_id, task.site.name): task.state for task in selectors.tasks_of_rounds(rounds)
    }
    turns = []
    for rnd, tasks in zip(rounds, plans, strict=True):
        site = str(tasks[0]["site"])
        turns.append(
            RelayTurn(
                label=rnd.label,
                site=site,
                state=str(states.get((rnd.pk, site), "")),
                is_current=rnd.state == RoundState.OPEN,
            )
        )
    return turns
