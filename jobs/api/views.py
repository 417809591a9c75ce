"""REST API of the jobs app, under ``/api/v1/``.

Views are shaped like the sites API's (``sites.api.views``): find through a selector (404),
check the role (403), parse (400), call one service, serialize. Two audiences:

- **people** (API token or session): submit a job bundle, list and read jobs, rounds, per-site
  status, metrics and model versions, download models, abort, and decide for a site;
- **site agents** (signed requests only, ``sites.authentication``): their site's active jobs,
  the job's spec and app archive, a round's global model, task status, the update (streamed),
  and metrics. A site reaches only the jobs it takes part in; any other job is 404.

Files are streamed with their SHA-256 in ``X-Content-SHA256`` whatever ``Accept`` says. An
update is ``PUT`` as the raw body and read in chunks, never whole (its signature:
``jobs.api.authentication``); the answer is 202 and a worker checks it. An agent decides for
its site only when the site accepts jobs automatically; otherwise its org admins do.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.db.models import QuerySet
from django.db.models.fields.files import FieldFile
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from common.exceptions import NotFound, ValidationFailed
from fedportal import bodylimits
from fedportal.api import JSONParser, StreamedJSONParser
from fedportal.api_views import M, PersonView, ProjectView, errors, parse
from fedportal.throttling import client_address
from jobs import selectors
from jobs.api import schema as _schema  # noqa: F401  (registers the streamed-upload scheme)
from jobs.api import serializers as s
from jobs.api.authentication import HEADER_CONTENT_SHA256, StreamedBodySignatureAuthentication
from jobs.api.permissions import (
    ONLY_LABELLERS,
    ONLY_MANAGERS,
    ONLY_SITE_ADMINS,
    ONLY_SUBMITTERS,
)
from jobs.models import Job, JobSite, MetricPoint, ModelVersion, Round, SiteTask, TaskState
from jobs.selectors import job_for_site, task_of_site
from jobs.services.labels import job_label
from jobs.services.participation import job_abort, site_job_decide
from jobs.services.secure import protected_total_bytes, secure_message_post, secure_view
from jobs.services.submission import job_submit
from jobs.services.tasks import round_model_fetch, task_mark, update_upload
from jobs.services.telemetry import metrics_record
from sites.api.permissions import IsSiteAgent, require, site_identity
from sites.authentication import SiteSignatureAuthentication
from sites.models import Site

PROJECT = OpenApiParameter(
    "project",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="The project's slug, as in the sites API, or its numeric id.",
)


def file_responses(*codes: int) -> dict[Any, Any]:
    return {
        (200, "application/octet-stream"): OpenApiResponse(
            OpenApiTypes.BINARY, description=f"The file; its SHA-256 in {HEADER_CONTENT_SHA256}."
        ),
        **errors(*codes),
    }


def stream_file(field_file: FieldFile, *, filename: str, sha256: str) -> FileResponse:
    """A stored file as a streamed attachment (read in chunks by the server, never whole)."""
    assert field_file.name is not None  # models and archives are stored before they are found
    response = FileResponse(
        field_file.storage.open(field_file.name, "rb"),
        as_attachment=True,
        filename=filename,
        content_type="application/octet-stream",
    )
    response[HEADER_CONTENT_SHA256] = sha256
    return response


class FileNegotiation(DefaultContentNegotiation):
    """A file endpoint sends the file whatever ``Accept`` says (``application/octet-stream``
    would otherwise be 406, as no renderer makes it); its errors are JSON."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        first = next(iter(renderers))
        return first, first.media_type


# --- bases -------------------------------------------------------------------------------------


class JobView(PersonView[M]):
    """An endpoint under ``/jobs/<uid>/``: the job must be visible to the caller, else 404."""

    _job: Job | None = None

    def get_job(self) -> Job:
        if self._job is None:
            self._job = selectors.job_visible_to(self.request.user, self.kwargs["uid"])
        return self._job


