"""The jobs API end to end, with Celery tasks run inline (eager): a lead submits a bundle over
HTTP, three site agents run it with signed requests (fetching the app and each round's model,
uploading updates as streamed PUTs), and the final model downloaded through the people's API
is the FedAvg result computed by hand. Then each way an upload, a metric post, an abort or a
decision can go wrong, and what is stored afterwards.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from asgiref.sync import async_to_sync
from django.db import connection, connections, transaction
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from client_agent.signing import canonical_string
from fedportal import bodylimits
from jobs.api.authentication import HEADER_CONTENT_SHA256
from jobs.models import Job, JobSite, JobState, MetricPoint, Round, RoundState, SiteTask, TaskState
from jobs.services import rounds
from sites.authentication import canonical_string_for_digest
from sites.exceptions import SignatureMalformed
from tests.portal.jobs_api_world import (
    ADMIN,
    INITIAL,
    LEAD,
    MEMBER,
    ORG_ADMIN,
    OTHER_LEAD,
    OUTSIDER,
    SITE_ELSEWHERE,
    SITE_IN,
    SITE_OUT,
    TRAIN_SCRIPT,
    World,
    body_of,
    build_world,
    make_bundle,
    stored_files,
    tensors_of,
    update_bytes,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


def updates_stored(job: Job) -> list[str]:
    return [f for f in stored_files() if f.startswith(f"jobs/{job.project_id}/{job.uid}/updates/")]


def upload(world: World, site, number: int, data: bytes, **kw):
    return world.agent(site, "PUT", f"{world.a}/rounds/{number}/update/", raw=data, **kw)


def test_a_whole_job_runs_over_http_to_the_hand_computed_fedavg_model(tmp_path: Path) -> None:
    world = build_world(tmp_path, submit=False)
    bundle = make_bundle(tmp_path, min_clients=3, num_rounds=2)

    created = world.call(
        LEAD,
        "POST",
        f"{world.p}/jobs/",
        multipart=bundle.form(sites=["site-1", "site-2", "site-3"], round_timeout_seconds="600"),
    )

    assert created.status_code == 201, created.json()
    job = Job.objects.get(uid=created.json()["uid"])
    world.job = job
    assert created.json()["submitted_by"] == LEAD and created.json()["round_timeout_seconds"] == 600
    # Every site accepts automatically and is online: the job started at once.
    assert world.call(LEAD, "GET", f"{world.j}/").json()["state"] == JobState.RUNNING

    for number in range(2):
        for weight, site in enumerate(world.sites, start=1):
            listed = world.agent(site, "GET", "/api/v1/agent/jobs/")
            assert listed.status_code == 200
            (entry,) = listed.json()
            assert entry["uid"] == str(job.uid) and entry["decision"] == "accepted"
            task = entry["current_task"]
            assert task["round"] == number and task["state"] == TaskState.ASSIGNED
            if number == 0:
                spec = world.agent(site, "GET", entry["spec_url"]).json()
                assert spec["spec"]["train_script"] == TRAIN_SCRIPT
                archive = world.agent(site, "GET", entry["bundle_url"])
                assert archive.status_code == 200
                data = body_of(archive)
                assert data == bundle.app
                assert archive[HEADER_CONTENT_SHA256] == hashlib.sha256(data).hexdigest()
                assert zipfile.ZipFile(io.BytesIO(data)).namelist() == [TRAIN_SCRIPT, "lib/util.py"]

            fetched = world.agent(site, "GET", task["model_url"])
            assert fetched.status_code == 200
            base = tensors_of(body_of(fetched), tmp_path)
            if number == 0:
                assert torch.equal(base["w"], INITIAL["w"])
            status = world.agent(site, "POST", task["status_url"], {"state": "training"})
            assert status.json()["state"] == TaskState.TRAINING

            params = {"w": base["w"] + weight, "n": base["n"] + 1}
            data = update_bytes(params, tmp_path, weight=weight, metrics={"accuracy": weight / 10})
            put = world.agent(site, "PUT", task["update_url"], raw=data)
            assert put.status_code == 202, put.json()
            assert put.json()["size"] == len(data)

    done = world.call(LEAD, "GET", f"{world.j}/").json()
    assert done["state"] == JobState.COMPLETED, done["failure_reason"]
    assert done["completed_rounds"] == 2
    models = world.call(MEMBER, "GET", f"{world.j}/models/").json()["results"]
    assert [m["round_number"] for m in models] == [0, 1, 2]
    final = world.call(MEMBER, "GET", models[-1]["download_url"])
    assert final.status_code == 200
    data = body_of(final)
    assert final[HEADER_CONTENT_SHA256] == hashlib.sha256(data).hexdigest() == models[-1]["sha256"]
    weights = tensors_of(data, tmp_path)
    # Weights 1, 2, 3: each round adds (1·1 + 2·2 + 3·3) / 6 = 14/6 to w and 1 to n.
    expected = torch.tensor([0.0, 1.0]) + 2 * torch.tensor(14 / 6, dtype=torch.float32)
    assert torch.allclose(weights["w"], expected)
    assert weights["n"].item() == 6 and weights["n"].dtype == torch.int64

    aggregate = world.call(
        MEMBER, "GET", f"{world.j}/metrics/?source=aggregate&key=accuracy"
    ).json()["results"]
    assert [(p["round"], round(p["value"], 6)) for p in aggregate] == [
        (0, round(14 / 60, 6)),
        (1, round(14 / 60, 6)),
    ]
    site_two = world.call(MEMBER, "GET", f"{world.j}/metrics/?site=site-2&round=1").json()
    assert [(p["key"], p["value"], p["source"]) for p in site_two["results"]] == [
        ("accuracy", 0.2, "result")
    ]
    per_site = world.call(MEMBER, "GET", f"{world.j}/sites/").json()["results"]
    assert [(s["site"], s["decision"]) for s in per_site] == [
        ("site-1", "accepted"),
        ("site-2", "accepted"),
        ("site-3", "accepted"),
    ]
    assert [t["state"] for t in per_site[0]["tasks"]] == ["accepted", "accepted"]
    rounds_seen = world.call(MEMBER, "GET", f"{world.j}/rounds/").json()["results"]
    assert [(r["number"], r["state"], r["participants"]) for r in rounds_seen] == [
        (0, "closed", ["site-1", "site-2", "site-3"]),
        (1, "closed", ["site-1", "site-2", "site-3"]),
    ]
    # A finished job is no longer among a site's active jobs.
    assert world.agent(world.sites[0], "GET", "/api/v1/agent/jobs/").json() == []


def test_downloading_a_round_model_marks_the_task_downloaded(jobs_world: World) -> None:
    fetched = jobs_world.call(SITE_IN, "GET", f"{jobs_world.a}/rounds/0/model/")

    assert fetched.status_code == 200
    task = SiteTask.objects.get(
        round__job=jobs_world.job, round__number=0, site=jobs_world.sites[0].site
    )
    assert task.state == TaskState.DOWNLOADED
    assert jobs_world.call(SITE_IN, "GET", f"{jobs_world.a}/rounds/1/model/").status_code == 404


def test_files_are_sent_whatever_the_accept_header(jobs_world: World) -> None:
    octets = {"Accept": "application/octet-stream"}
    model = jobs_world.call(MEMBER, "GET", f"{jobs_world.j}/models/0/download/", headers=octets)
    bundle = jobs_world.call(SITE_IN, "GET", f"{jobs_world.a}/bundle/", headers=octets)
    missing = jobs_world.call(MEMBER, "GET", f"{jobs_world.j}/models/7/download/", headers=octets)

    assert (model.status_code, bundle.status_code) == (200, 200)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_an_update_is_streamed_never_read_whole(jobs_world: World, settings) -> None:
    # Django refuses to load a body over DATA_UPLOAD_MAX_MEMORY_SIZE into request.body; the
    # upload goes through because neither the view nor its authentication ever does.
    data = update_bytes({"w": torch.ones(64), "n": torch.tensor(1)}, jobs_world.tmp)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    assert len(data) > 100

    put = upload(jobs_world, SITE_IN, 0, data)

    assert put.status_code == 202, put.json()
    task = SiteTask.objects.get(round__job=jobs_world.job, site=jobs_world.sites[0].site)
    assert task.update_size == len(data) and task.update_sha256 == hashlib.sha256(data).hexdigest()


def test_every_bad_upload_is_refused_and_stores_nothing(jobs_world: World, settings) -> None:
    job = jobs_world.job
    assert job is not None
    good = update_bytes({"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}, jobs_world.tmp)
    other = update_bytes({"w": torch.tensor([2.0, 2.0]), "n": torch.tensor(1)}, jobs_world.tmp)

    # The body is not what the (signed) digest says: altered on the way.
    tampered = upload(
        jobs_world,
        SITE_IN,
        0,
        other,
        headers={HEADER_CONTENT_SHA256: hashlib.sha256(good).hexdigest()},
        signed_body=good,
    )
    assert tampered.status_code == 400
    assert (tampered.json()["field"], tampered.json()["code"]) == ("sha256", "checksum_mismatch")
    # The digest header is not what was signed.
    resigned = upload(jobs_world, SITE_IN, 0, other, signed_body=good)
    assert resigned.status_code == 401 and resigned.json()["code"] == "signature_invalid"
    # No digest at all.
    bare = jobs_world.call(
        SITE_IN,
        "PUT",
        f"{jobs_world.a}/rounds/0/update/",
        raw=good,
        headers={HEADER_CONTENT_SHA256: ""},
    )
    assert bare.status_code == 401 and bare.json()["code"] == "signature_malformed"
    # Too large.
    settings.FEDPORTAL_MAX_MODEL_BYTES = len(good) - 1
    too_large = upload(jobs_world, SITE_IN, 0, good)
    assert too_large.status_code == 400
    assert (too_large.json()["field"], too_large.json()["code"]) == ("body", "too_large")
    settings.FEDPORTAL_MAX_MODEL_BYTES = 10**9
    # Empty.
    empty = jobs_world.call(SITE_IN, "PUT", f"{jobs_world.a}/rounds/0/update/", raw=b"")
    assert empty.status_code == 411 and empty.json()["field"] == "Content-Length"
    # A round the site has no task in, a job it is not in, another site's job.
    assert upload(jobs_world, SITE_IN, 3, good).status_code == 404
    assert upload(jobs_world, SITE_OUT, 0, good).status_code == 404
    assert upload(jobs_world, SITE_ELSEWHERE, 0, good).status_code == 404

    assert updates_stored(job) == []
    assert set(SiteTask.objects.filter(round__job=job).values_list("state", flat=True)) == {
        TaskState.ASSIGNED
    }

    # One update per task: the second is refused and the first is kept.
    assert upload(jobs_world, SITE_IN, 0, good).status_code == 202
    second = upload(jobs_world, SITE_IN, 0, other)
    assert second.status_code == 409 and second.json()["code"] == "conflict"
    task = SiteTask.objects.get(round__job=job, site=jobs_world.sites[0].site)
    assert task.state == TaskState.ACCEPTED
    assert task.update_sha256 == hashlib.sha256(good).hexdigest()
    assert len(updates_stored(job)) == 1


def test_an_update_after_the_round_closed_is_kept_as_late(tmp_path: Path) -> None:
    world = build_world(tmp_path, min_clients=2, num_rounds=2)
    job = world.job
    assert job is not None
    for site in world.sites[:2]:
        data = update_bytes({"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}, tmp_path)
        assert upload(world, site, 0, data).status_code == 202
    round_zero = job.rounds.get(number=0)
    round_zero.deadline = timezone.now()
    round_zero.save()
    rounds.job_advance(job_id=job.pk)

    data = update_bytes({"w": torch.tensor([9.0, 9.0]), "n": torch.tensor(1)}, tmp_path)
    late = upload(world, world.sites[2], 0, data)

    assert late.status_code == 202
    assert (late.json()["state"], late.json()["size"]) == (TaskState.LATE, len(data))
    task = SiteTask.objects.get(round=round_zero, site=world.sites[2].site)
    assert task.state == TaskState.LATE and task.update_sha256 == hashlib.sha256(data).hexdigest()
    one = world.call(MEMBER, "GET", f"{world.j}/models/1/download/")
    assert torch.equal(tensors_of(body_of(one), tmp_path)["w"], torch.tensor([1.0, 1.0]))
    # Kept once: a second late upload for the same task is refused.
    assert upload(world, world.sites[2], 0, data).status_code == 409


def signed_upload(world: World, site: Any) -> tuple[str, bytes, dict[str, str]]:
    """A site's upload for round 0 as its agent signs it: path, body and headers."""
    path = f"{world.a}/rounds/0/update/"
    data = update_bytes({"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}, world.tmp)
    headers = {
        **site.headers("PUT", path, data),
        HEADER_CONTENT_SHA256: hashlib.sha256(data).hexdigest(),
    }
    return path, data, headers


def upload_checked(
    world: World,
    site: Any,
    checked: bodylimits.CheckedSender,
    signed: tuple[str, bytes, dict[str, str]] | None = None,
) -> tuple[Any, list[str]]:
    """An upload as fedportal.server hands it to the view: through ASGI, with what its sender
    check found in the scope; the answer and the statements the view made. ``signed``: the
    request (path, body, headers) that was checked; a fresh one when None."""
    path, data, headers = signed or signed_upload(world, site)

    class ServerClient(AsyncClient):
        async def request(self, **request: Any) -> Any:
            return await super().request(**request, **{bodylimits.CHECKED_SENDER: checked})

    async def put() -> Any:
        return await ServerClient().generic(
            "PUT", path, data=data, content_type="application/octet-stream", headers=headers
        )

    with CaptureQueriesContext(connection) as captured:
        response = async_to_sync(put)()
    return response, [q["sql"] for q in captured.captured_queries]


def sender_checked(signed: tuple[str, bytes, dict[str, str]]) -> bodylimits.CheckedSender:
    """The server's check of the signed upload's headers, before it reads the body."""
    path, _, headers = signed
    checked = bodylimits._site_check(method="PUT", path=path, query=b"", headers=headers)
    assert checked is not None
    return checked


def reads_a_task(statements: list[str]) -> bool:
    """Whether ``statements`` look a site's task up by its round's number (as the view does;
    the update check that eager Celery runs after it reads tasks by id)."""
    return any(
        sql.startswith("SELECT") and 'FROM "jobs_sitetask"' in sql and '"number" = 0' in sql
        for sql in statements
    )


def test_an_upload_takes_the_task_its_senders_check_read(tmp_path: Path) -> None:
    world = build_world(tmp_path, min_clients=2, num_rounds=2)
    site = world.sites[0]
    signed = signed_upload(world, site)
    checked = sender_checked(signed)
    assert checked.task.site_id == site.site.pk

    response, statements = upload_checked(world, site, checked, signed)

    assert response.status_code == 202, response.content
    assert not reads_a_task(statements)  # the sender check's read served
    assert SiteTask.objects.get(pk=checked.task.pk).update_size


def test_an_upload_reads_its_own_task_when_the_checked_one_is_not_it(tmp_path: Path) -> None:
    """The scope's task is taken only for the same site, job and round: another site's task
    there (which no server puts) changes nothing of it."""
    world = build_world(tmp_path, min_clients=2, num_rounds=2)
    site, other = world.sites[0], world.sites[1]
    others = SiteTask.objects.select_related("round__job").get(
        round__job=world.job, round__number=0, site=other.site
    )
    signed = signed_upload(world, site)
    checked = bodylimits.CheckedSender(identity=sender_checked(signed).identity, task=others)

    response, statements = upload_checked(world, site, checked, signed)

    assert response.status_code == 202, response.content
    assert reads_a_task(statements)
    others.refresh_from_db()
    assert (others.state, others.update_size) == (TaskState.ASSIGNED, None)
    mine = SiteTask.objects.get(round__job=world.job, round__number=0, site=site.site)
    assert mine.update_size and mine.state in (TaskState.UPLOADED, TaskState.ACCEPTED)


def test_an_upload_its_senders_check_verified_is_recorded_not_verified_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The view claims the nonce and records the heartbeat; the certificate and signature the
    # server's check verified a moment before are not verified again.
    from sites import authentication

    world = build_world(tmp_path, min_clients=2, num_rounds=2)
    site = world.sites[0]
    signed = signed_upload(world, site)
    checked = sender_checked(signed)
    verified: list[object] = []
    monkeypatch.setattr(authentication, "verify_signature", lambda *a: verified.append(a))
    monkeypatch.setattr(authentication, "_certificate_verified", lambda *a: verified.append(a))

    response, _ = upload_checked(world, site, checked, signed)

    assert response.status_code == 202, response.content
    assert verified == []
    # The nonce was claimed: the same request again is a replay, checked or not.
    replayed, _ = upload_checked(world, site, checked, signed)
    assert replayed.status_code == 401
    assert replayed.json()["code"] == "replay_detected"


def test_an_upload_whose_certificate_was_revoked_while_its_body_streamed_is_refused(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, min_clients=2, num_rounds=2)
    site = world.sites[0]
    signed = signed_upload(world, site)
    checked = sender_checked(signed)  # the headers were fine when they came
    certificate = site.certificate
    certificate.revoked_at = timezone.now()
    certificate.revocation_reason = "key lost"
    certificate.save(update_fields=["revoked_at", "revocation_reason"])  # as the service does

    response, _ = upload_checked(world, site, checked, signed)

    assert response.status_code == 401
    assert response.json()["code"] == "certificate_revoked"
    task = SiteTask.objects.get(pk=checked.task.pk)
    assert (task.state, task.update_size) == (TaskState.ASSIGNED, None)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks between connections")
def test_an_upload_that_meets_its_round_closing_is_kept_as_late(tmp_path: Path) -> None:
    """The upload's one conditional update waits on the task's row while the round closes
    (its unanswered tasks late, the round aggregating, in one transaction); once that commits
    the upload reads the task again, finds it late, and keeps the update as late: never
    ``uploaded`` in a round that closed without it."""
    world = build_world(tmp_path, min_clients=2, num_rounds=2)
    assert world.job is not None
    round_zero = world.job.rounds.get(number=0)
    site = world.sites[2]
    rows_locked, commit = threading.Event(), threading.Event()

    def close_round() -> None:
        try:
            with transaction.atomic():
                SiteTask.objects.filter(round=round_zero).update(
                    state=TaskState.LATE, reason="no update before the round closed"
                )
                rows_locked.set()
                commit.wait(30)
                Round.objects.filter(pk=round_zero.pk).update(state=RoundState.AGGREGATING)
        finally:
            connections.close_all()  # this thread's own connection

    closing = threading.Thread(target=close_round)
    closing.start()
    assert rows_locked.wait(30)
    # Let the close commit only once the upload is waiting on the task's row.
    threading.Timer(1.0, commit.set).start()
    data = update_bytes({"w": torch.tensor([9.0, 9.0]), "n": torch.tensor(1)}, tmp_path)
    answer = upload(world, site, 0, data)
    closing.join(30)

    assert answer.status_code == 202
    assert answer.json()["state"] == TaskState.LATE
    task = SiteTask.objects.get(round=round_zero, site=site.site)
    assert task.state == TaskState.LATE
    assert task.update_sha256 == hashlib.sha256(data).hexdigest()


def test_metrics_posted_twice_with_the_same_ids_are_stored_once(jobs_world: World) -> None:
    points = {
        "points": [
            {"key": "loss", "value": 0.5, "step": 1, "round": 0, "id": "a1"},
            {"key": "loss", "value": 0.4, "step": 2, "round": 0, "id": "a2"},
        ]
    }

    first = jobs_world.call(SITE_IN, "POST", f"{jobs_world.a}/metrics/", points)
    again = jobs_world.call(SITE_IN, "POST", f"{jobs_world.a}/metrics/", points)

    assert first.json() == {"received": 2, "stored": 2}
    assert again.json() == {"received": 2, "stored": 0}
    listed = jobs_world.call(
        MEMBER, "GET", f"{jobs_world.j}/metrics/?key=loss&site=site-1&source=log"
    )
    assert [(p["value"], p["step"], p["round"]) for p in listed.json()["results"]] == [
        (0.5, 1, 0),
        (0.4, 2, 0),
    ]
    assert MetricPoint.objects.filter(job=jobs_world.job).count() == 2


def test_a_bad_metric_point_is_named_and_nothing_is_stored(jobs_world: World) -> None:
    points = {"points": [{"key": "loss", "value": 0.5}, {"key": "loss", "value": "NaN"}]}

    refused = jobs_world.call(SITE_IN, "POST", f"{jobs_world.a}/metrics/", points)

    assert refused.status_code == 400 and refused.json()["field"] == "points[1].value"
    assert not MetricPoint.objects.filter(job=jobs_world.job).exists()
    not_a_list = jobs_world.call(SITE_IN, "POST", f"{jobs_world.a}/metrics/", {"points": 3})
    assert not_a_list.status_code == 400 and not_a_list.json()["field"] == "points"


def test_abort_by_the_submitter_works_by_a_member_is_403_by_an_outsider_404(
    jobs_world: World,
) -> None:
    assert jobs_world.call(MEMBER, "POST", f"{jobs_world.j}/abort/").status_code == 403
    assert jobs_world.call(OTHER_LEAD, "POST", f"{jobs_world.j}/abort/").status_code == 403
    assert jobs_world.call(OUTSIDER, "POST", f"{jobs_world.j}/abort/").status_code == 404
    assert jobs_world.job is not None
    jobs_world.job.refresh_from_db()
    assert jobs_world.job.state == JobState.RUNNING

    aborted = jobs_world.call(
        LEAD, "POST", f"{jobs_world.j}/abort/", {"reason": "wrong data split"}
    )

    assert aborted.status_code == 200
    assert (aborted.json()["state"], aborted.json()["failure_reason"]) == (
        JobState.ABORTED,
        "wrong data split",
    )
    again = jobs_world.call(ADMIN, "POST", f"{jobs_world.j}/abort/")
    assert again.status_code == 409 and again.json()["code"] == "invalid_transition"
    # The sites' agents no longer see it.
    assert jobs_world.call(SITE_IN, "GET", "/api/v1/agent/jobs/").json() == []


def test_a_site_admin_decides_for_their_site_and_the_job_starts(tmp_path: Path) -> None:
    world = build_world(tmp_path, start=False)
    assert world.job is not None
    assert world.job.state == JobState.WAITING
    path = f"{world.j}/sites/site-2/decision/"
    assert world.call(LEAD, "POST", path, {"accept": True}).status_code == 403
    assert world.call(ORG_ADMIN, "POST", f"{world.j}/sites/site-4/decision/", {}).status_code == 404
    assert world.call(ORG_ADMIN, "POST", path, {}).json()["field"] == "accept"

    decided = world.call(ORG_ADMIN, "POST", path, {"accept": True})
    world.call(ADMIN, "POST", f"{world.j}/sites/site-3/decision/", {"accept": True})

    assert decided.status_code == 200
    assert (decided.json()["decision"], decided.json()["decided_by"]) == ("accepted", ORG_ADMIN)
    # Accepted everywhere; the job starts once its sites come online (a signed request each).
    for site in world.sites:
        assert world.agent(site, "GET", "/api/v1/agent/jobs/").status_code == 200
    world.job.refresh_from_db()
    assert world.job.state == JobState.RUNNING
    late = world.call(ADMIN, "POST", path, {"accept": False})
    assert late.status_code == 409


def test_an_agent_decides_only_where_its_site_accepts_jobs_automatically(tmp_path: Path) -> None:
    world = build_world(tmp_path, start=False)
    site_two = world.sites[1]

    refused = world.agent(site_two, "POST", f"{world.a}/decision/", {"accept": True})
    declined = world.call(SITE_IN, "POST", f"{world.a}/decision/", {"accept": False})

    assert refused.status_code == 403 and refused.json()["code"] == "decision_not_delegated"
    assert declined.status_code == 200 and declined.json()["decision"] == "declined"
    decisions = dict(JobSite.objects.filter(job=world.job).values_list("site__name", "decision"))
    assert decisions == {"site-1": "declined", "site-2": "pending", "site-3": "pending"}
    assert world.call(SITE_OUT, "POST", f"{world.a}/decision/", {"accept": True}).status_code == 404


def test_an_agent_sees_its_active_jobs_with_its_decision_and_current_task(
    jobs_world: World,
) -> None:
    mine = jobs_world.call(SITE_IN, "GET", "/api/v1/agent/jobs/").json()
    theirs = jobs_world.call(SITE_OUT, "GET", "/api/v1/agent/jobs/").json()

    assert theirs == []
    (entry,) = mine
    assert entry["state"] == JobState.RUNNING and entry["num_rounds"] == 2
    assert entry["current_task"] == {
        "round": 0,
        "state": "assigned",
        "reason": "",
        "deadline": entry["current_task"]["deadline"],
        # What the client script's FLModel gets: FedAvg's round 1 of 2 is a train task.
        "task": {
            "task_name": "train",
            "current_round": 0,
            "total_rounds": 2,
            "start_round": 0,
            "meta": {},
        },
        "model": "global",
        "model_url": f"{jobs_world.a}/rounds/0/model/",
        "status_url": f"{jobs_world.a}/rounds/0/status/",
        "update_url": f"{jobs_world.a}/rounds/0/update/",
    }


def test_an_agents_job_list_is_oldest_first_in_two_queries(
    jobs_world: World, tmp_path: Path, django_assert_num_queries: Any
) -> None:
    """Every agent lists its jobs every 30 s: the listing reads the links and the open tasks,
    and what it sends needs nothing more (no field it serializes is left out of them)."""
    from jobs.api.serializers import AgentJobSerializer
    from jobs.selectors import site_active_jobs

    bundle = make_bundle(tmp_path, name="second-job")
    second = jobs_world.call(LEAD, "POST", f"{jobs_world.p}/jobs/", multipart=bundle.form())
    assert second.status_code == 201, second.json()
    site = jobs_world.agents[SITE_IN].site

    with django_assert_num_queries(2):
        active = site_active_jobs(site)
        listed = AgentJobSerializer(
            active.links, many=True, context={"open_tasks": active.open_tasks}
        ).data

    assert [entry["name"] for entry in listed] == ["api-job", "second-job"]
    assert [entry["current_task"]["round"] for entry in listed] == [0, 0]
    with django_assert_num_queries(1):
        assert site_active_jobs(jobs_world.agents[SITE_ELSEWHERE].site).links == []


def test_jobs_are_listed_by_state_and_submitter(jobs_world: World, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, name="second-job")
    second = jobs_world.call(OTHER_LEAD, "POST", f"{jobs_world.p}/jobs/", multipart=bundle.form())
    assert second.status_code == 201

    def names(query: str) -> list[str]:
        response = jobs_world.call(MEMBER, "GET", f"{jobs_world.p}/jobs/{query}")
        assert response.status_code == 200, response.json()
        return [job["name"] for job in response.json()["results"]]

    assert names("") == ["second-job", "api-job"]
    assert names(f"?submitter={LEAD}") == ["api-job"]
    assert names(f"?submitter={OTHER_LEAD}&state=running") == ["second-job"]
    assert names("?state=completed") == []
    by_id = jobs_world.call(MEMBER, "GET", f"/api/v1/projects/{jobs_world.project.pk}/jobs/")
    assert by_id.json()["count"] == 2
    # A "digit" that int() refuses (found by schemathesis): an unknown project, not a 500.
    assert jobs_world.call(MEMBER, "GET", "/api/v1/projects/%C2%B2/jobs/").status_code == 404
    bad = jobs_world.call(MEMBER, "GET", f"{jobs_world.p}/jobs/?state=sleeping")
    assert bad.status_code == 400 and bad.json()["field"] == "state"
    assert (
        jobs_world.call(OUTSIDER, "GET", f"/api/v1/projects/{jobs_world.other.slug}/jobs/").json()[
            "results"
        ]
        == []
    )


def test_the_openapi_schema_lists_every_jobs_endpoint(client) -> None:
    schema = client.get("/api/schema/?format=json").json()

    paths = {p for p in schema["paths"] if "/jobs" in p}
    assert paths == {
        "/api/v1/projects/{project}/jobs/",
        "/api/v1/jobs/{uid}/",
        "/api/v1/jobs/{uid}/rounds/",
        "/api/v1/jobs/{uid}/sites/",
        "/api/v1/jobs/{uid}/sites/{site_name}/decision/",
        "/api/v1/jobs/{uid}/metrics/",
        "/api/v1/jobs/{uid}/cross-site/",
        "/api/v1/jobs/{uid}/models/",
        "/api/v1/jobs/{uid}/models/{round_number}/download/",
        "/api/v1/jobs/{uid}/abort/",
        "/api/v1/jobs/{uid}/metrics.csv",
        "/api/v1/jobs/{uid}/tracking/tensorboard.zip",
        "/api/v1/jobs/{uid}/tracking/mlflow.zip",
        "/api/v1/agent/jobs/",
        "/api/v1/agent/jobs/{uid}/decision/",
        "/api/v1/agent/jobs/{uid}/spec/",
        "/api/v1/agent/jobs/{uid}/bundle/",
        "/api/v1/agent/jobs/{uid}/rounds/{number}/model/",
        "/api/v1/agent/jobs/{uid}/rounds/{number}/status/",
        "/api/v1/agent/jobs/{uid}/rounds/{number}/update/",
        "/api/v1/agent/jobs/{uid}/rounds/{number}/secure/",
        "/api/v1/agent/jobs/{uid}/rounds/{number}/secure/{phase}/",
        "/api/v1/agent/jobs/{uid}/rounds/{number}/secure/total/",
        "/api/v1/agent/jobs/{uid}/metrics/",
    }
    submit = schema["paths"]["/api/v1/projects/{project}/jobs/"]["post"]
    assert "multipart/form-data" in submit["requestBody"]["content"]
    update = schema["paths"]["/api/v1/agent/jobs/{uid}/rounds/{number}/update/"]["put"]
    assert "application/octet-stream" in update["requestBody"]["content"]
    download = schema["paths"]["/api/v1/jobs/{uid}/models/{round_number}/download/"]["get"]
    assert "application/octet-stream" in download["responses"]["200"]["content"]


def test_a_signature_over_a_digest_is_the_signature_over_its_body() -> None:
    body = b"an update" * 1000
    fields: dict[str, Any] = {
        "method": "PUT",
        "path": "/api/v1/x/?a=1",
        "timestamp": 1_700_000_000,
        "nonce": "n",
    }

    by_digest = canonical_string_for_digest(**fields, digest=hashlib.sha256(body).hexdigest())

    assert by_digest == canonical_string(**fields, body=body)
    with pytest.raises(SignatureMalformed):
        canonical_string_for_digest(**fields, digest="AB" * 32)
