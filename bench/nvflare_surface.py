"""What NVFlare's surface costs here: ``flare.log`` and the tracking writers, and FedAvg's
NVFlare options on a round.

1. **Logging.** One SimEnv site logs N records in one round; the script times its own calls
   (the Client API's checks and the frame written to the runtime's socket), and the run's
   wall time covers the runtime reading, checking and storing every record. Rows: SCALAR
   points, SCALARS of 10 names (``SummaryWriter.add_scalars``), and SCALAR points with
   ``add_experiment_tracking(recipe, "tensorboard")`` writing every record to TensorBoard
   event files as it arrives.
2. **Options.** An echo FedAvg round (3 sites, LeNet-5's 61,706 parameters) plain, and with
   ``exclude_vars`` + ``params_transfer_type=DIFF`` + ``stop_cond`` (that never fires) +
   ``aggregation_weights``: the median round, rounds 2..N (round 1 includes start-up).

    .venv/bin/python bench/nvflare_surface.py
"""

from __future__ import annotations

import json
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import md_table, median

from jobs.envs import SimEnv
from jobs.recipes import FedAvgRecipe, add_experiment_tracking

RECORDS = 20_000

LOG_CLIENT = """
import json, sys, time
import client_agent.api as flare
from client_agent.tracking import SummaryWriter

kind, count = sys.argv[1], int(sys.argv[2])
flare.init()
writer = SummaryWriter()
while flare.is_running():
    model = flare.receive()
    started = time.perf_counter()
    for step in range(count):
        if kind == "scalars":
            writer.add_scalars("train", {f"m{i}": step * 0.5 + i for i in range(10)}, step)
        else:
            flare.log("loss", 1.0 / (step + 1), global_step=step)
    seconds = time.perf_counter() - started
    with open("log_seconds.json", "w") as fh:
        json.dump({"seconds": seconds}, fh)
    flare.send(flare.FLModel(params=model.params))
"""

ECHO_CLIENT = """
import client_agent.api as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
"""


def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 120),
        torch.nn.ReLU(),
        torch.nn.Linear(120, 84),
        torch.nn.ReLU(),
        torch.nn.Linear(84, 10),
    )


def log_row(tmp: Path, label: str, kind: str, tracking: bool) -> list[Any]:
    app = tmp / f"app-{label}"
    app.mkdir()
    (app / "client.py").write_text(textwrap.dedent(LOG_CLIENT))
    recipe = FedAvgRecipe(
        name="log-bench",
        min_clients=1,
        num_rounds=1,
        model={"w": torch.zeros(4)},
        train_script=app / "client.py",
        train_args=f"{kind} {RECORDS}",
    )
    if tracking:
        add_experiment_tracking(recipe, "tensorboard")
    started = time.perf_counter()
    run = recipe.execute(SimEnv(num_clients=1, workspace=tmp / label, show_progress=False))
    wall = time.perf_counter() - started
    script_seconds = json.loads(
        (run.workspace / "sites" / "site-1" / "log_seconds.json").read_text()
    )["seconds"]
    points = len(run.metrics.logged())
    return [
        label,
        f"{RECORDS:,}",
        f"{points:,}",
        f"{script_seconds / RECORDS * 1e6:.1f} µs",
        f"{RECORDS / script_seconds:,.0f}",
        f"{wall:.2f} s",
    ]


def round_seconds(tmp: Path, label: str, options: dict[str, Any]) -> float:
    app = tmp / f"echo-{label}"
    app.mkdir()
    (app / "client.py").write_text(textwrap.dedent(ECHO_CLIENT))
    recipe = FedAvgRecipe(
        name="echo",
        min_clients=3,
        num_rounds=21,
        model=lenet(),
        train_script=app / "client.py",
        **options,
    )
    run = recipe.execute(SimEnv(num_clients=3, workspace=tmp / label, show_progress=False))
    return median([r.seconds for r in run.rounds[1:]])


def main() -> None:
    benchlib.print_header(
        "NVFlare's surface: logging and FedAvg's options",
        "flare.log / SummaryWriter through SimEnv, and an echo round with NVFlare's options.",
    )
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rows = [
            log_row(tmp, "SCALAR (flare.log)", "scalar", tracking=False),
            log_row(tmp, "SCALARS ×10 (add_scalars)", "scalars", tracking=False),
            log_row(tmp, "SCALAR + TensorBoard tracking", "scalar", tracking=True),
        ]
        print(
            md_table(["records", "sent", "points stored", "per call", "calls/s", "run wall"], rows)
            + "\n"
        )
        plain = round_seconds(tmp, "plain", {})
        options = round_seconds(
            tmp,
            "options",
            {
                "exclude_vars": r"^0\.",  # the first conv layer stays at the sites
                "params_transfer_type": "DIFF",
                "stop_cond": "accuracy >= 0.99",
                "aggregation_weights": {"site-1": 2.0},
            },
        )
        print(
            md_table(
                ["echo round, 3 sites, 61,706 params", "median s (rounds 2..21)", "× plain"],
                [
                    ["plain FedAvg", f"{plain:.4f}", "1.00"],
                    [
                        "exclude_vars + DIFF + stop_cond + aggregation_weights",
                        f"{options:.4f}",
                        f"{options / plain:.2f}",
                    ],
                ],
            )
        )


if __name__ == "__main__":
    main()
