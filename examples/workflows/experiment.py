"""The non-IID experiment: every workflow with the same budget on strongly skewed digits.

python experiment.py                        # table on stdout, plot in docs/workflows-experiment.svg
python experiment.py --rounds 10 --svg /tmp/plot.svg

Five sites each hold mostly two digits (``skewed_digits.py``). Every workflow gets the same
initial model (seed 0), the same client script and optimizer (plain SGD, ``--lr``, batch 32),
the same number of rounds and local epochs, in ``SimEnv``: each site trains ``--epochs`` epochs
once per round, in Cyclic too (a round there is one pass of the relay over the five sites).
After each round the global model is scored on a balanced held-out split that no site holds.

The shared settings were chosen for FedAvg alone, before the other workflows ran: of the sites'
learning rates 0.05, 0.1 and 0.2 with 1 or 2 local epochs, 0.1 with 2 epochs is the smallest
that takes FedAvg to 0.9 within 50 rounds. The workflows' own settings are their defaults or
the literature's (see ``WORKFLOWS``).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from digits_net import DigitsNet, accuracy
from skewed_digits import load_test_data

from client_agent.wire import load_state_dict
from jobs.envs import RunStatus, SimEnv
from jobs.envs.base import model_file_name
from jobs.recipes import (
    CyclicRecipe,
    FedAvgRecipe,
    FedOptRecipe,
    FedProxRecipe,
    Recipe,
    ScaffoldRecipe,
)

HERE = Path(__file__).resolve().parent
NUM_SITES = 5
TARGET_ACCURACY = 0.9

# FedAdam as Reddi et al. 2021 ("Adaptive Federated Optimization") tuned it: server lr η = 1e-2,
# β1 = 0.9, β2 = 0.99, τ = 1e-3.
FEDADAM_ARGS = {
    "path": "jobs.aggregation.server_opt.FedAdam",
    "args": {"lr": 1e-2, "betas": (0.9, 0.99), "tau": 1e-3},
}
# FedAvgM as NVFlare's FedOptRecipe defaults to it: server SGD, lr 1.0, momentum 0.6.
FEDAVGM_ARGS = {"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}
FEDPROX_MU = 0.01  # NVFlare's default; Li et al. 2020 searched 0.001–1


@dataclass(frozen=True)
class Workflow:
    label: str
    make: Callable[..., Recipe]
    """``make(name=, model=, num_rounds=, train_script=, train_args=)`` → the recipe."""
    settings: str


def _common(**kwargs: Any) -> dict[str, Any]:
    return {"min_clients": NUM_SITES, **kwargs}


WORKFLOWS = [
    Workflow("FedAvg", lambda **kw: FedAvgRecipe(**_common(**kw)), "weighted mean"),
    Workflow(
        "FedProx",
        lambda **kw: FedProxRecipe(**_common(**kw), fedprox_mu=FEDPROX_MU),
        f"mu = {FEDPROX_MU}",
    ),
    Workflow(
        "SCAFFOLD", lambda **kw: ScaffoldRecipe(**_common(**kw)), "control variates, option II"
    ),
    Workflow(
        "FedOpt (FedAdam)",
        lambda **kw: FedOptRecipe(**_common(**kw), optimizer_args=FEDADAM_ARGS),
        "server lr 0.01, betas (0.9, 0.99), tau 0.001",
    ),
    Workflow(
        "FedOpt (FedAvgM)",
        lambda **kw: FedOptRecipe(**_common(**kw), optimizer_args=FEDAVGM_ARGS),
        "server SGD lr 1.0, momentum 0.6",
    ),
    Workflow(
        "Cyclic",
        lambda **kw: CyclicRecipe(**kw, min_clients=NUM_SITES, order="fixed"),
        "fixed order",
    ),
    Workflow(
        "FedAvg, median",
        lambda **kw: FedAvgRecipe(**_common(**kw), aggregator="median"),
        "coordinate-wise median",
    ),
]


@dataclass
class Result:
    workflow: Workflow
    accuracy: list[float]
    """The global model's test accuracy after 0, 1, … rounds (index 0: the initial model)."""
    seconds: float

    def rounds_to(self, target: float) -> int | None:
        return next((r for r, a in enumerate(self.accuracy) if a >= target), None)


