"""Reads of the jobs app: which jobs a person or a site may see, and who may act on them.

The role rules, after NVFlare's default authorisation policy:

- **project admin**: sees every job of the project, submits, and manages (aborts) any job;
- **lead**: sees the project's jobs, submits, and manages the jobs they submitted;
- **org admin** and **member**: see the project's jobs; an org admin (or a project admin)
  decides for their organisation's sites whether a job runs there;
- anyone else: nothing. A job of another project is "not found", never "forbidden".

Site agents see only the jobs their site takes part in (:func:`job_for_site`,
:func:`task_for_site` and :func:`site_active_jobs`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.db.models import Count, Prefetch, Q, QuerySet

from common.exceptions import NotFound
from jobs.bundle import MAX_TAGS
from jobs.models import (
    JOB_ACTIVE,
    Evaluation,
    Job,
    JobSite,
    LogLine,
    MetricPoint,
    ModelVersion,
    Round,
    RoundState,
    SiteTask,
    TaskState,
)
from sites import selectors as site_selectors
from sites.models import Project, Role, Site
from sites.selectors import UserLike

SUBMITTER_ROLES = frozenset({Role.PROJECT_ADMIN, Role.LEAD})


# --- who may do what ---------------------------------------------------------------------------


def can_submit_job(user: UserLike | None, project: Project) -> bool:
    """Project admins and leads submit jobs."""
    return bool(site_selectors.role_in_project(user, project) & SUBMITTER_ROLES)


def can_manage_job(user: UserLike | None, job: Job) -> bool:
    """Abort: a project admin, or the lead who submitted the job (while still a lead)."""
    roles = site_selectors.role_in_project(user, job.project)
    if Role.PROJECT_ADMIN in roles:
        return True
    return Role.LEAD in roles and job.submitted_by_id == getattr(user, "pk", None)


def can_decide_for_site(user: UserLike | None, site: Site) -> bool:
    """Accept or decline a job for a site: its organisation's org admins and project admins."""
    return site_selectors.can_manage_site(user, site)


# --- what a person may see ---------------------------------------------------------------------


def jobs_visible_to(
    user: UserLike | None,
    *,
    project: Project | None = None,
    state: str | None = None,
    submitter: str | None = None,
    name: str | None = None,
    experiment: str | None = None,
    tag: str | None = None,
) -> QuerySet[Job]:
    """Jobs of the projects ``user`` belongs to, newest first; ``submitter`` is a username,
    ``name`` a part of the job's name in any letter case, ``experiment`` the experiment's
    whole name in any letter case, ``tag`` one of the job's tags exactly."""
    qs = Job.objects.filter(project__in=site_selectors.projects_visible_to(user))
    if project is not None:
        qs = qs.filter(project=project)
    if state:
        qs = qs.filter(state=state)
    if submitter:
        qs = qs.filter(submitted_by__username=submitter)
    if name:
        qs = qs.filter(name__icontains=name)
    if experiment:
        qs = qs.filter(experiment__iexact=experiment)
    if tag:
        qs = qs.filter(has_tag(tag))
    return qs.select_related("project", "submitted_by")


def has_tag(tag: str) -> Q:
    """Jobs whose tags hold ``tag``. SQLite has no JSON containment (``tags__contains``), but
    both databases compare a list's element by position, and a job has at most ``MAX_TAGS``."""
    found = Q()
    for position in range(MAX_TAGS):
        found |= Q(**{f"tags__{position}": tag})
    return found


def job_visible_to(user: UserLike | None, uid: uuid.UUID | str) -> Job:
    """The job with ``uid`` if ``user`` may see it; NotFound otherwise, whether or not it exists."""
    job = jobs_visible_to(user).filter(uid=uid).first()
    if job is None:
        raise NotFound("no such job")
    return job


def rounds_of(job: Job) -> QuerySet[Round]:
    return job.rounds.order_by("number").prefetch_related(
        Prefetch("tasks", queryset=SiteTask.objects.select_related("site").order_by("site__name"))
    )


