"""Jobs on the portal: the one job state machine, its rounds, site tasks, models and metrics.

The database is the single source of truth for a job: Celery workers (``jobs.tasks``) read it,
decide with the pure workflow objects (``jobs.workflows``), and write it back. A worker or
portal restart resumes from these rows and the files in storage.

The pure federated core in this package (recipes, envs, workflows, aggregation) never imports
this module.
"""

from __future__ import annotations

from typing import ClassVar

from django.conf import settings
from django.db import models
from django.utils import timezone

from client_agent.protocol import MAX_LINE_CHARS
from common.exceptions import InvalidTransition
from common.rounds import round_for_people


class InvalidJobTransition(InvalidTransition):
    """A state change the job's state machine does not allow (HTTP 409 through the API)."""

    def __init__(self, kind: str, current: str, wanted: str) -> None:
        self.current = current
        self.wanted = wanted
        super().__init__(f"a {kind} that is {current} cannot become {wanted}")


class JobState(models.TextChoices):
    SUBMITTED = "submitted"
    WAITING = "waiting"  # for min_clients sites to be online and to have accepted the job
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"


JOB_ACTIVE = frozenset({JobState.SUBMITTED, JobState.WAITING, JobState.RUNNING})
JOB_TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.ABORTED})
_JOB_MOVES: dict[str, frozenset[str]] = {
    JobState.SUBMITTED: frozenset({JobState.WAITING, JobState.FAILED, JobState.ABORTED}),
    JobState.WAITING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.ABORTED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.ABORTED}),
}


def _bundle_path(job: Job, filename: str) -> str:
    return f"jobs/{job.project_id}/{job.uid}/{filename}"


class Job(models.Model):
    """A submitted job bundle and where it stands. Transitions go through :meth:`move_to`."""

    uid = models.UUIDField(unique=True, editable=False)
    project = models.ForeignKey("sites.Project", on_delete=models.PROTECT, related_name="jobs")
    name = models.CharField(max_length=100)
    # Groups runs for comparison, as an MLflow experiment and its tags do: free text set at
    # submission (job.json) or later by whoever manages the job.
    experiment = models.CharField(max_length=100, blank=True, db_index=True)
    tags = models.JSONField(default=list, blank=True, help_text="short strings")
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="submitted_jobs"
    )
    workflow = models.CharField(max_length=50)
    params = models.JSONField()
    spec = models.JSONField(help_text="the bundle's job.json as submitted")
    min_clients = models.PositiveIntegerField()
    num_rounds = models.PositiveIntegerField()
    round_timeout_seconds = models.PositiveIntegerField()
    app_archive = models.FileField(upload_to=_bundle_path, max_length=300)
    app_sha256 = models.CharField(max_length=64)
    state = models.CharField(max_length=20, choices=JobState.choices, default=JobState.SUBMITTED)
    failure_reason = models.TextField(blank=True)
    completed_rounds = models.PositiveIntegerField(default=0)
    # Frozen when the job starts: the sites that accepted it then (by name, sorted) are the
    # sites every round is planned over, and the rounds the workflow runs with them (a relay
    # runs one round a turn, so its count depends on the sites). A site that accepts later
    # does not join a running job: the plans, and a resumed job's state, would change under it.
    round_sites = models.JSONField(
        default=list, blank=True, help_text="the sites' names the rounds are planned over"
    )
    total_rounds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="rounds the workflow runs with round_sites; null: not started",
    )
    best_round = models.PositiveIntegerField(null=True, blank=True)
    best_score = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["-created_at", "-id"]
        indexes: ClassVar = [models.Index(fields=["project", "state"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.uid})"

    @property
    def is_active(self) -> bool:
        return self.state in JOB_ACTIVE

    def move_to(self, state: str, reason: str = "") -> None:
        """Change state in memory, refusing moves the state machine does not allow."""
        if state not in _JOB_MOVES.get(self.state, frozenset()):
            raise InvalidJobTransition("job", self.state, state)
        now = timezone.now()
        if state == JobState.RUNNING:
            self.started_at = now
        if state in JOB_TERMINAL:
            self.finished_at = now
            self.failure_reason = reason
        self.state = state


class JobSite(models.Model):
    """A site taking part in a job, and whether it accepted to run it."""

    class Decision(models.TextChoices):
        PENDING = "pending"
        ACCEPTED = "accepted"
        DECLINED = "declined"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="participants")
    site = models.ForeignKey("sites.Site", on_delete=models.PROTECT, related_name="job_links")
    decision = models.CharField(max_length=10, choices=Decision.choices, default=Decision.PENDING)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    decision_reason = models.TextField(blank=True, help_text="why the site decided so, if given")
    # The site's output lines in this job (jobs.services.telemetry.log_lines_record): how many are
    # kept and their size, how many were dropped past the quota, and the rate's token bucket.
    log_lines = models.PositiveIntegerField(default=0)
    log_bytes = models.PositiveBigIntegerField(default=0)
    log_lines_dropped = models.PositiveBigIntegerField(default=0)
    log_allowance = models.FloatField(null=True, blank=True, help_text="bytes; null: full")
    log_allowance_at = models.DateTimeField(null=True, blank=True)
    # The latest privacy report the site's agent sent for this job (its ledger's report:
    # ε spent, releases, history, the policy's δ and noise, and the tensors it kept home).
    privacy = models.JSONField(default=dict, blank=True, editable=False)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["job", "site"], name="unique_job_site")
        ]


