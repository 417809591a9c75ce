"""App archive checks (``client_agent.app_archive``), shared by the portal and the agent:
what a zip declares in its central directory is checked against what it holds."""

from __future__ import annotations

import contextlib
import io
import unicodedata
import zipfile
from pathlib import Path

import pytest

from client_agent import app_archive
from client_agent.app_archive import BundleError, check_app_archive, extract_app
from tests.archives import LIARS, PAYLOAD, SCRIPT, honest_zip


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "app.zip"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(LIARS))
def test_a_member_whose_declared_crc_or_size_lies_is_refused_naming_it(
    tmp_path: Path, case: str
) -> None:
    make, member = LIARS[case]
    archive = write(tmp_path, make())

    with pytest.raises(BundleError, match=f"^app: member '{member}'") as raised:
        check_app_archive(archive, SCRIPT)

    assert raised.value.field == "app" and raised.value.reason.startswith(f"member '{member}'")


@pytest.mark.parametrize("case", list(LIARS))
def test_extracting_a_lying_archive_fails_with_a_bundle_error_and_leaves_nothing(
    tmp_path: Path, case: str
) -> None:
    make, member = LIARS[case]
    archive = write(tmp_path, make())
    dest = tmp_path / "app"

    with pytest.raises(BundleError, match=f"member '{member}'"):
        extract_app(archive, dest, SCRIPT)

    assert not dest.exists()


def test_an_honest_member_larger_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_archive, "MAX_APP_BYTES", 1000)
    data = honest_zip({SCRIPT: b"pass\n", "big.bin": bytes(2000)}, method=zipfile.ZIP_STORED)

    with pytest.raises(BundleError, match="more than"):
        check_app_archive(write(tmp_path, data), SCRIPT)


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ("client.py", "Client.py", ("client.py", "Client.py")),
        ("lib/model.py", "LIB/model.py", ("lib/model.py", "LIB/model.py")),
        (
            unicodedata.normalize("NFC", "données.py"),
            unicodedata.normalize("NFD", "données.py"),
            (
                unicodedata.normalize("NFC", "données.py"),
                unicodedata.normalize("NFD", "données.py"),
            ),
        ),
        ("util.py", "util.py", ("util.py",)),
        ("lib", "Lib/model.py", ("lib", "Lib")),  # a file and a folder
    ],
)
def test_names_that_collide_on_some_file_system_are_refused_naming_both(
    tmp_path: Path, first: str, second: str, named: tuple[str, ...]
) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        if SCRIPT not in (first, second):
            zf.writestr(SCRIPT, b"pass\n")
        with pytest.warns(UserWarning) if first == second else contextlib.nullcontext():
            zf.writestr(first, b"A = 1\n")
            zf.writestr(second, b"A = 2\n")
    archive = write(tmp_path, buffer.getvalue())

    with pytest.raises(BundleError) as raised:
        check_app_archive(archive, SCRIPT)

    for name in named:
        assert repr(name) in str(raised.value), raised.value


def test_an_honest_archive_is_checked_and_extracted(tmp_path: Path) -> None:
    archive = write(tmp_path, honest_zip({SCRIPT: PAYLOAD, "lib/util.py": b"X = 1\n"}))

    assert sorted(check_app_archive(archive, SCRIPT)) == [SCRIPT, "lib/util.py"]
    dest = extract_app(archive, tmp_path / "app", SCRIPT)

    assert (dest / SCRIPT).read_bytes() == PAYLOAD
    assert (dest / "lib" / "util.py").read_bytes() == b"X = 1\n"
