"""A job's records: each site's whole log, streamed as text; a search in its logs; its
metric table as CSV; who is holding its open round; a project's lagging sites.

Log format, one stored line per text line, oldest first (as stored)::

    2026-11-28T23:10:53.123456+00:00 round 3 script | the text

``round -`` when the line belongs to no round; rounds are counted from 1 as on the pages;
the stream is ``script`` or ``agent``. A newline or carriage return inside a line's text is
written as ``\\n`` / ``\\r`` (and a backslash as ``\\\\``) so each row stays one line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from uuid import UUID

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from common.downloads import download_filename
from common.rounds import round_for_people
from dashboard.http import SignedInRequest
from dashboard.job_records import (
    MAX_MATCHES,
    LogSearchForm,
    job_record_json,
    job_record_json_async,
    lagging_of_project,
    metric_table_csv,
    metric_table_of,
    round_holders_for_page,
)
from dashboard.views._common import job_for, project_for
from dashboard.views.projects import project_context
from jobs import selectors
from jobs.models import Job, LogLine
from sites.models import Site

LOG_BATCH = 2000

_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r"})


def log_row(line: LogLine) -> str:
    """One stored log line as one line of the download (format in the module docstring)."""
    number = "-" if line.round_number is None else str(round_for_people(line.round_number))
    text = line.text.translate(_ESCAPES)
    return f"{line.created_at.isoformat()} round {number} {line.stream} | {text}\n"


def _log_batch(job_id: int, site_id: int, after: int) -> tuple[str, int | None]:
    """The next ``LOG_BATCH`` lines after id ``after``, and the last id (None when done)."""
    lines = list(
        LogLine.objects.filter(job_id=job_id, site_id=site_id, id__gt=after)
        .order_by("id")
        .only("id", "created_at", "round_number", "stream", "text")[:LOG_BATCH]
    )
    if not lines:
        return "", None
    return "".join(log_row(line) for line in lines), lines[-1].pk


def site_log_text(job: Job, site: Site) -> Iterator[str]:
    """Every stored line of ``site`` in ``job``, a batch at a time: memory stays flat."""
    last: int | None = 0
    while last is not None:
        text, last = _log_batch(job.pk, site.pk, last)
        if text:
            yield text


async def site_log_text_async(job: Job, site: Site) -> AsyncIterator[str]:
    """:func:`site_log_text` for an ASGI server, which would read a plain iterator to the
    end before sending anything."""
    last: int | None = 0
    batch = sync_to_async(_log_batch)
    while last is not None:
        text, last = await batch(job.pk, site.pk, last)
        if text:
            yield text


@login_required
@require_safe
def job_site_log(request: SignedInRequest, uid: UUID, site_name: str) -> StreamingHttpResponse:
    """A participating site's whole stored log for the job, as plain text, streamed."""
    job = job_for(request, uid)
    link = job.participants.select_related("site").filter(site__name=site_name).first()
    if link is None:
        raise Http404("No such site in this job.")
    site = link.site
    content = (
        site_log_text_async(job, site)
        if isinstance(request, ASGIRequest)
        else site_log_text(job, site)
    )
    response = StreamingHttpResponse(content, content_type="text/plain; charset=utf-8")
    name = download_filename(f"{job.name}-{site.name}", job.uid, "-log.txt")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_safe
def job_log_search(request: SignedInRequest, uid: UUID) -> HttpResponse:
    """Lines of the job's logs holding some text: a GET form, so a search has its own URL."""
    job = job_for(request, uid)
    context = project_context(request, job.project)
    form = LogSearchForm(request.GET if "q" in request.GET else None, job=job)
    context.update(job=job, form=form, matches=None, total=0, limit=MAX_MATCHES)
    if form.is_valid():
        matches, total = selectors.log_lines_matching(
            job, form.cleaned_data["q"], site=form.chosen_site(), limit=MAX_MATCHES
        )
        context.update(matches=matches, total=total)
    return render(request, "dashboard/job_log_search.html", context)


@login_required
@require_safe
def job_metric_table_csv(request: SignedInRequest, uid: UUID) -> HttpResponse:
    """The job page's site × round table of one metric (``?metric=``) as CSV: the same cells.
    Built whole: it is bounded (sites × at most ``MAX_TABLE_ROUNDS`` rounds)."""
    job = job_for(request, uid)
    table = metric_table_of(job, request.GET.get("metric"))
    response = HttpResponse(metric_table_csv(table), content_type="text/csv; charset=utf-8")
    name = download_filename(f"{job.name}-{table.key}", job.uid, "-by-round.csv")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_safe
def job_round_sites_fragment(request: SignedInRequest, uid: UUID) -> HttpResponse:
    """Who is holding the job's open round: fetched again on task and agent events."""
    job = job_for(request, uid)
    context = {"job": job, "holders": round_holders_for_page(job)}
    return render(request, "dashboard/_job_round_sites.html", context)


@login_required
@require_safe
def project_lagging_fragment(request: SignedInRequest, slug: str) -> HttpResponse:
    """The project's lagging sites, among the jobs the viewer may see."""
    project = project_for(request, slug)
    context = {"project": project, "lagging": lagging_of_project(request, project)}
    return render(request, "dashboard/_lagging_rows.html", context)


@login_required
@require_safe
def job_record(request: SignedInRequest, uid: UUID) -> StreamingHttpResponse:
    """The job's whole record as one JSON file, streamed (``dashboard.job_records``)."""
    job = job_for(request, uid)
    content = (
        job_record_json_async(job, request.user)
        if isinstance(request, ASGIRequest)
        else job_record_json(job, request.user)
    )
    response = StreamingHttpResponse(content, content_type="application/json")
    name = download_filename(job.name, job.uid, "-record.json")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "no-store"
    return response
