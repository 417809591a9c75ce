"""Submitting in one step: an exported bundle uploaded as one zip (its contents or its folder),
previewed (spec, tensors from the header, app files, sites with who is online and who accepts
automatically), then submitted or discarded; refused bundles name the part at fault and keep
nothing. "Clone and edit" fills the form from an earlier job, reusing its app and weights.
Every workflow parameter starts at the workflow's default."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from django.core.files.storage import default_storage
from django.test import Client

from jobs.models import Job, ModelVersion
from jobs.recipes import FedAvgRecipe
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


def _exported(tmp: Path, *, name: str = "digits") -> Path:
    """What ``recipe.export()`` writes, for a two-tensor model and a one-file app."""
    app = tmp / "app"
    app.mkdir(parents=True)
    (app / "client.py").write_text("print('hello')\n")
    model = torch.nn.Linear(3, 2)
    recipe = FedAvgRecipe(
        name=name,
        min_clients=2,
        num_rounds=3,
        model=model,
        train_script=str(app / "client.py"),
    )
    out = tmp / "export"
    recipe.export(str(out))
    return out


def _zip_folder(folder: Path, *, inside: bool) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder.parent if inside else folder).as_posix()
                zf.write(path, rel)
    return buffer.getvalue()


def _client(world: jw.World, persona: str) -> Client:
    client = Client()
    client.force_login(world.users[persona])
    return client


def _upload(client: Client, world: jw.World, data: bytes) -> Any:
    return client.post(
        f"/projects/{world.project.slug}/jobs/upload/",
        {"bundle": io.BytesIO(data)},
        format="multipart",
    )


def _staged_files() -> list[str]:
    try:
        projects, _ = default_storage.listdir("staged")
    except FileNotFoundError:
        return []
    found = []
    for project in projects:
        users, _ = default_storage.listdir(f"staged/{project}")
        for user in users:
            tokens, _ = default_storage.listdir(f"staged/{project}/{user}")
            for token in tokens:
                _, files = default_storage.listdir(f"staged/{project}/{user}/{token}")
                found += files
    return found


@pytest.mark.parametrize("inside", [False, True], ids=["contents", "folder"])
def test_an_exported_bundle_is_previewed_then_submitted(tmp_path: Path, inside: bool) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    exported = _exported(tmp_path)
    client = _client(world, jw.LEAD)

    uploaded = _upload(client, world, _zip_folder(exported, inside=inside))

    assert uploaded.status_code == 302
    preview = client.get(uploaded["Location"])
    page = preview.content.decode()
    assert "Preview the job digits" in page
    assert "2 tensors, 8 parameters" in page  # weight 2×3 and bias 2
    assert "<code>weight</code>" in page and "2 × 3" in page
    assert "<code>client.py</code>" in page
    assert "site-1 (offline; accepts automatically)" in page
    assert "site-2 (offline; a site admin decides)" in page
    assert Job.objects.count() == 0

    done = client.post(uploaded["Location"], {"action": "submit", "name": "digits-run"})

    job = Job.objects.get()
    assert done.status_code == 302 and done["Location"] == f"/jobs/{job.uid}/"
    assert (job.name, job.workflow, job.params["num_rounds"]) == ("digits-run", "fedavg", 3)
    assert job.submitted_by == world.users[jw.LEAD]
    assert _staged_files() == []  # submitted: nothing staged is kept
    assert client.get(uploaded["Location"]).status_code == 404


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"readme.txt": b"x"}, "no job.json at the zip&#x27;s root or in one folder"),
        ({"job.json": b"{not json"}, "job.json: not valid JSON"),
        ({"job.json": json.dumps({"format": 1}).encode()}, "job.json: "),
        ({"../job.json": b"{}"}, "has an unsafe path"),
    ],
    ids=["no-spec", "bad-json", "bad-spec", "traversal"],
)
def test_a_bad_bundle_is_refused_naming_the_part(
    tmp_path: Path, members: dict[str, bytes], message: str
) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)

    response = _upload(_client(world, jw.LEAD), world, buffer.getvalue())

    assert response.status_code == 200
    assert message in response.content.decode()
    assert _staged_files() == []


def test_a_bundle_whose_model_or_app_is_wrong_is_refused(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    exported = _exported(tmp_path)
    (exported / "initial_model.safetensors").write_bytes(b"not safetensors at all")
    client = _client(world, jw.LEAD)

    bad_model = _upload(client, world, _zip_folder(exported, inside=False))
    assert "initial_model.safetensors: " in bad_model.content.decode()

    exported2 = _exported(tmp_path / "second")
    (exported2 / "app" / "client.py").rename(exported2 / "app" / "other.py")
    no_script = _upload(client, world, _zip_folder(exported2, inside=False))
    assert "app/: train_script &#x27;client.py&#x27; is not in the archive" in (
        no_script.content.decode()
    )
    assert _staged_files() == [] and Job.objects.count() == 0


def test_a_staged_bundle_is_its_uploaders_alone_and_can_be_discarded(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    lead = _client(world, jw.LEAD)
    uploaded = _upload(lead, world, _zip_folder(_exported(tmp_path), inside=False))
    preview = uploaded["Location"]

    assert _client(world, jw.ADMIN).get(preview).status_code == 404  # another person's
    assert _client(world, jw.MEMBER).get(preview).status_code == 403  # may not submit
    assert _client(world, jw.OUTSIDER).get(preview).status_code == 404
    assert lead.get(preview.replace("/upload/", "/upload/..%2F")).status_code == 404

    discarded = lead.post(preview, {"action": "discard"})
    assert discarded.status_code == 302
    assert _staged_files() == [] and lead.get(preview).status_code == 404


def test_clone_and_edit_reuses_the_app_and_weights(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    job = world.job
    assert job is not None
    client = _client(world, jw.LEAD)
    url = f"/projects/{world.project.slug}/jobs/new/"

    form = client.get(f"{url}?from={job.uid}").context["form"]
    assert form.initial["name"] == "api-job-2"
    assert form.initial["fedavg__num_rounds"] == job.params["num_rounds"]
    assert form.initial["earlier_app"] == str(job.uid)
    assert form.initial["earlier_model"] == str(job.uid)
    assert sorted(form.initial["sites"]) == ["site-1", "site-2", "site-3"]
    assert "Clone and edit" in client.get(f"/jobs/{job.uid}/").content.decode()

    fields = {k: v for k, v in form.initial.items() if v is not None and k != "sites"}
    fields.update({"fedavg__num_rounds": 7, "sites": ["site-1", "site-2", "site-3"]})
    fields = {k: v for k, v in fields.items() if not isinstance(v, bool) or v}
    response = client.post(url, fields)

    clone = Job.objects.get(name="api-job-2")
    assert response.status_code == 302, response.context["form"].errors if response.context else ""
    assert clone.params["num_rounds"] == 7 and clone.app_sha256 == job.app_sha256
    original = ModelVersion.objects.get(job=job, round_number=0)
    copied = ModelVersion.objects.get(job=clone, round_number=0)
    assert copied.sha256 == original.sha256

    elsewhere = client.get(f"{url}?from=00000000-0000-0000-0000-000000000000", follow=True)
    assert "There is no such job to start from in this project." in elsewhere.content.decode()


def test_every_parameter_starts_at_the_workflows_default(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    page = _client(world, jw.LEAD).get(f"/projects/{world.project.slug}/jobs/new/")
    form = page.context["form"]

    assert form["fedavg__min_clients"].initial == 2
    assert form["fedavg__num_rounds"].initial == 5
    assert form["fedavg__key_metric"].initial == "accuracy"
    assert form["fedprox__fedprox_mu"].initial == 0.01
    assert form["fedavg__aggregator_args"].initial == "{}"
