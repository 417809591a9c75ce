"""``PocEnv``: the whole platform on this machine, in three parts.

- :mod:`jobs.envs.poc.env`: the env itself (``recipe.execute(PocEnv(...))``): its workspace,
  the portal's environment, start and stop in order, the sites' enrolment;
- :mod:`jobs.envs.poc.supervisor`: the processes it starts (portal, worker, agents, fork
  server), each in its own process group, watched and ended;
- :mod:`jobs.envs.poc.template`: the cached set-up (the migrated database and the enrolled
  project) that spares ``migrate`` and ``poc_setup`` on later starts.
"""

from jobs.envs.poc.env import PROJECT_ROOT, PocEnv, PocEnvError

__all__ = ["PROJECT_ROOT", "PocEnv", "PocEnvError"]
