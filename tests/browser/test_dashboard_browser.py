"""The dashboard in a real Chromium: enrolment request → approval → token, a job submitted
with an invalid field then corrected, a running job's page updating live (a metric point within
2 seconds, a log line) and aborted, and a member who sees no abort button and whom the API
refuses too. Every page visited is screenshotted (see conftest.py)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from django.db import connection
from playwright.sync_api import expect

from jobs.models import Evaluation, Job, JobState
from jobs.services.telemetry import log_lines_record
from sites.models import Certificate, Site, SiteState
from sites.services import enrolment_token_check
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import api_world as sw
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


def test_site_request_approval_and_one_time_token(pages: Pages) -> None:
    world = in_thread(sw.build_world)
    slug = world.project.slug
    page = pages.new_page()
    pages.sign_in(page, world.users[sw.ORG_ADMIN_A].username)
    page.get_by_role("link", name="Hospital Net").click()
    pages.shot(page, "project")
    page.get_by_role("navigation", name="Project Hospital Net").get_by_role(
        "link", name="Sites"
    ).click()
    page.get_by_role("link", name="Request a site").click()
    page.get_by_label("Name").fill("Bad Name!")
    page.get_by_label("Contact email").fill("ops@new.example.org")
    page.get_by_role("button", name="Request site").click()
    expect(page.locator("#id_name-error")).to_contain_text("lowercase letters")
    expect(page.locator("#id_name")).to_be_focused()  # focus goes to the field at fault
    pages.shot(page, "request-error")
    assert not Site.objects.filter(name="Bad Name!").exists()
    page.get_by_label("Name").fill("site-new")
    page.get_by_label("Contact email").fill("ops@new.example.org")
    page.get_by_role("button", name="Request site").click()
    expect(page.get_by_role("status").first).to_contain_text("Site site-new was requested")
    pages.shot(page, "requested")
    assert Site.objects.get(name="site-new").state == SiteState.REQUESTED

    admin = pages.new_page()
    pages.sign_in(admin, world.users[sw.ADMIN].username)
    pages.visit(admin, f"/projects/{slug}/sites/", "approval-queue")
    admin.get_by_role("button", name="Approve site-new").click()
    command = admin.get_by_label("At the site, run").input_value()
    pages.shot(admin, "token-shown-once")
    match = re.fullmatch(
        rf"python -m client_agent enrol --portal {re.escape(pages.base)} --token (fpe_\S+)",
        command,
    )
    assert match, command
    assert enrolment_token_check(token=match.group(1)).name == "site-new"

    # Revoking a certificate asks for a reason, and the page is the confirmation.
    pages.visit(admin, f"/projects/{slug}/sites/", "sites-after-approval")
    admin.get_by_role("link", name="Revoke the certificate of site-a").click()
    admin.get_by_label("Reason").fill("key left on a laptop")
    pages.shot(admin, "revoke-confirm")
    admin.get_by_role("button", name="Revoke certificate").click()
    expect(admin.get_by_role("status").first).to_contain_text("was revoked")
    pages.shot(admin, "revoked")
    cert = Certificate.objects.get(pk=world.site_a.certificate.pk)
    assert cert.revocation_reason == "key left on a laptop"


def test_job_submitted_with_an_invalid_field_then_corrected(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path, start=False, submit=False)
    bundle = jw.make_bundle(tmp_path)
    app = tmp_path / "app.zip"
    app.write_bytes(bundle.app)
    model = tmp_path / "initial_model.safetensors"
    model.write_bytes(bundle.model)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    pages.visit(page, f"/projects/{world.project.slug}/jobs/new/", "submit-form")

    def fill(min_clients: str) -> None:
        page.get_by_label("Name (required)", exact=True).fill("browser-job")
        page.get_by_label("Workflow (required)", exact=True).select_option("fedavg")
        # Only the chosen workflow's parameters are shown.
        shown = page.locator("fieldset[data-workflow]:not([hidden])")
        expect(shown).to_have_count(1)
        shown.get_by_label("Min clients").fill(min_clients)
        shown.get_by_label("Num rounds").fill("2")
        page.get_by_label("App folder (zip)").set_input_files(str(app))
        page.get_by_label("Initial weights (.safetensors)").set_input_files(str(model))
        page.get_by_role("button", name="Submit job").click()

    fill("9")
    error = page.locator("#id_fedavg__min_clients-error")
    expect(error).to_contain_text("the job needs 9 sites")
    expect(page.locator("#id_fedavg__min_clients")).to_have_attribute("aria-invalid", "true")
    pages.shot(page, "submit-error")
    assert not Job.objects.exists()

    fill("2")
    expect(page.get_by_role("heading", level=1)).to_have_text("Job browser-job")
    job = Job.objects.get()
    expect(page.locator("#job-state")).to_have_text(job.state)
    pages.shot(page, "submitted-job")
    assert job.min_clients == 2 and job.submitted_by == world.users[jw.LEAD]


def test_a_cyclic_job_is_chosen_and_submitted_with_the_form(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path, start=False, submit=False)
    bundle = jw.make_bundle(tmp_path)
    app = tmp_path / "app.zip"
    app.write_bytes(bundle.app)
    model = tmp_path / "initial_model.safetensors"
    model.write_bytes(bundle.model)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    pages.visit(page, f"/projects/{world.project.slug}/jobs/new/", "submit-form-cyclic")

    page.get_by_label("Name (required)", exact=True).fill("relay-job")
    page.get_by_label("Workflow (required)", exact=True).select_option("cyclic")
    shown = page.locator("fieldset[data-workflow]:not([hidden])")
    expect(shown.locator("legend")).to_have_text("Parameters of the cyclic workflow")
    shown.get_by_label("Min clients").fill("2")
    shown.get_by_label("Num rounds").fill("3")
    shown.get_by_label("Order").select_option("random")
    page.get_by_label("App folder (zip)").set_input_files(str(app))
    page.get_by_label("Initial weights (.safetensors)").set_input_files(str(model))
    page.get_by_role("button", name="Submit job").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Job relay-job")
    pages.shot(page, "submitted-cyclic-job")
    job = Job.objects.get()
    assert job.workflow == "cyclic"
    assert (job.params["num_rounds"], job.params["order"]) == (3, "random")
    # The job page lists the workflow's parameters with their descriptions.
    page.locator("#workflow-parameters summary").click()
    expect(
        page.locator("#workflow-parameters").get_by_text("passes over all the sites")
    ).to_be_visible()
    pages.shot(page, "cyclic-job-parameters")


def _cross_site_scores(job: Job) -> None:
    """What a cross-site evaluation's close stores: every site's accuracy of every model."""
    models = ["global", "site:site-1", "site:site-2", "site:site-3"]
    for row, model in enumerate(models):
        for column, site in enumerate(("site-1", "site-2", "site-3")):
            home = model == f"site:{site}"
            accuracy = 0.95 if home else 0.4 + 0.1 * ((row + column) % 3)
            Evaluation.objects.create(
                job=job,
                round_number=row + 2,
                model=model,
                site_name=site,
                metrics={"accuracy": accuracy},
            )


def test_the_cross_site_heat_map_reads_in_a_browser(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    job = world.job
    assert job is not None
    in_thread(_cross_site_scores, job)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    pages.visit(page, f"/jobs/{job.uid}/", "job-cross-site")
    # Once its socket is live the page fetches its fragments again (the heat map's among
    # them): read the map after that, not an element about to be replaced.
    expect(page.locator("[data-live-status]")).to_contain_text("Live")
    page.wait_for_load_state("networkidle")

    heat = page.locator("#cross-site")
    heat.scroll_into_view_if_needed()
    pages.shot(page, "cross-site-heat-map")
    expect(heat).to_be_visible()
    expect(page.locator("#cross-site-heading")).to_have_text("Cross-site evaluation: accuracy")
    # A row per model, a column per site, every value written out; a site's own model is
    # the best cell of its column, coloured as such.
    expect(heat.locator("tbody tr")).to_have_count(4)
    own = heat.locator('[data-model="site:site-2"] [data-site="site-2"]')
    expect(own).to_have_text("0.95")
    expect(own).to_have_class("heat-10")


def _post_metric(base: str, world: jw.World, point: dict) -> None:
    """A site's agent posts a metric point to the portal process: a signed HTTP request."""
    assert world.job is not None
    path = f"/api/v1/agent/jobs/{world.job.uid}/metrics/"
    body = json.dumps({"points": [point]}).encode()
    headers = {"Content-Type": "application/json", **world.sites[0].headers("POST", path, body)}
    request = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response)["stored"] == 1


