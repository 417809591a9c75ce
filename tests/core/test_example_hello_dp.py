"""examples/hello-dp: DP-SGD (Opacus) inside the client script, run small in SimEnv.

The ε each site reports is the accountant's for every step the site has taken since the job
began, so it grows round by round; the weights it sends carry the global model's names even
though Opacus wraps the module ("_module.<name>").
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from client_agent.privacy import accounting
from client_agent.wire import load_state_dict
from jobs.envs import Run, RunStatus

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello-dp"
SITES = ["site-1", "site-2", "site-3"]


def hello_dp_job() -> ModuleType:
    # Under its own name: a plain ``import job`` would collide with the other examples' jobs.
    spec = importlib.util.spec_from_file_location("hello_dp_job", EXAMPLE / "job.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    # 64 images a site in batches of 32: a sample rate of 0.5 and 2 steps an epoch.
    argv = ["--rounds", "2", "--epochs", "1", "--samples", "64", "--noise-multiplier", "1.0"]
    workspace = tmp_path_factory.mktemp("hello-dp")
    run: Run = hello_dp_job().main([*argv, "--quiet", "--workspace", str(workspace)])
    return run


def test_hello_dp_completes_with_every_site_in_every_round(small_run: Run) -> None:
    assert small_run.status == RunStatus.COMPLETED, small_run.error
    assert [sorted(r.accepted) for r in small_run.rounds] == [SITES, SITES]
    assert all(not r.rejected for r in small_run.rounds)


def test_each_site_reports_a_record_level_epsilon_that_grows_every_round(
    small_run: Run,
) -> None:
    for site in SITES:
        points = small_run.metrics.logged("privacy/record_epsilon", site)
        assert [p.step for p in points] == [0, 1], site
        values = [p.value for p in points]
        assert 0 < values[0] < values[1], (site, values)
        # The script's one accountant over all its steps: 2 a round, sample rate 64/32 → 0.5.
        # A new engine each round would report round 1's ε again.
        expected = [accounting.epsilon([(1.0, 0.5, 2 * r)], 1e-5) for r in (1, 2)]
        assert values == pytest.approx(expected, rel=1e-6), site


def test_the_final_model_has_the_global_model_names_not_opacus_wrapper_names(
    small_run: Run,
) -> None:
    final = small_run.global_model
    assert final is not None
    initial = load_state_dict(small_run.workspace / "models" / "initial.safetensors")
    assert sorted(final) == sorted(initial)
    assert not any(name.startswith("_module.") for name in final)
    # GroupNorm stands where hello-pt has BatchNorm: no running statistics travel.
    assert "features.1.running_mean" not in final
    assert any(float((final[k] - initial[k]).abs().max()) > 0 for k in initial)
