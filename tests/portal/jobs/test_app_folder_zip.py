"""An app zip may hold the app folder's contents (what ``pack_app`` writes) or the folder
itself (what a file manager's "compress" makes): both submit the same job, whose stored archive
holds the contents at its root. Any other layout is refused, naming the missing script."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from common.exceptions import ValidationFailed
from jobs.models import Job
from jobs.services.submission import job_submit
from tests.portal import jobs_api_world as jw

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _submit(world: jw.World, app: bytes, tmp: Path) -> Job:
    made = jw.make_bundle(tmp, name="folder-zip")
    return job_submit(
        project=world.project,
        submitted_by=world.users[jw.LEAD],
        spec=made.spec,
        initial_model=io.BytesIO(made.model),
        app_archive=io.BytesIO(app),
    )


def test_a_zip_of_the_folder_itself_is_stored_as_its_contents(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    folder = _zip(
        {
            "hello-pt/": b"",
            f"hello-pt/{jw.TRAIN_SCRIPT}": b"print('a client script')\n",
            "hello-pt/lib/util.py": b"X = 1\n",
        }
    )

    job = _submit(world, folder, tmp_path)

    with job.app_archive.open("rb") as fh, zipfile.ZipFile(fh) as zf:
        assert sorted(zf.namelist()) == sorted([jw.TRAIN_SCRIPT, "lib/util.py"])
        assert zf.read("lib/util.py") == b"X = 1\n"


def test_a_zip_of_the_contents_is_kept_as_it_is(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    contents = _zip({jw.TRAIN_SCRIPT: b"print('x')\n", "hello-pt/notes.txt": b"n"})

    job = _submit(world, contents, tmp_path)

    with job.app_archive.open("rb") as fh:
        assert fh.read() == contents


def test_two_folders_or_no_script_is_refused_naming_the_script(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)
    two = _zip({f"a/{jw.TRAIN_SCRIPT}": b"x", f"b/{jw.TRAIN_SCRIPT}": b"y"})

    with pytest.raises(ValidationFailed) as refused:
        _submit(world, two, tmp_path)

    assert refused.value.field == "app"
    assert f"train_script {jw.TRAIN_SCRIPT!r} is not in the archive" in refused.value.message
