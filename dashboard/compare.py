"""Runs side by side, as MLflow's run comparison shows them: which jobs the URL names, one
metric's curves overlaid, the parameters with the rows that differ marked, and each job's final
and best scores.

**Bounded.** At most :data:`MAX_COMPARED` jobs. Each job's points are read once, by
``dashboard.metrics.metric_charts`` (two queries a job, downsampled series); the participants of
all the jobs are one query more. Nothing is read per round: scores come from the charts' series,
whose downsampling keeps each series' last point and its lowest and highest values.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.utils import timezone

from dashboard.metrics import AGGREGATE, metric_charts
from dashboard.workflow_views import workflow_parameter_rows
from jobs import selectors
from jobs.models import Job, JobSite
from sites.models import Project
from sites.selectors import UserLike

MAX_COMPARED = 10
AXES = ("round", "step")
# Keys whose lower values are better when the job does not say (its key_metric_mode does).
_LOWER_IS_BETTER_WORDS = ("loss", "error", "err", "mse", "mae", "perplexity", "distance")
MISSING = "—"


# --- which jobs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The jobs to compare, in the order the URL names them, and what was wrong with the
    rest of the URL, said for people."""

    jobs: list[Job]
    problems: list[str]


def compare_selection(*, user: UserLike, project: Project, uids: Sequence[str]) -> Selection:
    """The project's jobs named by ``uids`` that ``user`` may see (at most
    :data:`MAX_COMPARED`). A uid that is malformed, or names no job of this project that the
    user may see, is left out with a problem saying so; whether it exists elsewhere is not
    told."""
    problems: list[str] = []
    wanted: dict[uuid.UUID, str] = {}
    malformed: list[str] = []
    for raw in uids:
        try:
            wanted.setdefault(uuid.UUID(raw.strip()), raw.strip())
        except ValueError:
            malformed.append(raw[:40])
    if malformed:
        problems.append("Not job ids: " + ", ".join(f"“{text}”" for text in malformed) + ".")
    if len(wanted) > MAX_COMPARED:
        problems.append(
            f"At most {MAX_COMPARED} jobs are compared at once: "
            f"these are the first {MAX_COMPARED} of the {len(wanted)} selected."
        )
        wanted = dict(list(wanted.items())[:MAX_COMPARED])
    found = {
        job.uid: job
        for job in selectors.jobs_visible_to(user, project=project).filter(uid__in=list(wanted))
    }
    unknown = [text for uid, text in wanted.items() if uid not in found]
    if unknown:
        problems.append(
            f"No job of {project.name} has the id "
            + ", ".join(f"“{text}”" for text in unknown)
            + ": it is left out."
        )
    return Selection(jobs=[found[uid] for uid in wanted if uid in found], problems=problems)


# --- what the page shows ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterRow:
    name: str
    values: list[str]  # one a job, in the jobs' order
    differs: bool


@dataclass(frozen=True)
class ScoreCell:
    final: str  # the last round's aggregate
    best: str
    best_round: int | None  # counted from 1


@dataclass(frozen=True)
class ScoreRow:
    key: str
    higher_is_better: bool
    cells: list[ScoreCell]


@dataclass(frozen=True)
class JobColumn:
    """A job's column head and the facts the scores table opens with."""

    job: Job
    duration: str
    rounds: str


@dataclass(frozen=True)
class Comparison:
    columns: list[JobColumn]
    metric_keys: list[str]
    metric: str | None
    axis: str
    per_site: bool
    chart: dict[str, Any]  # for compare.js: the chosen metric's series, job by job
    chart_empty: bool
    parameters: list[ParameterRow]
    scores: list[ScoreRow]
    problems: list[str]


def number(value: float | None) -> str:
    return MISSING if value is None else format(value, ".6g")


