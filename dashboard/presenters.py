"""What the dashboard's tables show beside a model: small frozen records the views build and the
templates read (``row.site.name``, ``row.online``), so that no page sets attributes on a model
instance."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from django.urls import reverse

from dashboard.privacy import Expectation, JobSpend, link_spend
from jobs.models import Job, JobSite, LogLine, ModelVersion, SiteTask
from jobs.selectors import POSSIBLE
from sites.models import ApiToken, Membership, Project, Site
from sites.selectors import site_is_online


@dataclass(frozen=True)
class ProjectRow:
    """A project on the home page, with the viewer's roles in it and its live counts."""

    project: Project
    my_roles: list[str]
    enrolled_sites: int
    active_jobs: int


@dataclass(frozen=True)
class SiteRow:
    """A site with whether its agent is online now."""

    site: Site
    online: bool


def site_rows(sites: Iterable[Site]) -> list[SiteRow]:
    """Each site with ``online`` by the same heartbeat rule the round controller uses."""
    return [SiteRow(site=site, online=site_is_online(site)) for site in sites]


@dataclass(frozen=True)
class ApiTokenRow:
    """An API token with whether it can be used now (not revoked, not expired)."""

    token: ApiToken
    usable: bool


def api_token_rows(tokens: Iterable[ApiToken], *, now: dt.datetime) -> list[ApiTokenRow]:
    return [ApiTokenRow(token=token, usable=token.is_usable_at(now)) for token in tokens]


@dataclass(frozen=True)
class TaskGridRow:
    """A site of a job in the page's round grid: its participation (decision), whether its
    agent is online now, and its task in each round (None where it had none)."""

    link: JobSite
    online: bool
    tasks: list[SiteTask | None]
    privacy: JobSpend | None = None  # what the site spent on the job, once it reported it


def task_grid_rows(grid: Iterable[tuple[JobSite, list[SiteTask | None]]]) -> list[TaskGridRow]:
    """``jobs.selectors.task_grid_of``'s rows, each with ``online`` by the heartbeat rule and
    the site's privacy spend on the job (its latest ledger report)."""
    return [
        TaskGridRow(
            link=link,
            online=site_is_online(link.site),
            tasks=tasks,
            privacy=link_spend(link),
        )
        for link, tasks in grid
    ]


@dataclass(frozen=True)
class ModelVersionRow:
    """A global model of a job, with the API address that downloads it."""

    version: ModelVersion
    download_url: str


def model_version_rows(job: Job, versions: Iterable[ModelVersion]) -> list[ModelVersionRow]:
    return [
        ModelVersionRow(
            version=version,
            download_url=reverse(
                "jobs-api:job-model-download",
                kwargs={"uid": job.uid, "round_number": version.round_number},
            ),
        )
        for version in versions
    ]


@dataclass(frozen=True)
class SiteLog:
    """A site's log tail in a job, and how many older lines its quota for the job dropped."""

    site: Site
    lines: list[LogLine]
    dropped: int
    total: int = 0  # every line stored, for the full-log download link

    @property
    def through(self) -> int:
        """The id of the last line shown (0: none). The page skips a live line whose id is
        not above it: its event was on its way while this tail was read. A site's lines are
        inserted under its job-site row's lock, so their ids rise in the order they commit."""
        return self.lines[-1].pk if self.lines else 0


@dataclass(frozen=True)
class DecisionRow:
    """A job waiting at one of the viewer's sites, with where its quorum stands: how many of
    its sites accepted, are pending, declined, against the ``min_clients`` it needs."""

    link: JobSite
    accepted: int
    pending: int
    declined: int
    possible: int  # accepted or pending, at enrolled sites (jobs.selectors.decision_counts)
    privacy: Expectation | None = None  # what the job would spend of the site's budget

    @property
    def can_still_start(self) -> bool:
        return self.possible >= self.link.job.min_clients


def decision_rows(
    links: list[JobSite],
    counts: dict[int, dict[str, int]],
    privacy: Mapping[int, Expectation] | None = None,
) -> list[DecisionRow]:
    """``privacy``: each link's expected spend by the link's id (``dashboard.privacy``)."""
    return [
        DecisionRow(
            link=link,
            accepted=counts[link.job_id][JobSite.Decision.ACCEPTED],
            pending=counts[link.job_id][JobSite.Decision.PENDING],
            declined=counts[link.job_id][JobSite.Decision.DECLINED],
            possible=counts[link.job_id][POSSIBLE],
            privacy=(privacy or {}).get(link.pk),
        )
        for link in links
    ]


@dataclass(frozen=True)
class PolicyRow:
    """One line of a site's policy as the portal knows it: what it rules, and the setting."""

    rule: str
    setting: str


def site_policy_rows(site: Site) -> list[PolicyRow]:
    """What the site decides for itself, as the portal knows it: who accepts its jobs and what
    it declared it has. The agent enforces its own rules at the site; this shows the ones it
    told the portal."""
    resources = ", ".join(f"{key}: {value}" for key, value in sorted(site.resources.items()))
    return [
        PolicyRow(
            "Who accepts jobs",
            "the site's agent, automatically"
            if site.auto_accept_jobs
            else "a site admin, job by job (the agent may not)",
        ),
        PolicyRow("Declared resources", resources or "none declared"),
        PolicyRow("Data", "stays at the site: only model updates, metrics and log lines leave"),
    ]


@dataclass(frozen=True)
class MemberRow:
    """One membership on the members page, with what the viewer may do to it: the roles they
    may give it (``sites.selectors.can_grant_role``) when they may manage it at all."""

    membership: Membership
    role_choices: tuple[tuple[str, str], ...]
    can_manage: bool
    error: str = ""


@dataclass(frozen=True)
class NextStep:
    """Something the signed-in person can do next, on the home page; ``url`` is empty when the
    step happens elsewhere (an invitation is accepted from the link its sender gave)."""

    text: str
    url: str = ""
