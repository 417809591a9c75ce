"""What the example jobs in this folder share: their command line, the env, the summary.

Every ``job_*.py`` here runs with ``--env sim`` (the default: ``SimEnv``, this process),
``--env poc`` (``PocEnv``: a portal, a worker and the sites' agents on this machine) or
``--env prod`` (``ProdEnv``: your portal, from ``FEDPORTAL_URL``, ``FEDPORTAL_TOKEN``,
``FEDPORTAL_PROJECT`` or ``~/.fedportal/credentials.json``). Only the env differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from jobs.envs import Env, PocEnv, ProdEnv, Run, SimEnv

DEFAULT_SITES = 5
DEFAULT_ROUNDS = 10


def parser(description: str) -> argparse.ArgumentParser:
    """The options every example job takes; a job adds its own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    parser.add_argument("--sites", type=int, default=DEFAULT_SITES, help="how many sites")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="training rounds")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument(
        "--no-serve", action="store_true", help="poc: stop the portal when the job ends"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--workspace", type=Path, help="sim: the folder for the run (default: a temporary one)"
    )
    return parser


def train_args(args: argparse.Namespace) -> str:
    """The client script's arguments: how the digits are split, the local epochs."""
    return f"--num-sites {args.sites} --epochs {args.epochs}"


def env_for(args: argparse.Namespace) -> Env:
    if args.env == "sim":
        return SimEnv(
            num_clients=args.sites, workspace=args.workspace, show_progress=not args.quiet
        )
    if args.env == "poc":
        # Stays up afterwards to look at the job in the browser, unless --no-serve.
        return PocEnv(
            num_clients=args.sites, keep_running=not args.no_serve, show_progress=not args.quiet
        )
    return ProdEnv()


def test_accuracy(params: dict[str, torch.Tensor]) -> float:
    """The accuracy of a model on the balanced held-out split that no site holds.

    Only for the demo: a real server holds no data; the sites' metrics are what it knows.
    Imported here, after the run, so that scikit-learn's import does not delay the sites.
    """
    from digits_net import DigitsNet, accuracy
    from skewed_digits import load_test_data

    model = DigitsNet()
    model.load_state_dict(params)
    return float(accuracy(model, *load_test_data()))


def report(run: Run, training_rounds: int | None = None) -> None:
    """Print what the run did: its status, the accuracy by round (the first
    ``training_rounds`` only, when evaluation rounds follow), the final model's score."""
    print(f"status {run.status.value}" + (f": {run.error}" if run.error else ""))
    by_round = run.metrics.aggregated("accuracy")
    if training_rounds is not None:
        by_round = [(number, value) for number, value in by_round if number < training_rounds]
    if by_round:
        print(
            "sites' mean validation accuracy of the model each round (Cyclic: each turn) "
            "started from: " + ", ".join(f"{value:.3f}" for _, value in by_round)
        )
    final = run.global_model
    if final is not None:
        print(f"final global model: accuracy {test_accuracy(final):.3f} on the held-out digits")


def finish(env: Env, args: argparse.Namespace) -> None:
    """In PocEnv, keep the portal up to look at the job (Ctrl-C ends it)."""
    if isinstance(env, PocEnv) and not args.no_serve:
        env.serve_until_interrupted()
