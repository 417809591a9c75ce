"""What the jobs API reads and writes.

Input serializers only parse (types and required fields); the rules (the spec against the
workflow, the safetensors header, archive paths, size limits, who may decide) live in the
services, which name the field at fault. Output serializers describe exactly what is sent, so
that the OpenAPI schema is the contract.

Round numbers count from 0, as in the database and the Client API's ``current_round``: round
``n`` starts from the global model ``n`` (the model after ``n`` completed rounds; model 0 is
the initial one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.files.uploadedfile import UploadedFile
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from client_agent import jsonlimits
from client_agent.privacy.accounting import as_json
from client_agent.privacy.policy import JobAssessment
from jobs.bundle import MAX_EXPERIMENT_CHARS, MAX_TAG_CHARS, MAX_TAGS
from jobs.models import (
    Job,
    JobSite,
    JobState,
    MetricPoint,
    ModelVersion,
    Round,
    SiteTask,
    TaskState,
)
from jobs.selectors import (
    CrossSiteMatrix,
    JobPrivacySpend,
    cross_site_matrix_of,
    job_privacy_expectation,
    privacy_spend_of,
)
from jobs.services.plans import task_spec_payload
from jobs.services.rounds import planned_task_of
from jobs.services.submission import MAX_ROUND_TIMEOUT_SECONDS
from jobs.workflows.base import MAX_ROUNDS
from sites.selectors import site_is_online

if TYPE_CHECKING:
    from sites.models import Project

# job.json is a few hundred bytes; this bound only keeps absurd input out before parsing.
SPEC_MAX_BYTES = 1024 * 1024
SITE_NAME_MAX = 63
# What an agent may report about its task (jobs.services.tasks.task_mark).
TASK_REPORTS = [TaskState.DOWNLOADED.value, TaskState.TRAINING.value, TaskState.FAILED.value]
REASON_MAX = 2000


# --- submission --------------------------------------------------------------------------------


@extend_schema_field(
    {
        "oneOf": [{"type": "string", "format": "binary"}, {"type": "string"}],
        "description": "The bundle's job.json: a file part, or the JSON text as a form field.",
    }
)
# Any: a JSON value, parsed from whatever a client sent.
class SpecField(serializers.Field[Any, Any, Any, dict[str, Any]]):
    """``job.json`` as an uploaded file or as a JSON string; parsed to a dict (or whatever JSON
    value it holds: the service says what is wrong with it)."""

    default_error_messages = {
        "too_large": f"job.json is larger than {SPEC_MAX_BYTES} bytes",
        "not_json": "not JSON: {error}",
        "not_text": "must be a JSON text or a job.json file",
    }

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, UploadedFile):
            if data.size is not None and data.size > SPEC_MAX_BYTES:
                self.fail("too_large")
            raw: Any = data.read(SPEC_MAX_BYTES + 1)
        elif isinstance(data, str):
            raw = data
        else:
            self.fail("not_text")
        if len(raw) > SPEC_MAX_BYTES:
            self.fail("too_large")
        try:
            return jsonlimits.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            self.fail("not_json", error=str(exc))

    def to_representation(self, value: Any) -> Any:
        return value


class JobSubmitSerializer(serializers.Serializer[dict[str, Any]]):
    """``multipart/form-data``: the job bundle that ``recipe.export()`` writes."""

    spec = SpecField()
    initial_model = serializers.FileField(
        allow_empty_file=True, help_text="initial_model.safetensors: the initial global weights."
    )
    app = serializers.FileField(
        allow_empty_file=True,
        help_text="The bundle's app/ folder as a zip (jobs.bundle.pack_app); the spec's "
        "train_script must be in it. No absolute paths, no '..', no links.",
    )
    sites = serializers.ListField(
        child=serializers.CharField(max_length=SITE_NAME_MAX),
        required=False,
        allow_empty=False,
        help_text="Names of the enrolled sites that take part (repeat the field for each); "
        "default: every site of the project enrolled now.",
    )
    round_timeout_seconds = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ROUND_TIMEOUT_SECONDS,
        help_text="A round closes at this deadline if min_clients sites answered "
        "(default: FEDPORTAL_ROUND_TIMEOUT_SECONDS).",
    )


class JobQuerySerializer(serializers.Serializer[dict[str, Any]]):
    state = serializers.ChoiceField(JobState.choices, required=False)
    submitter = serializers.CharField(required=False, max_length=150, help_text="A username.")
    name = serializers.CharField(
        required=False,
        max_length=100,
        help_text="Jobs whose name contains this, in any letter case.",
    )
    experiment = serializers.CharField(
        required=False,
        max_length=MAX_EXPERIMENT_CHARS,
        help_text="Jobs of this experiment (its whole name, in any letter case).",
    )
    tag = serializers.CharField(
        required=False, max_length=MAX_TAG_CHARS, help_text="Jobs that have this tag."
    )


class LabelsSerializer(serializers.Serializer[dict[str, Any]]):
    """A job's labels; a field left out stays as it is (the service checks the values)."""

    experiment = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        max_length=MAX_EXPERIMENT_CHARS,
        help_text=f"The experiment the job belongs to, at most {MAX_EXPERIMENT_CHARS} "
        'characters; "" for none.',
    )
    tags = serializers.ListField(
        child=serializers.CharField(allow_blank=True, trim_whitespace=False),
        required=False,
        max_length=MAX_TAGS,
        help_text=f"Replaces the job's tags: at most {MAX_TAGS}, each 1 to {MAX_TAG_CHARS} "
        "characters without commas; [] for none.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "experiment" not in attrs and "tags" not in attrs:
            raise serializers.ValidationError("give experiment, tags or both")
        return attrs


class DecisionSerializer(serializers.Serializer[dict[str, Any]]):
    accept = serializers.BooleanField(help_text="true: the site runs the job; false: it does not.")
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=1000,
        help_text="Why (optional): shown with the decision and kept in the audit log.",
    )