def duration_text(job: Job, now: dt.datetime) -> str:
    """From start to end (to now while it runs); "—" before it starts."""
    if job.started_at is None:
        return MISSING
    seconds = int(((job.finished_at or now) - job.started_at).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


def higher_is_better(job: Job, key: str) -> bool:
    """The job's own rule for its key metric (``key_metric_mode``); otherwise lower is better
    for keys named like a loss or an error, higher for the rest (accuracy, AUC, F1…)."""
    params = job.params or {}
    if params.get("key_metric") == key and params.get("key_metric_mode") in ("max", "min"):
        return bool(params["key_metric_mode"] == "max")
    lowered = key.lower()
    return not any(word in lowered for word in _LOWER_IS_BETTER_WORDS)


def _score(points: list[list[Any]] | None, higher: bool) -> ScoreCell:
    """Final and best of an aggregate by-round series (sorted by round, from 1)."""
    if not points:
        return ScoreCell(final=MISSING, best=MISSING, best_round=None)
    best = points[0]
    for point in points[1:]:
        if (point[1] > best[1]) if higher else (point[1] < best[1]):
            best = point
    return ScoreCell(final=number(points[-1][1]), best=number(best[1]), best_round=int(best[0]))


def _sites_of(jobs: list[Job]) -> dict[int, list[str]]:
    """Each job's sites: those its rounds run over once it started, else those asked to take
    part; one query for all the jobs."""
    asked: dict[int, list[str]] = {job.pk: [] for job in jobs}
    links = JobSite.objects.filter(job__in=[job.pk for job in jobs]).order_by("site__name")
    for job_id, name in links.values_list("job_id", "site__name"):
        asked[job_id].append(name)
    return {job.pk: list(job.round_sites) if job.round_sites else asked[job.pk] for job in jobs}


def parameter_rows(jobs: list[Job]) -> list[ParameterRow]:
    """One row a parameter: the job's set-up, then each workflow parameter (in the first
    job's order, then the others'), as the job page shows them."""
    sites = _sites_of(jobs)
    rows: list[tuple[str, list[str]]] = [
        ("workflow", [job.workflow for job in jobs]),
        ("train_script", [str(job.spec.get("train_script", "")) for job in jobs]),
        ("train_args", [str(job.spec.get("train_args", "")) for job in jobs]),
        ("min_clients", [str(job.min_clients) for job in jobs]),
        ("num_rounds", [str(job.num_rounds) for job in jobs]),
        ("sites", [", ".join(sites[job.pk]) or MISSING for job in jobs]),
        ("experiment", [job.experiment or MISSING for job in jobs]),
        ("tags", [", ".join(job.tags or []) or MISSING for job in jobs]),
    ]
    shown = {name for name, _ in rows}
    params = [{row.name: row.value for row in workflow_parameter_rows(job)} for job in jobs]
    names = [name for values in params for name in values if name not in shown]
    for name in dict.fromkeys(names):
        rows.append((name, [values.get(name, MISSING) for values in params]))
    return [
        ParameterRow(name=name, values=values, differs=len(set(values)) > 1)
        for name, values in rows
    ]


def compare_jobs(
    selection: Selection, *, metric: str | None, axis: str | None, per_site: bool
) -> Comparison:
    """What the compare page shows for ``selection``: ``metric`` (a key; default: the first
    job's key metric, else the first key with rounds) on the x ``axis`` ("round" or "step";
    default: round when the metric has rounds), and each site's series as well with
    ``per_site``."""
    jobs = selection.jobs
    problems = list(selection.problems)
    charts = [metric_charts(job) for job in jobs]
    by_axis: dict[str, set[str]] = {name: set() for name in AXES}
    for job_charts in charts:
        for chart in job_charts.values():
            by_axis[chart["axis"]].add(chart["key"])
    keys = sorted(by_axis["round"] | by_axis["step"])
    if metric and jobs and metric not in keys:
        problems.append(f"None of these jobs has the metric “{metric[:100]}”.")
        metric = None
    if metric is None and keys:
        wanted = (jobs[0].params or {}).get("key_metric")
        rounds = sorted(by_axis["round"])
        metric = wanted if wanted in keys else (rounds or keys)[0]
    if axis not in AXES:
        axis = "round" if metric in by_axis["round"] or metric is None else "step"
    chart_jobs = []
    for job, job_charts in zip(jobs, charts, strict=True):
        chart = job_charts.get(f"{metric} · by {axis}", {"series": {}, "counts": {}})
        series = {
            name: points
            for name, points in chart["series"].items()
            if per_site or name == AGGREGATE
        }
        chart_jobs.append({"name": job.name, "uid": str(job.uid), "series": series})
    # Scores: the aggregate by round of every key any job has by round.
    scores = []
    for key in sorted(by_axis["round"]):
        higher = higher_is_better(jobs[0], key)
        cells = [
            _score(c.get(f"{key} · by round", {}).get("series", {}).get(AGGREGATE), higher)
            for c in charts
        ]
        scores.append(ScoreRow(key=key, higher_is_better=higher, cells=cells))
    now = timezone.now()
    columns = [
        JobColumn(
            job=job,
            duration=duration_text(job, now),
            rounds=f"{job.completed_rounds} of {job.total_rounds or job.num_rounds}",
        )
        for job in jobs
    ]
    return Comparison(
        columns=columns,
        metric_keys=keys,
        metric=metric,
        axis=axis,
        per_site=per_site,
        chart={
            "metric": metric,
            "axis": axis,
            "aggregate": AGGREGATE,
            "jobs": chart_jobs,
        },
        chart_empty=not any(entry["series"] for entry in chart_jobs),
        parameters=parameter_rows(jobs) if jobs else [],
        scores=scores,
        problems=problems,
    )
