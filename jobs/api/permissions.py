"""Who may call the jobs API: the same answers, in the same order, as the sites API
(``sites.api.permissions``, whose ``IsPerson``, ``IsSiteAgent`` and ``require`` the views use),
so that existence never leaks:

1. No credentials, or credentials of the wrong kind: **401**. People's endpoints take an API
   token or a session; agents' endpoints take only a signed request, so a person cannot call
   an agent endpoint and a site agent cannot call a people endpoint.
2. A project or job the caller cannot see (another project's; for a site, a job it does not
   take part in): **404**, the same answer as for one that does not exist.
3. A job the caller can see but may not act on: **403**, with the message below saying who may.

The rules themselves are the ``can_*`` helpers in ``jobs.selectors``.
"""

ONLY_SUBMITTERS = "only the project's leads and project admins submit jobs"
ONLY_MANAGERS = "only a project admin, or the lead who submitted the job, may abort it"
ONLY_LABELLERS = "only a project admin, or the lead who submitted the job, may label it"
ONLY_SITE_ADMINS = "only an org admin of the site's organisation, or a project admin, decides"
