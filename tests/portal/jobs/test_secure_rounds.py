"""Secure aggregation on the portal, driven as the agents drive it: each site a
``MaskingSite`` or ``HESite`` session with its own secrets, posting its keys, sealed shares and
finish answer to the agent API (signed with its enrolment key) and uploading its protected
update as the usual update, with Celery tasks run inline (eager). The portal sees only what a
real portal sees; the tests check the global model it makes from the sum, who is out of the
round and why, what is refused, and what it keeps.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from django.utils import timezone
from rest_framework.test import APIClient

from client_agent import he, signing
from client_agent.secagg import ring
from client_agent.secagg.he_session import HESite
from client_agent.secagg.session import MaskingSite, error_bound, round_context
from client_agent.secagg.upload import protected_bytes, write_protected
from client_agent.secagg.vector import Layout
from client_agent.wire import load_state_dict
from jobs.api.authentication import HEADER_CONTENT_SHA256
from jobs.bundle import pack_app
from jobs.models import Job, JobState, ModelVersion, Round, RoundState, SecureMessage, TaskState
from jobs.recipes import FedAvgRecipe
from jobs.selectors import task_for_site
from jobs.services import rounds
from jobs.services.submission import job_submit
from sites import services as site_services
from tests.portal.factories import EnrolledSite, OrganizationFactory, creator_of, enrolled_site
from tests.portal.jobs_api_world import update_bytes
from tests.ring_uniformity import UNIFORM_CHI2_MAX, chi2_top_bits

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

# 528 values: enough for a chi-square test over 16 bins, one CKKS batch under HE.
SHAPES = {"b": (16,), "w": (32, 16)}
LAYOUT = Layout.of(SHAPES)


# --------------------------------------------------------------------------------------------
# The world: enrolled sites, a protected job, agents
# --------------------------------------------------------------------------------------------


def enrolled_sites(count: int) -> list[EnrolledSite]:
    """Sites 1..count of one new organisation, enrolled, accepting jobs and online."""
    organization = OrganizationFactory.create()
    sites = [
        enrolled_site(organization=organization, name=f"site-{i}") for i in range(1, count + 1)
    ]
    for enrolled in sites:
        enrolled.site.auto_accept_jobs = True
        enrolled.site.last_heartbeat = timezone.now()
        enrolled.site.save()
    return sites


def initial_model() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in SHAPES.items()}


def submit_secure(
    tmp_path: Path,
    sites: Sequence[EnrolledSite],
    *,
    kind: str = "masking",
    min_clients: int | None = None,
) -> Job:
    """A one-round FedAvg job with ``secure_aggregation=kind`` over ``sites``, running."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("print('a client script')\n")
    recipe = FedAvgRecipe(
        name="secure-job",
        min_clients=min_clients or len(sites),
        num_rounds=1,
        model=initial_model(),
        train_script=str(app / "client.py"),
        secure_aggregation=kind,
    )
    bundle = recipe.export(tmp_path / "bundle")
    archive = pack_app(bundle / "app", tmp_path / "app.zip")
    project = sites[0].site.project
    with open(bundle / "initial_model.safetensors", "rb") as m, open(archive, "rb") as a:
        job = job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=recipe.spec(),
            initial_model=m,
            app_archive=a,
            sites=[s.site.name for s in sites],
        )
    job.refresh_from_db()
    assert job.state == JobState.RUNNING, job.failure_reason
    return job


def signed_call(
    enrolled: EnrolledSite, method: str, path: str, body: Any = None, *, raw: bytes | None = None
) -> Any:
    """A request as ``enrolled``'s agent sends it: JSON posts and raw uploads signed over
    their SHA-256, sent in X-Content-SHA256 (``PortalClient.post_signed``, ``round_update``)."""
    headers: dict[str, str] = {}
    if raw is not None:
        data, content_type = raw, "application/octet-stream"
    else:
        data = b"" if body is None else json.dumps(body).encode()
        content_type = "application/json"
    if data:
        headers[HEADER_CONTENT_SHA256] = hashlib.sha256(data).hexdigest()
    headers.update(enrolled.headers(method, path, data))
    return APIClient().generic(
        method,
        path,
        data=data,  # type: ignore[arg-type]  # DRF hands bytes to Django unchanged
        content_type=content_type,
        headers=headers,
    )


