"""Submitting in a real Chromium: a lead uploads the zip of a bundle ``recipe.export()`` wrote,
reads the preview, submits, lands on the job's page; then clones that job, changes one
parameter and submits the clone."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from django.db import connection
from playwright.sync_api import expect

from jobs.models import Job
from jobs.recipes import FedAvgRecipe
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.usefixtures("eager_celery"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)",
    ),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL: the portal process shares the test database",
    ),
    pytest.mark.django_db(transaction=True),
]


def _bundle_zip(tmp: Path) -> Path:
    """``python -m zipfile -c my-job.zip my-job/`` of what ``recipe.export("my-job")`` writes."""
    app = tmp / "src"
    app.mkdir()
    (app / "client.py").write_text("print('hello')\n")
    recipe = FedAvgRecipe(
        name="digits",
        min_clients=2,
        num_rounds=3,
        model=torch.nn.Linear(4, 2),
        train_script=str(app / "client.py"),
    )
    folder = tmp / "my-job"
    recipe.export(str(folder))
    archive = tmp / "my-job.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(tmp).as_posix())
    return archive


def test_upload_a_bundle_preview_submit_then_clone_and_edit(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path, start=False, submit=False)
    archive = _bundle_zip(tmp_path)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    pages.visit(page, f"/projects/{world.project.slug}/jobs/new/", "submit-form")
    page.get_by_role("link", name="Upload it as one zip").click()
    page.get_by_label("Job bundle (.zip)").set_input_files(str(archive))
    pages.shot(page, "bundle-chosen")
    page.get_by_role("button", name="Upload and preview").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Preview the job digits")
    expect(page.locator("#bundle-facts")).to_contain_text("2 tensors, 10 parameters")
    expect(page.get_by_role("table", name="Tensors of the initial model")).to_contain_text("2 × 4")
    expect(page.get_by_label("site-1 (offline; accepts automatically)")).to_be_visible()
    pages.shot(page, "bundle-preview")
    page.get_by_label("Name").fill("digits-a")
    page.get_by_role("button", name="Submit job").click()

    expect(page.get_by_role("heading", level=1)).to_contain_text("digits-a")
    pages.shot(page, "submitted-job")
    first = in_thread(lambda: Job.objects.get(name="digits-a"))
    assert first.params["num_rounds"] == 3

    page.get_by_role("link", name="Clone and edit").click()
    expect(page.get_by_label("Name")).to_have_value("digits-a-2")
    fieldset = page.locator('fieldset[data-workflow="fedavg"]')
    fieldset.get_by_label("Num rounds").fill("6")
    pages.shot(page, "clone-form")
    page.get_by_role("button", name="Submit job").click()

    expect(page.get_by_role("heading", level=1)).to_contain_text("digits-a-2")
    pages.shot(page, "cloned-job")
    clone = in_thread(lambda: Job.objects.get(name="digits-a-2"))
    assert clone.params["num_rounds"] == 6
    assert clone.app_sha256 == first.app_sha256