class RoundState(models.TextChoices):
    OPEN = "open"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"


_ROUND_MOVES: dict[str, frozenset[str]] = {
    RoundState.OPEN: frozenset({RoundState.AGGREGATING, RoundState.FAILED}),
    RoundState.AGGREGATING: frozenset({RoundState.CLOSED, RoundState.FAILED}),
}
ROUND_ENDED = frozenset({RoundState.CLOSED, RoundState.FAILED})


class Round(models.Model):
    """One round of a job. ``number`` counts from 0; it starts from the global model after
    ``number`` completed rounds (``ModelVersion.round_number == number``)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    state = models.CharField(max_length=20, choices=RoundState.choices, default=RoundState.OPEN)
    opened_at = models.DateTimeField(default=timezone.now)
    deadline = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    plan = models.JSONField(
        default=dict,
        blank=True,
        help_text="the workflow's plan of the round (jobs.services.plans): label, min_results, "
        "and each site's task, model and spec",
    )
    server_state = models.CharField(
        max_length=300,
        blank=True,
        help_text="storage name of the workflow's server state after the round closed",
    )
    aggregation_attempts = models.PositiveSmallIntegerField(
        default=0,
        help_text="times a worker started aggregating this round; past "
        "FEDPORTAL_ROUND_MAX_AGGREGATION_ATTEMPTS the round fails instead of starting again",
    )
    claim_holder = models.CharField(
        max_length=200,
        blank=True,
        help_text="the worker doing the round's aggregation (or summing) now, while its lease "
        "lasts; empty when nobody is (jobs.services.claims)",
    )
    claim_expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="when the holder's lease ends unless renewed; with no holder, when the "
        "workers' watchdog kicks a round that nobody claimed",
    )
    protection = models.JSONField(
        default=dict,
        blank=True,
        help_text="under secure aggregation (jobs.services.secure): the kind, the phase, the "
        "roster of public keys, the sites that shared, the survivors, the finish requests and "
        "the round's cost; empty for a plain round",
    )
    protected_total = models.FileField(
        blank=True,
        help_text="under HE, the sum of the survivors' encrypted updates, for the site that "
        "decrypts it: never one site's (named by jobs.services.plans.protected_total_name); "
        "masked rounds store none",
    )

    class Meta:
        ordering: ClassVar = ["job", "number"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["job", "number"], name="unique_job_round")
        ]

    def __str__(self) -> str:
        return f"round {round_for_people(self.number)} of {self.job}"

    @property
    def label(self) -> str:
        """The round for people, as its plan names it ("round 3", a relay's turn)."""
        return str((self.plan or {}).get("label") or f"round {round_for_people(self.number)}")

    def move_to(self, state: str) -> None:
        """Change state in memory, refusing moves the round's state machine does not allow;
        a round that ends (closed or failed) records when."""
        if state not in _ROUND_MOVES.get(self.state, frozenset()):
            raise InvalidJobTransition("round", self.state, state)
        if state in ROUND_ENDED:
            self.closed_at = timezone.now()
        self.state = state


class SecureMessage(models.Model):
    """What one site sent in one phase of a protected round (jobs.services.secure): its
    public keys, its shares sealed for other sites, or its finish answer. Nothing stored here
    reveals a site's update: keys are public, shares are sealed for their receivers, and a
    site reveals for each other site one kind of share only."""

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="secure_messages")
    site = models.ForeignKey("sites.Site", on_delete=models.CASCADE, related_name="+")
    phase = models.CharField(max_length=10)
    payload = models.JSONField(default=dict, blank=True)
    # Named by jobs.services.plans.secure_data_name when stored, like protected_total.
    data = models.FileField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["round", "site", "phase"], name="unique_secure_message")
        ]

    def __str__(self) -> str:
        return f"{self.phase} of {self.site_id} in {self.round}"


