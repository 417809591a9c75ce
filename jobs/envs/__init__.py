"""Where a recipe runs: ``recipe.execute(env)`` is the same call in every env.

- :class:`SimEnv`: simulation on this machine, one process per site, the workflow in-process.
- :class:`PocEnv`: a real portal, Celery worker and one site agent per site, all on this
  machine, started and stopped for you.
- :class:`ProdEnv`: a portal somewhere else, reached with an API token.

Each returns a :class:`Run` with the same fields; only the env line of a ``job.py`` changes.
"""

from jobs.envs.base import Env, MetricPoint, Metrics, RoundRecord, Run, RunStatus
from jobs.envs.poc import PocEnv, PocEnvError
from jobs.envs.portal import PortalRun, ProdEnv
from jobs.envs.sim import SimEnv

__all__ = [
    "Env",
    "MetricPoint",
    "Metrics",
    "PocEnv",
    "PocEnvError",
    "PortalRun",
    "ProdEnv",
    "RoundRecord",
    "Run",
    "RunStatus",
    "SimEnv",
]
