"""A job's metric points for experiment trackers: as CSV, as TensorBoard event files and as an
MLflow file store, each a download under ``/api/v1/jobs/<uid>/``.

Readable by whoever may read the job's metrics (``JobView``: the job visible to the caller,
else 404). The event files and the store are written from the stored points by
:mod:`jobs.tracking` (the code SimEnv's trackers use), in a temporary folder, and zipped into
an anonymous temporary file that the response streams and closes: nothing stays on disk. The
work is bounded by the job's points, which are bounded where they enter.

Stored points no longer know their data type: each is one scalar under its key, at its step
(else its round), in its site's run or the ``aggregate`` run; a train result's metrics are
keyed ``result/<key>`` (:func:`jobs.tracking.write_tensorboard`). A point whose key MLflow
refuses as a metric name is left out of the MLflow store and named in ``PROBLEMS.txt``.
"""

from __future__ import annotations

import csv
import io
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any
from uuid import UUID

from django.http import FileResponse, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request

from common.downloads import download_filename
from common.spreadsheet import spreadsheet_safe
from fedportal.api_views import errors
from jobs import selectors
from jobs.api.views import FileNegotiation, JobView
from jobs.models import Job, MetricPoint
from jobs.tracking import Point, file_store_uri, write_mlflow, write_tensorboard

PROBLEMS_FILE = "PROBLEMS.txt"
CSV_COLUMNS = ("round", "site", "key", "value", "step", "source", "created_at")


def _file_stem(job: Job) -> str:
    return download_filename(job.name, job.uid, "")


def job_points(job: Job) -> list[Point]:
    """The job's stored metric points, in the order they were recorded, for the writers."""
    rows = selectors.metric_points_of(job).values_list(
        "site__name", "round_number", "key", "value", "step", "source"
    )
    return [
        Point(site=site, round=rnd, key=key, value=value, step=step, source=source)
        for site, rnd, key, value, step, source in rows.iterator()
    ]


def _zip_folder(folder: Path, problems: list[str]) -> IO[bytes]:
    """``folder``'s files zipped (names relative to ``folder``'s parent) into an anonymous
    temporary file, rewound; it is gone once closed. ``problems`` (the points a tracker
    refused) go in ``PROBLEMS.txt``, so a download that lacks points says which."""
    archive = tempfile.TemporaryFile()  # noqa: SIM115  (the response closes it)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            # Folders too, empty ones included: MLflow's store takes a run only when its
            # params/ and artifacts/ folders exist.
            if path.is_file() or path.is_dir():
                zf.write(path, str(path.relative_to(folder.parent)))
        if problems:
            zf.writestr(PROBLEMS_FILE, "".join(f"left out: {p}\n" for p in problems))
    archive.seek(0)
    return archive


def _zip_response(archive: IO[bytes], filename: str) -> FileResponse:
    response = FileResponse(
        archive, as_attachment=True, filename=filename, content_type="application/zip"
    )
    response["Cache-Control"] = "no-store"
    return response


ZIP_RESPONSES: dict[Any, Any] = {
    (200, "application/zip"): OpenApiResponse(OpenApiTypes.BINARY, description="A zip file."),
    **errors(404),
}


class JobMetricsCsvView(JobView[MetricPoint]):
    """Every metric point of the job as CSV, in the order recorded; rounds count from 0 as
    everywhere in the API, and an empty ``site`` is a round's aggregate."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["jobs"],
        summary="A job's metric points as CSV (round, site, key, value, step, source, created_at)",
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="The CSV file."),
            **errors(404),
        },
    )
    def get(self, request: Request, uid: UUID) -> HttpResponse:
        job = self.get_job()
        rows = selectors.metric_points_of(job).values_list(
            "round_number", "site__name", "key", "value", "step", "source", "created_at"
        )
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(
            (
                "" if rnd is None else rnd,
                "" if site is None else site,
                spreadsheet_safe(key),
                repr(value),  # every digit: the value reads back exactly
                "" if step is None else step,
                source,
                created_at.isoformat(),
            )
            for rnd, site, key, value, step, source, created_at in rows.iterator()
        )
        response = HttpResponse(out.getvalue(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{_file_stem(job)}-metrics.csv"'
        response["Cache-Control"] = "no-store"
        return response


class JobTensorBoardExportView(JobView[MetricPoint]):
    """The job's metric points as TensorBoard event files: ``tb_events/<site>/`` and
    ``tb_events/aggregate/``; unzip and run ``tensorboard --logdir tb_events``."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["jobs"],
        summary="A job's metrics as TensorBoard event files (zip)",
        responses=ZIP_RESPONSES,
    )
    def get(self, request: Request, uid: UUID) -> FileResponse:
        job = self.get_job()
        points = job_points(job)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "tb_events"
            problems = write_tensorboard(points, folder)
            archive = _zip_folder(folder, problems)
        return _zip_response(archive, f"{_file_stem(job)}-tensorboard.zip")


class JobMlflowExportView(JobView[MetricPoint]):
    """The job's metric points as an MLflow file store, ``mlruns/``: one experiment named
    after the job, one run per site and one for the aggregates, tagged with the site and the
    job's uid; unzip and run ``mlflow ui --backend-store-uri ./mlruns`` (with
    ``MLFLOW_ALLOW_FILE_STORE=true``, as MLflow 3 asks for a file store)."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["jobs"],
        summary="A job's metrics as an MLflow file store (zip)",
        responses=ZIP_RESPONSES,
    )
    def get(self, request: Request, uid: UUID) -> FileResponse:
        job = self.get_job()
        points = job_points(job)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "mlruns"
            problems = write_mlflow(
                points,
                file_store_uri(folder),
                job.name,
                job_name=job.name,
                job_id=str(job.uid),
            )
            archive = _zip_folder(folder, problems)
        return _zip_response(archive, f"{_file_stem(job)}-mlflow.zip")
