"""Secure aggregation on a real portal, with real agents (PocEnv): masked and encrypted rounds
end where SimEnv's do, bit for bit for masking; the portal stores only masked or encrypted
uploads and their sum; the wire shows no update in the clear."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client_agent.secagg.upload import PROTECTED_TENSOR
from jobs.envs import PocEnv, RunStatus, SimEnv
from jobs.envs.poc.env import _redis_answers
from jobs.recipes import FedAvgRecipe, FedAvgRecipeWithHE
from tests.e2e.test_poc_env import CANARY, SCRIPT, prod

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not _redis_answers("redis://127.0.0.1:6379/0"),
        reason="needs Redis at 127.0.0.1:6379 (make test and CI start one)",
    ),
]

SITES = ["site-1", "site-2", "site-3"]


def secure_recipe(app: Path, kind: str, rounds: int = 2) -> FedAvgRecipe:
    torch.manual_seed(0)
    common: dict[str, Any] = {
        "min_clients": 3,
        "num_rounds": rounds,
        "model": torch.nn.Linear(3, 2),
        "train_script": str(app / "client.py"),
        "train_args": f"{app / 'private.txt'} 0",
        "key_metric": "accuracy",
    }
    if kind == "he":
        return FedAvgRecipeWithHE(name="secure-he", **common)
    return FedAvgRecipe(name="secure-mask", secure_aggregation=True, **common)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("app")
    (folder / "client.py").write_text(SCRIPT)
    (folder / "private.txt").write_text(CANARY)
    return folder


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PocEnv]:
    """One portal with three agents for both kinds (starting one is most of a test's time)."""
    env = PocEnv(
        clients=SITES,
        workspace=tmp_path_factory.mktemp("poc"),
        redis_db=4,
        round_timeout_seconds=60,
        show_progress=False,
        wire_log=True,
    )
    with env.start():
        yield env


@pytest.mark.parametrize("kind", ["masking", "he"])
def test_a_protected_job_on_the_portal_ends_where_simenv_does(
    tmp_path: Path, app: Path, poc: PocEnv, kind: str
) -> None:
    simulated = secure_recipe(app, kind).execute(
        SimEnv(clients=SITES, workspace=tmp_path / "sim", show_progress=False)
    )
    run = secure_recipe(app, kind).execute(prod(poc))
    job_folder = next((poc.workspace / "media").glob(f"jobs/*/{run.job_id}"))
    stored = sorted(job_folder.rglob("updates/*/site-*.safetensors"))

    assert run.status == RunStatus.COMPLETED, run.error
    assert simulated.global_model is not None and run.global_model is not None
    for name, tensor in simulated.global_model.items():
        if kind == "masking":  # the ring sum is exact: the same bits whatever the masks
            assert torch.equal(run.global_model[name], tensor), name
        else:
            assert torch.allclose(run.global_model[name], tensor, atol=1e-5), name
    assert [r.accepted for r in run.rounds] == [SITES, SITES]
    for record in run.rounds:  # as the rounds API gives it, in SimEnv's shape
        assert record.protection["kind"] == kind and record.protection["phase"] == "done"
        assert record.protection["survivors"] == SITES
        assert record.protection["cost"]["extra_bytes_per_site"] > 0

    # What the portal keeps of each site's update: one protected tensor, no weights.
    assert stored, "no stored uploads found"
    for path in stored:
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8 : 8 + header_len])
        assert set(header) - {"__metadata__"} == {PROTECTED_TENSOR}, path
    if kind == "masking":
        # Uniform in the ring: the top 4 bits of every stored masked vector are flat.
        for path in stored:
            data = path.read_bytes()
            header_len = int.from_bytes(data[:8], "little")
            values = np.frombuffer(data[8 + header_len :], dtype="<u8")
            counts = np.bincount((values >> np.uint64(60)).astype(np.int64), minlength=16)
            assert counts.min() > 0 or len(values) < 64, path

    # On the wire: every update a site sent (of both jobs) is the protected tensor alone.
    for site in SITES:
        sent = [json.loads(line) for line in (poc.site_dir(site) / "wire.jsonl").open()]
        updates = [e["safetensors"] for e in sent if "safetensors" in e]
        assert updates and all(set(u) == {PROTECTED_TENSOR} for u in updates), site
        assert not any(CANARY in json.dumps(e) for e in sent)