class AbortSerializer(serializers.Serializer[dict[str, Any]]):
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=REASON_MAX,
        help_text="Why; recorded as the job's failure reason (default: who aborted it).",
    )


class TaskStatusSerializer(serializers.Serializer[dict[str, Any]]):
    state = serializers.ChoiceField(TASK_REPORTS, help_text="What the site is doing in this round.")
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=REASON_MAX,
        help_text="Why, when the state is failed (required then).",
    )
    privacy = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="With failed, when the site's privacy policy declined the round: its "
        "privacy ledger's report (noise_multiplier, sample_rate, clip_norm, clip_scope, delta, "
        "releases, history, project_history, epsilon, project_epsilon, max_epsilon, "
        "max_project_epsilon, policy_sha256).",
    )


class MetricPointInSerializer(serializers.Serializer[dict[str, Any]]):
    """One point as the agent sends it; the service checks the values."""

    key = serializers.CharField(help_text="The metric's name, 1 to 200 characters.")
    value = serializers.FloatField(help_text="A finite number.")
    step = serializers.IntegerField(
        required=False, allow_null=True, min_value=-(2**63), max_value=2**63 - 1
    )
    round = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=MAX_ROUNDS, help_text="From 0."
    )
    id = serializers.CharField(
        required=False,
        allow_blank=True,
        help_text="The sender's id for the point, up to 64 characters: a point sent again "
        "with the same id is stored once.",
    )


@extend_schema_field(MetricPointInSerializer(many=True))
class PointsField(serializers.ListField):
    """Parsed as plain JSON objects: ``metrics_record`` checks each point and names the one at
    fault (``points[3].value``); :class:`MetricPointInSerializer` documents the shape."""

    child = serializers.DictField()


class MetricsPostSerializer(serializers.Serializer[dict[str, Any]]):
    points = PointsField(max_length=10_000)


class MetricsPostedSerializer(serializers.Serializer[dict[str, Any]]):
    received = serializers.IntegerField(help_text="Points in the request.")
    stored = serializers.IntegerField(help_text="Points new to the portal (resends are not).")