class AgentView(generics.GenericAPIView[M]):
    """An endpoint for site agents (signed requests only). People are refused with 401."""

    authentication_classes = [SiteSignatureAuthentication]
    permission_classes = [IsSiteAgent]
    pagination_class = None

    @property
    def site(self) -> Site:
        return site_identity(self.request).site

    def get_job(self) -> Job:
        """The job in the URL if this site takes part in it; 404 otherwise."""
        return job_for_site(job_uid=self.kwargs["uid"], site=self.site)

    def get_task(
        self, number: int, *, with_start_model: bool = False, whole_round: bool = False
    ) -> SiteTask:
        """The site's task in round ``number`` of the job in the URL; 404 as :meth:`get_job`
        for the job, and for a round in which the site has no task. ``with_start_model``: the
        round's start model read with it (``jobs.selectors.start_model_of``);
        ``whole_round``: the round's and job's fields that grow with the sites too (a
        protected round's state), which are otherwise read on first use."""
        return task_of_site(
            job_uid=self.kwargs["uid"],
            site=self.site,
            round_number=number,
            with_start_model=with_start_model,
            whole_round=whole_round,
        )


# --- people: a project's jobs ------------------------------------------------------------------


class ProjectJobListView(ProjectView[Job]):
    """A project's jobs (members), and submitting a job bundle (leads, project admins)."""

    parser_classes = [MultiPartParser]
    serializer_class = s.JobSerializer

    @extend_schema(
        tags=["jobs"],
        summary="List a project's jobs, newest first",
        parameters=[PROJECT, s.JobQuerySerializer],
        responses={200: s.JobSerializer(many=True), **errors(400, 404)},
    )
    def get(self, request: Request, project: str) -> Response:
        q = self.query(s.JobQuerySerializer)
        jobs = selectors.jobs_visible_to(
            request.user,
            project=self.get_project(),
            state=q.get("state"),
            submitter=q.get("submitter"),
            name=q.get("name"),
            experiment=q.get("experiment"),
            tag=q.get("tag"),
        )
        page = self.paginate_queryset(jobs)
        return self.get_paginated_response(s.JobSerializer(page, many=True).data)

    @extend_schema(
        tags=["jobs"],
        summary="Submit a job bundle",
        description="The bundle that `recipe.export()` writes: job.json, the initial weights "
        "(safetensors) and the app folder as a zip. Everything is checked before anything is "
        "stored; a failure is a 4xx naming the field, and stores nothing.",
        parameters=[PROJECT],
        request={"multipart/form-data": s.JobSubmitSerializer},
        responses={201: s.JobSerializer, **errors(400, 403, 404, 413)},
    )
    def post(self, request: Request, project: str) -> Response:
        found = self.get_project()
        require(selectors.can_submit_job(request.user, found), ONLY_SUBMITTERS)
        self._refuse_oversized(request)
        data = parse(s.JobSubmitSerializer, request.data)
        job = job_submit(
            project=found,
            submitted_by=self.person,
            spec=data["spec"],
            initial_model=data["initial_model"],
            app_archive=data["app"],
            sites=data.get("sites"),
            round_timeout_seconds=data.get("round_timeout_seconds"),
            source_address=client_address(request),
        )
        return Response(s.JobSerializer(job).data, status=status.HTTP_201_CREATED)

    @staticmethod
    def _refuse_oversized(request: Request) -> None:
        # Before the multipart body is parsed: a body bigger than the two files' limits
        # together cannot be a valid bundle (the server refuses it before reading it; this is
        # the same rule for any other server). The service checks each file.
        limit = bodylimits.submission_max_bytes()
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            raise ValidationFailed(
                f"the request is {length} bytes; a job bundle is at most {limit}",
                field="body",
                code="too_large",
                status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )


# --- people: one job ---------------------------------------------------------------------------


