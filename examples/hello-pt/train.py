"""Plain local training on one site's data: the script a data scientist already trusts.

python train.py --site site-1
"""

import argparse

import torch
from model import Net
from torch import nn

from data import load_data


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, epochs: int) -> int:
    """Train for ``epochs`` epochs; returns the number of optimizer steps taken."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    steps = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(32):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", default="site-1")
    parser.add_argument("--num-sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    torch.manual_seed(0)
    site = args.site
    x_train, y_train, x_test, y_test = load_data(site, args.num_sites)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for _ in range(args.rounds):
        accuracy = evaluate(model, x_test, y_test)
        steps = train(model, optimizer, x_train, y_train, args.epochs)
        print(f"{site}: accuracy {accuracy:.3f} before {steps} steps")
    print(f"{site}: final accuracy {evaluate(model, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
