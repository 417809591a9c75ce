"""FedProx: FedAvg whose sites add a proximal term that keeps them near the global model.

python job_fedprox.py               # mu 0.01, in SimEnv
python job_fedprox.py --mu 0.1      # --env poc / prod

The recipe hands ``mu`` to every train task in ``meta["fedprox_mu"]``; client.py adds
``PTFedProxLoss(mu)(model, global_model)`` to its loss. ``mu = 0`` is FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import job_tools
import torch
from digits_net import DigitsNet

from jobs.envs import Run
from jobs.recipes import FedProxRecipe


def main(argv: Sequence[str] | None = None) -> Run:
    parser = job_tools.parser(__doc__.splitlines()[0])
    parser.add_argument("--mu", type=float, default=0.01, help="the proximal term's weight")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run
    recipe = FedProxRecipe(
        name="fedprox",
        min_clients=args.sites,
        num_rounds=args.rounds,
        model=DigitsNet(),
        train_script=Path(__file__).with_name("client.py"),
        train_args=job_tools.train_args(args),
        fedprox_mu=args.mu,
    )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    job_tools.report(run)
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