class JobDetailView(JobView[Job]):
    """A job: its spec, state, progress and best model; and its labels, changed by PATCH."""

    parser_classes = [JSONParser]

    @extend_schema(tags=["jobs"], responses={200: s.JobSerializer, **errors(404)})
    def get(self, request: Request, uid: UUID) -> Response:
        return Response(s.JobSerializer(self.get_job()).data)

    @extend_schema(
        tags=["jobs"],
        summary="Set a job's experiment and tags (project admins, and the lead who submitted it)",
        request=s.LabelsSerializer,
        responses={200: s.JobSerializer, **errors(400, 403, 404)},
    )
    def patch(self, request: Request, uid: UUID) -> Response:
        job = self.get_job()
        require(selectors.can_manage_job(request.user, job), ONLY_LABELLERS)
        data = parse(s.LabelsSerializer, request.data)
        job = job_label(
            job=job,
            experiment=data.get("experiment"),
            tags=data.get("tags"),
            actor=self.person,
            source_address=client_address(request),
        )
        return Response(s.JobSerializer(job).data)


class JobRoundListView(JobView[Round]):
    """A job's rounds with their state, deadline, aggregate metrics and participants."""

    serializer_class = s.RoundSerializer

    @extend_schema(
        tags=["jobs"],
        summary="A job's rounds, from 0",
        responses={200: s.RoundSerializer(many=True), **errors(404)},
    )
    def get(self, request: Request, uid: UUID) -> Response:
        rounds: QuerySet[Round] = selectors.rounds_of(self.get_job())
        page = self.paginate_queryset(rounds)
        return self.get_paginated_response(s.RoundSerializer(page, many=True).data)


class JobSiteListView(JobView[JobSite]):
    """Each site of a job: its decision, whether it is online, and its task in every round."""

    serializer_class = s.ParticipantSerializer

    @extend_schema(
        tags=["jobs"],
        summary="A job's sites: decision, online, and the task of each round",
        responses={200: s.ParticipantSerializer(many=True), **errors(404)},
    )
    def get(self, request: Request, uid: UUID) -> Response:
        page = self.paginate_queryset(selectors.participants_of(self.get_job()))
        return self.get_paginated_response(s.ParticipantSerializer(page, many=True).data)


