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

import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass

from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.utils import timezone

from client_agent.privacy.policy import JobAssessment, assess_job
from common.exceptions import NotFound
from fedportal.prepared import PreparedQuery
from jobs.bundle import MAX_TAGS
from jobs.models import (
    JOB_ACTIVE,
    TASK_ANSWERED,
    TASK_OPEN,
    Evaluation,
    Job,
    JobSite,
    JobState,
    LogLine,
    MetricPoint,
    ModelVersion,
    Round,
    RoundState,
    SiteTask,
    TaskState,
)
from sites import selectors as site_selectors
from sites.models import Project, Role, Site, SiteState
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


def organizations_deciding(user: UserLike | None, project: Project) -> list[int]:
    """The ids of the project's organisations at whose sites ``user`` decides which jobs run:
    :func:`can_decide_for_site`'s rule, per organisation (a query each)."""
    return [org.pk for org in project.organizations.all() if site_selectors.is_org_admin(user, org)]


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
        job.participants.select_related(
            "site__organization", "decided_by", "job__project", "job__submitted_by"
        )
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


def log_line_counts_of(job: Job) -> dict[int, int]:
    """How many log lines each site has stored for the job, by site id (absent: none)."""
    counts = LogLine.objects.filter(job=job).values("site_id").annotate(n=Count("id"))
    return {row["site_id"]: row["n"] for row in counts.order_by()}


def log_lines_matching(
    job: Job, text: str, *, site: Site | None = None, limit: int = 500
) -> tuple[list[LogLine], int]:
    """The job's log lines holding ``text`` (any case, as a plain substring: ``%`` and ``_``
    are literal), by site name then as stored, at most ``limit`` of them; and how many match
    in all."""
    lines = LogLine.objects.filter(job=job, text__icontains=text)
    if site is not None:
        lines = lines.filter(site=site)
    found = list(lines.select_related("site").order_by("site__name", "id")[:limit])
    total = len(found) if len(found) < limit else lines.count()
    return found, total


def round_metric_keys_of(job: Job) -> list[str]:
    """The metric keys the job has per-round values of (points with a round and no step:
    sites' train results and the round aggregates), sorted."""
    keys = MetricPoint.objects.filter(job=job, round_number__isnull=False, step__isnull=True)
    return sorted(set(keys.values_list("key", flat=True).order_by()))


def round_metric_values_of(job: Job, key: str) -> dict[tuple[int | None, int], float]:
    """``{(site id or None for the aggregate, round number from 0): value}`` of ``key``; where
    a site sent a round's value more than once, the last one recorded counts."""
    points = MetricPoint.objects.filter(
        job=job, key=key, round_number__isnull=False, step__isnull=True
    ).order_by("created_at", "id")
    values: dict[tuple[int | None, int], float] = {}
    for site_id, round_number, value in points.values_list("site_id", "round_number", "value"):
        if round_number is not None:  # always, by the filter; for the type checker
            values[(site_id, round_number)] = value
    return values


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


def initial_parameter_count(job: Job) -> int | None:
    """How many values the job's model holds, from the initial model file's header (no tensor
    read); None when the file is missing or unreadable."""
    import math

    from client_agent.wire import WireFormatError, read_header

    version = ModelVersion.objects.filter(job=job, round_number=0).first()
    if version is None or not version.file:
        return None
    try:
        header, _ = read_header(version.file.path)
    except (OSError, WireFormatError, NotImplementedError):
        # NotImplementedError: Django's answer to .path on a storage that is not on disk.
        return None
    return sum(math.prod(int(d) for d in entry["shape"]) for entry in header.values())


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


# What an agent's request on its task never reads of the task's round and job, and whose
# size grows with the sites: the round's plan lists every site's task, a protected round's
# state every site's keys, the job its sites. Decoding them on every request of every site
# made a round's agent requests cost the square of its sites (profiled at 100 agents: JSON
# decoding was the largest single cost of the portal's request path).
ROUND_GROWS = ("plan", "protection", "metrics")
JOB_GROWS = ("spec", "params", "round_sites", "tags")
ROUND_HEAVY = (
    *(f"round__{name}" for name in ROUND_GROWS),
    *(f"round__job__{name}" for name in JOB_GROWS),
)


