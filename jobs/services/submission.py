"""``job_submit``: check a job bundle completely, then store it and record the job."""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.core.files import File
from django.db import transaction

from client_agent.wire import WireFormatError, first_nonfinite_tensor, read_header
from common.exceptions import ValidationFailed
from common.validators import is_int
from jobs.bundle import BundleError, check_app_archive, check_spec, unwrap_app_archive
from jobs.exceptions import StorageFull, is_storage_full
from jobs.models import Job, JobSite, ModelVersion
from jobs.services.audit import JobAuditAction, job_audit_record

# A round may wait for its sites at most 30 days (and the database column holds no more than
# 2**31 - 1 seconds anyway).
MAX_ROUND_TIMEOUT_SECONDS = 30 * 24 * 3600


def _copy_limited(src: IO[bytes], dest: Path, *, limit: int, field: str) -> str:
    """Copy an upload to ``dest`` in chunks, refusing more than ``limit`` bytes; sha256 hex."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise ValidationFailed(
                    f"larger than the limit of {limit} bytes", field=field, code="too_large"
                )
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _check_initial_model(path: Path) -> None:
    """The initial model passes the checks every update passes (``client_agent.wire``): a
    well-formed safetensors file whose tensors tile its data exactly, with finite values."""
    try:
        tensors, _ = read_header(path)
        bad = first_nonfinite_tensor(path)
    except WireFormatError as exc:
        raise ValidationFailed(str(exc).split(": ", 1)[-1], field="initial_model") from None
    if not tensors:
        raise ValidationFailed("holds no tensors", field="initial_model")
    if bad is not None:
        raise ValidationFailed(f"tensor {bad!r} holds NaN or Inf values", field="initial_model")


def job_submit(
    *,
    project: Any,
    submitted_by: Any,
    spec: Any,
    initial_model: IO[bytes],
    app_archive: IO[bytes],
    sites: Sequence[str] | None = None,
    round_timeout_seconds: int | None = None,
    source_address: str | None = None,
) -> Job:
    """Check everything, then store the bundle and create the job and its participants.

    ``spec`` is the parsed ``job.json``. ``initial_model`` is a safetensors file and
    ``app_archive`` a zip of the app folder (``jobs.bundle.pack_app``). ``sites`` names the
    participating sites; by default every site of the project that is enrolled now.
    Any failure raises :class:`ValidationFailed` naming the field, and nothing is stored.
    A stored job is audited (``job.submitted``) with ``submitted_by`` as its actor.
    """
    from sites.models import Site  # jobs.models must not import sites.models

    try:
        checked = check_spec(spec)
    except BundleError as exc:
        raise ValidationFailed(exc.reason, field=f"spec.{exc.field}") from None
    timeout = (
        settings.FEDPORTAL_ROUND_TIMEOUT_SECONDS
        if round_timeout_seconds is None
        else round_timeout_seconds
    )
    if not is_int(timeout) or not 1 <= timeout <= MAX_ROUND_TIMEOUT_SECONDS:
        raise ValidationFailed(
            f"must be a whole number of seconds from 1 to {MAX_ROUND_TIMEOUT_SECONDS}",
            field="round_timeout_seconds",
        )

    enrolled = Site.objects.filter(project=project, state=Site.State.ENROLLED)
    if sites is not None:
        by_name = {s.name: s for s in enrolled.filter(name__in=list(sites))}
        unknown = sorted(set(sites) - set(by_name))
        if unknown:
            raise ValidationFailed(
                f"not enrolled sites of this project: {', '.join(unknown)}", field="sites"
            )
        participants = [by_name[name] for name in dict.fromkeys(sites)]
    else:
        participants = list(enrolled.order_by("name"))
    workflow = checked.workflow
    if len(participants) < workflow.min_clients:
        raise ValidationFailed(
            f"the job needs {workflow.min_clients} sites but only {len(participants)} "
            "enrolled sites would take part",
            field="spec.params.min_clients",
        )

    try:
        return _check_and_store(
            project=project,
            submitted_by=submitted_by,
            spec=spec,
            checked=checked,
            timeout=timeout,
            participants=participants,
            initial_model=initial_model,
            app_archive=app_archive,
            source_address=source_address,
        )
    except OSError as exc:
        if is_storage_full(exc):
            raise StorageFull(
                "the portal's storage is full; the job was not submitted: try again later"
            ) from exc
        raise


def _check_and_store(
    *,
    project: Any,
    submitted_by: Any,
    spec: Any,
    checked: Any,
    timeout: int,
    participants: list[Any],
    initial_model: IO[bytes],
    app_archive: IO[bytes],
    source_address: str | None,
) -> Job:
    with tempfile.TemporaryDirectory(prefix="fedportal-submit-") as tmp:
        model_path = Path(tmp) / "initial_model.safetensors"
        model_sha = _copy_limited(
            initial_model,
            model_path,
            limit=settings.FEDPORTAL_MAX_MODEL_BYTES,
            field="initial_model",
        )
        _check_initial_model(model_path)
        app_path = Path(tmp) / "app.zip"
        app_sha = _copy_limited(
            app_archive, app_path, limit=settings.FEDPORTAL_MAX_APP_ARCHIVE_BYTES, field="app"
        )
        try:
            unwrapped = unwrap_app_archive(app_path, checked.train_script, Path(tmp) / "app-in.zip")
            check_app_archive(unwrapped, checked.train_script)
        except BundleError as exc:
            raise ValidationFailed(exc.reason, field="app") from None
        if unwrapped != app_path:  # the folder itself was zipped: keep its contents
            app_path = unwrapped
            app_sha = hashlib.sha256(unwrapped.read_bytes()).hexdigest()
        return _store(
            project=project,
            submitted_by=submitted_by,
            spec=spec,
            checked=checked,
            timeout=timeout,
            participants=participants,
            model_path=model_path,
            model_sha=model_sha,
            app_path=app_path,
            app_sha=app_sha,
            source_address=source_address,
        )


def _store(
    *,
    project: Any,
    submitted_by: Any,
    spec: dict[str, Any],
    checked: Any,
    timeout: int,
    participants: list[Any],
    model_path: Path,
    model_sha: str,
    app_path: Path,
    app_sha: str,
    source_address: str | None,
) -> Job:
    from jobs.services.rounds import job_kick_after_commit  # import cycle

    stored: list[Any] = []
    try:
        with transaction.atomic():
            workflow = checked.workflow
            job = Job(
                uid=uuid.uuid4(),
                project=project,
                name=checked.name,
                experiment=checked.experiment,
                tags=list(checked.tags),
                submitted_by=submitted_by,
                workflow=workflow.name,
                params=workflow.to_params(),
                spec=json.loads(json.dumps(spec)),
                min_clients=workflow.min_clients,
                num_rounds=workflow.num_rounds,
                round_timeout_seconds=timeout,
                app_sha256=app_sha,
            )
            with open(app_path, "rb") as fh:
                job.app_archive.save("app.zip", File(fh), save=False)
            stored.append(job.app_archive)
            job.save()
            JobSite.objects.bulk_create(JobSite(job=job, site=site) for site in participants)
            version = ModelVersion(
                job=job, round_number=0, sha256=model_sha, size=model_path.stat().st_size
            )
            with open(model_path, "rb") as fh:
                version.file.save("round-000.safetensors", File(fh), save=False)
            stored.append(version.file)
            version.save()
            job_audit_record(
                action=JobAuditAction.SUBMITTED,
                job=job,
                actor=submitted_by,
                source_address=source_address,
                details={"sites": [site.name for site in participants]},
            )
            job_kick_after_commit(job)
            return job
    except BaseException:
        # The rows rolled back; take the files with them so a failed submission stores nothing.
        for field_file in stored:
            field_file.storage.delete(field_file.name)
        raise
