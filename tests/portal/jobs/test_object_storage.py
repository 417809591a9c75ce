"""Job bundles, models and updates in an S3-compatible store (django-storages), read and
written by the real boto3 client over HTTP against moto's standalone server: a job's rounds
close with the same model as on the file system, and a worker works on local copies that it
downloads once and drops when the round is done."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.wire import load_state_dict
from jobs import storage
from jobs.models import JobState, ModelVersion, SiteTask
from tests.object_store import CREDENTIALS, s3_client, s3_server
from tests.portal.rounds_helpers import submit, three_sites, upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

BUCKET = "fedportal-test"
UPDATES = [
    {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)},
    {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(2)},
    {"w": torch.tensor([-1.0, 0.5]), "n": torch.tensor(3)},
]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def bucket(endpoint: str, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The default storage is an S3 bucket of its own for the test; returns a boto3 client."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client: Any = s3_client(endpoint)
    name = f"{BUCKET}-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=name)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": name,
                "endpoint_url": endpoint,
                "file_overwrite": True,
                "default_acl": None,
            },
        },
    }
    settings.FEDPORTAL_STORAGE_CACHE_DIR = tmp_path / "cache"
    settings.MEDIA_ROOT = tmp_path / "media-unused"  # nothing may land on the file system
    client.bucket = name
    return client


def keys(client: Any) -> list[str]:
    listed = client.list_objects_v2(Bucket=client.bucket).get("Contents", [])
    return sorted(str(item["Key"]) for item in listed)


def run_job(tmp_path: Path) -> dict[str, torch.Tensor]:
    tmp_path.mkdir(parents=True)
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=2)
    for number in range(2):
        for site, update in zip(sites, UPDATES, strict=True):
            upload(job, site, number, {k: v + number for k, v in update.items()})
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    final = ModelVersion.objects.get(job=job, round_number=2)
    with final.file.open("rb") as fh:
        data = fh.read()
    assert hashlib.sha256(data).hexdigest() == final.sha256
    out = tmp_path / "final.safetensors"
    out.write_bytes(data)
    return load_state_dict(out)


def test_a_job_runs_on_object_storage_with_the_file_systems_model(
    bucket: Any, settings: Any, tmp_path: Path
) -> None:
    on_s3 = run_job(tmp_path / "s3")
    stored = keys(bucket)
    # Bundles, every update, every global model and server state are in the bucket.
    models = [str(v.file.name) for v in ModelVersion.objects.all()]
    assert len(models) == 3 and set(models) <= set(stored)
    updates = [str(t.update.name) for t in SiteTask.objects.all()]
    assert len(updates) == 6 and set(updates) <= set(stored)
    assert not Path(settings.MEDIA_ROOT).exists()
    # The worker's copies of the closed rounds' updates were dropped; models stay cached.
    cache = Path(settings.FEDPORTAL_STORAGE_CACHE_DIR)
    assert not [p for p in cache.rglob("*.safetensors") if str(p.relative_to(cache)) in updates]

    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    }
    settings.MEDIA_ROOT = tmp_path / "media"
    on_disk = run_job(tmp_path / "fs")
    assert sorted(on_s3) == sorted(on_disk)
    for name in on_disk:
        assert torch.equal(on_s3[name], on_disk[name]), name


def test_a_local_copy_is_downloaded_once_and_again_when_the_object_changes(
    bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "jobs/x/round-001/site-1.safetensors"
    first = os.urandom(3 * storage.PART_BYTES + 17)  # several parts
    bucket.put_object(Bucket=bucket.bucket, Key=name, Body=first)
    downloads = []
    client = storage._client()
    real = client.download_file

    def counted(*args: Any, **kwargs: Any) -> Any:
        downloads.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "download_file", counted)
    path = storage.local_path(name)
    assert path.read_bytes() == first
    assert storage.local_path(name) == path and len(downloads) == 1  # used again

    second = os.urandom(1000)
    bucket.put_object(Bucket=bucket.bucket, Key=name, Body=second)
    assert storage.local_path(name).read_bytes() == second
    assert len(downloads) == 2

    storage.forget([name])
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.local_path("jobs/x/none.safetensors")


def test_a_file_written_here_is_published_in_parts(bucket: Any) -> None:
    name = "jobs/x/models/round-002.safetensors"
    data = os.urandom(2 * storage.PART_BYTES + 5)
    path = storage.path_to_write(name)
    path.write_bytes(data)
    storage.publish(name)
    head = bucket.head_object(Bucket=bucket.bucket, Key=name)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    assert storage.local_path(name) == path  # this host's copy is the object's

    storage.publish(name, keep_local=False)
    assert not path.exists()
    got = bucket.get_object(Bucket=bucket.bucket, Key=name)["Body"].read()
    assert got == data


def test_a_name_outside_the_cache_is_refused(bucket: Any) -> None:
    with pytest.raises(ValueError, match="leaves the cache folder"):
        storage.path_to_write("../../etc/passwd")