def participants_of(job: Job) -> QuerySet[JobSite]:
    """The job's sites, by name, each with ``job_tasks``: its tasks in this job, by round."""
    tasks = SiteTask.objects.filter(round__job=job).select_related("round")
    tasks = tasks.order_by("round__number")
    return (
        job.participants.select_related("site__organization", "decided_by")
        .prefetch_related(Prefetch("site__tasks", queryset=tasks, to_attr="job_tasks"))
        .order_by("site__name")
    )


def participant_of(job: Job, site_name: str) -> JobSite:
    link = participants_of(job).filter(site__name=site_name).first()
    if link is None:
        raise NotFound(f"site {site_name!r} does not take part in this job")
    return link


def metric_points_of(
    job: Job,
    *,
    key: str | None = None,
    site: str | None = None,
    round_number: int | None = None,
    source: str | None = None,
) -> QuerySet[MetricPoint]:
    """The job's metric points in the order they were recorded; ``site`` is a site name."""
    qs = job.metric_points.select_related("site").order_by("created_at", "id")
    if key:
        qs = qs.filter(key=key)
    if site:
        qs = qs.filter(site__name=site)
    if round_number is not None:
        qs = qs.filter(round_number=round_number)
    if source:
        qs = qs.filter(source=source)
    return qs


def task_grid_of(job: Job) -> tuple[list[Round], list[tuple[JobSite, list[SiteTask | None]]]]:
    """The job's rounds by number, and each participant (by site name) with its task in each
    of them (None where it had none): the job page's grid, in three queries whatever the
    number of rounds and sites."""
    rounds = list(job.rounds.order_by("number"))
    column = {rnd.pk: i for i, rnd in enumerate(rounds)}
    links = list(job.participants.select_related("site", "decided_by").order_by("site__name"))
    cells: dict[int, list[SiteTask | None]] = {link.site_id: [None] * len(rounds) for link in links}
    tasks = SiteTask.objects.filter(round__job=job).only(
        "round_id", "site_id", "state", "reason", "task_name", "model_ref"
    )
    for task in tasks:
        row, i = cells.get(task.site_id), column.get(task.round_id)
        if row is not None and i is not None:
            row[i] = task
    return rounds, [(link, cells[link.site_id]) for link in links]


def tasks_of_rounds(rounds: list[Round]) -> QuerySet[SiteTask]:
    """The tasks of ``rounds``, with their sites, in one query."""
    return SiteTask.objects.filter(round__in=rounds).select_related("site")


def log_tails_of(job: Job, sites: list[Site], *, limit: int = 200) -> dict[int, list[LogLine]]:
    """The last ``limit`` log lines of each of ``sites`` in the job, oldest first, by site id.
    One query a site, each reading only its tail through the (job, site, id) index, however
    many lines the job has."""
    tails: dict[int, list[LogLine]] = {}
    for site in sites:
        newest = (
            LogLine.objects.filter(job=job, site=site)
            .order_by("-id")
            .only("site_id", "stream", "round_number", "text")[:limit]
        )
        tails[site.pk] = list(reversed(newest))
    return tails


CrossSiteMatrix = dict[str, dict[str, dict[str, float]]]


def cross_site_matrix_of(job: Job) -> CrossSiteMatrix:
    """The job's evaluation scores: ``matrix[model][site]`` is the metrics ``site`` computed
    for ``model`` (``"global"``, or a checkpoint's name such as ``"site:site-2"``); a later
    round's cell replaces an earlier one's, as in ``Run.cross_site_matrix``. Empty when the
    job evaluated nothing."""
    matrix: CrossSiteMatrix = {}
    cells = Evaluation.objects.filter(job=job).order_by("round_number", "model", "site_name")
    for cell in cells.only("model", "site_name", "metrics"):
        matrix.setdefault(cell.model, {})[cell.site_name] = dict(cell.metrics)
    return matrix


