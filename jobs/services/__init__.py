"""Writes for jobs, one module a concern: ``submission`` (a job bundle in), ``rounds`` (the
state machine the workers drive), ``participation`` (a site's decision, an abort), ``tasks``
(a site's work on its round tasks) and ``telemetry`` (its metric points and output lines);
``audit`` records who did what. Reads live in ``jobs.selectors``.

Keyword-only, typed, raising ``common.exceptions.DomainError`` subclasses. Celery tasks
(``jobs.tasks``) and API views call these; neither holds job logic of its own.
"""
