"""Jobs, rounds, model versions and metrics on the portal.

No models yet: they come with issue 4 (jobs on the portal). The pure federated core in this
package (recipes, envs, workflows, aggregation) imports no Django and never imports this module.
"""