def _site_tasks(
    *, with_start_model: bool, whole_round: bool, **filters: object
) -> QuerySet[SiteTask]:
    """The site tasks ``filters`` select, each with its round and job (without the fields that
    grow with the sites unless ``whole_round``) and its site; with ``with_start_model``, the
    global model its round starts from (:func:`start_model_of`). Unordered: building the
    model's ordering (which would join the sites) cost a request more than the database
    spends on it."""
    tasks = SiteTask.objects.select_related("round__job", "site").filter(**filters)
    if not whole_round:
        tasks = tasks.defer(*ROUND_HEAVY)
    if with_start_model:
        start = ModelVersion.objects.filter(
            job_id=OuterRef("round__job_id"), round_number=OuterRef("round__number")
        ).order_by()
        tasks = tasks.annotate(
            **{
                f"{_START_MODEL}{name}": Subquery(start.values(name)[:1])
                for name in _START_MODEL_FIELDS
            }
        )
    return tasks.order_by()


def _task_of_site_in_job(*, with_start_model: bool) -> PreparedQuery[SiteTask]:
    return PreparedQuery(
        lambda site_id, round_number, job_uid: _site_tasks(
            with_start_model=with_start_model,
            whole_round=False,
            site_id=site_id,
            round__number=round_number,
            round__job__uid=job_uid,
        ),
        # Examples no constant of the query equals (within the columns' ranges: a round number
        # out of range would compile to no query at all).
        site_id=2_000_000_011,
        round_number=2_000_000_017,
        job_uid=uuid.UUID(int=0xF00D),
    )


# The lookup of every agent request (the model, the upload and its sender's check), compiled
# once: building and compiling it was the largest single cost of a request (fedportal.prepared).
_TASK_OF_SITE_IN_JOB = {flag: _task_of_site_in_job(with_start_model=flag) for flag in (False, True)}
_ROUND_NUMBERS = range(2**31)  # what Round.number (a PositiveIntegerField) can hold


def _site_task(
    site: Site,
    round_number: int,
    *,
    with_start_model: bool = False,
    whole_round: bool = False,
    **job: object,
) -> SiteTask | None:
    """The site's task in round ``round_number`` of the job that ``job`` filters on
    (:func:`_site_tasks`)."""
    if round_number not in _ROUND_NUMBERS:
        return None
    if not whole_round and set(job) == {"round__job__uid"}:
        return _TASK_OF_SITE_IN_JOB[with_start_model].first(
            site_id=site.pk, round_number=round_number, job_uid=job["round__job__uid"]
        )
    tasks = _site_tasks(
        with_start_model=with_start_model,
        whole_round=whole_round,
        round__number=round_number,
        site=site,
        **job,
    )
    # One row at most: sliced rather than ``first()``, which would sort by id.
    return next(iter(tasks[:1]), None)


# What a model download serves of a round's start model (its metrics may be large).
_START_MODEL = "start_model_"
_START_MODEL_FIELDS = ("id", "file", "sha256")


def start_model_of(task: SiteTask) -> ModelVersion | None:
    """The global model ``task``'s round starts from, as read with the task
    (``with_start_model``): its id, file and sha256 only; None when the task was read without
    it or the round has none yet."""
    values = {name: getattr(task, f"{_START_MODEL}{name}", None) for name in _START_MODEL_FIELDS}
    if values["id"] is None:
        return None
    return ModelVersion(job=task.round.job, round_number=task.round.number, **values)


def task_for_site(
    *, job: Job, site: Site, round_number: int, whole_round: bool = False
) -> SiteTask:
    """The site's task in round ``round_number`` of the job; NotFound when it has none.
    ``whole_round`` as :func:`_site_task`."""
    task = _site_task(site, round_number, whole_round=whole_round, round__job=job)
    if task is None:
        raise NotFound(f"this site has no task in round number {round_number} (counted from 0)")
    return task


def task_of_site(
    *,
    job_uid: object,
    site: Site,
    round_number: int,
    with_start_model: bool = False,
    whole_round: bool = False,
) -> SiteTask:
    """The site's task in round ``round_number`` of the job with ``job_uid``: what
    :func:`job_for_site` then :func:`task_for_site` give, with their NotFound, in one query
    when the task exists (a site has tasks only in jobs it takes part in). With
    ``with_start_model`` that query also reads the round's start model
    (:func:`start_model_of`); ``whole_round`` as :func:`_site_task`."""
    task = None
    if not isinstance(job_uid, uuid.UUID):
        with contextlib.suppress(ValueError):
            job_uid = uuid.UUID(str(job_uid))
    if isinstance(job_uid, uuid.UUID):
        task = _site_task(
            site,
            round_number,
            with_start_model=with_start_model,
            whole_round=whole_round,
            round__job__uid=job_uid,
        )
    if task is None:
        job = job_for_site(job_uid=job_uid, site=site)  # NotFound naming the job, if it is that
        return task_for_site(job=job, site=site, round_number=round_number, whole_round=whole_round)
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


