"""FedOpt: FedAvg's aggregate, then a server optimizer step (FedAvgM or FedAdam).

python job_fedopt.py                        # FedAvgM: server SGD, lr 1.0, momentum 0.6
python job_fedopt.py --optimizer fedadam    # FedAdam: server lr 0.01, betas (0.9, 0.99), tau 1e-3

The server treats the round's change (global model minus the sites' weighted mean) as a
gradient and steps a real optimizer with it; its momentum or moments are the job's server
state, kept with every round. The sites run the usual script: nothing changes for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import job_tools
import torch
from digits_net import DigitsNet

from jobs.envs import Run
from jobs.recipes import FedOptRecipe

OPTIMIZERS: dict[str, dict[str, Any]] = {
    # NVFlare's FedOptRecipe default (Hsu et al. 2019's FedAvgM).
    "fedavgm": {"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}},
    # Reddi et al. 2021 ("Adaptive Federated Optimization"), their tuned server lr and tau.
    "fedadam": {
        "path": "jobs.aggregation.server_opt.FedAdam",
        "args": {"lr": 1e-2, "betas": (0.9, 0.99), "tau": 1e-3},
    },
}


def main(argv: Sequence[str] | None = None) -> Run:
    parser = job_tools.parser(__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fedavgm")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run
    recipe = FedOptRecipe(
        name=f"fedopt-{args.optimizer}",
        min_clients=args.sites,
        num_rounds=args.rounds,
        model=DigitsNet(),
        train_script=Path(__file__).with_name("client.py"),
        train_args=job_tools.train_args(args),
        optimizer_args=OPTIMIZERS[args.optimizer],
    )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    job_tools.report(run)
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
