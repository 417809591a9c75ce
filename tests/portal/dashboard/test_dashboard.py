"""The dashboard's pages with Django's test client: the same permissions as the API (another
project's objects are 404, a missing role is 403 and changes nothing), service errors beside
the field they name, secrets shown once, and the approvals reviewer reading the app's files.

The personas are the API tests' (``api_world`` for sites, ``jobs_api_world`` for jobs)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs.models import Job, JobSite, JobState, LogLine, MetricPoint
from jobs.services.telemetry import log_lines_record, metrics_record
from sites.models import ApiToken, AuditEvent, Certificate, Site, SiteState
from sites.services import enrolment_token_check
from tests.archives import lying_crc
from tests.portal import api_world as sw
from tests.portal import jobs_api_world as jw

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]


def as_user(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response: Any) -> str:
    content: bytes = response.content
    return content.decode()


# --- sign in, and what each person may see ---------------------------------------------------


def test_pages_ask_anonymous_people_to_sign_in() -> None:
    world = sw.build_world()
    response = Client().get(f"/projects/{world.project.slug}/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_sign_in_and_out_with_the_login_form() -> None:
    sw.build_world()
    client = Client()
    page = client.get("/login/")
    assert page.status_code == 200 and 'for="id_username"' in text(page)
    response = client.post("/login/", {"username": sw.MEMBER, "password": "pw"}, follow=True)
    assert "Hospital Net" in text(response)  # the projects list
    assert "Signed in as <strong>member</strong>" in text(response)
    assert client.post("/logout/").status_code == 302
    assert client.get("/projects/hospital-net/").status_code == 302


def test_another_projects_pages_are_404_with_a_page_that_says_so() -> None:
    world = sw.build_world()
    outsider = as_user(world.users[sw.OUTSIDER])
    slug = world.project.slug
    for url in (
        f"/projects/{slug}/",
        f"/projects/{slug}/sites/",
        f"/projects/{slug}/jobs/new/",
        f"/projects/{slug}/approvals/",
        f"/projects/{slug}/certificates/{world.site_a.certificate.pk}/revoke/",
    ):
        response = outsider.get(url)
        assert response.status_code == 404, url
        assert "belong to a project you are not a member of" in text(response)
    response = outsider.post(f"/projects/{slug}/sites/{world.site_requested.pk}/approve/")
    assert response.status_code == 404
    assert Site.objects.get(pk=world.site_requested.pk).state == SiteState.REQUESTED


def test_the_projects_list_shows_only_my_projects() -> None:
    world = sw.build_world()
    page = text(as_user(world.users[sw.MEMBER]).get("/"))
    assert "Hospital Net" in page and "Other Net" not in page


# --- sites -----------------------------------------------------------------------------------


def test_only_org_admins_may_request_a_site() -> None:
    world = sw.build_world()
    response = as_user(world.users[sw.MEMBER]).get(f"/projects/{world.project.slug}/sites/request/")
    assert response.status_code == 403
    assert "Only an org admin" in text(response)


def test_a_site_request_error_appears_beside_the_field_and_nothing_is_created() -> None:
    world = sw.build_world()
    client = as_user(world.users[sw.ORG_ADMIN_A])
    url = f"/projects/{world.project.slug}/sites/request/"
    before = Site.objects.count()
    response = client.post(
        url,
        {"organization": world.org_a.pk, "name": "site-a", "contact_email": "ops@example.org"},
    )
    assert response.status_code == 200
    form = response.context["form"]
    assert "already has a site named 'site-a'" in form.errors["name"][0]
    assert 'id="id_name-error"' in text(response) and 'aria-invalid="true"' in text(response)
    assert Site.objects.count() == before

    # Organisation B is not theirs: the choice is refused by the form.
    response = client.post(
        url, {"organization": world.org_b.pk, "name": "site-x", "contact_email": "a@example.org"}
    )
    assert "organization" in response.context["form"].errors

    response = client.post(
        url,
        {
            "organization": world.org_a.pk,
            "name": "site-new",
            "contact_email": "ops@example.org",
            "gpus": "2",
        },
    )
    assert response.status_code == 302
    site = Site.objects.get(name="site-new")
    assert site.state == SiteState.REQUESTED and site.resources == {"gpus": 2}


def test_approval_shows_the_token_once_with_the_enrol_command(settings) -> None:
    world = sw.build_world()
    admin = as_user(world.users[sw.ADMIN])
    queue = text(admin.get(f"/projects/{world.project.slug}/sites/"))
    assert "Waiting for approval" in queue and "Approve site-r" in queue

    # An org admin is not a project admin: refused, and nothing changes.
    url = f"/projects/{world.project.slug}/sites/{world.site_requested.pk}/approve/"
    assert as_user(world.users[sw.ORG_ADMIN_A]).post(url).status_code == 403
    assert Site.objects.get(pk=world.site_requested.pk).state == SiteState.REQUESTED

    response = admin.post(url)
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    command = response.context["command"]
    token = response.context["token"]
    assert command == f"python -m client_agent enrol --portal http://testserver --token {token}"
    assert command in text(response)
    assert enrolment_token_check(token=token).pk == world.site_requested.pk

    settings.FEDPORTAL_PUBLIC_URL = "https://portal.example.org/"
    response = admin.post(f"/projects/{world.project.slug}/sites/{world.site_requested.pk}/token/")
    assert response.context["command"].startswith(
        "python -m client_agent enrol --portal https://portal.example.org --token fpe_"
    )


def test_deny_needs_a_reason() -> None:
    world = sw.build_world()
    admin = as_user(world.users[sw.ADMIN])
    url = f"/projects/{world.project.slug}/sites/{world.site_requested.pk}/deny/"
    response = admin.post(url, {"reason": ""}, follow=True)
    assert "was not denied: give a reason" in text(response)
    assert Site.objects.get(pk=world.site_requested.pk).state == SiteState.REQUESTED
    admin.post(url, {"reason": "unknown hospital"})
    site = Site.objects.get(pk=world.site_requested.pk)
    assert site.state == SiteState.DENIED and site.state_reason == "unknown hospital"


def test_certificate_revoke_asks_for_a_reason_and_confirmation() -> None:
    world = sw.build_world()
    cert = world.site_a.certificate
    url = f"/projects/{world.project.slug}/certificates/{cert.pk}/revoke/"
    assert as_user(world.users[sw.MEMBER]).post(url, {"reason": "x"}).status_code == 403
    admin = as_user(world.users[sw.ADMIN])
    page = admin.get(url)
    assert "Revoke the certificate of site-a?" in text(page) and cert.serial in text(page)
    assert Certificate.objects.get(pk=cert.pk).revoked_at is None  # a GET only asks
    response = admin.post(url, {"reason": ""})
    assert "reason" in response.context["form"].errors
    assert Certificate.objects.get(pk=cert.pk).revoked_at is None
    admin.post(url, {"reason": "laptop stolen"})
    revoked = Certificate.objects.get(pk=cert.pk)
    assert revoked.revoked_at is not None and revoked.revocation_reason == "laptop stolen"


# --- audit log and API tokens ------------------------------------------------------------------


def test_audit_log_filters_by_action_actor_and_project() -> None:
    world = sw.build_world()
    admin = as_user(world.users[sw.ADMIN])
    page = admin.get("/audit/", {"project": world.project.slug, "action": "site."})
    events = list(page.context["page"])
    assert events and all(e.action.startswith("site.") for e in events)
    assert all(e.project_id == world.project.pk for e in events)
    page = admin.get("/audit/", {"actor": sw.ORG_ADMIN_A})
    assert all(e.actor_repr == sw.ORG_ADMIN_A for e in page.context["page"])
    page = admin.get("/audit/", {"since": "2999-01-01T00:00"})
    assert page.context["page"].paginator.count == 0
    # The outsider sees their own events only, none of P's.
    outsider = as_user(world.users[sw.OUTSIDER]).get("/audit/")
    assert all(e.project_id != world.project.pk for e in outsider.context["page"])


def test_api_tokens_are_created_shown_once_listed_and_revoked() -> None:
    world = sw.build_world()
    user = world.users[sw.MEMBER]
    client = as_user(user)
    response = client.post("/api-tokens/", {"name": "notebook"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    key = response.context["key"]
    assert key.startswith("fpt_") and key in text(response)
    api = Client(headers={"Authorization": f"Token {key}"}).get("/api/v1/projects/")
    assert api.status_code == 200
    listing = text(client.get("/api-tokens/"))
    assert "notebook" in listing and key not in listing
    token = ApiToken.objects.get(user=user, name="notebook")
    # Nobody revokes another person's token: 404.
    assert as_user(world.users[sw.ADMIN]).post(f"/api-tokens/{token.pk}/revoke/").status_code == 404
    client.post(f"/api-tokens/{token.pk}/revoke/")
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    assert AuditEvent.objects.filter(action="api_token.revoked", actor=user).exists()


def test_unknown_pages_render_the_404_template() -> None:
    response = Client().get("/no/such/page/")
    assert response.status_code == 404
    assert "Page not found" in text(response)


# --- jobs --------------------------------------------------------------------------------------
# Jobs move on in callbacks run after commit (eager Celery), so these tests commit.
jobs_db = pytest.mark.django_db(transaction=True)


@jobs_db
def test_job_page_shows_rounds_metrics_logs_and_models(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)
    job = world.job
    assert job is not None
    site = world.sites[0].site
    metrics_record(job=job, site=site, points=[{"key": "loss", "value": 0.75, "step": 3}])
    log_lines_record(job=job, site=site, lines=[{"text": "epoch 1 done", "round": 0}])
    page = as_user(world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/")
    assert page.status_code == 200
    html = text(page)
    assert "Round 1" in html and "site-1" in html and "[round 1] epoch 1 done" in html
    snapshot = page.context["chart_snapshot"]
    assert snapshot["charts"]["loss · by step"]["series"]["site-1"] == [[3, 0.75]]
    # What the page skips when it hears of these again (dashboard.metrics.metric_snapshot).
    point = MetricPoint.objects.get(job=job, site=site)
    line = LogLine.objects.get(job=job, site=site)
    assert snapshot["through"] == {"site-1": point.pk}
    assert f'data-site="site-1" data-through="{line.pk}"' in page.content.decode()
    assert 'data-site="site-2" data-through="0"' in page.content.decode()
    assert f"/api/v1/jobs/{job.uid}/models/0/download/" in html
    assert "Abort job" not in html  # a member may not abort
    assert "lib/util.py" in html  # the app's files
    lead_page = text(as_user(world.users[jw.LEAD]).get(f"/jobs/{job.uid}/"))
    assert "Abort job" in lead_page
    assert as_user(world.users[jw.OUTSIDER]).get(f"/jobs/{job.uid}/").status_code == 404
    fragment = as_user(world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/metrics.json")
    assert fragment.json()["charts"]["loss · by step"]["key"] == "loss"
    assert fragment.json()["through"] == {"site-1": point.pk}


@jobs_db
def test_abort_is_refused_to_a_member_and_done_for_the_lead(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)
    assert world.job is not None
    url = f"/jobs/{world.job.uid}/abort/"
    response = as_user(world.users[jw.MEMBER]).post(url)
    assert response.status_code == 403 and "may abort it" in text(response)
    assert Job.objects.get(pk=world.job.pk).state == JobState.RUNNING
    as_user(world.users[jw.OTHER_LEAD]).post(url)
    assert Job.objects.get(pk=world.job.pk).state == JobState.RUNNING
    as_user(world.users[jw.LEAD]).post(url, {"reason": "wrong data"})
    job = Job.objects.get(pk=world.job.pk)
    assert job.state == JobState.ABORTED and job.failure_reason == "wrong data"


def _submit_fields(bundle: jw.Bundle, **overrides) -> dict:
    fields = {
        "name": "browser-job",
        "workflow": "fedavg",
        "fedavg__min_clients": "2",
        "fedavg__num_rounds": "3",
        "train_script": "client.py",
        "train_args": "--epochs 1",
        "app": SimpleUploadedFile("app.zip", bundle.app),
        "initial_model": SimpleUploadedFile("initial.safetensors", bundle.model),
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


@jobs_db
def test_submit_shows_service_errors_beside_fields_then_submits(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, submit=False)
    bundle = jw.make_bundle(tmp_path)
    client = as_user(world.users[jw.LEAD])
    url = f"/projects/{world.project.slug}/jobs/new/"
    assert as_user(world.users[jw.MEMBER]).get(url).status_code == 403
    form_page = text(client.get(url))
    assert (
        'name="fedavg__min_clients"' in form_page and 'name="fedavg__key_metric_mode"' in form_page
    )

    response = client.post(url, _submit_fields(bundle, fedavg__min_clients="9"))
    errors = response.context["form"].errors
    assert "the job needs 9 sites" in errors["fedavg__min_clients"][0]
    response = client.post(url, _submit_fields(bundle, train_script="missing.py"))
    assert "missing.py" in response.context["form"].errors["app"][0]
    response = client.post(url, _submit_fields(bundle, initial_model=SimpleUploadedFile("m", b"x")))
    assert "initial_model" in response.context["form"].errors
    response = client.post(url, _submit_fields(bundle, fedavg__num_rounds=None))
    assert "fedavg__num_rounds" in response.context["form"].errors
    assert Job.objects.count() == 0 and jw.stored_files() == []

    response = client.post(url, _submit_fields(bundle, sites=["site-1", "site-2"]))
    job = Job.objects.get()
    assert response["Location"] == f"/jobs/{job.uid}/"
    assert job.params["min_clients"] == 2 and job.num_rounds == 3
    assert sorted(job.participants.values_list("site__name", flat=True)) == ["site-1", "site-2"]

    # The same app again, picked from the earlier uploads instead of uploaded.
    response = client.post(
        url, _submit_fields(bundle, name="again", app=None, earlier_app=str(job.uid))
    )
    again = Job.objects.get(name="again")
    assert response.status_code == 302 and again.app_sha256 == job.app_sha256


@jobs_db
def test_approvals_list_review_files_and_decide(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    job = world.job
    assert job is not None
    org_admin = as_user(world.users[jw.ORG_ADMIN])
    listing = org_admin.get(f"/projects/{world.project.slug}/approvals/")
    pending = {(row.link.job_id, row.link.site.name) for row in listing.context["pending"]}
    assert pending == {(job.pk, "site-2"), (job.pk, "site-3")}
    member = as_user(world.users[jw.MEMBER])
    assert member.get(f"/projects/{world.project.slug}/approvals/").context["pending"] == []

    review = f"/jobs/{job.uid}/sites/site-2/review/"
    assert member.get(review).status_code == 403
    page = org_admin.get(review, {"file": "client.py"})
    html = text(page)
    assert "lib/util.py" in html and "print(&#x27;a client script&#x27;)" in html
    assert "lead" in html and "min_clients" in html
    hidden = org_admin.get(review, {"file": "../../etc/passwd"})
    assert hidden.context["shown_text"] is None and "is not shown" in text(hidden)

    decide = f"/jobs/{job.uid}/sites/site-2/decide/"
    assert member.post(decide, {"decision": "accept"}).status_code == 403
    org_admin.post(decide, {"decision": "accept"})
    link = JobSite.objects.get(job=job, site__name="site-2")
    assert (
        link.decision == JobSite.Decision.ACCEPTED and link.decided_by == world.users[jw.ORG_ADMIN]
    )


@jobs_db
@pytest.mark.parametrize(
    ("stored", "shown", "listed"),
    [(lying_crc(), "util.py", True), (b"not a zip at all", "client.py", False)],
)
def test_a_damaged_app_archive_is_reported_on_the_pages_not_a_server_error(
    tmp_path: Path, stored: bytes, shown: str, listed: bool
) -> None:
    world = jw.build_world(tmp_path, start=False)
    job = world.job
    assert job is not None
    # A stored archive damaged after its check (or from before it): only storage holds it.
    with open(job.app_archive.path, "wb") as fh:
        fh.write(stored)
    org_admin = as_user(world.users[jw.ORG_ADMIN])

    review = org_admin.get(f"/jobs/{job.uid}/sites/site-2/review/", {"file": shown})
    page = org_admin.get(f"/jobs/{job.uid}/")

    assert review.status_code == 200 and page.status_code == 200
    assert "The app archive cannot be read" in text(review)
    assert review.context["shown_text"] is None
    # The job page lists what the central directory says; only an unlistable archive is an error.
    assert ("The app archive cannot be read" in text(page)) is not listed
    assert ("util.py" in text(page)) is listed


@jobs_db
def test_model_download_link_streams_with_the_apis_permissions(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path)
    assert world.job is not None
    url = f"/api/v1/jobs/{world.job.uid}/models/0/download/"
    response = as_user(world.users[jw.MEMBER]).get(url)
    assert response.status_code == 200 and response.streaming
    assert jw.body_of(response) == world.job.models.get(round_number=0).file.read()
    assert as_user(world.users[jw.OUTSIDER]).get(url).status_code == 404


@jobs_db
def test_submitting_an_earlier_upload_of_another_project_is_refused(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, submit=False)
    theirs = jw.make_bundle(tmp_path)
    from jobs.services.submission import job_submit
    from tests.portal.factories import OrganizationFactory, enrolled_site

    for name in ("q-1", "q-2", "q-3"):
        enrolled_site(organization=OrganizationFactory.create(project=world.other), name=name)
    other_job = job_submit(
        project=world.other,
        submitted_by=world.users[jw.OUTSIDER],
        spec=theirs.spec,
        initial_model=io.BytesIO(theirs.model),
        app_archive=io.BytesIO(theirs.app),
    )
    response = as_user(world.users[jw.LEAD]).post(
        f"/projects/{world.project.slug}/jobs/new/",
        _submit_fields(theirs, app=None, earlier_app=str(other_job.uid)),
    )
    assert "earlier_app" in response.context["form"].errors
    assert not Job.objects.filter(project=world.project).exists()