class TaskState(models.TextChoices):
    ASSIGNED = "assigned"
    DOWNLOADED = "downloaded"
    TRAINING = "training"
    UPLOADED = "uploaded"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    LATE = "late"


TASK_ANSWERED = frozenset({TaskState.ACCEPTED, TaskState.REJECTED, TaskState.FAILED})
TASK_OPEN = frozenset({TaskState.ASSIGNED, TaskState.DOWNLOADED, TaskState.TRAINING})

# A task's state machine: the site reports progress or failure while the task is open, its
# upload makes it uploaded (late once the round closed), the check accepts or rejects it, and
# a round that closes makes every unanswered task late. Accepted, rejected, failed and late
# are final.
_TASK_MOVES: dict[str, frozenset[str]] = {
    TaskState.ASSIGNED: frozenset(
        {
            TaskState.DOWNLOADED,
            TaskState.TRAINING,
            TaskState.UPLOADED,
            TaskState.FAILED,
            TaskState.LATE,
        }
    ),
    TaskState.DOWNLOADED: frozenset(
        {TaskState.TRAINING, TaskState.UPLOADED, TaskState.FAILED, TaskState.LATE}
    ),
    TaskState.TRAINING: frozenset({TaskState.UPLOADED, TaskState.FAILED, TaskState.LATE}),
    TaskState.UPLOADED: frozenset({TaskState.ACCEPTED, TaskState.REJECTED, TaskState.LATE}),
}


def _update_path(task: SiteTask, filename: str) -> str:
    job = task.round.job
    return f"jobs/{job.project_id}/{job.uid}/updates/round-{task.round.number:03d}/{filename}"


class SiteTask(models.Model):
    """What one site did in one round."""

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="tasks")
    site = models.ForeignKey("sites.Site", on_delete=models.PROTECT, related_name="tasks")
    state = models.CharField(max_length=20, choices=TaskState.choices, default=TaskState.ASSIGNED)
    reason = models.TextField(blank=True)
    # What the round's plan asks of this site: the task name (train, validate, submit_model),
    # which model it gets ("global" or a checkpoint's name) and the script's FLModel fields.
    task_name = models.CharField(max_length=20, default="train")
    model_ref = models.CharField(max_length=200, default="global")
    spec = models.JSONField(default=dict, blank=True)
    update = models.FileField(upload_to=_update_path, max_length=300, blank=True)
    update_sha256 = models.CharField(max_length=64, blank=True)
    update_size = models.PositiveBigIntegerField(null=True, blank=True)
    weight = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    # The privacy report the site's agent sent with this task's upload or its refusal.
    privacy = models.JSONField(default=dict, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering: ClassVar = ["round", "site__name"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["round", "site"], name="unique_round_site")
        ]

    @staticmethod
    def states_that_move_to(state: str) -> frozenset[str]:
        """The states a task may move to ``state`` from: the condition of a conditional
        update (``filter(state__in=…).update(state=state)``), so that two workers never move
        one task twice, nor a task the state machine does not allow to move."""
        return frozenset(before for before, after in _TASK_MOVES.items() if state in after)

    def move_to(self, state: str, reason: str = "") -> None:
        """Change state in memory, refusing moves the task's state machine does not allow."""
        if state not in _TASK_MOVES.get(self.state, frozenset()):
            raise InvalidJobTransition("task", self.state, state)
        self.state, self.reason = state, reason


