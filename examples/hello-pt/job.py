"""hello-pt: three hospitals' worth of digits, federated with FedAvg.

python job.py            # or: make demo
"""

from model import Net

from jobs.envs import SimEnv
from jobs.recipes import FedAvgRecipe

if __name__ == "__main__":
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
        f"status {run.status.value}; accuracy by round: "
        + ", ".join(f"{v:.3f}" for _, v in run.metrics.aggregated("accuracy"))
    )
