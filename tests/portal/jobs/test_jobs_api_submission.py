"""Submitting a job bundle over HTTP: what is accepted, and every way a bundle is refused —
a 4xx that names the field, with no job row and no file left behind."""

from __future__ import annotations

import io
import json
import stat
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Job, JobSite, JobState, ModelVersion
from tests.archives import lying_crc, lying_small_size, zip_bomb
from tests.portal.jobs_api_world import (
    ADMIN,
    LEAD,
    TRAIN_SCRIPT,
    Bundle,
    World,
    build_world,
    make_bundle,
    stored_files,
    zip_bytes,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


@pytest.fixture
def jobs_world_before_submission(tmp_path: Path) -> World:
    """The jobs world (``jobs_api_world.build_world``) with no job submitted yet."""
    return build_world(tmp_path, submit=False)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path)


def submit(world: World, fields: dict[str, Any], persona: str = LEAD) -> Any:
    return world.call(persona, "POST", f"{world.p}/jobs/", multipart=fields)


def assert_nothing_stored() -> None:
    assert Job.objects.count() == 0
    assert JobSite.objects.count() == 0
    assert ModelVersion.objects.count() == 0
    assert stored_files() == []


def file(name: str, data: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data)


def zip_with(info: zipfile.ZipInfo, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(TRAIN_SCRIPT, b"print('hi')\n")
        zf.writestr(info, data)
    return buffer.getvalue()


def symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("data")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def raw_model(tensors: dict[str, Any], data: bytes) -> bytes:
    """Bytes in safetensors layout with any tensor table: what a careless or hostile submitter
    can send, which safetensors' own writer would never make."""
    header = json.dumps(tensors).encode()
    return struct.pack("<Q", len(header)) + header + data


def model_with_nan() -> bytes:
    values = torch.tensor([0.0, float("nan")]).numpy().tobytes()
    return raw_model({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, values)


def pickled_model() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.tensor([0.0, 1.0])}, buffer)
    return buffer.getvalue()


def test_a_bundle_submitted_by_a_lead_is_stored_and_its_job_starts(
    jobs_world_before_submission: World, bundle: Bundle
) -> None:
    spec = json.dumps(bundle.spec)  # the spec as a JSON string
    created = submit(jobs_world_before_submission, bundle.form(spec=spec))

    assert created.status_code == 201, created.json()
    body = created.json()
    assert (body["name"], body["workflow"], body["min_clients"], body["num_rounds"]) == (
        "api-job",
        "fedavg",
        3,
        2,
    )
    job = Job.objects.get(uid=body["uid"])
    # Sites 1-4 are enrolled (the default participants); 1-3 accept automatically and are
    # online, which is min_clients: the job started.
    assert job.state == JobState.RUNNING
    assert sorted(job.participants.values_list("site__name", flat=True)) == [
        "site-1",
        "site-2",
        "site-3",
        "site-4",
    ]
    assert job.app_archive.read() == bundle.app
    prefix = f"jobs/{jobs_world_before_submission.project.pk}/{job.uid}/"
    assert stored_files() == [prefix + "app.zip", prefix + "models/round-000.safetensors"]


def test_a_project_admin_submits_to_named_sites_with_a_round_timeout(
    jobs_world_before_submission: World, bundle: Bundle
) -> None:
    created = submit(
        jobs_world_before_submission,
        bundle.form(sites=["site-3", "site-1", "site-2"], round_timeout_seconds="30"),
        persona=ADMIN,
    )

    assert created.status_code == 201, created.json()
    job = Job.objects.get(uid=created.json()["uid"])
    assert (
        job.round_timeout_seconds == 30
        and job.submitted_by == jobs_world_before_submission.users[ADMIN]
    )
    assert sorted(job.participants.values_list("site__name", flat=True)) == [
        "site-1",
        "site-2",
        "site-3",
    ]