def _model_path(version: ModelVersion, filename: str) -> str:
    job = version.job
    return f"jobs/{job.project_id}/{job.uid}/models/{filename}"


class ModelVersion(models.Model):
    """A global model: the initial one (``round_number`` 0) and one after every round."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="models")
    round_number = models.PositiveIntegerField(help_text="completed rounds when it was made")
    file = models.FileField(upload_to=_model_path, max_length=300)
    sha256 = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField()
    metrics = models.JSONField(
        default=dict, blank=True, help_text="the sites' weighted metrics scoring this model"
    )
    is_best = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["job", "round_number"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["job", "round_number"], name="unique_job_model")
        ]


class Checkpoint(models.Model):
    """A model a workflow keeps by name (a site's submitted model, ``"site:site-2"``), which
    later rounds' tasks send instead of the global model."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="checkpoints")
    name = models.CharField(max_length=200)
    round_number = models.PositiveIntegerField(help_text="the round that kept it (from 0)")
    file = models.FileField(max_length=300)
    sha256 = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["job", "name"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["job", "name"], name="unique_job_checkpoint")
        ]

    def __str__(self) -> str:
        return f"checkpoint {self.name} of {self.job}"


class Evaluation(models.Model):
    """One cell of a cross-site evaluation: the metrics ``site_name`` computed for the model
    ``model`` (``"global"``, or a checkpoint's name such as ``"site:site-2"``) in a round. A
    later round's cell for the same model and site replaces an earlier one in the matrix."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="evaluations")
    round_number = models.PositiveIntegerField(help_text="the round that made it (from 0)")
    model = models.CharField(max_length=200)
    site_name = models.CharField(max_length=100)
    metrics = models.JSONField(default=dict)

    class Meta:
        ordering: ClassVar = ["job", "round_number", "model", "site_name"]
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["job", "round_number", "model", "site_name"],
                name="unique_job_evaluation",
            )
        ]


class MetricPoint(models.Model):
    """One number from a site (its train result, or ``flare.log``) or a round's aggregate."""

    class Source(models.TextChoices):
        RESULT = "result"
        AGGREGATE = "aggregate"
        LOG = "log"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metric_points")
    site = models.ForeignKey("sites.Site", null=True, blank=True, on_delete=models.PROTECT)
    round_number = models.PositiveIntegerField(null=True, blank=True)
    key = models.CharField(max_length=200)
    value = models.FloatField()
    step = models.BigIntegerField(null=True, blank=True)
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.LOG)
    client_id = models.CharField(
        max_length=64, blank=True, help_text="the sender's id for the point: a resend is ignored"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["job", "created_at", "id"]
        indexes: ClassVar = [models.Index(fields=["job", "key", "site", "round_number"])]
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["job", "site", "client_id"],
                condition=~models.Q(client_id=""),
                name="unique_metric_client_id",
            )
        ]


class LogLine(models.Model):
    """A line a site's client script printed, or one its agent wrote about the job.

    Only what the script itself chose to print leaves the site, and only the tail is worth
    keeping: the service cuts each line to ``MAX_LENGTH`` characters (with a marker), and keeps
    each site's newest lines within a quota.
    """

    MAX_LENGTH = MAX_LINE_CHARS

    class Stream(models.TextChoices):
        SCRIPT = "script"  # the client script's stdout and stderr, interleaved as printed
        AGENT = "agent"  # the agent about this job: started, restarted, failed

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_lines")
    site = models.ForeignKey("sites.Site", on_delete=models.PROTECT, related_name="log_lines")
    round_number = models.PositiveIntegerField(null=True, blank=True)
    stream = models.CharField(max_length=10, choices=Stream.choices, default=Stream.SCRIPT)
    text = models.TextField()
    size = models.PositiveIntegerField(default=0, help_text="bytes of the text, UTF-8")
    client_id = models.CharField(
        max_length=64, blank=True, help_text="the sender's id for the line: a resend is ignored"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["job", "site", "id"]
        indexes: ClassVar = [models.Index(fields=["job", "site", "id"])]
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["job", "site", "client_id"],
                condition=~models.Q(client_id=""),
                name="unique_log_line_client_id",
            )
        ]

    def __str__(self) -> str:
        return f"{self.site_id} {self.stream}: {self.text[:60]}"