class Agent:
    """One site's agent in round 0 of ``job``: its protocol session, and the calls it makes."""

    def __init__(self, job: Job, enrolled: EnrolledSite, kind: str = "masking") -> None:
        self.job = job
        self.enrolled = enrolled
        self.name = enrolled.site.name
        self.base = f"/api/v1/agent/jobs/{job.uid}/rounds/0/"
        session_cls = MaskingSite if kind == "masking" else HESite
        self.session = session_cls(
            self.name,
            context=round_context(str(job.uid), 0),
            round_number=0,
            sign=lambda message: signing.sign_bytes(enrolled.key, message),
        )

    def view(self) -> dict[str, Any]:
        response = signed_call(self.enrolled, "GET", self.base + "secure/")
        assert response.status_code == 200, response.json()
        return dict(response.json())

    def post(self, phase: str, message: Any, data: bytes | None = None) -> Any:
        body: dict[str, Any] = {"message": message}
        if data is not None:
            body["data"] = base64.b64encode(data).decode("ascii")
        return signed_call(self.enrolled, "POST", self.base + f"secure/{phase}/", body)

    def keys(self) -> Any:
        return self.post("keys", self.session.advertise())

    def shares(self) -> Any:
        view = self.view()
        assert view["phase"] == "shares", view
        return self.post("shares", self.session.share(view["roster"]))

    def protect(self, params: dict[str, torch.Tensor], weight: float) -> bytes:
        """The site's weighted update masked (or encrypted) with the setup the portal
        relays."""
        view = self.view()
        assert view["phase"] == "upload" and view.get("setup"), view
        return bytes(self.session.protect(LAYOUT.flatten(params, weight=weight), view["setup"]))

    def protected(self, params: dict[str, torch.Tensor], weight: float) -> bytes:
        """The site's update file, protected."""
        return protected_file(self.protect(params, weight), weight)

    def upload(self, data: bytes) -> Any:
        return signed_call(self.enrolled, "PUT", self.base + "update/", raw=data)

    def finish(self) -> Any:
        view = self.view()
        request = view["request"]
        total = b""
        if request.get("total"):
            download = signed_call(self.enrolled, "GET", self.base + "secure/total/")
            assert download.status_code == 200
            total = b"".join(download.streaming_content)
        answer, data = self.session.finish(request, total)
        return self.post("finish", answer, data or None)


