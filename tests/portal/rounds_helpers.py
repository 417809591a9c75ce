"""A job driven through the services alone, as a worker drives it: three sites that accept
jobs and are online, a FedAvg job submitted from a recipe's bundle, and each site's update
uploaded as its agent would send it."""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from django.utils import timezone

from jobs.bundle import pack_app
from jobs.models import Job, SiteTask
from jobs.recipes import FedAvgRecipe
from jobs.selectors import task_for_site
from jobs.services.submission import job_submit
from jobs.services.tasks import update_upload
from sites.models import Project, Site
from tests.portal.factories import EnrolledSite, OrganizationFactory, enrolled_site
from tests.portal.jobs_api_world import update_bytes


def make_bundle(
    tmp_path: Path, *, min_clients: int = 3, num_rounds: int = 2
) -> tuple[dict[str, Any], Path, Path]:
    """A FedAvg recipe's bundle under ``tmp_path``: (spec, initial model file, app archive)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("print('a client script')\n")
    recipe = FedAvgRecipe(
        name="portal-job",
        min_clients=min_clients,
        num_rounds=num_rounds,
        model={"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(4)},
        train_script=str(app / "client.py"),
    )
    bundle = recipe.export(tmp_path / "bundle")
    archive = pack_app(bundle / "app", tmp_path / "app.zip")
    return recipe.spec(), bundle / "initial_model.safetensors", archive


def three_enrolled_sites() -> list[EnrolledSite]:
    """Sites 1-3 of one new organisation, enrolled (key and certificate), each accepting jobs
    and online."""
    organization = OrganizationFactory.create()
    sites = [enrolled_site(organization=organization, name=f"site-{i}") for i in (1, 2, 3)]
    for enrolled in sites:
        enrolled.site.auto_accept_jobs = True
        enrolled.site.last_heartbeat = timezone.now()
        enrolled.site.save()
    return sites


def three_sites() -> tuple[Project, list[Site]]:
    """:func:`three_enrolled_sites`: their project and the sites."""
    enrolled = three_enrolled_sites()
    return enrolled[0].site.project, [e.site for e in enrolled]


def submit(tmp_path: Path, project: Project, **kwargs: Any) -> Job:
    """The project creator's job from ``make_bundle(tmp_path, **kwargs)``."""
    spec, model, archive = make_bundle(tmp_path, **kwargs)
    with open(model, "rb") as m, open(archive, "rb") as a:
        return job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=spec,
            initial_model=m,
            app_archive=a,
        )


def upload(
    job: Job,
    site: Site,
    round_number: int,
    params: dict[str, torch.Tensor],
    *,
    weight: float = 1.0,
    metrics: dict[str, Any] | None = None,
) -> SiteTask:
    """``site``'s update for ``round_number``, stored as the update API stores it."""
    with tempfile.TemporaryDirectory() as tmp:
        data = update_bytes(params, Path(tmp), weight=weight, metrics=metrics)
    return upload_bytes(job, site, round_number, data)


def upload_bytes(job: Job, site: Site, round_number: int, data: bytes) -> SiteTask:
    """``data`` stored as ``site``'s update for ``round_number``, as the update API stores it."""
    task = task_for_site(job=job, site=site, round_number=round_number)
    return update_upload(
        task=task,
        stream=io.BytesIO(data),
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
    )
