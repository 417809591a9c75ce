"""Federated evaluation: one checkpoint scored by every site on its own validation data.

python job_fedeval.py --ckpt model.safetensors   # your checkpoint (safetensors or torch.save)
python job_fedeval.py                            # a model trained on site-1's data alone

Without ``--ckpt`` the job first trains a model on site-1's share of the digits, here, the way
that site would before offering its model to the others; the sites' scores then show how it
fares on data it never saw. A global model of another job (``models/best.safetensors`` in its
workspace) is the usual checkpoint. ``run.cross_site_matrix["global"]`` holds each site's
metrics.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import job_tools
import torch
from digits_net import DigitsNet
from skewed_digits import load_site_data
from torch import nn

from jobs.envs import Run
from jobs.recipes import FedEvalRecipe


def train_on_one_site(site: str, num_sites: int, epochs: int, path: Path) -> None:
    """Train a model on ``site``'s data alone and save its ``state_dict`` to ``path``."""
    (x, y), _ = load_site_data(site, num_sites)
    model = DigitsNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    torch.save(model.state_dict(), path)


def main(argv: Sequence[str] | None = None) -> Run:
    parser = job_tools.parser(__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="the checkpoint to evaluate")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="fedeval-") as tmp:
        checkpoint = args.ckpt
        if checkpoint is None:
            checkpoint = Path(tmp, "site-1-alone.pt")
            # As many epochs as the other examples train in all their rounds.
            train_on_one_site("site-1", args.sites, args.rounds * args.epochs, checkpoint)
        recipe = FedEvalRecipe(
            name="fedeval",
            model=DigitsNet(),
            eval_ckpt=checkpoint,
            min_clients=args.sites,
            eval_script=Path(__file__).with_name("client.py"),
            eval_args=job_tools.train_args(args),
        )
    env = job_tools.env_for(args)
    run = recipe.execute(env)
    print(f"status {run.status.value}" + (f": {run.error}" if run.error else ""))
    for site, metrics in sorted(run.cross_site_matrix.get("global", {}).items()):
        print(f"{site}: accuracy {metrics['accuracy']:.3f} on its own validation data")
    job_tools.finish(env, args)
    return run


if __name__ == "__main__":
    main()