BAD_SUBMISSIONS: dict[str, tuple[Callable[[Bundle], dict[str, Any]], str, str]] = {
    # name: (form overrides, the field named, the code)
    "spec is not JSON": (lambda b: {"spec": "{'format': 1"}, "spec", "invalid"),
    "spec file is not JSON": (lambda b: {"spec": file("job.json", b"\xff\xfe")}, "spec", "invalid"),
    "spec is not an object": (lambda b: {"spec": "[1, 2]"}, "spec.job.json", "invalid"),
    "unknown workflow": (
        lambda b: {"spec": json.dumps({**b.spec, "workflow": "fedmagic"})},
        "spec.workflow",
        "invalid",
    ),
    "bad params": (
        lambda b: {
            "spec": json.dumps({**b.spec, "params": {**b.spec["params"], "min_clients": 0}})
        },
        "spec.min_clients",
        "invalid",
    ),
    "unknown param": (
        lambda b: {"spec": json.dumps({**b.spec, "params": {**b.spec["params"], "lr": 0.1}})},
        "spec.lr",
        "invalid",
    ),
    "train script outside the app": (
        lambda b: {"spec": json.dumps({**b.spec, "train_script": "../client.py"})},
        "spec.train_script",
        "invalid",
    ),
    "no spec": (lambda b: {"spec": None}, "spec", "invalid"),
    "a pickle as initial_model": (
        lambda b: {"initial_model": file("initial_model.safetensors", pickled_model())},
        "initial_model",
        "invalid",
    ),
    "no initial_model": (lambda b: {"initial_model": None}, "initial_model", "invalid"),
    # The initial model passes the checks every update passes.
    "an initial model holding NaN": (
        lambda b: {"initial_model": file("initial_model.safetensors", model_with_nan())},
        "initial_model",
        "invalid",
    ),
    "an initial model whose tensors overlap": (
        lambda b: {
            "initial_model": file(
                "initial_model.safetensors",
                raw_model(
                    {
                        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                    },
                    b"\0" * 8,
                ),
            )
        },
        "initial_model",
        "invalid",
    ),
    "an initial model whose bytes do not fit its shape": (
        lambda b: {
            "initial_model": file(
                "initial_model.safetensors",
                raw_model({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            )
        },
        "initial_model",
        "invalid",
    ),
    "app is not a zip": (lambda b: {"app": file("app.zip", b.model)}, "app", "invalid"),
    "a zip with ../evil": (
        lambda b: {"app": file("app.zip", zip_bytes({TRAIN_SCRIPT: b"", "../evil": b"x"}))},
        "app",
        "invalid",
    ),
    "a zip with an absolute path": (
        lambda b: {"app": file("app.zip", zip_bytes({TRAIN_SCRIPT: b"", "/etc/evil": b"x"}))},
        "app",
        "invalid",
    ),
    "a zip with a symlink member": (
        lambda b: {"app": file("app.zip", zip_with(symlink_member(), b"/etc/passwd"))},
        "app",
        "invalid",
    ),
    "a zip whose CRC lies": (lambda b: {"app": file("app.zip", lying_crc())}, "app", "invalid"),
    "a zip whose declared size lies": (
        lambda b: {"app": file("app.zip", lying_small_size())},
        "app",
        "invalid",
    ),
    "a zip bomb": (lambda b: {"app": file("app.zip", zip_bomb())}, "app", "invalid"),
    "a zip without the train script": (
        lambda b: {"app": file("app.zip", zip_bytes({"other.py": b"print()"}))},
        "app",
        "invalid",
    ),
    "an unknown site": (lambda b: {"sites": ["site-1", "site-9"]}, "sites", "invalid"),
    "another project's site": (lambda b: {"sites": ["site-q"]}, "sites", "invalid"),
    "fewer sites than min_clients": (
        lambda b: {"sites": ["site-1", "site-2"]},
        "spec.params.min_clients",
        "invalid",
    ),
    "a round timeout of 0": (
        lambda b: {"round_timeout_seconds": "0"},
        "round_timeout_seconds",
        "invalid",
    ),
    "a round timeout that is no number": (
        lambda b: {"round_timeout_seconds": "soon"},
        "round_timeout_seconds",
        "invalid",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_a_bad_submission_names_the_field_and_stores_nothing(
    jobs_world_before_submission: World, bundle: Bundle, case: str
) -> None:
    overrides, field, code = BAD_SUBMISSIONS[case]

    refused = submit(jobs_world_before_submission, bundle.form(**overrides(bundle)))

    assert refused.status_code == 400, refused.json()
    assert (refused.json()["field"], refused.json()["code"]) == (field, code), refused.json()
    assert_nothing_stored()


def test_names_that_differ_only_in_case_are_refused_naming_both(
    jobs_world_before_submission: World, bundle: Bundle
) -> None:
    app = zip_bytes({TRAIN_SCRIPT: b"import util", "util.py": b"", "Util.py": b""})

    refused = submit(jobs_world_before_submission, bundle.form(app=file("app.zip", app)))

    assert refused.status_code == 400
    assert refused.json()["field"] == "app"
    assert "'util.py' and 'Util.py'" in refused.json()["message"]
    assert_nothing_stored()


def test_more_enrolled_sites_needed_than_the_project_has(
    tmp_path: Path, jobs_world_before_submission: World
) -> None:
    five = make_bundle(tmp_path, min_clients=5)

    refused = submit(jobs_world_before_submission, five.form())

    assert refused.status_code == 400
    assert refused.json()["field"] == "spec.params.min_clients"
    assert "needs 5 sites but only 4" in refused.json()["message"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    ("setting", "field"),
    [("FEDPORTAL_MAX_MODEL_BYTES", "initial_model"), ("FEDPORTAL_MAX_APP_ARCHIVE_BYTES", "app")],
)
def test_a_file_over_its_size_limit_is_refused_and_nothing_stored(
    jobs_world_before_submission: World, bundle: Bundle, settings, setting: str, field: str
) -> None:
    setattr(settings, setting, 64)

    refused = submit(jobs_world_before_submission, bundle.form())

    assert refused.status_code == 400
    assert (refused.json()["field"], refused.json()["code"]) == (field, "too_large")
    assert_nothing_stored()


def test_a_request_bigger_than_any_bundle_is_refused_before_it_is_parsed(
    jobs_world_before_submission: World, bundle: Bundle, settings, monkeypatch
) -> None:
    settings.FEDPORTAL_MAX_MODEL_BYTES = 1
    settings.FEDPORTAL_MAX_APP_ARCHIVE_BYTES = 1
    monkeypatch.setattr("fedportal.bodylimits.SUBMISSION_OVERHEAD_BYTES", 100)

    refused = submit(jobs_world_before_submission, bundle.form())

    assert refused.status_code == 413
    assert (refused.json()["field"], refused.json()["code"]) == ("body", "too_large")
    assert_nothing_stored()


def test_a_json_body_is_not_a_bundle(jobs_world_before_submission: World) -> None:
    refused = jobs_world_before_submission.call(
        LEAD, "POST", f"{jobs_world_before_submission.p}/jobs/", {"spec": {}}
    )

    assert refused.status_code == 415
    assert_nothing_stored()
