"""Running a recipe on a portal: :class:`ProdEnv`, and the :class:`PortalRun` it returns.

``ProdEnv`` needs the portal's URL, an API token (made on the portal: API tokens) and the
project's slug, from its arguments, or from ``FEDPORTAL_URL`` / ``FEDPORTAL_TOKEN`` /
``FEDPORTAL_PROJECT``, or from a credentials file (JSON with ``portal``, ``token``,
``project``; default ``~/.fedportal/credentials.json``). A plain ``http://`` portal on another
machine is refused (the API token would cross the network in clear text) unless
``insecure=True`` or ``FEDPORTAL_INSECURE=1``. It exports the recipe to a bundle,
submits it over the REST API, and (unless ``wait=False``) follows the job until it ends,
printing progress like SimEnv. The run's models and metrics are fetched from the portal.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client_agent.portal import PortalClient, PortalError, PortalUnreachable
from jobs.bundle import MODEL_FILE, SPEC_FILE, pack_app
from jobs.envs.base import MetricPoint, Metrics, RoundRecord, Run, RunStatus, _Progress

if TYPE_CHECKING:
    from jobs.recipes import Recipe

DEFAULT_CREDENTIALS = Path("~/.fedportal/credentials.json")
INSECURE_ENV = "FEDPORTAL_INSECURE"
_TERMINAL = {
    "completed": RunStatus.COMPLETED,
    "failed": RunStatus.FAILED,
    "aborted": RunStatus.ABORTED,
}


class PortalRun(Run):
    """A job on a portal. ``wait()`` follows it to the end; ``status``, ``metrics``,
    ``rounds`` and the models are what the portal reported at the last refresh."""

    def __init__(
        self,
        *,
        client: PortalClient,
        job: dict[str, Any],
        workspace: Path,
        show_progress: bool = True,
        poll_seconds: float = 0.5,
    ) -> None:
        super().__init__(job_id=str(job["uid"]), status=RunStatus.RUNNING, workspace=workspace)
        self.client = client
        self.name = str(job["name"])
        self.num_rounds = int(job["num_rounds"])
        self.state = str(job["state"])
        self.poll_seconds = poll_seconds
        self.progress = _Progress(show_progress, self.num_rounds)
        self._said_rounds = 0
        self._update(job)

    @property
    def url(self) -> str:
        return f"{self.client.url}/jobs/{self.job_id}/"

    def _path(self, suffix: str = "") -> str:
        return f"/api/v1/jobs/{self.job_id}/{suffix}"

    def _update(self, job: dict[str, Any]) -> None:
        self.state = str(job["state"])
        self.status = _TERMINAL.get(self.state, RunStatus.RUNNING)
        self.error = job.get("failure_reason") or None
        self.best_round = job.get("best_round")
        self.best_score = job.get("best_score")
        self.completed_rounds = int(job.get("completed_rounds") or 0)
        if job.get("total_rounds") is not None:
            # Frozen when the job started: a relay runs a round per site turn.
            self.num_rounds = self.progress.num_rounds = int(job["total_rounds"])

    def refresh(self) -> PortalRun:
        self._update(self.client.get(self._path()))
        return self

    def wait(self, timeout: float | None = None) -> PortalRun:
        """Follow the job until it ends (or ``timeout`` seconds); then fetch its results."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_state = ""
        away_since: float | None = None
        while True:
            try:
                self.refresh()
            except (PortalUnreachable, PortalError) as exc:
                # A portal being restarted or redeployed (or a proxy answering 502/503 for
                # it meanwhile) is waited for; the job goes on without us.
                if isinstance(exc, PortalError) and exc.status < 500:
                    raise
                if away_since is None:
                    away_since = time.monotonic()
                    self.progress.say(f"the portal does not answer ({exc}); still waiting")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"job {self.job_id}: the portal has not answered for "
                        f"{time.monotonic() - away_since:.0f} s"
                    ) from exc
                time.sleep(min(2.0, self.poll_seconds * 4))
                continue
            if away_since is not None:
                away_since = None
                self.progress.say("the portal answers again")
            if self.state != last_state:
                last_state = self.state
                self.progress.say(f"{self.name} ({self.job_id}): {self.state}")
            while self._said_rounds < self.completed_rounds:
                self._said_rounds += 1
                self.progress.say(f"round {self._said_rounds}/{self.num_rounds} done")
            if self.status != RunStatus.RUNNING:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} is still {self.state} after {timeout} s")
            time.sleep(self.poll_seconds)
        self.fetch_results()
        if self.status == RunStatus.COMPLETED:
            self.progress.say(f"{self.name}: COMPLETED; results in {self.workspace}")
        else:
            self.progress.say(f"{self.name}: {self.status.value}: {self.error}")
        return self

    def abort(self, reason: str = "aborted from job.py") -> None:
        """Abort the job on the portal (``POST /api/v1/jobs/<uid>/abort/``), recording
        ``reason``. A job that has ended already is left as it is, as NVFlare's ``Run.abort``
        is a no-op then; a portal that refuses (no permission) raises its error."""
        if self.status != RunStatus.RUNNING:
            return
        try:
            self._update(self.client.post(self._path("abort/"), {"reason": reason}))
        except PortalError as exc:
            if exc.status != 409:
                raise
            self.refresh()  # it ended since the last refresh: nothing left to abort

    def get_status(self) -> str | None:
        """The job's status now, asked of the portal, in NVFlare's words (``"RUNNING"``,
        ``"FINISHED:COMPLETED"``, …); ``None`` when the portal cannot be asked, as NVFlare's
        ``Run.get_status`` answers when its admin API fails. An ended job's status is final,
        so it is answered without asking (a PocEnv's portal is stopped by then)."""
        if self.status != RunStatus.RUNNING:
            return super().get_status()
        try:
            self.refresh()
        except (PortalUnreachable, PortalError):
            return None
        return super().get_status()

    def get_result(self, timeout: float = 0.0, clean_up: bool = True) -> str | None:
        """Wait for the job to end (``timeout`` seconds, 0: no limit, as NVFlare), download its
        models and metrics into the run's workspace, and return that folder; ``None`` if the
        job is still running after ``timeout``. The models are in its ``models/`` folder.

        ``clean_up`` changes nothing: the portal keeps the job, and the folder is the result
        (a PocEnv is stopped when its run ends unless ``keep_running=True``)."""
        try:
            self.wait(timeout=timeout or None)
        except TimeoutError:
            return None
        return str(self.workspace)

    def fetch_results(self) -> None:
        """Rounds, metrics and every global model, into the run and its workspace."""
        rounds = self.client.get_all(self._path("rounds/"))
        answers: dict[int, dict[str, tuple[str, str]]] = {}
        site_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        for participant in self.client.get_all(self._path("sites/")):
            for task in participant.get("tasks") or []:
                number = int(task["round"])
                answers.setdefault(number, {})[participant["site"]] = (
                    task["state"],
                    task.get("reason") or "",
                )
                if task["state"] == "accepted":
                    site_metrics.setdefault(number, {})[participant["site"]] = dict(
                        task.get("metrics") or {}
                    )
        self.rounds = []
        for r in rounds:
            if r["state"] != "closed":
                continue
            number = int(r["number"])
            tasks = answers.get(number, {})
            self.rounds.append(
                RoundRecord(
                    round=number,
                    label=str(r.get("label") or ""),
                    accepted=sorted(s for s, (state, _) in tasks.items() if state == "accepted"),
                    rejected={
                        s: why or state for s, (state, why) in tasks.items() if state != "accepted"
                    },
                    metrics=dict(r.get("metrics") or {}),
                    site_metrics=site_metrics.get(number, {}),
                    protection=dict(r.get("protection") or {}),
                )
            )
        cross_site = self.client.get(self._path("cross-site/"))
        self.evaluations = [
            {"model": model, "site": site, "metrics": dict(metrics)}
            for model in cross_site["models"]
            for site, metrics in cross_site["matrix"][model].items()
        ]
        points = self.client.get_all(self._path("metrics/?limit=1000"))
        self.metrics = Metrics(
            MetricPoint(
                round=p.get("round"),
                site=p.get("site"),
                key=p["key"],
                value=float(p["value"]),
                step=p.get("step"),
                source=p.get("source", "result"),
            )
            for p in points
        )
        models = self.workspace / "models"
        for version in self.client.get_all(self._path("models/")):
            number = int(version["round_number"])
            name = "initial.safetensors" if number == 0 else f"round-{number:03d}.safetensors"
            target = models / name
            if not target.exists():
                self.client.download(self._path(f"models/{number}/download/"), target)
            if version.get("is_best"):
                (models / "best.safetensors").unlink(missing_ok=True)
                os.link(target, models / "best.safetensors")
        if self.status == RunStatus.COMPLETED:
            self.write_named_model_files()