class JobSiteDecisionView(JobView[JobSite]):
    """A site's org admin (or a project admin) accepts or declines the job for the site,
    while the job waits to start."""

    parser_classes = [JSONParser]

    @extend_schema(
        tags=["jobs"],
        summary="Accept or decline the job for a site (its org admins, project admins)",
        request=s.DecisionSerializer,
        responses={200: s.ParticipantSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, uid: UUID, site_name: str) -> Response:
        job = self.get_job()
        link = selectors.participant_of(job, site_name)
        require(selectors.can_decide_for_site(request.user, link.site), ONLY_SITE_ADMINS)
        data = parse(s.DecisionSerializer, request.data)
        link = site_job_decide(
            job=job,
            site=link.site,
            accept=data["accept"],
            decided_by=self.person,
            reason=data.get("reason", ""),
            source_address=client_address(request),
        )
        return Response(s.ParticipantSerializer(link).data)


class JobMetricListView(JobView[MetricPoint]):
    """Metric points: the sites' logged values and train results, and each round's aggregate."""

    serializer_class = s.MetricPointSerializer

    @extend_schema(
        tags=["jobs"],
        summary="A job's metric points, in the order they were recorded",
        parameters=[s.MetricQuerySerializer],
        responses={200: s.MetricPointSerializer(many=True), **errors(400, 404)},
    )
    def get(self, request: Request, uid: UUID) -> Response:
        q = self.query(s.MetricQuerySerializer)
        points: QuerySet[MetricPoint] = selectors.metric_points_of(
            self.get_job(),
            key=q.get("key"),
            site=q.get("site"),
            round_number=q.get("round"),
            source=q.get("source"),
        )
        page = self.paginate_queryset(points)
        return self.get_paginated_response(s.MetricPointSerializer(page, many=True).data)


class JobCrossSiteView(JobView[Job]):
    """The job's cross-site evaluation: every site's metrics of every evaluated model."""

    @extend_schema(
        tags=["jobs"],
        summary="A job's cross-site evaluation matrix (models × sites)",
        responses={200: s.CrossSiteSerializer, **errors(404)},
    )
    def get(self, request: Request, uid: UUID) -> Response:
        found = selectors.cross_site_of(self.get_job())
        data = {"models": found.models, "sites": found.sites, "matrix": found.matrix}
        return Response(s.CrossSiteSerializer(data).data)


class JobModelListView(JobView[ModelVersion]):
    """Global models: number 0 is the initial one, number n the model after n rounds."""

    serializer_class = s.ModelVersionSerializer

    @extend_schema(
        tags=["jobs"],
        summary="A job's global models: the initial one and one after every round",
        responses={200: s.ModelVersionSerializer(many=True), **errors(404)},
    )
    def get(self, request: Request, uid: UUID) -> Response:
        job = self.get_job()
        versions: QuerySet[ModelVersion] = selectors.model_versions_of(job)
        page = self.paginate_queryset(versions)
        data = s.ModelVersionSerializer(page, many=True, context={"job": job}).data
        return self.get_paginated_response(data)


class JobModelDownloadView(JobView[ModelVersion]):
    """The model file (safetensors), streamed, with its SHA-256 in X-Content-SHA256."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["jobs"],
        summary="Download a global model (safetensors)",
        responses=file_responses(404),
    )
    def get(self, request: Request, uid: UUID, round_number: int) -> FileResponse:
        job = self.get_job()
        version = selectors.model_version_of(job, round_number)
        return stream_file(
            version.file,
            filename=f"{job.name}-round-{round_number:03d}.safetensors",
            sha256=version.sha256,
        )


class JobAbortView(JobView[Job]):
    """Stop an active job: its open round fails, and it takes no more updates into account."""

    parser_classes = [JSONParser]

    @extend_schema(
        tags=["jobs"],
        summary="Abort a job (project admins, and the lead who submitted it)",
        request=s.AbortSerializer,
        responses={200: s.JobSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, uid: UUID) -> Response:
        job = self.get_job()
        require(selectors.can_manage_job(request.user, job), ONLY_MANAGERS)
        data = parse(s.AbortSerializer, request.data)
        job = job_abort(
            job=job,
            actor=self.person,
            reason=data.get("reason") or "",
            source_address=client_address(request),
        )
        return Response(s.JobSerializer(job).data)


# --- site agents -------------------------------------------------------------------------------


class AgentJobListView(AgentView[JobSite]):
    """What an agent polls: its site's active jobs, decision, and task in the open round."""

    @extend_schema(
        tags=["agent"],
        summary="The active jobs this site takes part in, with its decision and current task",
        responses={200: s.AgentJobSerializer(many=True), **errors()},
    )
    def get(self, request: Request) -> Response:
        active = selectors.site_active_jobs(self.site)
        context = {"open_tasks": active.open_tasks}
        return Response(s.AgentJobSerializer(active.links, many=True, context=context).data)


class AgentJobDecisionView(AgentView[JobSite]):
    """The agent accepts or declines a job, only for a site that accepts jobs automatically
    (403 ``decision_not_delegated`` otherwise: its admin decides)."""

    parser_classes = [JSONParser]

    @extend_schema(
        tags=["agent"],
        summary="Accept or decline a job, where the site's policy lets its agent decide",
        request=s.DecisionSerializer,
        responses={200: s.AgentDecisionSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, uid: UUID) -> Response:
        job = self.get_job()
        data = parse(s.DecisionSerializer, request.data)
        link = site_job_decide(
            job=job,
            site=self.site,
            accept=data["accept"],
            by_agent=True,
            source_address=client_address(request),
        )
        return Response(s.AgentDecisionSerializer(link).data)


class AgentJobSpecView(AgentView[Job]):
    """The job.json the agent runs (train script and arguments) and the app's SHA-256."""

    @extend_schema(
        tags=["agent"],
        summary="The job's spec (job.json) and its app archive's SHA-256",
        responses={200: s.AgentJobSpecSerializer, **errors(404)},
    )
    def get(self, request: Request, uid: UUID) -> Response:
        return Response(s.AgentJobSpecSerializer(self.get_job()).data)


class AgentJobBundleView(AgentView[Job]):
    """The app archive (zip), streamed, with its SHA-256 in X-Content-SHA256."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["agent"],
        summary="Download the job's app archive (zip)",
        responses=file_responses(404),
    )
    def get(self, request: Request, uid: UUID) -> FileResponse:
        job = self.get_job()
        return stream_file(job.app_archive, filename=f"{job.name}-app.zip", sha256=job.app_sha256)


class AgentRoundModelView(AgentView[ModelVersion]):
    """The model the site's task in round n sends (the global model round n starts from, or
    the checkpoint the round's plan names), streamed; the task becomes ``downloaded``, or
    ``training`` with ``?then=training``."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["agent"],
        summary="Download the model of the site's task in round n (the global model or a "
        "checkpoint); marks the task downloaded",
        parameters=[
            OpenApiParameter(
                "then",
                str,
                enum=[TaskState.DOWNLOADED.value, TaskState.TRAINING.value],
                description="The task's state once the model is fetched (default downloaded).",
            )
        ],
        responses=file_responses(400, 404),
    )
    def get(self, request: Request, uid: UUID, number: int) -> FileResponse:
        task = self.get_task(number, with_start_model=True)
        job = task.round.job
        then = request.query_params.get("then", TaskState.DOWNLOADED)
        if then not in (TaskState.DOWNLOADED, TaskState.TRAINING):
            raise ValidationFailed("then must be downloaded or training", field="then")
        model = round_model_fetch(task=task, then=then)
        return stream_file(
            model.file,
            filename=f"{job.name}-round-{number:03d}.safetensors",
            sha256=model.sha256,
        )


class AgentRoundStatusView(AgentView[SiteTask]):
    """The site reports ``training`` (or ``downloaded``) for its task in round n, or that it
    failed: with ``privacy`` when its privacy policy declined the round."""

    parser_classes = [JSONParser]

    @extend_schema(
        tags=["agent"],
        summary="Report progress on the round's task",
        request=s.TaskStatusSerializer,
        responses={200: s.AgentTaskStateSerializer, **errors(400, 404)},
    )
    def post(self, request: Request, uid: UUID, number: int) -> Response:
        task = self.get_task(number)
        data = parse(s.TaskStatusSerializer, request.data)
        task = task_mark(
            task=task,
            state=data["state"],
            reason=data.get("reason", ""),
            privacy=data.get("privacy"),
        )
        return Response(s.AgentTaskStateSerializer(task).data)


class AgentRoundUpdateView(AgentView[SiteTask]):
    """The site's update for round n, as the raw body (see the summary)."""

    authentication_classes = [StreamedBodySignatureAuthentication]

    @extend_schema(
        tags=["agent"],
        summary="Upload the site's update for round n (streamed, raw body)",
        description="The body is the update as a safetensors file (client_agent.wire), sent "
        f"with Content-Length and its SHA-256 in {HEADER_CONTENT_SHA256}, which is also what "
        "the request's signature covers. It is streamed to storage, never held whole, and "
        "kept only if it is within FEDPORTAL_MAX_MODEL_BYTES and matches the digest. One "
        "update per task; an update after the round closed is kept as `late`, not aggregated.",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter(
                HEADER_CONTENT_SHA256,
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                required=True,
                description="The body's SHA-256, 64 hexadecimal digits.",
            )
        ],
        responses={202: s.AgentTaskStateSerializer, **errors(400, 404, 409, 411)},
    )
    def put(self, request: Request, uid: UUID, number: int) -> Response:
        # The server's check of the sender read the task before the body came (a statement
        # and a query's building saved on every upload); the same site's, job's and round's.
        task = bodylimits.checked_task(
            getattr(request._request, "scope", None),
            site_id=self.site.pk,
            job_uid=uid,
            round_number=number,
        ) or self.get_task(number)
        length = _content_length(request)
        # request.stream is the request itself, read in chunks by the service (never
        # request.body, which would load it whole).
        stream = request.stream or io.BytesIO()
        task = update_upload(
            task=task,
            stream=stream,
            sha256=request.headers.get(HEADER_CONTENT_SHA256, ""),
            length=length,
        )
        return Response(s.AgentTaskStateSerializer(task).data, status=status.HTTP_202_ACCEPTED)


