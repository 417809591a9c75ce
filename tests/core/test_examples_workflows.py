"""The examples in examples/workflows: each job runs for a round or two in SimEnv and shows
what its workflow does (not how well it learns in so few rounds)."""

from __future__ import annotations

import importlib.util
import math
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from client_agent.fl_model import AlgorithmConstants
from client_agent.wire import load_state_dict, read_model_file
from jobs.envs import Run, RunStatus

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module", autouse=True)
def examples_importable() -> Iterator[None]:
    """The jobs import their neighbours (job_tools, digits_net, skewed_digits) by name."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLES))


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"workflows_example_{name}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def run_job(tmp_path: Path, name: str, *args: str, rounds: int = 1) -> Run:
    argv = ["--sites", "3", "--rounds", str(rounds), "--quiet", "--workspace", str(tmp_path)]
    run: Run = example(name).main([*argv, *args])
    assert run.status == RunStatus.COMPLETED, run.error
    return run


def initial_and_final(run: Run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    final = run.global_model
    assert final is not None
    return load_state_dict(run.workspace / "models" / "initial.safetensors"), final


def largest_change(run: Run) -> float:
    before, after = initial_and_final(run)
    return max(float((after[k] - before[k]).abs().max()) for k in before)


def test_fedavg_median_aggregates_every_site_each_round(tmp_path: Path) -> None:
    run = run_job(tmp_path, "job_fedavg_robust.py", rounds=2)

    assert [sorted(r.accepted) for r in run.rounds] == [SITES, SITES]
    assert run.workspace.name.startswith("fedavg-median-")
    before, after = initial_and_final(run)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert largest_change(run) > 0


def test_fedprox_mu_reaches_the_sites_and_holds_them_near_the_global_model(
    tmp_path: Path,
) -> None:
    # With mu = 0 the sites train plain SGD; a large mu pulls every step back toward the
    # weights received, so one round moves the global model far less. If the script ignored
    # meta["fedprox_mu"] the two runs would give the same model.
    free = run_job(tmp_path / "free", "job_fedprox.py", "--mu", "0")
    held = run_job(tmp_path / "held", "job_fedprox.py", "--mu", "5")

    assert largest_change(held) < 0.5 * largest_change(free)


def test_fedadam_moves_no_weight_further_than_its_server_lr_in_one_round(tmp_path: Path) -> None:
    # Reddi et al.'s FedAdam from m = 0, v = tau²: the first step is
    # lr · 0.1·δ / (sqrt(0.99·tau² + 0.01·δ²) + tau) for a site change δ, under lr in size and
    # close to it wherever |δ| ≫ tau (tau = 1e-3): lr = 0.01 bounds every change.
    run = run_job(tmp_path, "job_fedopt.py", "--optimizer", "fedadam")

    assert 0.009 < largest_change(run) < 0.01


def test_fedavgm_first_round_is_fedavg_and_runs_on(tmp_path: Path) -> None:
    # Momentum starts at zero, so round 1 of FedAvgM (server lr 1) is FedAvg's step; the
    # sites' local steps move weights by far more than FedAdam's 0.01.
    run = run_job(tmp_path, "job_fedopt.py", rounds=2)

    assert [sorted(r.accepted) for r in run.rounds] == [SITES, SITES]
    assert largest_change(run) > 0.02


def test_scaffold_sites_send_controls_and_the_server_control_builds_up(tmp_path: Path) -> None:
    run = run_job(tmp_path, "job_scaffold.py", rounds=2)

    models = run.workspace / "models"
    first = read_model_file(models / "initial.safetensors").meta
    after = read_model_file(models / "round-001.safetensors").meta
    controls_before = first[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]
    controls_after = after[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]
    # c starts at zero; the sites' control changes move it after the first round.
    assert all(float(c.abs().max()) == 0 for c in controls_before.values())
    assert max(float(torch.as_tensor(c).abs().max()) for c in controls_after.values()) > 0
    assert sorted(controls_after) == sorted(
        name for name, _ in example("digits_net.py").DigitsNet().named_parameters()
    )


def test_cyclic_relays_through_every_site_in_order(tmp_path: Path) -> None:
    run = run_job(tmp_path, "job_cyclic.py", rounds=2)

    assert [r.accepted for r in run.rounds] == [["site-1"], ["site-2"], ["site-3"]] * 2
    assert run.rounds[4].label == "round 2, turn 2/3 (site-2)"


def test_fedeval_scores_a_site_1_model_well_only_at_site_1(tmp_path: Path) -> None:
    run = run_job(tmp_path, "job_fedeval.py", rounds=5)  # 10 epochs at site-1

    scores = {site: m["accuracy"] for site, m in run.cross_site_matrix["global"].items()}
    assert sorted(scores) == SITES
    # Site-1's home digits are 0, 3, 6 and 9: a model trained there knows little else.
    assert scores["site-1"] > 0.5
    assert scores["site-1"] > max(scores["site-2"], scores["site-3"]) + 0.3


def test_fedeval_takes_a_checkpoint_file(tmp_path: Path) -> None:
    fedeval = example("job_fedeval.py")
    checkpoint = tmp_path / "zeros.pt"
    weights = {k: torch.zeros_like(v) for k, v in fedeval.DigitsNet().state_dict().items()}
    torch.save(weights, checkpoint)

    run = run_job(tmp_path / "run", "job_fedeval.py", "--ckpt", str(checkpoint))

    # All-zero weights give every image the same logits: argmax picks digit 0 everywhere, so
    # each site's accuracy is its share of zeros: most of site-1's data (0 is its home digit),
    # few of the others'.
    scores = {site: m["accuracy"] for site, m in run.cross_site_matrix["global"].items()}
    (_, _), (_, y_val) = example("skewed_digits.py").load_site_data("site-2", 3)
    assert scores["site-2"] == pytest.approx(float((y_val == 0).float().mean()))
    assert scores["site-1"] > 0.15 > scores["site-2"]


def test_cross_site_matrix_is_complete_and_own_models_win_at_home(tmp_path: Path) -> None:
    run = run_job(tmp_path, "job_cross_site.py", "--epochs", "3")

    matrix = run.cross_site_matrix
    assert sorted(matrix) == ["global"] + [f"site:{s}" for s in SITES]
    for scores in matrix.values():
        assert sorted(scores) == SITES
        assert all(0 <= m["accuracy"] <= 1 for m in scores.values())
    # Skewed labels: each site's own model scores best on that site's own data.
    for site in SITES:
        at_home = matrix[f"site:{site}"][site]["accuracy"]
        assert at_home > max(matrix[f"site:{site}"][s]["accuracy"] for s in SITES if s != site)


def test_experiment_writes_a_table_and_a_plot_with_a_line_per_workflow(tmp_path: Path) -> None:
    experiment = example("experiment.py")
    svg = tmp_path / "plot.svg"

    results = experiment.main(
        [
            "--rounds",
            "2",
            "--epochs",
            "1",
            "--only",
            "FedAvg",
            "--only",
            "Cyclic",
            "--svg",
            str(svg),
        ]
    )

    assert [r.workflow.label for r in results] == ["FedAvg", "Cyclic"]
    for result in results:
        assert len(result.accuracy) == 3  # the initial model and after rounds 1 and 2
        assert all(0 <= a <= 1 and not math.isnan(a) for a in result.accuracy)
    root = ElementTree.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "FedAvg" in texts and "Cyclic" in texts and "test accuracy" in texts


def test_rounds_to_target_is_the_first_round_at_or_above_it() -> None:
    experiment = example("experiment.py")
    workflow = experiment.WORKFLOWS[0]

    reached = experiment.Result(workflow, [0.1, 0.85, 0.9, 0.95], 1.0)
    never = experiment.Result(workflow, [0.1, 0.5], 1.0)

    assert reached.rounds_to(0.9) == 2
    assert never.rounds_to(0.9) is None
    table = experiment.markdown_table([reached, never])
    assert "| FedAvg | weighted mean | 0.950 | 0.950 | 2 | 1.0 |" in table
    assert "| FedAvg | weighted mean | 0.500 | 0.500 | — | 1.0 |" in table
