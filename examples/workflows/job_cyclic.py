"""Cyclic: the sites train one after another, each from the model the previous one sent.

python job_cyclic.py                    # sites in name order, in SimEnv
python job_cyclic.py --order random     # shuffled every pass (seeded); --env poc / prod

A round is one pass of the relay over all the sites; each site's turn is one step of the job
(``run.rounds`` has one record per turn). No averaging: the model the last site sends is the
global model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import job_tools
import torch
from digits_net import DigitsNet

from jobs.envs import Run
from jobs.recipes import CyclicRecipe


def main(argv: Sequence[str] | None = None) -> Run:
    parser = job_tools.parser(__doc__.splitlines()[0])
    parser.add_argument("--order", choices=["fixed", "random"], default="fixed")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle's seed (random)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run
    recipe = CyclicRecipe(
        name="cyclic",
        model=DigitsNet(),
        num_rounds=args.rounds,
        train_script=Path(__file__).with_name("client.py"),
        train_args=job_tools.train_args(args),
        min_clients=args.sites,
        order=args.order,
        seed=args.seed,
    )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    job_tools.report(run)
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
