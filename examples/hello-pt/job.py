"""hello-pt: FedAvg of a small CNN over three sites' non-IID shares of scikit-learn's digits.

python job.py            # or, from the repository root: make demo
"""

import torch
from model import Net

from jobs.envs import SimEnv
from jobs.recipes import FedAvgRecipe

if __name__ == "__main__":
    torch.manual_seed(0)  # the same initial model every run, so runs can be compared
    recipe = FedAvgRecipe(
        name="hello-pt",
        min_clients=3,
        num_rounds=5,
        model=Net(),
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
        # server holds no data; the sites' metrics are what it knows. Imported here, after
        # the run, so that scikit-learn's import does not delay the sites' start.
        from train import evaluate

        from data import load_data

        final = Net()
        final.load_state_dict(run.global_model)
        *_, x_test, y_test = load_data("site-1")
        print(f"final global model: accuracy {evaluate(final, x_test, y_test):.3f}")