class ProdEnv:
    """Submit to a portal that runs elsewhere; ``recipe.execute(ProdEnv(...))``."""

    def __init__(
        self,
        portal_url: str | None = None,
        token: str | None = None,
        project: str | None = None,
        *,
        credentials: str | Path | None = None,
        sites: Sequence[str] | None = None,
        round_timeout_seconds: int | None = None,
        wait: bool = True,
        show_progress: bool = True,
        workspace: str | Path | None = None,
        insecure: bool | None = None,
    ) -> None:
        stored: dict[str, Any] = {}
        path = Path(credentials or DEFAULT_CREDENTIALS).expanduser()
        if credentials is not None or path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"credentials: cannot read {path}: {exc}") from None
        self.portal_url = portal_url or os.environ.get("FEDPORTAL_URL") or stored.get("portal")
        self.token = token or os.environ.get("FEDPORTAL_TOKEN") or stored.get("token")
        self.project = project or os.environ.get("FEDPORTAL_PROJECT") or stored.get("project")
        for name, value in (
            ("portal_url", self.portal_url),
            ("token", self.token),
            ("project", self.project),
        ):
            if not value:
                raise ValueError(
                    f"{name}: not given; pass it, set FEDPORTAL_{name.split('_')[0].upper()}, or "
                    f"put it in {path}"
                )
        self.sites = list(sites) if sites is not None else None
        self.round_timeout_seconds = round_timeout_seconds
        self.wait = wait
        self.show_progress = show_progress
        self.workspace = Path(workspace).resolve() if workspace is not None else None
        if insecure is None:
            insecure = os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
        self.client = PortalClient(
            str(self.portal_url),
            api_token=str(self.token),
            insecure=insecure,
            insecure_flag=f"insecure=True (or set {INSECURE_ENV}=1)",
        )

    def run(self, recipe: Recipe) -> PortalRun:
        if recipe.experiment_tracking:
            # Said, not silently ignored: a portal keeps every job's numbers and serves them
            # as TensorBoard files, an MLflow store and CSV; it runs no tracker of its own.
            warnings.warn(
                "add_experiment_tracking: on a portal, download the job's TensorBoard events or "
                "MLflow store (/api/v1/jobs/<uid>/tracking/tensorboard.zip, …/mlflow.zip) or "
                "its metrics.csv; the portal pushes to no tracking server, and site agents keep "
                "no client-side tracker records",
                stacklevel=4,  # the job script's recipe.execute(env)
            )
        workspace = self.workspace or Path(tempfile.gettempdir()) / "fedportal-runs"
        staging = Path(tempfile.mkdtemp(prefix="fedportal-submit-"))
        try:
            bundle = recipe.export(staging / "bundle")
            form = _multipart_form(
                bundle, staging, sites=self.sites, timeout=self.round_timeout_seconds
            )
            job = self.client.post_file(
                f"/api/v1/projects/{self.project}/jobs/", form.path, form.content_type
            )
        except PortalError as exc:
            where = f" ({exc.field})" if exc.field else ""
            raise ValueError(f"the portal refused the job{where}: {exc.message}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        run = PortalRun(
            client=self.client,
            job=job,
            workspace=workspace / str(job["uid"]),
            show_progress=self.show_progress,
        )
        run.model_file_names = recipe.model_file_names
        run.progress.say(f"submitted {run.name} to {self.client.url}: job {run.job_id}")
        return run.wait() if self.wait else run


