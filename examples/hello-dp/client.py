"""hello-pt's client trained with DP-SGD (Opacus): record-level differential privacy.

Every optimizer step clips each training example's gradient to ``--max-grad-norm`` and adds
Gaussian noise of standard deviation ``--noise-multiplier`` × that norm to their sum; batches
are drawn by Poisson sampling (each example in a batch with probability batch size / site
size), which is what Opacus's accountant assumes. One ``PrivacyEngine`` serves the whole job,
so its accountant carries every round's steps and the ε it reports after round r is what
rounds 1 … r have spent together. The script reports it with ``flare.log`` under
``privacy/record_epsilon``, as NVFlare's hello-dp does.

This protects each training example at this site, and it is the data scientist's choice: the
script does it. What leaves the site as a whole (the site-level privacy a site admin sets in
``privacy.toml``) is the agent's business, enforced whether or not the script does this.

``model.py`` and ``data.py`` are hello-pt's, shipped beside this script by ``job.py``.
"""

import argparse

import torch
from model import Net  # hello-pt's
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import client_agent.api as flare
from data import load_data  # hello-pt's, shipped beside this script by job.py

EPSILON_KEY = "privacy/record_epsilon"
NOISE_KEY = "privacy/record_noise_multiplier"


def dp_net() -> nn.Module:
    """hello-pt's CNN as DP-SGD needs it: BatchNorm mixes the examples of a batch, so one
    example's gradient is not its own; Opacus puts GroupNorm in its place. ``job.py`` builds
    the global model the same way, so the tensor names match."""
    model: nn.Module = ModuleValidator.fix(Net())
    return model


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int
) -> int:
    """``epochs`` passes of DP-SGD; returns the number of optimizer steps taken."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-sites", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32, help="the expected batch size")
    parser.add_argument(
        "--samples", type=int, default=None, help="train on this many of the site's images"
    )
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clip")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="instead of --noise-multiplier: the noise that keeps the whole job within this ε",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    flare.init()
    site = flare.get_site_name()
    x_train, y_train, x_test, y_test = load_data(site, args.num_sites)
    if args.samples is not None:
        x_train, y_train = x_train[: args.samples], y_train[: args.samples]
    net = dp_net()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=args.momentum
    )
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size)
    engine = PrivacyEngine(accountant="rdp")
    model: nn.Module | None = None  # net wrapped by Opacus (GradSampleModule), from round 1
    while flare.is_running():
        received = flare.receive()
        if received is None:  # the job ended while we waited
            break
        # Weights go in and out through ``net``, not the wrapper: the wrapper names every
        # tensor "_module.<name>", which the global model does not know.
        net.load_state_dict(received.params)
        accuracy = evaluate(net, x_test, y_test)
        if model is None:
            # Once for the whole job: a new engine each round would start its accountant at
            # zero and report one round's ε as if it were the job's.
            net.train()  # Opacus checks the module in training mode
            if args.target_epsilon is not None:
                rounds = received.total_rounds or 1
                model, optimizer, loader = engine.make_private_with_epsilon(
                    module=net,
                    optimizer=optimizer,
                    data_loader=loader,
                    target_epsilon=args.target_epsilon,
                    target_delta=args.delta,
                    epochs=args.epochs * rounds,
                    max_grad_norm=args.max_grad_norm,
                )
            else:
                model, optimizer, loader = engine.make_private(
                    module=net,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=args.noise_multiplier,
                    max_grad_norm=args.max_grad_norm,
                    poisson_sampling=True,
                )
        steps = train(model, optimizer, loader, args.epochs)
        epsilon = engine.get_epsilon(args.delta)
        flare.log(EPSILON_KEY, epsilon, global_step=received.current_round)
        noise = float(getattr(optimizer, "noise_multiplier", 0.0))  # Opacus's DPOptimizer's
        flare.log(NOISE_KEY, noise, global_step=received.current_round)
        print(
            f"{site}: accuracy {accuracy:.3f} before {steps} DP-SGD steps; "
            f"ε = {epsilon:.3f} at δ = {args.delta} so far"
        )
        flare.send(
            flare.FLModel(
                params=net.state_dict(),
                metrics={"accuracy": accuracy},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )


if __name__ == "__main__":
    main()
