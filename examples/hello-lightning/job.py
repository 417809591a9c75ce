"""hello-lightning: FedAvg of hello-pt's CNN, written as a LightningModule, over three sites.

python job.py
"""

import torch
from model import LitNet

from jobs.envs import SimEnv
from jobs.recipes import FedAvgRecipe

if __name__ == "__main__":
    torch.manual_seed(0)  # the same initial model every run, so runs can be compared
    recipe = FedAvgRecipe(
        name="hello-lightning",
        min_clients=3,
        num_rounds=5,
        model=LitNet(),
        train_script="client.py",
        train_args="--epochs 2",
        key_metric="accuracy",
    )
    run = recipe.execute(SimEnv(num_clients=3))
    print(
        f"status {run.status.value}; accuracy of the global model each round started from: "
        + ", ".join(f"{v:.3f}" for _, v in run.metrics.aggregated("accuracy"))
    )
    if run.global_model is not None:
        # Only for the demo: score the final model on the test split the sites use. A real
        # server holds no data; the sites' metrics are what it knows.
        from data import load_data

        final = LitNet().eval()
        final.load_state_dict(run.global_model)
        *_, x_test, y_test = load_data("site-1")
        with torch.no_grad():
            accuracy = (final(x_test).argmax(dim=1) == y_test).float().mean().item()
        print(f"final global model: accuracy {accuracy:.3f}")