class _Form:
    def __init__(self, path: Path, content_type: str) -> None:
        self.path = path
        self.content_type = content_type


def _multipart_form(
    bundle: Path, staging: Path, *, sites: Sequence[str] | None, timeout: int | None
) -> _Form:
    """The job bundle as a multipart form, written to a file so large models stream."""
    boundary = "fedportal-" + secrets.token_hex(12)
    archive = pack_app(bundle / "app", staging / "app.zip")
    path = staging / "form"
    fields: list[tuple[str, str]] = [(name, value) for name in ["sites"] for value in sites or []]
    if timeout is not None:
        fields.append(("round_timeout_seconds", str(timeout)))
    files = [
        ("spec", SPEC_FILE, bundle / SPEC_FILE, "application/json"),
        ("initial_model", MODEL_FILE, bundle / MODEL_FILE, "application/octet-stream"),
        ("app", "app.zip", archive, "application/zip"),
    ]
    with open(path, "wb") as out:
        for name, value in fields:
            disposition = f'Content-Disposition: form-data; name="{name}"'
            out.write(f"--{boundary}\r\n{disposition}\r\n\r\n{value}\r\n".encode())
        for name, filename, source, content_type in files:
            out.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
            )
            with open(source, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    out.write(chunk)
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
    return _Form(path, f"multipart/form-data; boundary={boundary}")