def test_running_job_page_updates_live_and_is_aborted(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    job = world.job
    assert job is not None and job.state == JobState.RUNNING
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    pages.visit(page, f"/jobs/{job.uid}/", "job-running")
    expect(page.locator("[data-live-status]")).to_contain_text("Live")
    expect(page.locator('#task-grid tr[data-site="site-1"]')).to_contain_text("assigned")
    page.evaluate("window.notReloaded = true")

    started = time.monotonic()
    _post_metric(pages.base, world, {"key": "loss", "value": 0.4242, "step": 5})
    latest = page.locator('figure[data-chart="loss · by step"] tr[data-series="site-1"]')
    expect(latest).to_contain_text("0.4242", timeout=2000)
    assert time.monotonic() - started < 2.0
    points = page.evaluate("window.FedPortalJob.charts()['loss · by step'].series['site-1']")
    assert points == [[5, 0.4242]]
    pages.shot(page, "metric-arrived")

    # A log line recorded in this process crosses the Redis channel layer to the page.
    in_thread(
        log_lines_record, job=job, site=world.sites[1].site, lines=[{"text": "epoch 1: loss 0.42"}]
    )
    expect(page.locator('.log[data-site="site-2"] pre')).to_contain_text("epoch 1: loss 0.42")
    assert page.evaluate("window.notReloaded") is True
    pages.shot(page, "log-arrived")

    page.get_by_label("Reason for aborting (optional)").fill("wrong learning rate")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Abort job").click()
    expect(page.locator("#job-state")).to_have_text("aborted")
    expect(page.get_by_role("button", name="Abort job")).to_have_count(0)
    pages.shot(page, "aborted")
    aborted = Job.objects.get(pk=job.pk)
    assert aborted.state == JobState.ABORTED and aborted.failure_reason == "wrong learning rate"


def test_member_sees_no_abort_button_and_the_api_refuses(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    job = world.job
    assert job is not None
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.MEMBER].username)
    pages.visit(page, f"/jobs/{job.uid}/", "job-as-member")
    expect(page.get_by_role("heading", level=1)).to_have_text("Job api-job")
    expect(page.get_by_role("button", name="Abort job")).to_have_count(0)
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(
        f"{pages.base}/api/v1/jobs/{job.uid}/abort/",
        headers={"X-CSRFToken": csrf, "Content-Type": "application/json"},
        data="{}",
    )
    assert response.status == 403, response.text()
    assert response.json()["code"] == "permission_denied"
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING

    # Another project's job is "not found", with a page that says what went wrong.
    pages.visit(page, f"/projects/{world.other.slug}/", "other-project-404")
    expect(page.get_by_role("heading", level=1)).to_have_text("Page not found")


