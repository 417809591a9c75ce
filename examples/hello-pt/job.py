"""hello-pt: FedAvg of a small CNN over three sites' non-IID shares of scikit-learn's digits.

python job.py              # SimEnv: simulation in this process (make sim)
python job.py --env poc    # PocEnv: portal, worker and 3 agents on this machine (make demo)
python job.py --env prod   # ProdEnv: your portal (FEDPORTAL_URL, FEDPORTAL_TOKEN,
                           #   FEDPORTAL_PROJECT, or ~/.fedportal/credentials.json)

Only the env line differs between the three.
"""

import argparse

import torch
from model import Net

from jobs.envs import PocEnv, ProdEnv, SimEnv
from jobs.recipes import FedAvgRecipe

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    parser.add_argument(
        "--no-serve", action="store_true", help="poc: stop the portal when the job ends"
    )
    args = parser.parse_args()
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
    if args.env == "sim":
        env = SimEnv(num_clients=3)
    elif args.env == "poc":
        env = PocEnv(num_clients=3, keep_running=not args.no_serve)  # stays up to look at
    else:
        env = ProdEnv()
    run = recipe.execute(env)
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
    if isinstance(env, PocEnv) and not args.no_serve:
        env.serve_until_interrupted()
