"""The client script of every example in this folder: one script, every workflow.

It answers the three tasks a workflow may give a site, as NVFlare's scripts do:

- train (``flare.is_train()``): score the received model on this site's validation data, train
  it, send the weights. FedProx's ``mu`` arrives in ``meta["fedprox_mu"]`` (``FedProxRecipe``)
  and adds ``PTFedProxLoss(mu)`` to the loss; SCAFFOLD's server control arrives in
  ``meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]`` (``ScaffoldRecipe``) and ``PTScaffoldHelper``
  corrects every step and sends back the change of this site's control. Other workflows send
  neither, and the script trains plain SGD.
- evaluate (``flare.is_evaluate()``): score the received model, send the metrics only.
- submit_model (``flare.is_submit_model()``): send this site's own model, as last trained
  (cross-site evaluation scores it at every site).

Plain SGD without momentum: SCAFFOLD's correction is derived for it, and one optimizer for every
workflow keeps the comparison in ``experiment.py`` fair.
"""

import argparse
import copy

import torch
from digits_net import DigitsNet, accuracy
from skewed_digits import load_site_data
from torch import nn

import client_agent.api as flare
from client_agent.pt import AlgorithmConstants, PTFedProxLoss, PTScaffoldHelper, get_lr_values


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
    fedprox: PTFedProxLoss | None,
    scaffold: PTScaffoldHelper | None,
) -> int:
    """``args.epochs`` epochs of SGD from the received weights; returns the steps taken."""
    received = copy.deepcopy(model)  # the global model: FedProx's anchor, SCAFFOLD's x
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    if scaffold is not None:
        c_global_para, c_local_para = scaffold.get_params()
    model.train()
    steps = 0
    for _ in range(args.epochs):
        for batch in torch.randperm(len(y), generator=generator).split(args.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            if fedprox is not None:
                loss = loss + fedprox(model, received)
            loss.backward()
            optimizer.step()
            if scaffold is not None:
                lr = get_lr_values(optimizer)[0]
                scaffold.model_update(model, lr, c_global_para, c_local_para)
            steps += 1
    if scaffold is not None:
        lr = get_lr_values(optimizer)[0]
        scaffold.terms_update(model, lr, c_global_para, c_local_para, received)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-sites", type=int, default=5, help="how the digits are split")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    (x_train, y_train), (x_val, y_val) = load_site_data(site, args.num_sites)
    model = DigitsNet()
    generator = torch.Generator().manual_seed(0)  # the same batches in every run
    scaffold: PTScaffoldHelper | None = None
    own_model: dict[str, torch.Tensor] | None = None
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:  # the job ended while we waited
            break
        if flare.is_submit_model():
            if own_model is None:
                raise RuntimeError(f"{site}: asked for its own model before it trained one")
            flare.send(flare.FLModel(params=own_model))
            continue
        if input_model.params is None:
            raise RuntimeError(f"{site}: round {input_model.current_round} sent no model to use")
        model.load_state_dict(input_model.params)
        val_accuracy = accuracy(model, x_val, y_val)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": val_accuracy}))
            continue
        mu = float(input_model.meta.get(AlgorithmConstants.FEDPROX_MU, 0.0))
        global_controls = input_model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        if global_controls is not None:
            if scaffold is None:
                scaffold = PTScaffoldHelper()
                scaffold.init(model)
            scaffold.load_global_controls(global_controls)
        fedprox = PTFedProxLoss(mu) if mu > 0 else None
        this_round_scaffold = scaffold if global_controls is not None else None
        steps = train(model, x_train, y_train, args, generator, fedprox, this_round_scaffold)
        own_model = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        meta: dict[str, object] = {"NUM_STEPS_CURRENT_ROUND": steps}
        if this_round_scaffold is not None:
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = this_round_scaffold.get_delta_controls()
        metrics = {"accuracy": val_accuracy}
        flare.send(flare.FLModel(params=own_model, metrics=metrics, meta=meta))


if __name__ == "__main__":
    main()
