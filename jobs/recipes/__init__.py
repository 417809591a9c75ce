"""Recipes: a federated job described as a Python object, not a config file.

    recipe = FedAvgRecipe(name="hello-pt", min_clients=3, num_rounds=5,
                          model=Net(), train_script="client.py")
    run = recipe.execute(SimEnv(num_clients=3))

A recipe is data. It checks its arguments when it is made, exports a job bundle
(:mod:`jobs.bundle`), and knows nothing of where it runs: the env decides that. The user
selects the workflow by the recipe class: ``FedAvgRecipe``, ``FedOptRecipe``,
``ScaffoldRecipe``, ``FedProxRecipe``, ``CyclicRecipe``, ``FedEvalRecipe``,
``FedAvgRecipeWithHE`` (encrypted sums; ``FedAvgRecipe(..., secure_aggregation=True)`` masks
them instead), and
``add_cross_site_evaluation(recipe)`` after training. ``ServerDP`` is the settings of
server-side DP-FedAvg (``FedAvgRecipe(..., dp=ServerDP(noise_multiplier=1.0))``).

As NVFlare's ``nvflare.recipe`` does, this package also offers the envs (``SimEnv``,
``PocEnv``, ``ProdEnv``) and ``Run``, so that ``from nvflare.recipe import SimEnv,
add_experiment_tracking`` changes only its module name.
"""

from jobs.envs import PocEnv, ProdEnv, Run, SimEnv
from jobs.recipes.base import Recipe, set_per_site_config
from jobs.recipes.cyclic import CyclicRecipe
from jobs.recipes.evaluation import (
    FedEvalRecipe,
    add_cross_site_evaluation,
    add_final_global_evaluation,
)
from jobs.recipes.fedavg import FedAvgRecipe, FedAvgRecipeWithHE, FedProxRecipe
from jobs.recipes.fedopt import FedOptRecipe
from jobs.recipes.numpy import NumpyCrossSiteEvalRecipe, NumpyFedAvgRecipe
from jobs.recipes.scaffold import ScaffoldRecipe
from jobs.recipes.tracking import add_experiment_tracking
from jobs.workflows.dp import ServerDP

__all__ = [
    "CyclicRecipe",
    "FedAvgRecipe",
    "FedAvgRecipeWithHE",
    "FedEvalRecipe",
    "FedOptRecipe",
    "FedProxRecipe",
    "NumpyCrossSiteEvalRecipe",
    "NumpyFedAvgRecipe",
    "PocEnv",
    "ProdEnv",
    "Recipe",
    "Run",
    "ScaffoldRecipe",
    "ServerDP",
    "SimEnv",
    "add_cross_site_evaluation",
    "add_experiment_tracking",
    "add_final_global_evaluation",
    "set_per_site_config",
]
