"""Where a recipe runs: ``recipe.execute(env)`` is the same call in every env.

- :class:`SimEnv`: simulation on this machine, one process per site, the workflow in-process.
- :class:`PocEnv`: a real portal, Celery worker and one site agent per site, all on this
  machine, started and stopped for you.
- :class:`ProdEnv`: a portal somewhere else, reached with an API token.

Each returns a :class:`Run` with the same fields and NVFlare's ``get_job_id()``,
``get_status()``, ``get_result()`` and ``abort()``; only the env line of a ``job.py`` changes.
A failed SimEnv run raises :class:`RunFailed`, which carries the run.
"""

from jobs.envs.base import (
    NVFLARE_STATUS,
    Env,
    MetricPoint,
    Metrics,
    RoundRecord,
    Run,
    RunFailed,
    RunStatus,
)
from jobs.envs.poc import PocEnv, PocEnvError
from jobs.envs.portal import PortalRun, ProdEnv
from jobs.envs.sim import SimEnv

__all__ = [
    "NVFLARE_STATUS",
    "Env",
    "MetricPoint",
    "Metrics",
    "PocEnv",
    "PocEnvError",
    "PortalRun",
    "ProdEnv",
    "RoundRecord",
    "Run",
    "RunFailed",
    "RunStatus",
    "SimEnv",
]