@dataclass(frozen=True)
class CrossSite:
    """A job's cross-site evaluation laid out: the models ("global" first, then by name), the
    sites (by name) and ``matrix[model][site]``."""

    models: list[str]
    sites: list[str]
    matrix: CrossSiteMatrix


def cross_site_of(job: Job) -> CrossSite:
    matrix = cross_site_matrix_of(job)
    models = sorted(matrix, key=lambda name: (name != "global", name))
    sites = sorted({site for row in matrix.values() for site in row})
    return CrossSite(models=models, sites=sites, matrix=matrix)


def model_versions_of(job: Job) -> QuerySet[ModelVersion]:
    return job.models.order_by("round_number")


def model_version_of(job: Job, round_number: int) -> ModelVersion:
    version = job.models.filter(round_number=round_number).first()
    if version is None:
        raise NotFound(f"no global model after {round_number} round(s) of this job")
    return version


# --- what a site agent sees --------------------------------------------------------------------


def job_for_site(*, job_uid: object, site: Site) -> Job:
    """The job, if ``site`` takes part in it; otherwise NotFound (existence must not leak),
    also for a ``job_uid`` that is no job id at all (it may come from an agent's message)."""
    try:
        uid = uuid.UUID(str(job_uid)) if not isinstance(job_uid, uuid.UUID) else job_uid
    except ValueError:
        raise NotFound("no such job for this site") from None
    # At most one row: no ordering (the model's would sort, and this runs on every agent call).
    job = Job.objects.filter(uid=uid, participants__site=site).order_by().first()
    if job is None:
        raise NotFound("no such job for this site")
    return job


def task_for_site(*, job: Job, site: Site, round_number: int) -> SiteTask:
    """The site's task in round ``round_number`` of the job; NotFound when it has none."""
    task = (
        SiteTask.objects.select_related("round__job", "site")
        .filter(round__job=job, round__number=round_number, site=site)
        .order_by()  # one row; the model's ordering would join the sites to sort it
        .first()
    )
    if task is None:
        raise NotFound(f"this site has no task in round number {round_number} (counted from 0)")
    return task


_OPEN_TASK_STATES = (TaskState.ASSIGNED, TaskState.DOWNLOADED, TaskState.TRAINING)


def task_takes_update(task: SiteTask) -> bool:
    """One update per task: while it is open, or once, late, after its round closed."""
    return task.state in _OPEN_TASK_STATES or (task.state == TaskState.LATE and not task.update)


@dataclass(frozen=True)
class SiteActiveJobs:
    """The active jobs a site takes part in, as its participation rows (oldest first), and its
    task in each one's open round, by job id (absent between rounds and before the start)."""

    links: list[JobSite]
    open_tasks: dict[int, SiteTask]


def site_active_jobs(site: Site) -> SiteActiveJobs:
    """What the site's agent polls: its active jobs and its task in each open round."""
    links = list(
        JobSite.objects.filter(site=site, job__state__in=JOB_ACTIVE)
        .select_related("job")
        .order_by("job__created_at", "job__id")
    )
    open_tasks = SiteTask.objects.filter(
        site=site, round__state=RoundState.OPEN, round__job__in=[link.job_id for link in links]
    ).select_related("round__job", "site")
    return SiteActiveJobs(links=links, open_tasks={task.round.job_id: task for task in open_tasks})


def decision_counts(job_ids: list[int]) -> dict[int, dict[str, int]]:
    """For each job, how many of its sites accepted, are pending and declined: one query."""
    counts: dict[int, dict[str, int]] = {
        job_id: dict.fromkeys(JobSite.Decision.values, 0) for job_id in job_ids
    }
    rows = (
        JobSite.objects.filter(job_id__in=job_ids)
        .values_list("job_id", "decision")
        .annotate(n=Count("id"))
        .order_by()
    )
    for job_id, decision, n in rows:
        counts[job_id][decision] = n
    return counts
