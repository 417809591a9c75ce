"""PocEnv refuses what cannot work before it starts anything."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
import torch

from jobs.envs import PocEnv
from jobs.envs.poc import PocEnvError
from jobs.recipes import FedAvgRecipe


def test_a_recipe_needing_more_sites_than_the_env_has_is_refused_before_any_start(
    tmp_path,
) -> None:
    (tmp_path / "client.py").write_text("")
    recipe = FedAvgRecipe(
        name="needs-four",
        min_clients=4,
        num_rounds=1,
        model=torch.nn.Linear(2, 1),
        train_script=str(tmp_path / "client.py"),
    )
    env = PocEnv(num_clients=3, workspace=tmp_path / "poc")
    with pytest.raises(ValueError, match="min_clients: the recipe needs 4 sites but PocEnv has 3"):
        recipe.execute(env)
    assert env.processes == {} and not (tmp_path / "poc").exists()


def test_its_redis_database_and_tags_are_its_own() -> None:
    first, second = PocEnv(2, redis_url="redis://example:6390/0", redis_db=7), PocEnv(2)
    assert first.redis_url == "redis://example:6390/7"
    assert first.run_tag != second.run_tag  # its own Celery queue and channel-layer prefix


def test_its_default_workspace_cannot_be_guessed_and_is_never_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first, second = PocEnv(2), PocEnv(2)
    assert first.workspace.parent == second.workspace.parent == tmp_path
    assert first.workspace != second.workspace  # made in the same second
    assert not first.workspace.exists()  # made by start(), not before

    first._make_workspace()
    assert stat.S_IMODE(first.workspace.stat().st_mode) == 0o700
    for folder in ("logs", "sites", "runs"):
        assert stat.S_IMODE((first.workspace / folder).stat().st_mode) == 0o700
    # Someone made the folder first (a guess, a race): PocEnv does not move in.
    second.workspace.mkdir(mode=0o777)
    with pytest.raises(PocEnvError, match="exists already"):
        second._make_workspace()


@pytest.fixture
def usual_umask():
    old = os.umask(0o022)  # what most users have: files 0644 unless made otherwise
    yield
    os.umask(old)


def test_a_given_workspace_is_made_private_and_secrets_are_born_0600(
    tmp_path, monkeypatch, usual_umask
) -> None:
    given = tmp_path / "poc"
    given.mkdir(mode=0o755)
    env = PocEnv(2, workspace=given)
    born: list[int] = []
    real_open = os.open

    def watching_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            born.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching_open)

    env._make_workspace()
    secret = env._secret("secret-key")

    assert stat.S_IMODE(given.stat().st_mode) == 0o700
    assert stat.S_IMODE((given / ".secret-key").stat().st_mode) == 0o600
    assert secret == (given / ".secret-key").read_text()
    assert born == [0o600]  # created with its mode, not chmod-ed after the write