class MetricQuerySerializer(serializers.Serializer[dict[str, Any]]):
    key = serializers.CharField(required=False, max_length=200)
    site = serializers.CharField(required=False, max_length=SITE_NAME_MAX, help_text="A name.")
    round = serializers.IntegerField(required=False, min_value=0, max_value=MAX_ROUNDS)
    # The serializer's metaclass moves declared fields off the class, so this does not shadow
    # Field.source at run time; the stubs cannot know.
    source = serializers.ChoiceField(  # type: ignore[assignment]
        MetricPoint.Source.choices, required=False
    )


# --- jobs for people ---------------------------------------------------------------------------

# model → site → metric → value
CROSS_SITE_MATRIX_FIELD = serializers.DictField(
    child=serializers.DictField(child=serializers.DictField(child=serializers.FloatField()))
)


class CrossSiteSerializer(serializers.Serializer[dict[str, Any]]):
    """A job's cross-site evaluation: the models and sites in order, and the matrix."""

    models = serializers.ListField(
        child=serializers.CharField(),
        help_text="The evaluated models: 'global' first, then checkpoints by name.",
    )
    sites = serializers.ListField(child=serializers.CharField(), help_text="By name.")
    matrix = CROSS_SITE_MATRIX_FIELD


class JobSerializer(serializers.ModelSerializer[Job]):
    project: serializers.SlugRelatedField[Project] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    project_id = serializers.IntegerField(read_only=True)
    submitted_by = serializers.CharField(source="submitted_by.username", read_only=True)
    cross_site = serializers.SerializerMethodField(
        help_text="Evaluation scores: cross_site[model][site] is the metrics the site computed "
        "for the model ('global', or a checkpoint such as 'site:site-2'); {} when none."
    )

    class Meta:
        model = Job
        fields = [
            "uid",
            "project",
            "project_id",
            "name",
            "experiment",
            "tags",
            "state",
            "failure_reason",
            "workflow",
            "params",
            "spec",
            "min_clients",
            "num_rounds",
            "total_rounds",
            "round_sites",
            "completed_rounds",
            "round_timeout_seconds",
            "best_round",
            "best_score",
            "cross_site",
            "app_sha256",
            "submitted_by",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(CROSS_SITE_MATRIX_FIELD)
    def get_cross_site(self, job: Job) -> CrossSiteMatrix:
        return cross_site_matrix_of(job)


class RoundSerializer(serializers.ModelSerializer[Round]):
    participants = serializers.SerializerMethodField(help_text="Sites with a task in the round.")
    label = serializers.CharField(  # type: ignore[assignment]  # Field.label is its title
        read_only=True, help_text="The round for people: 'round 3', or a relay's turn."
    )
    tasks = serializers.SerializerMethodField(
        help_text="The round's plan: each site's task_name and model ('global' or a "
        "checkpoint), in the plan's order (a relay's order)."
    )

    class Meta:
        model = Round
        fields = [
            "number",
            "label",
            "state",
            "opened_at",
            "deadline",
            "closed_at",
            "metrics",
            "participants",
            "tasks",
            "protection",
        ]
        read_only_fields = fields

    protection = serializers.SerializerMethodField(
        help_text="Under secure aggregation: the kind, the phase, the sites on the roster, "
        "those that shared and those whose update was summed, and the round's cost "
        "(extra_bytes_per_site, unmask_seconds); null for a plain round. Never keys or shares."
    )

    @extend_schema_field(serializers.DictField(allow_null=True))
    def get_protection(self, rnd: Round) -> dict[str, Any] | None:
        protection = rnd.protection or {}
        if not protection:
            return None
        return {
            "kind": protection.get("kind"),
            "phase": protection.get("phase"),
            "roster": list((protection.get("roster") or {}).get("sites") or []),
            "shared": list(protection.get("shared") or []),
            "survivors": list(protection.get("survivors") or []),
            "cost": dict(protection.get("cost") or {}),
        }

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_participants(self, rnd: Round) -> list[str]:
        return [task.site.name for task in rnd.tasks.all()]

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_tasks(self, rnd: Round) -> list[dict[str, Any]]:
        return [
            {"site": t["site"], "task_name": t["spec"]["task_name"], "model": t["model"]}
            for t in (rnd.plan or {}).get("tasks", [])
        ]


class SiteTaskSerializer(serializers.ModelSerializer[SiteTask]):
    round = serializers.IntegerField(source="round.number", read_only=True)
    privacy_epsilon = serializers.SerializerMethodField(
        help_text="ε the job had spent at the site after this task, by the privacy report "
        "the site's agent sent with it (the accountant's value for its history); null when "
        "none came, or it is unbounded (no noise)."
    )

    class Meta:
        model = SiteTask
        fields = [
            "round",
            "task_name",
            "model_ref",
            "state",
            "reason",
            "update_size",
            "weight",
            "metrics",
            "privacy_epsilon",
            "updated_at",
        ]
        read_only_fields = fields

    def get_privacy_epsilon(self, task: SiteTask) -> float | None:
        value = (task.privacy or {}).get("epsilon")
        return float(value) if value is not None else None


class PrivacySpendSerializer(serializers.Serializer[JobPrivacySpend]):
    """What a job has spent at a site, by the latest privacy report of the site's agent."""

    epsilon = serializers.FloatField(
        allow_null=True,
        help_text="The accountant's ε for the reported history at delta (null: unbounded or "
        "not accounted).",
    )
    max_epsilon = serializers.FloatField(allow_null=True, help_text="The site's cap per job.")
    releases = serializers.IntegerField(help_text="Updates released under the policy.")
    delta = serializers.FloatField(allow_null=True)
    noise_multiplier = serializers.FloatField(allow_null=True)
    excluded = serializers.SerializerMethodField(help_text="Tensors the site keeps home.")

    def get_excluded(self, spend: JobPrivacySpend) -> int:
        return len(spend.excluded)


class PrivacyExpectedSerializer(serializers.Serializer[JobAssessment]):
    """What the job is expected to spend at the site, by the policy its agent reported."""

    expected_epsilon = serializers.SerializerMethodField(
        help_text="ε the job spends there if it runs the rounds that fit; null when nothing "
        "is accounted or it is unbounded (the site clips without noise)."
    )
    rounds_within = serializers.IntegerField(
        allow_null=True, help_text="Rounds the site's budgets leave room for (null: no budget)."
    )
    refused = serializers.CharField(
        allow_null=True, help_text="Why the site's policy refuses the job (null: it may run)."
    )

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_expected_epsilon(self, assessment: JobAssessment) -> float | None:
        return as_json(assessment.expected_epsilon)


class ParticipantSerializer(serializers.ModelSerializer[JobSite]):
    """A site in a job: its decision, whether it is online, and its task in every round."""

    site = serializers.CharField(source="site.name", read_only=True)
    organization = serializers.CharField(source="site.organization.name", read_only=True)
    decided_by = serializers.CharField(source="decided_by.username", default=None, read_only=True)
    auto_accept_jobs = serializers.BooleanField(source="site.auto_accept_jobs", read_only=True)
    last_heartbeat = serializers.DateTimeField(source="site.last_heartbeat", read_only=True)
    online = serializers.SerializerMethodField()
    tasks = serializers.SerializerMethodField()
    log_lines = serializers.IntegerField(
        read_only=True, help_text="output lines of the site kept for this job"
    )
    log_lines_dropped = serializers.IntegerField(
        read_only=True, help_text="older output lines deleted past the site's quota"
    )
    privacy = serializers.SerializerMethodField(
        help_text="What the job has spent at the site, by its agent's latest privacy report; "
        "null before any."
    )
    privacy_expected = serializers.SerializerMethodField(
        help_text="What the job is expected to spend at the site under the privacy policy its "
        "agent reported, from the start; null when it never reported one."
    )

    class Meta:
        model = JobSite
        fields = [
            "site",
            "organization",
            "decision",
            "decided_at",
            "decided_by",
            "decision_reason",
            "auto_accept_jobs",
            "last_heartbeat",
            "online",
            "tasks",
            "log_lines",
            "log_lines_dropped",
            "privacy",
            "privacy_expected",
        ]
        read_only_fields = fields

    def get_online(self, link: JobSite) -> bool:
        return site_is_online(link.site)

    @extend_schema_field(PrivacySpendSerializer(allow_null=True))
    def get_privacy(self, link: JobSite) -> dict[str, Any] | None:
        spend = privacy_spend_of(link)
        if spend is None:
            return None
        data: dict[str, Any] = PrivacySpendSerializer(spend).data
        return data

    @extend_schema_field(PrivacyExpectedSerializer(allow_null=True))
    def get_privacy_expected(self, link: JobSite) -> dict[str, Any] | None:
        expected = job_privacy_expectation(link)
        if expected is None:
            return None
        data: dict[str, Any] = PrivacyExpectedSerializer(expected).data
        return data

    @extend_schema_field(SiteTaskSerializer(many=True))
    def get_tasks(self, link: JobSite) -> list[dict[str, Any]]:
        tasks = getattr(link.site, "job_tasks", None)
        if tasks is None:  # not prefetched (a single participant after a decision)
            tasks = SiteTask.objects.filter(round__job_id=link.job_id, site=link.site)
            tasks = tasks.select_related("round").order_by("round__number")
        serializer = SiteTaskSerializer(tasks, many=True)
        # many=True makes a ListSerializer, whose data is a list; the stubs type one serializer's.
        data: list[dict[str, Any]] = serializer.data  # type: ignore[assignment]
        return data


class MetricPointSerializer(serializers.ModelSerializer[MetricPoint]):
    site = serializers.CharField(source="site.name", default=None, read_only=True)
    round = serializers.IntegerField(source="round_number", read_only=True)

    class Meta:
        model = MetricPoint
        fields = ["key", "value", "step", "round", "site", "source", "created_at"]
        read_only_fields = fields


class ModelVersionSerializer(serializers.ModelSerializer[ModelVersion]):
    round_number = serializers.IntegerField(
        read_only=True, help_text="Completed rounds when it was made; 0 is the initial model."
    )
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = [
            "round_number",
            "sha256",
            "size",
            "metrics",
            "is_best",
            "created_at",
            "download_url",
        ]
        read_only_fields = fields

    def get_download_url(self, version: ModelVersion) -> str:
        return reverse(
            "jobs-api:job-model-download",
            kwargs={"uid": self.context["job"].uid, "round_number": version.round_number},
        )


# --- jobs for site agents ----------------------------------------------------------------------


class AgentTaskSerializer(serializers.ModelSerializer[SiteTask]):
    """The site's task in the job's open round, with the paths it signs and calls."""

    round = serializers.IntegerField(source="round.number", read_only=True)
    deadline = serializers.DateTimeField(source="round.deadline", read_only=True)
    model_url = serializers.SerializerMethodField(help_text="GET: the model the round starts from.")
    status_url = serializers.SerializerMethodField(help_text="POST: {'state': 'training'}.")
    update_url = serializers.SerializerMethodField(help_text="PUT: the update, streamed.")
    task = serializers.SerializerMethodField(
        help_text="What the workflow asks of the client script this round: task_name (train, "
        "validate, submit_model), current_round, total_rounds, start_round and meta, as the "
        "script's FLModel gets them."
    )
    model = serializers.CharField(
        source="model_ref",
        read_only=True,
        help_text="The model model_url sends: 'global', or a checkpoint's name.",
    )

    class Meta:
        model = SiteTask
        fields = [
            "round",
            "state",
            "reason",
            "deadline",
            "task",
            "model",
            "model_url",
            "status_url",
            "update_url",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.DictField())
    def get_task(self, task: SiteTask) -> dict[str, Any]:
        # The spec the round's plan gave this site, as stored when the round opened.
        return task_spec_payload(planned_task_of(task).spec)

    def _url(self, task: SiteTask, name: str) -> str:
        return reverse(
            f"jobs-api:{name}", kwargs={"uid": self.context["uid"], "number": task.round.number}
        )

    def get_model_url(self, task: SiteTask) -> str:
        return self._url(task, "agent-round-model")

    def get_status_url(self, task: SiteTask) -> str:
        return self._url(task, "agent-round-status")

    def get_update_url(self, task: SiteTask) -> str:
        return self._url(task, "agent-round-update")


class AgentJobSerializer(serializers.ModelSerializer[JobSite]):
    """A job as its site's agent sees it: enough to decide, fetch and run."""

    uid = serializers.UUIDField(source="job.uid", read_only=True)
    name = serializers.CharField(source="job.name", read_only=True)
    state = serializers.CharField(source="job.state", read_only=True)
    workflow = serializers.CharField(source="job.workflow", read_only=True)
    num_rounds = serializers.IntegerField(source="job.num_rounds", read_only=True)
    completed_rounds = serializers.IntegerField(source="job.completed_rounds", read_only=True)
    app_sha256 = serializers.CharField(source="job.app_sha256", read_only=True)
    project = serializers.CharField(
        source="job.project.slug",
        read_only=True,
        help_text="The job's project (its slug), for the site's privacy policy's job rule.",
    )
    submitter = serializers.CharField(
        source="job.submitted_by.username",
        default=None,
        read_only=True,
        help_text="Who submitted the job (a portal username), for the privacy policy's rule.",
    )
    spec_url = serializers.SerializerMethodField()
    bundle_url = serializers.SerializerMethodField()
    current_task = serializers.SerializerMethodField(
        help_text="The site's task in the open round; null between rounds and before the start."
    )

    class Meta:
        model = JobSite
        fields = [
            "uid",
            "name",
            "state",
            "workflow",
            "num_rounds",
            "completed_rounds",
            "app_sha256",
            "project",
            "submitter",
            "decision",
            "spec_url",
            "bundle_url",
            "current_task",
        ]
        read_only_fields = fields

    def get_spec_url(self, link: JobSite) -> str:
        return reverse("jobs-api:agent-job-spec", kwargs={"uid": link.job.uid})

    def get_bundle_url(self, link: JobSite) -> str:
        return reverse("jobs-api:agent-job-bundle", kwargs={"uid": link.job.uid})

    @extend_schema_field(AgentTaskSerializer(allow_null=True))
    def get_current_task(self, link: JobSite) -> dict[str, Any] | None:
        # The view passes the site's open tasks by job id (jobs.selectors.SiteActiveJobs).
        task = self.context["open_tasks"].get(link.job_id)
        if task is None:
            return None
        data: dict[str, Any] = AgentTaskSerializer(task, context={"uid": link.job.uid}).data
        return data


class AgentJobSpecSerializer(serializers.ModelSerializer[Job]):
    """What the agent runs: the job.json as submitted, and the app archive's digest."""

    class Meta:
        model = Job
        fields = ["uid", "name", "workflow", "params", "num_rounds", "spec", "app_sha256"]
        read_only_fields = fields


class AgentDecisionSerializer(serializers.ModelSerializer[JobSite]):
    uid = serializers.UUIDField(source="job.uid", read_only=True)
    site = serializers.CharField(source="site.name", read_only=True)

    class Meta:
        model = JobSite
        fields = ["uid", "site", "decision", "decided_at"]
        read_only_fields = fields


class AgentTaskStateSerializer(serializers.ModelSerializer[SiteTask]):
    round = serializers.IntegerField(source="round.number", read_only=True)
    sha256 = serializers.CharField(source="update_sha256", read_only=True)
    size = serializers.IntegerField(source="update_size", read_only=True, allow_null=True)

    class Meta:
        model = SiteTask
        fields = ["round", "state", "reason", "sha256", "size"]
        read_only_fields = fields