def test_no_page_breaks_the_content_security_policy(pages: Pages, tmp_path: Path) -> None:
    """Every page works under ``default-src 'self'`` with no inline script or style: the
    browser reports no violation, and the API docs (Swagger UI, served by the portal itself)
    render the schema."""
    world = in_thread(jw.build_world, tmp_path)
    assert world.job is not None
    page = pages.new_page()
    violations: list[str] = []
    page.on(
        "console",
        lambda message: (
            violations.append(message.text)
            if "Content Security Policy" in message.text
            or "Content-Security-Policy" in message.text
            else None
        ),
    )
    failed: list[str] = []
    # A live page's own fetches that the next navigation cancels (net::ERR_ABORTED) are not
    # refusals; anything else that failed (blocked by the policy, a missing file) is.
    page.on(
        "requestfailed",
        lambda request: (
            None if "ERR_ABORTED" in (request.failure or "") else failed.append(request.url)
        ),
    )
    pages.visit(page, "/api/docs/", "api-docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("FedPortal")
    expect(page.locator(".opblock-tag").first).to_be_visible()
    pages.shot(page, "api-docs-rendered")
    pages.visit(page, "/admin/login/", "admin-login")
    pages.sign_in(page, world.users[jw.LEAD].username)
    for path, name in [
        (f"/projects/{world.project.slug}/", "project"),
        (f"/jobs/{world.job.uid}/", "job"),
        (f"/projects/{world.project.slug}/jobs/new/", "job-submit"),
        (f"/projects/{world.project.slug}/sites/", "sites"),
        ("/api-tokens/", "api-tokens"),
        ("/audit/", "audit"),
    ]:
        pages.visit(page, path, f"csp-{name}")
    expect(page.locator("h1")).to_be_visible()
    assert violations == []
    assert [url for url in failed if "/ws/" not in url] == []