def _content_length(request: Request) -> int:
    raw = request.META.get("CONTENT_LENGTH") or ""
    if not (raw.isascii() and raw.isdigit()) or int(raw) == 0:
        raise ValidationFailed(
            "send the update as the body, with its length in Content-Length",
            field="Content-Length",
            code="length_required",
            status=status.HTTP_411_LENGTH_REQUIRED,
        )
    return int(raw)


class AgentSecureView(AgentView[SiteTask]):
    """Where the site's protected round is (jobs.services.secure): the phase, the roster of
    public keys, the site's setup, its finish request."""

    @extend_schema(
        tags=["agent"],
        summary="The secure aggregation phase of the site's task in round n, and what the site "
        "needs for it",
        responses={200: OpenApiTypes.OBJECT, **errors(404, 409)},
    )
    def get(self, request: Request, uid: UUID, number: int) -> Response:
        task = self.get_task(number, whole_round=True)
        return Response(secure_view(task=task))


class AgentSecureMessageView(AgentView[SiteTask]):
    """The site's message in one phase of a protected round: ``keys``, ``shares`` or
    ``finish``. The body is ``{"message": {...}}``, with ``"data"`` (base64) for a finish
    answer that carries bytes (a decrypted sum). Signed over ``X-Content-SHA256`` like an
    update, so that the portal knows the sender before it reads a large body (an encrypted
    round's shares carry its sealed context for every site)."""

    authentication_classes = [StreamedBodySignatureAuthentication]
    parser_classes = [StreamedJSONParser]

    @extend_schema(
        tags=["agent"],
        summary="Send the site's keys, sealed shares or finish answer for round n",
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **errors(400, 404, 409)},
    )
    def post(self, request: Request, uid: UUID, number: int, phase: str) -> Response:
        task = self.get_task(number, whole_round=True)
        body = request.data
        if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
            raise ValidationFailed('send {"message": {...}}', field="message")
        data = b""
        if body.get("data") is not None:
            if not isinstance(body["data"], str):
                raise ValidationFailed("data must be base64", field="data")
            try:
                data = base64.b64decode(body["data"].encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise ValidationFailed("data: not base64", field="data") from None
        return Response(
            secure_message_post(task=task, phase=phase, payload=body["message"], data=data)
        )


class AgentSecureTotalView(AgentView[SiteTask]):
    """The protected sum of round n (encrypted), for the site asked to decrypt it."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FileNegotiation

    @extend_schema(
        tags=["agent"],
        summary="Download the round's encrypted sum (the site asked to decrypt it only)",
        responses=file_responses(404, 409),
    )
    def get(self, request: Request, uid: UUID, number: int) -> FileResponse:
        task = self.get_task(number, whole_round=True)
        request_for_site = (task.round.protection.get("requests") or {}).get(task.site.name)
        if not request_for_site or not request_for_site.get("total"):
            raise NotFound("this site is not asked to decrypt the round's sum")
        return FileResponse(
            protected_total_bytes(task.round),
            as_attachment=True,
            filename=f"round-{number:03d}-total.bin",
            content_type="application/octet-stream",
        )


class AgentMetricsView(AgentView[MetricPoint]):
    """The site's ``flare.log`` points; a point resent with the same id is stored once."""

    parser_classes = [JSONParser]

    @extend_schema(
        tags=["agent"],
        summary="Post metric points (flare.log); a point resent with the same id is stored once",
        request=s.MetricsPostSerializer,
        responses={200: s.MetricsPostedSerializer, **errors(400, 404, 409)},
    )
    def post(self, request: Request, uid: UUID) -> Response:
        job = self.get_job()
        points = parse(s.MetricsPostSerializer, request.data)["points"]
        stored = metrics_record(job=job, site=self.site, points=points)
        return Response({"received": len(points), "stored": stored})
