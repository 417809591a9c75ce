"""hello-dp: hello-pt's FedAvg with DP-SGD (Opacus) inside every site's training script.

python job.py                          # SimEnv, 3 sites, 3 rounds, noise multiplier 1.0
python job.py --target-epsilon 4       # the noise that keeps the whole job within ε = 4
python job.py --env poc                # PocEnv: portal, worker and 3 agents on this machine

Each site's script reports the ε its training examples have spent so far (record-level DP,
``flare.log("privacy/record_epsilon", …)``); this prints it per site and round. The script
uses hello-pt's data and CNN (``../hello-pt/model.py`` and ``data.py`` travel with the job),
with GroupNorm in place of BatchNorm, which DP-SGD cannot use.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from opacus.validators import ModuleValidator
from torch import nn

from jobs.envs import PocEnv, Run, SimEnv
from jobs.recipes import FedAvgRecipe

HERE = Path(__file__).resolve().parent
HELLO_PT = HERE.parent / "hello-pt"
EPSILON_KEY = "privacy/record_epsilon"  # client.py's


def hello_pt(module: str) -> ModuleType:
    """hello-pt's ``model`` or ``data`` module, loaded by path under its own name, so that a
    plain ``import model`` elsewhere in the same process (another example's) is neither
    shadowed nor reused."""
    name = f"hello_pt_{module}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HELLO_PT / f"{module}.py")
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded  # Opacus copies a model by pickling it
        spec.loader.exec_module(loaded)
    return sys.modules[name]


def global_model() -> nn.Module:
    """hello-pt's CNN with Opacus's fix (GroupNorm for BatchNorm), as client.py builds it."""
    model: nn.Module = ModuleValidator.fix(hello_pt("model").Net())
    return model


def test_accuracy(params: dict[str, torch.Tensor]) -> float:
    """A model's accuracy on hello-pt's test split. Only for the demo: a real server holds no
    data; the sites' metrics are what it knows."""
    model = global_model()
    model.load_state_dict(params)
    *_, x_test, y_test = hello_pt("data").load_data("site-1")
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(dim=1) == y_test).float().mean())


def train_args(args: argparse.Namespace) -> str:
    privacy = (
        f"--target-epsilon {args.target_epsilon}"
        if args.target_epsilon is not None
        else f"--noise-multiplier {args.noise_multiplier}"
    )
    samples = f" --samples {args.samples}" if args.samples is not None else ""
    return (
        f"--num-sites {args.sites} --epochs {args.epochs} --lr {args.lr} "
        f"--momentum {args.momentum} {privacy} "
        f"--max-grad-norm {args.max_grad_norm} --delta {args.delta}{samples}"
    )


def main(argv: Sequence[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--env", choices=["sim", "poc"], default="sim")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05, help="the sites' SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="the sites' SGD momentum")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--target-epsilon", type=float, default=None)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--samples", type=int, default=None, help="images per site (≤ 512)")
    parser.add_argument("--workspace", type=Path, help="sim: the folder for the run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--no-serve", action="store_true", help="poc: stop the portal when the job ends"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run, so runs can be compared
    recipe = FedAvgRecipe(
        name="hello-dp",
        min_clients=args.sites,
        num_rounds=args.rounds,
        model=global_model(),
        train_script=HERE / "client.py",
        train_args=train_args(args),
        key_metric="accuracy",
    )
    # hello-pt's data and model, shipped beside client.py: one home for each.
    recipe.add_client_file(HELLO_PT / "model.py")
    recipe.add_client_file(HELLO_PT / "data.py")
    env: SimEnv | PocEnv
    if args.env == "sim":
        env = SimEnv(num_clients=args.sites, workspace=args.workspace, show_progress=not args.quiet)
    else:
        env = PocEnv(
            num_clients=args.sites, keep_running=not args.no_serve, show_progress=not args.quiet
        )
    run = recipe.execute(env)
    print(f"status {run.status.value}" + (f": {run.error}" if run.error else ""))
    print(
        "accuracy of the global model each round started from: "
        + ", ".join(f"{v:.3f}" for _, v in run.metrics.aggregated("accuracy"))
    )
    sites = sorted({p.site for p in run.metrics.logged(EPSILON_KEY) if p.site})
    for site in sites:
        spent = ", ".join(f"{p.value:.2f}" for p in run.metrics.logged(EPSILON_KEY, site))
        print(f"{site}: record-level ε after each round (δ = {args.delta}): {spent}")
    if run.global_model is not None:
        print(f"final global model: accuracy {test_accuracy(run.global_model):.3f}")
    if isinstance(env, PocEnv) and not args.no_serve:
        env.serve_until_interrupted()
    return run


if __name__ == "__main__":
    main()
