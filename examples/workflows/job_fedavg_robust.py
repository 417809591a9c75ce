"""FedAvg with a robust aggregator: the coordinate-wise median of the sites' weights.

python job_fedavg_robust.py                            # median, in SimEnv
python job_fedavg_robust.py --aggregator trimmed_mean  # or krum; --env poc / prod

The median (or trimmed mean, or Krum) replaces the weighted mean, so one site sending garbage
cannot drag the global model where it likes. The price: honest sites whose data differ are
partly outvoted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import job_tools
import torch
from digits_net import DigitsNet

from jobs.envs import Run
from jobs.recipes import FedAvgRecipe

# What each robust aggregator needs besides its name: trimmed mean drops this share of the
# values at each end, Krum is told how many sites may be malicious and keeps the best one.
AGGREGATOR_ARGS: dict[str, dict[str, float]] = {
    "median": {},
    "trimmed_mean": {"trim_fraction": 0.2},
    "krum": {"num_malicious": 1, "num_to_keep": 1},
}


def main(argv: Sequence[str] | None = None) -> Run:
    parser = job_tools.parser(__doc__.splitlines()[0])
    parser.add_argument("--aggregator", choices=sorted(AGGREGATOR_ARGS), default="median")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run
    recipe = FedAvgRecipe(
        name=f"fedavg-{args.aggregator.replace('_', '-')}",
        min_clients=args.sites,
        num_rounds=args.rounds,
        model=DigitsNet(),
        train_script=Path(__file__).with_name("client.py"),
        train_args=job_tools.train_args(args),
        aggregator=args.aggregator,
        aggregator_args=AGGREGATOR_ARGS[args.aggregator],
    )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    job_tools.report(run)
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