def run_workflow(workflow: Workflow, args: argparse.Namespace, workspace: Path) -> Result:
    torch.manual_seed(0)  # the same initial model for every workflow
    recipe = workflow.make(
        name="experiment-" + "".join(c if c.isalnum() else "-" for c in workflow.label.lower()),
        model=DigitsNet(),
        num_rounds=args.rounds,
        train_script=HERE / "client.py",
        train_args=f"--num-sites {NUM_SITES} --epochs {args.epochs} --lr {args.lr}",
    )
    started = time.perf_counter()
    run = recipe.execute(SimEnv(num_clients=NUM_SITES, workspace=workspace, show_progress=False))
    seconds = time.perf_counter() - started
    if run.status != RunStatus.COMPLETED:
        raise SystemExit(f"{workflow.label}: {run.status.value}: {run.error}")
    # A driver round is a round of every workflow but Cyclic, where it is one site's turn.
    turns_per_round = len(run.rounds) // args.rounds
    x_test, y_test = load_test_data()
    model = DigitsNet()
    curve = []
    for completed in range(args.rounds + 1):
        path = run.workspace / "models" / model_file_name(completed * turns_per_round)
        model.load_state_dict(load_state_dict(path))
        curve.append(accuracy(model, x_test, y_test))
    return Result(workflow, curve, seconds)


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| workflow | its settings | final accuracy | best accuracy "
        f"| rounds to reach {TARGET_ACCURACY} | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        reached = r.rounds_to(TARGET_ACCURACY)
        lines.append(
            f"| {r.workflow.label} | {r.workflow.settings} | {r.accuracy[-1]:.3f} "
            f"| {max(r.accuracy):.3f} | {'—' if reached is None else reached} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


# -- the plot: an SVG written by hand (no plotting library is installed) ---------------------

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
# Dashes as well as colours, so the lines stay apart in grey print and for colour-blind readers.
DASHES = ["", "6 3", "2 2", "8 3 2 3", "", "6 3", "2 2"]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _x_ticks(last: int) -> list[int]:
    """Round numbers for the x axis: about six, at a round step (1, 2, 5, 10, …)."""
    raw = max(last / 6, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return list(range(0, last + 1, int(step)))


def svg_plot(results: Sequence[Result], title: str, width: int = 760, height: int = 460) -> str:
    """Accuracy by round, one line per workflow, with axes, ticks, labels and a legend."""
    left, right, top, bottom = 60, 200, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    last = max(len(r.accuracy) - 1 for r in results)

    def x(round_number: float) -> float:
        return left + plot_w * round_number / max(last, 1)

    def y(value: float) -> float:
        return top + plot_h * (1 - value)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + plot_w / 2}" y="22" text-anchor="middle" font-size="14">'
        f"{_escape(title)}</text>",
    ]
    for tick in range(0, 11, 2):  # y: accuracy 0, 0.2, …, 1.0, with grid lines
        value = tick / 10
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'stroke="#e5e5e5"/>'
        )
        out.append(
            f'<text x="{left - 8}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.1f}</text>'
        )
    for tick in _x_ticks(last):
        out.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top + plot_h}" '
            f'y2="{top + plot_h + 5}" stroke="black"/>'
        )
        out.append(
            f'<text x="{x(tick):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{tick}</text>'
        )
    out += [
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y(TARGET_ACCURACY):.1f}" '
        f'y2="{y(TARGET_ACCURACY):.1f}" stroke="#999" stroke-dasharray="3 3"/>',
        f'<text x="{left + plot_w - 4}" y="{y(TARGET_ACCURACY) - 4:.1f}" text-anchor="end" '
        f'fill="#777">{TARGET_ACCURACY}</text>',
        f'<path d="M{left},{top} V{top + plot_h} H{left + plot_w}" fill="none" stroke="black"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">'
        "round (global model after it; 0: the initial model)</text>",
        f'<text transform="translate(18 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        "test accuracy</text>",
    ]
    for i, result in enumerate(results):
        colour, dash = COLOURS[i % len(COLOURS)], DASHES[i % len(DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        points = " ".join(f"{x(r):.1f},{y(a):.1f}" for r, a in enumerate(result.accuracy))
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"'
            f"{dash_attr}/>"
        )
        legend_y = top + 10 + 20 * i
        legend_x = left + plot_w + 16
        out.append(
            f'<line x1="{legend_x}" x2="{legend_x + 26}" y1="{legend_y}" y2="{legend_y}" '
            f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
        )
        out.append(
            f'<text x="{legend_x + 32}" y="{legend_y + 4}">{_escape(result.workflow.label)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.1, help="the sites' SGD learning rate")
    parser.add_argument(
        "--svg",
        type=Path,
        default=HERE.parent.parent / "docs" / "workflows-experiment.svg",
        help="where to write the plot",
    )
    parser.add_argument(
        "--only", action="append", help="run only this workflow (its label; repeatable)"
    )
    args = parser.parse_args(argv)
    chosen = [w for w in WORKFLOWS if not args.only or w.label in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="fedportal-experiment-") as tmp:
        for workflow in chosen:
            result = run_workflow(workflow, args, Path(tmp))
            print(
                f"{workflow.label}: final {result.accuracy[-1]:.3f} in {result.seconds:.1f} s",
                flush=True,
            )
            results.append(result)
    print()
    print(
        f"{NUM_SITES} sites, {args.rounds} rounds × {args.epochs} local epoch(s), "
        f"SGD lr {args.lr}, batch 32; test accuracy of the global model on the held-out digits\n"
    )
    print(markdown_table(results))
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"Non-IID digits, {NUM_SITES} sites, {args.rounds} rounds × {args.epochs} local epoch(s)"
    )
    args.svg.write_text(svg_plot(results, title))
    print(f"\nplot: {args.svg}")
    return results


if __name__ == "__main__":
    main()