# What the job list never reads of a job and its project, and that grows with the job's sites
# and bundle (the spec, the site list) or is the project's authority (its CA).
_LISTING_HEAVY = (
    "privacy",
    *(f"job__{name}" for name in JOB_GROWS),
    "job__project__ca_certificate_pem",
    "job__project__ca_private_key_encrypted",
)


def site_active_jobs(site: Site) -> SiteActiveJobs:
    """What the site's agent polls: its active jobs, oldest first, and its task in each open
    round; one query when it has no active job, two otherwise.

    Every agent lists its jobs every 30 s while connected, busy or not, so this is a steady
    cost per site. Neither query is sorted by the database: building an ORDER BY across the
    join cost more than the rest of the listing (profiled at 100 agents); the few rows are
    sorted here."""
    links = list(
        JobSite.objects.filter(site=site, job__state__in=JOB_ACTIVE)
        .select_related("job__project", "job__submitted_by")
        .defer(*_LISTING_HEAVY)
        .order_by()
    )
    if not links:
        return SiteActiveJobs(links=[], open_tasks={})
    links.sort(key=lambda link: (link.job.created_at, link.job_id))
    jobs = {link.job_id: link.job for link in links}
    open_tasks = {}
    for task in (
        SiteTask.objects.filter(site=site, round__state=RoundState.OPEN, round__job__in=jobs)
        .select_related("round")
        .defer(*(f"round__{name}" for name in ROUND_GROWS))
        .order_by()
    ):
        task.site, task.round.job = site, jobs[task.round.job_id]  # read already
        open_tasks[task.round.job_id] = task
    return SiteActiveJobs(links=links, open_tasks=open_tasks)


POSSIBLE = "possible"


