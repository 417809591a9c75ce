"""``manage.py poc_setup``: the people and sites a proof of concept on one machine needs.

Used by ``jobs.envs.PocEnv`` on a fresh database: a superuser who administers one project,
an organisation for the sites, every site requested and approved (accepting jobs
automatically), and an API token. Prints one JSON object: the API token, the user's
password, the project's slug and each site's one-time enrolment token. Everything is made
through the same services the API uses, so the audit log reads as if a person had done it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from common.exceptions import DomainError
from sites import services


class Command(BaseCommand):
    help = "Create a PoC project with approved sites; print the tokens as JSON."
    # PocEnv runs it on a database migrated from a checked project; the checks cost ~0.3 s.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", default="poc", help="the project's name")
        parser.add_argument("--sites", required=True, help="site names, comma-separated")
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, **options: Any) -> None:
        names = [n.strip() for n in options["sites"].split(",") if n.strip()]
        if not names:
            raise CommandError("--sites: name at least one site")
        password = secrets.token_urlsafe(12)
        try:
            with transaction.atomic():
                user = get_user_model().objects.create_superuser(
                    username=options["username"], email="", password=password
                )
                project = services.project_create(name=options["project"], created_by=user)
                organization = services.organization_create(
                    project=project, name="PoC sites", created_by=user
                )
                tokens = {}
                for name in names:
                    site = services.site_request(
                        organization=organization,
                        name=name,
                        contact_email=f"admin@{name}.invalid",
                        requested_by=user,
                    )
                    site, tokens[name] = services.site_approve(site=site, approved_by=user)
                    site.auto_accept_jobs = True
                    site.save(update_fields=["auto_accept_jobs"])
                _, api_token = services.api_token_create(user=user, name="PocEnv")
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            json.dumps(
                {
                    "username": user.get_username(),
                    "password": password,
                    "project": project.slug,
                    "api_token": api_token,
                    "enrolment_tokens": tokens,
                }
            )
        )
