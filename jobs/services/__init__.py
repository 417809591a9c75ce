"""Writes for jobs: submission, the round state machine, site decisions and metrics.

Keyword-only, typed, raising ``common.exceptions.DomainError`` subclasses. Celery tasks
(``jobs.tasks``) and API views call these; neither holds job logic of its own.
"""