def decision_counts(job_ids: list[int]) -> dict[int, dict[str, int]]:
    """For each job, how many of its sites accepted, are pending and declined, and how many
    can still take part (:data:`POSSIBLE`: accepted or pending, and enrolled: a revoked or
    denied site cannot); two queries."""
    counts: dict[int, dict[str, int]] = {
        job_id: dict.fromkeys([*JobSite.Decision.values, POSSIBLE], 0) for job_id in job_ids
    }
    links = JobSite.objects.filter(job_id__in=job_ids)
    rows = links.values_list("job_id", "decision").annotate(n=Count("id")).order_by()
    for job_id, decision, n in rows:
        counts[job_id][decision] = n
    possible = (
        links.filter(
            decision__in=(JobSite.Decision.ACCEPTED, JobSite.Decision.PENDING),
            site__state=SiteState.ENROLLED,
        )
        .values_list("job_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    for job_id, n in possible:
        counts[job_id][POSSIBLE] = n
    return counts


@dataclass(frozen=True)
class QuorumShortfall:
    """A job that cannot start: only ``possible`` sites can still take part, it needs ``needed``."""

    possible: int
    needed: int


LAG_OFFLINE = "its agent is offline"
LAG_SLOW = "no answer after half the round's time, while other sites have answered"


def lag_of(
    *,
    state: str,
    online: bool,
    opened_at: dt.datetime,
    deadline: dt.datetime,
    others_answered: bool,
    now: dt.datetime,
) -> str:
    """Why a site holding a task of an open round is lagging ("" when it is not): the one rule
    for "lagging", for the job page and the project page.

    A site is lagging when its task is still open (assigned, downloaded or training: it owes
    the round an upload) and either

    - its agent is offline (``sites.selectors.site_is_online``), so nothing will come until it
      is back; or
    - half the round's time (from its opening to its deadline) has passed, and at least one
      other site of the round has answered (uploaded, accepted, rejected or failed).

    A site that uploaded, answered or was marked late is not lagging: it holds nothing.
    """
    if state not in TASK_OPEN:
        return ""
    if not online:
        return LAG_OFFLINE
    if others_answered and now >= opened_at + (deadline - opened_at) / 2:
        return LAG_SLOW
    return ""


@dataclass(frozen=True)
class RoundHolder:
    """A site's task in an open round, whether its agent is online, and why it lags ("")."""

    task: SiteTask
    online: bool
    lag: str


def round_holders_of(rounds: list[Round], now: dt.datetime | None = None) -> list[RoundHolder]:
    """Every task of ``rounds`` (open ones: the rule is about rounds still waiting), with its
    site and round and the round's job, by round then site name: one query."""
    now = now or timezone.now()
    tasks = list(
        SiteTask.objects.filter(round__in=rounds)
        .select_related("site", "round", "round__job")
        .order_by("round__job__name", "round__job_id", "round__number", "site__name")
    )
    answered: dict[int, int] = {}
    for task in tasks:
        if task.state in TASK_ANSWERED or task.state == TaskState.UPLOADED:
            answered[task.round_id] = answered.get(task.round_id, 0) + 1
    holders = []
    for task in tasks:
        mine = task.state in TASK_ANSWERED or task.state == TaskState.UPLOADED
        online = site_selectors.site_is_online(task.site, now)
        lag = lag_of(
            state=task.state,
            online=online,
            opened_at=task.round.opened_at,
            deadline=task.round.deadline,
            others_answered=answered.get(task.round_id, 0) - int(mine) > 0,
            now=now,
        )
        holders.append(RoundHolder(task=task, online=online, lag=lag))
    return holders


def open_rounds_of(jobs: QuerySet[Job]) -> list[Round]:
    """The open rounds of those of ``jobs`` that are running."""
    return list(
        Round.objects.filter(
            job__in=jobs.filter(state=JobState.RUNNING).order_by().values("pk"),
            state=RoundState.OPEN,
        )
    )


def lagging_in(jobs: QuerySet[Job], now: dt.datetime | None = None) -> list[RoundHolder]:
    """The lagging sites (:func:`lag_of`) of the open rounds of ``jobs``."""
    return [holder for holder in round_holders_of(open_rounds_of(jobs), now) if holder.lag]


def quorum_shortfall_of(job: Job) -> QuorumShortfall | None:
    """Whether a job not yet running can never reach ``min_clients``: the sites that accepted
    it or have still to decide, and are enrolled (a revoked or denied site cannot take part),
    are fewer than it needs. None when it can, or once it is running or over."""
    if job.state not in (JobState.SUBMITTED, JobState.WAITING):
        return None
    possible = decision_counts([job.pk])[job.pk][POSSIBLE]
    if possible >= job.min_clients:
        return None
    return QuorumShortfall(possible=possible, needed=job.min_clients)


# --- privacy -----------------------------------------------------------------------------------


def job_privacy_assessment(*, job: Job, site: Site) -> JobAssessment | None:
    """What ``job`` would spend at ``site`` under the policy its agent reported, and whether
    the policy refuses it (its project or submitter, or no round fits the budgets); None when
    the site never reported a policy. The one rule both acceptance paths and the pages use:
    the job's rounds from the start, after what the project has already spent there."""
    policy = site_selectors.site_privacy_policy(site)
    if policy is None:
        return None
    return assess_job(
        policy,
        project=job.project.slug,
        submitter=job.submitted_by.get_username() if job.submitted_by_id else None,
        rounds=job.num_rounds,
        job_spent=[],
        project_spent=site_selectors.site_privacy_project_spent(site),
    )


def job_privacy_expectation(link: JobSite) -> JobAssessment | None:
    """:func:`job_privacy_assessment` for one participation row (the approval page's figure)."""
    return job_privacy_assessment(job=link.job, site=link.site)


@dataclass(frozen=True)
class JobPrivacySpend:
    """What one job has spent at one site, as the site's agent last reported it; ``epsilon``
    is the accountant's value for ``history`` at ``delta`` (None: unbounded or not
    accounted, a policy without clipping or without noise)."""

    job: Job
    link: JobSite
    epsilon: float | None
    max_epsilon: float | None
    releases: int
    history: list[list[float]]
    delta: float | None
    noise_multiplier: float | None
    excluded: list[str]


def privacy_spend_of(link: JobSite) -> JobPrivacySpend | None:
    """The spend in ``link.privacy``; None when the site has reported none for the job."""
    report = link.privacy or {}
    if not report:
        return None
    return JobPrivacySpend(
        job=link.job,
        link=link,
        epsilon=report.get("epsilon"),
        max_epsilon=report.get("max_epsilon"),
        releases=int(report.get("releases") or 0),
        history=list(report.get("history") or []),
        delta=report.get("delta"),
        noise_multiplier=report.get("noise_multiplier"),
        excluded=list(report.get("excluded") or []),
    )


def site_privacy_spend(site: Site) -> list[JobPrivacySpend]:
    """Each job's spend at ``site`` that its agent reported, newest job first."""
    links = (
        JobSite.objects.filter(site=site)
        .exclude(privacy={})
        .select_related("job__project", "site")
        .order_by("-job__created_at", "-job__id")
    )
    return [spend for link in links if (spend := privacy_spend_of(link)) is not None]