def protected_file(data: bytes, weight: float, metrics: dict[str, Any] | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "update.safetensors"
        write_protected(
            path,
            data,
            params_type="FULL",
            metrics=metrics or {"accuracy": 0.5},
            meta={"NUM_STEPS_CURRENT_ROUND": weight},
        )
        return path.read_bytes()


def site_updates(names: Sequence[str]) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    """Each site's trained params (the initial model moved its own way) and weight 1, 2, …"""
    generator = torch.Generator().manual_seed(11)
    base = initial_model()
    return {
        name: (
            {k: v + torch.rand(v.shape, generator=generator) * 0.6 - 0.3 for k, v in base.items()},
            float(number),
        )
        for number, name in enumerate(names, start=1)
    }


def fedavg(
    updates: dict[str, tuple[dict[str, torch.Tensor], float]], sites: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Plain FedAvg of ``sites``' updates, in float64."""
    total = sum(updates[s][1] for s in sites)
    return {
        name: torch.stack([updates[s][0][name].double() * updates[s][1] for s in sites]).sum(0)
        / total
        for name in SHAPES
    }


def global_model(job: Job, number: int = 1) -> dict[str, torch.Tensor]:
    return load_state_dict(Path(ModelVersion.objects.get(job=job, round_number=number).file.path))


def assert_masked_mean(job: Job, updates: Any, survivors: Sequence[str]) -> None:
    """The job's model after round 0 is the survivors' FedAvg, within the ring's bound (and
    float32's rounding of the mean)."""
    expected = fedavg(updates, survivors)
    bound = error_bound(len(survivors), sum(updates[s][1] for s in survivors))
    final = global_model(job)
    for name, tensor in expected.items():
        assert final[name].dtype == torch.float32
        assert torch.allclose(final[name].double(), tensor, rtol=2**-23, atol=bound), name


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.json()
    return dict(response.json())


def accepted(response: Any) -> None:
    assert response.status_code == 202, response.json()


def all_keys_and_shares(agents: Sequence[Agent]) -> None:
    for agent in agents:
        assert ok(agent.keys())["stored"] is True
    for agent in agents:
        assert ok(agent.shares())["stored"] is True


def round_deadline_passes(job: Job) -> None:
    """The round's deadline (the upload phase's) is past, and the worker's kick comes."""
    Round.objects.filter(job=job, number=0).update(deadline=timezone.now() - timedelta(seconds=1))
    rounds.job_advance(job_id=job.pk)


def phase_deadline_passes(job: Job) -> None:
    """The current phase's deadline is past, and the worker's kick comes."""
    rnd = Round.objects.get(job=job, number=0)
    past = (timezone.now() - timedelta(seconds=1)).isoformat()
    rnd.protection = {**rnd.protection, "phase_deadline": past}
    rnd.save(update_fields=["protection"])
    rounds.job_advance(job_id=job.pk)


def protection_of(job: Job) -> dict[str, Any]:
    return dict(Round.objects.get(job=job, number=0).protection)


def masked_round_with_dropouts(
    tmp_path: Path, count: int, dropped: Sequence[str], *, min_clients: int = 3
) -> tuple[Job, list[Agent], Any]:
    """A masked round of ``count`` sites where the ``dropped`` ones send keys and shares and
    never upload, driven to its end: the job, the agents, the updates."""
    sites = enrolled_sites(count)
    job = submit_secure(tmp_path, sites, min_clients=min_clients)
    agents = [Agent(job, s) for s in sites]
    updates = site_updates([a.name for a in agents])
    all_keys_and_shares(agents)
    survivors = [a for a in agents if a.name not in dropped]
    for agent in survivors:
        accepted(agent.upload(agent.protected(*updates[agent.name])))
    assert protection_of(job)["phase"] == "upload"  # the dropped sites are still awaited
    round_deadline_passes(job)
    if protection_of(job).get("phase") == "finish":
        for agent in survivors:
            assert ok(agent.finish())["stored"] is True
    job.refresh_from_db()
    return job, agents, updates


# --------------------------------------------------------------------------------------------
# Rounds that close
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [3, 5])
def test_a_masked_round_closes_at_fedavgs_model(tmp_path: Path, count: int) -> None:
    sites = enrolled_sites(count)
    job = submit_secure(tmp_path, sites)
    agents = [Agent(job, s) for s in sites]
    updates = site_updates([a.name for a in agents])
    assert agents[0].view()["phase"] == "keys"

    all_keys_and_shares(agents)
    for agent in agents:
        accepted(agent.upload(agent.protected(*updates[agent.name])))
    protection = protection_of(job)
    assert protection["phase"] == "finish"
    assert protection["survivors"] == [a.name for a in agents]
    for agent in agents:
        ok(agent.finish())

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    assert_masked_mean(job, updates, [a.name for a in agents])
    # Weighted, not the plain mean: the test tells the two apart.
    plain = torch.stack([updates[a.name][0]["w"].double() for a in agents]).mean(0)
    assert not torch.allclose(global_model(job)["w"].double(), plain, atol=1e-3)
    # The uploads were summed as the masks were removed: no masked sum was ever stored.
    assert not Round.objects.get(job=job, number=0).protected_total


@pytest.mark.parametrize(
    ("count", "dropped"),
    [
        (5, ["site-4"]),
        # Two dropouts need every survivor to keep a threshold (a majority) of surviving
        # neighbours to rebuild its self seed: six sites, the fewest where two may go.
        (6, ["site-2", "site-5"]),
    ],
)
def test_sites_that_shared_and_never_uploaded_are_recovered_exactly(
    tmp_path: Path, count: int, dropped: list[str]
) -> None:
    job, agents, updates = masked_round_with_dropouts(tmp_path, count, dropped)

    assert job.state == JobState.COMPLETED, job.failure_reason
    survivors = [a.name for a in agents if a.name not in dropped]
    assert_masked_mean(job, updates, survivors)
    rnd = Round.objects.get(job=job, number=0)
    assert rnd.protection["shared"] == [a.name for a in agents]
    assert rnd.protection["survivors"] == survivors
    for name in dropped:
        task = task_for_site(
            job=job, site=next(a for a in agents if a.name == name).enrolled.site, round_number=0
        )
        assert task.state == TaskState.LATE
        assert task.reason == "no update before the round closed"


def test_a_survivor_that_never_answers_the_finish_request_still_counts(tmp_path: Path) -> None:
    sites = enrolled_sites(5)
    job = submit_secure(tmp_path, sites, min_clients=3)
    agents = [Agent(job, s) for s in sites]
    updates = site_updates([a.name for a in agents])
    all_keys_and_shares(agents)
    for agent in agents:
        accepted(agent.upload(agent.protected(*updates[agent.name])))
    for agent in agents[:4]:
        ok(agent.finish())
    assert protection_of(job)["phase"] == "finish"  # site-5 is still awaited

    phase_deadline_passes(job)

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    # Its upload is in the sum; its self mask came off with its neighbours' shares.
    assert_masked_mean(job, updates, [a.name for a in agents])


def test_two_of_five_sites_dropping_fail_the_round_before_any_share_is_revealed(
    tmp_path: Path,
) -> None:
    # With five sites the threshold is 3 of 4 neighbours: after two dropouts each survivor has
    # two surviving neighbours, too few to rebuild its self seed. The round fails when the
    # uploads end, naming the first site that could not be unmasked, and no site is asked to
    # reveal a share for a sum that could never be opened.
    job, _, _ = masked_round_with_dropouts(tmp_path, 5, ["site-2", "site-5"], min_clients=3)

    assert job.state == JobState.FAILED
    assert job.failure_reason == (
        "round 1: secure aggregation: site-1's self mask could not be removed: 2 of its "
        "neighbours survived, 3 are needed (dropped: site-2, site-5)"
    )
    assert not SecureMessage.objects.filter(round__job=job, phase="finish").exists()


def test_too_few_survivors_fail_the_job_naming_the_quorum_and_the_missing_sites(
    tmp_path: Path,
) -> None:
    job, _, _ = masked_round_with_dropouts(tmp_path, 4, ["site-1", "site-3"], min_clients=3)

    assert job.state == JobState.FAILED
    reason = job.failure_reason
    assert "2 acceptable result(s), min_clients is 3" in reason, reason
    assert "site-1" in reason and "site-3" in reason
    assert "site-2" not in reason and "site-4" not in reason
    assert Round.objects.get(job=job, number=0).state == RoundState.FAILED


def test_too_few_keys_fail_the_job_at_the_end_of_the_keys_phase(tmp_path: Path) -> None:
    sites = enrolled_sites(3)
    job = submit_secure(tmp_path, sites)
    agents = [Agent(job, s) for s in sites]
    for agent in agents[:2]:
        ok(agent.keys())

    phase_deadline_passes(job)

    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.failure_reason == (
        "round 1: secure aggregation: 2 site(s) sent their keys; secure aggregation needs at "
        "least 3; none from site-3"
    )
    assert Round.objects.get(job=job, number=0).state == RoundState.FAILED
    assert agents[0].view()["round_state"] == RoundState.FAILED


def test_a_site_that_misses_the_keys_phase_is_out_and_the_round_goes_on(tmp_path: Path) -> None:
    sites = enrolled_sites(4)
    job = submit_secure(tmp_path, sites, min_clients=3)
    agents = [Agent(job, s) for s in sites]
    late = agents[2]
    on_time = [a for a in agents if a is not late]
    updates = site_updates([a.name for a in agents])
    for agent in on_time:
        ok(agent.keys())
    assert protection_of(job)["phase"] == "keys"

    phase_deadline_passes(job)

    protection = protection_of(job)
    assert protection["phase"] == "shares"
    assert protection["roster"]["sites"] == [a.name for a in on_time]
    task = task_for_site(job=job, site=late.enrolled.site, round_number=0)
    assert task.state == TaskState.FAILED
    assert task.reason == "secure aggregation: sent no keys before the phase ended"
    refused = late.keys()
    assert refused.status_code == 409 and refused.json()["code"] == "wrong_phase"
    assert late.view()["roster"]["sites"] == [a.name for a in on_time]

    for agent in on_time:
        ok(agent.shares())
    for agent in on_time:
        accepted(agent.upload(agent.protected(*updates[agent.name])))
    for agent in on_time:
        ok(agent.finish())

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    assert_masked_mean(job, updates, [a.name for a in on_time])


def encrypted_round_uploaded(
    tmp_path: Path,
) -> tuple[Job, list[Agent], dict[str, tuple[dict[str, torch.Tensor], float]]]:
    """Three sites of an HE job past their keys, shares and uploads: the round waits for the
    decrypted sum."""
    sites = enrolled_sites(3)
    job = submit_secure(tmp_path, sites, kind="he")
    agents = [Agent(job, s, kind="he") for s in sites]
    updates = site_updates([a.name for a in agents])
    all_keys_and_shares(agents)
    for agent in agents:
        accepted(agent.upload(agent.protected(*updates[agent.name])))
    return job, agents, updates


def test_an_encrypted_round_closes_at_fedavgs_model_and_the_portal_holds_no_secret_key(
    tmp_path: Path,
) -> None:
    job, agents, updates = encrypted_round_uploaded(tmp_path)
    requests = protection_of(job)["requests"]
    assert list(requests) == ["site-1"]  # one survivor decrypts
    assert Round.objects.get(job=job, number=0).protected_total  # the sum it decrypts
    ok(agents[0].finish())

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    expected = fedavg(updates, [a.name for a in agents])
    final = global_model(job)
    for name, tensor in expected.items():
        assert torch.allclose(final[name].double(), tensor, atol=1e-5), name
    holder = SecureMessage.objects.get(round__job=job, phase="shares", site__name="site-1")
    stored = base64.b64decode(holder.payload["public_context"])
    assert he.HEContext.from_bytes(stored).is_private is False
    # The others' shares messages carry nothing; the holder's boxes are sealed for them.
    others = SecureMessage.objects.filter(round__job=job, phase="shares").exclude(pk=holder.pk)
    assert [m.payload for m in others] == [{}, {}]
    assert sorted(holder.payload["boxes"]) == ["site-2", "site-3"]


def test_when_the_survivor_asked_to_decrypt_is_gone_the_next_one_is_asked(
    tmp_path: Path,
) -> None:
    job, agents, updates = encrypted_round_uploaded(tmp_path)
    assert list(protection_of(job)["requests"]) == ["site-1"]

    phase_deadline_passes(job)  # site-1 never answers

    assert list(protection_of(job)["requests"]) == ["site-2"]
    assert "request" not in agents[0].view()  # site-1 may no longer answer
    ok(agents[1].finish())
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    expected = fedavg(updates, [a.name for a in agents])
    final = global_model(job)
    for name, tensor in expected.items():
        assert torch.allclose(final[name].double(), tensor, atol=1e-5), name


def test_when_no_survivor_decrypts_the_round_fails_with_the_reason(tmp_path: Path) -> None:
    job, agents, updates = encrypted_round_uploaded(tmp_path)

    for _ in agents:
        phase_deadline_passes(job)

    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.failure_reason == (
        "round 1: secure aggregation: no surviving site sent back the decrypted sum"
    )


# --------------------------------------------------------------------------------------------
# Bad input: refused with the reason, nothing stored
# --------------------------------------------------------------------------------------------


def three_agents(tmp_path: Path, kind: str = "masking") -> tuple[Job, list[Agent]]:
    sites = enrolled_sites(3)
    job = submit_secure(tmp_path, sites, kind=kind)
    return job, [Agent(job, s, kind=kind) for s in sites]


def test_malformed_keys_are_refused_naming_the_field(tmp_path: Path) -> None:
    job, agents = three_agents(tmp_path)
    good = agents[0].session.advertise()

    short = agents[0].post("keys", {**good, "mask_public": base64.b64encode(b"k" * 31).decode()})
    not_b64 = agents[0].post("keys", {**good, "seal_public": "not base64!"})
    missing = agents[0].post("keys", {k: v for k, v in good.items() if k != "mask_public"})

    assert short.status_code == 400
    assert "mask_public: 31 bytes, expected 32" in short.json()["message"]
    assert not_b64.status_code == 400
    assert "seal_public: not base64" in not_b64.json()["message"]
    assert missing.status_code == 400 and "mask_public" in missing.json()["message"]
    assert not SecureMessage.objects.filter(round__job=job).exists()


def test_keys_not_signed_by_the_site_are_refused(tmp_path: Path) -> None:
    job, agents = three_agents(tmp_path)
    agent = agents[0]
    good = agent.session.advertise()
    # Signed by another key (a portal's, or another site's), or not signed at all.
    stranger = signing.generate_key()
    keys = [base64.b64decode(good["mask_public"]), base64.b64decode(good["seal_public"])]
    from client_agent.secagg.session import keys_message

    forged = signing.sign_bytes(
        stranger, keys_message(round_context(str(job.uid), 0), agent.name, keys)
    )
    by_other_site = signing.sign_bytes(
        agents[1].enrolled.key, keys_message(round_context(str(job.uid), 0), agent.name, keys)
    )
    for_other_round = signing.sign_bytes(
        agent.enrolled.key, keys_message(round_context(str(job.uid), 1), agent.name, keys)
    )

    for signature in (forged, by_other_site, for_other_round):
        refused = agent.post("keys", {**good, "signature": base64.b64encode(signature).decode()})
        assert refused.status_code == 400, refused.json()
        assert "signature does not check" in refused.json()["message"]
    unsigned = agent.post("keys", {k: v for k, v in good.items() if k != "signature"})
    assert unsigned.status_code == 400
    assert "must be signed" in unsigned.json()["message"]
    assert not SecureMessage.objects.filter(round__job=job).exists()
    assert ok(agent.post("keys", good))["stored"] is True


def test_shares_for_the_wrong_neighbours_are_refused(tmp_path: Path) -> None:
    job, agents = three_agents(tmp_path)
    for agent in agents:
        ok(agent.keys())
    agent = agents[0]
    message = agent.session.share(agent.view()["roster"])
    boxes = dict(message["boxes"])
    box = boxes.pop("site-2")

    for wrong in (
        {**boxes, "site-1": box},  # for itself instead of site-2
        boxes,  # one short
        {**boxes, "site-2": box, "site-9": box},  # one for a site not on the roster
    ):
        refused = agent.post("shares", {"boxes": wrong})
        assert refused.status_code == 400, refused.json()
        assert "neighbours are ['site-2', 'site-3']" in refused.json()["message"]
    cut = agent.post("shares", {"boxes": {**boxes, "site-2": box[:-8]}})
    assert cut.status_code == 400 and "the box for site-2" in cut.json()["message"]
    assert not SecureMessage.objects.filter(round__job=job, phase="shares").exists()


def test_a_message_for_another_phase_is_refused_with_409(tmp_path: Path) -> None:
    job, agents = three_agents(tmp_path)

    early = agents[0].post("shares", {"boxes": {}})
    early_finish = agents[0].post("finish", {"self_seed_shares": {}})
    assert early.status_code == 409 and early.json()["code"] == "wrong_phase"
    assert early_finish.status_code == 409 and early_finish.json()["code"] == "wrong_phase"
    unknown = agents[0].post("upload", {})
    assert unknown.status_code == 400 and unknown.json()["field"] == "phase"

    for agent in agents[:2]:
        ok(agent.keys())
    last = agents[2].session.advertise()
    ok(agents[2].post("keys", last))  # the last keys move the round to its shares phase
    # The same post again (a retry whose answer was lost) is answered as taken, though the
    # phase moved on; another keys message (a fresh signature) is refused.
    retried = agents[2].post("keys", last)
    assert retried.status_code == 200 and retried.json()["stored"] is False
    again = agents[0].post("keys", agents[0].session.advertise())
    assert again.status_code == 409 and "already sent its keys message" in again.json()["message"]
    assert SecureMessage.objects.filter(round__job=job).count() == 3


def test_a_site_not_in_the_round_is_refused(tmp_path: Path) -> None:
    sites = enrolled_sites(5)
    job = submit_secure(tmp_path, sites[:4], min_clients=3)
    agents = [Agent(job, s) for s in sites]
    outsider, late = agents[4], agents[3]
    for agent in agents[:3]:
        ok(agent.keys())

    not_in_job = outsider.keys()
    assert not_in_job.status_code == 404, not_in_job.json()
    phase_deadline_passes(job)  # site-4 sent no keys: out of the round
    not_on_roster = late.post("shares", {"boxes": {}})

    assert not_on_roster.status_code == 409, not_on_roster.json()
    assert not_on_roster.json()["code"] == "not_in_phase"
    assert "site-4 is not part of the round's shares phase" in not_on_roster.json()["message"]
    assert not SecureMessage.objects.filter(round__job=job, site__name__in=["site-4", "site-5"])


def test_protected_uploads_that_do_not_fit_the_round_are_rejected_with_the_reason(
    tmp_path: Path,
) -> None:
    job, agents = three_agents(tmp_path)
    all_keys_and_shares(agents)
    updates = site_updates([a.name for a in agents])
    short, plain, good = agents
    masked = short.protect(*updates[short.name])

    accepted(short.upload(protected_file(masked[:-8], 1.0)))
    params = updates[plain.name][0]
    with tempfile.TemporaryDirectory() as tmp:
        accepted(plain.upload(update_bytes(params, Path(tmp), weight=2.0)))

    task = task_for_site(job=job, site=short.enrolled.site, round_number=0)
    assert task.state == TaskState.REJECTED
    assert f"the masked vector is {8 * LAYOUT.length - 8} bytes" in task.reason
    assert f"the round's is {8 * LAYOUT.length}" in task.reason
    task = task_for_site(job=job, site=plain.enrolled.site, round_number=0)
    assert task.state == TaskState.REJECTED
    assert "a protected round takes one tensor, 'fedportal.protected'" in task.reason
    accepted(good.upload(good.protected(*updates[good.name])))
    task = task_for_site(job=job, site=good.enrolled.site, round_number=0)
    assert task.state == TaskState.ACCEPTED, task.reason


def test_an_encrypted_upload_under_another_context_is_rejected(tmp_path: Path) -> None:
    job, agents = three_agents(tmp_path, kind="he")
    all_keys_and_shares(agents)
    updates = site_updates([a.name for a in agents])
    agent = agents[1]
    assert agent.view()["phase"] == "upload"
    params, weight = updates[agent.name]
    # A context of the site's own making, not the round's: the portal could not sum it.
    own = he.HEContext.create()
    data = he.pack(he.encrypt(own, LAYOUT.flatten(params, weight=weight)))

    accepted(agent.upload(protected_file(data, weight)))

    task = task_for_site(job=job, site=agent.enrolled.site, round_number=0)
    assert task.state == TaskState.REJECTED
    assert "context" in task.reason, task.reason


def test_a_finish_answer_with_a_share_the_site_does_not_hold_is_refused(tmp_path: Path) -> None:
    job, agents = three_agents(tmp_path)
    all_keys_and_shares(agents)
    updates = site_updates([a.name for a in agents])
    for agent in agents:
        accepted(agent.upload(agent.protected(*updates[agent.name])))
    agent = agents[0]
    request = agent.view()["request"]
    assert request == {"survivors": ["site-1", "site-2", "site-3"], "dropped": []}
    answer, _ = agent.session.finish(request)
    share = answer["self_seed_shares"]["site-2"]

    for wrong, owner in (
        # No site dropped: a mask key share would unmask site-2 with its self seed.
        ({**answer, "mask_key_shares": {"site-2": share}}, "site-2"),
        ({**answer, "self_seed_shares": {**answer["self_seed_shares"], "site-1": share}}, "site-1"),
    ):
        refused = agent.post("finish", wrong)
        assert refused.status_code == 400, refused.json()
        assert f"site-1 holds no such share of '{owner}'" in refused.json()["message"]
    not_hex = agent.post("finish", {**answer, "self_seed_shares": {"site-2": "zz"}})
    assert not_hex.status_code == 400 and "not hexadecimal" in not_hex.json()["message"]
    assert not SecureMessage.objects.filter(round__job=job, phase="finish").exists()
    assert ok(agent.post("finish", answer))["stored"] is True


def test_the_same_message_twice_is_taken_once_and_a_different_one_refused(
    tmp_path: Path,
) -> None:
    job, agents = three_agents(tmp_path)
    first = agents[0].session.advertise()
    ok(agents[0].post("keys", first))

    again = ok(agents[0].post("keys", first))
    other = agents[0].post(
        "keys",
        MaskingSite(
            "site-1",
            context=round_context(str(job.uid), 0),
            round_number=0,
            sign=lambda message: signing.sign_bytes(agents[0].enrolled.key, message),
        ).advertise(),
    )

    assert again == {"phase": "keys", "stored": False}
    assert other.status_code == 409
    assert "already sent its keys message, a different one" in other.json()["message"]
    stored = SecureMessage.objects.get(round__job=job)
    assert stored.payload["mask_public"] == first["mask_public"]
    assert stored.payload["certificate"] == agents[0].enrolled.certificate.pem


# --------------------------------------------------------------------------------------------
# What the portal keeps
# --------------------------------------------------------------------------------------------


def test_what_the_portal_keeps_of_a_round_with_a_dropout_reveals_no_site(tmp_path: Path) -> None:
    job, agents, updates = masked_round_with_dropouts(tmp_path, 5, ["site-3"])
    assert job.state == JobState.COMPLETED, job.failure_reason
    survivors = ["site-1", "site-2", "site-4", "site-5"]

    # (a) Each stored upload is uniform in the ring; the same update unmasked is not.
    rnd = Round.objects.get(job=job, number=0)
    stored = [t for t in rnd.tasks.select_related("site") if t.update]
    assert sorted(t.site.name for t in stored) == survivors
    for task in stored:
        values = np.frombuffer(protected_bytes(task.update.path), dtype="<u8")
        assert len(values) == LAYOUT.length
        assert chi2_top_bits(values) < UNIFORM_CHI2_MAX, task.site.name
    params, weight = updates["site-1"]
    clear = ring.quantize(LAYOUT.flatten(params, weight=weight), sites=5)
    assert chi2_top_bits(clear) > 1_000

    # (b) The finish answers reveal, per site, the shares of one secret only: self seeds of
    # the survivors, mask keys of the site that dropped.
    answers = SecureMessage.objects.filter(round=rnd, phase="finish").select_related("site")
    assert sorted(m.site.name for m in answers) == survivors
    seeds = {owner for m in answers for owner in m.payload.get("self_seed_shares", {})}
    mask_keys = {owner for m in answers for owner in m.payload.get("mask_key_shares", {})}
    assert seeds == set(survivors) and mask_keys == {"site-3"}
    assert not seeds & mask_keys

    # (c) The people's API gives the rounds' protection, never a key, box or share.
    token = site_services.api_token_create(user=creator_of(job.project), name="tests")[1]
    client = APIClient()
    listing = client.get(
        f"/api/v1/jobs/{job.uid}/rounds/", headers={"Authorization": f"Bearer {token}"}
    )
    assert listing.status_code == 200
    (entry,) = listing.json()["results"]
    assert entry["protection"]["survivors"] == survivors
    assert entry["protection"]["shared"] == [a.name for a in agents]
    text = json.dumps(listing.json())
    secrets = [
        value
        for message in SecureMessage.objects.filter(round=rnd)
        for value in _leaves(message.payload)
        if len(value) >= 16
    ]
    assert secrets, "the round stored no keys or shares to look for"
    for secret in secrets:
        assert secret not in text
    for word in ("boxes", "self_seed_shares", "mask_key_shares", "mask_public", "certificate"):
        assert word not in text


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value] if isinstance(value, str) else []


