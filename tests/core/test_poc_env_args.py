"""PocEnv refuses what cannot work before it starts anything."""

from __future__ import annotations

import pytest
import torch

from jobs.envs import PocEnv
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients: must be an integer of at least 1"),
        ({"clients": ["a", "a"]}, "clients: must be a non-empty list of unique site names"),
        ({"num_clients": 2, "clients": ["a"]}, "num_clients: 2 but clients names 1 sites"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PocEnv(**kwargs)


def test_its_redis_database_and_tags_are_its_own() -> None:
    first, second = PocEnv(2, redis_url="redis://example:6390/0", redis_db=7), PocEnv(2)
    assert first.redis_url == "redis://example:6390/7"
    assert first.run_tag != second.run_tag  # its own Celery queue and channel-layer prefix
