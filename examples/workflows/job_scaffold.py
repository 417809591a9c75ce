"""SCAFFOLD: FedAvg with control variates that correct each site's drift toward its own data.

python job_scaffold.py              # in SimEnv; --env poc / prod

The server sends its control ``c`` with the global model
(``meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]``); client.py's ``PTScaffoldHelper`` corrects
every SGD step by ``c - c_i`` and sends back the change of its own control ``c_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import job_tools
import torch
from digits_net import DigitsNet

from jobs.envs import Run
from jobs.recipes import ScaffoldRecipe


def main(argv: Sequence[str] | None = None) -> Run:
    args = job_tools.parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run
    recipe = ScaffoldRecipe(
        name="scaffold",
        min_clients=args.sites,
        num_rounds=args.rounds,
        model=DigitsNet(),
        train_script=Path(__file__).with_name("client.py"),
        train_args=job_tools.train_args(args),
    )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    job_tools.report(run)
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