# --------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------


def test_secure_aggregation_with_one_client_is_refused_at_submission(tmp_path: Path) -> None:
    sites = enrolled_sites(3)
    project = sites[0].site.project
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("print('a client script')\n")
    recipe = FedAvgRecipe(
        name="secure-job",
        min_clients=2,
        num_rounds=1,
        model=initial_model(),
        train_script=str(app / "client.py"),
        secure_aggregation=True,
    )
    bundle = recipe.export(tmp_path / "bundle")
    archive = pack_app(bundle / "app", tmp_path / "app.zip")
    token = site_services.api_token_create(user=creator_of(project), name="tests")[1]

    def post(spec: dict[str, Any]) -> Any:
        from django.core.files.uploadedfile import SimpleUploadedFile

        form = {
            "spec": SimpleUploadedFile("job.json", json.dumps(spec).encode()),
            "initial_model": SimpleUploadedFile(
                "initial_model.safetensors", (bundle / "initial_model.safetensors").read_bytes()
            ),
            "app": SimpleUploadedFile("app.zip", archive.read_bytes()),
        }
        return APIClient().post(
            f"/api/v1/projects/{project.slug}/jobs/",
            form,
            format="multipart",
            headers={"Authorization": f"Bearer {token}"},
        )

    spec = recipe.spec()
    refused = post({**spec, "params": {**spec["params"], "min_clients": 1}})

    assert refused.status_code == 400, refused.json()
    assert "secure_aggregation" in refused.json()["field"]
    assert "min_clients ≥ 2" in refused.json()["message"]
    assert not Job.objects.exists()
    # Two is enough: the sum of two sites is hidden from the portal (README, threat model).
    assert post(spec).status_code == 201
