"""FedAvg, then cross-site evaluation: every site scores every site's model and the global one.

python job_cross_site.py            # in SimEnv; --env poc / prod

After the training rounds each site submits its own model (``flare.is_submit_model()``), then
every site scores each of them and the final global model on its own validation data
(``flare.is_evaluate()``). ``run.cross_site_matrix[model][site]`` holds the scores; the portal's
job page shows them as a heat map. With skewed labels a site's own model scores well at home
and badly elsewhere; the global model does well everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import job_tools
import torch
from digits_net import DigitsNet

from jobs.envs import Run
from jobs.recipes import FedAvgRecipe, add_cross_site_evaluation


def print_matrix(run: Run) -> None:
    """The accuracy matrix, models down, sites across."""
    matrix = run.cross_site_matrix
    sites = sorted({site for scores in matrix.values() for site in scores})
    print("cross-site accuracy (rows: models, columns: the sites that scored them)")
    print(f"{'':>14} " + " ".join(f"{site:>7}" for site in sites))
    for model, scores in matrix.items():
        cells = (f"{scores[s]['accuracy']:7.3f}" if s in scores else f"{'—':>7}" for s in sites)
        print(f"{model:>14} " + " ".join(cells))


def main(argv: Sequence[str] | None = None) -> Run:
    args = job_tools.parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)  # the same initial model every run
    recipe = add_cross_site_evaluation(
        FedAvgRecipe(
            name="fedavg-cross-site",
            min_clients=args.sites,
            num_rounds=args.rounds,
            model=DigitsNet(),
            train_script=Path(__file__).with_name("client.py"),
            train_args=job_tools.train_args(args),
        )
    )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    job_tools.report(run, training_rounds=args.rounds)  # then the evaluation rounds
    print_matrix(run)
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
