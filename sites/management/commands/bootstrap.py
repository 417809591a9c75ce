"""``manage.py bootstrap``: the first superuser and, optionally, the first project.

Idempotent: it creates what is missing and nothing else, so a deployment script may run it on
every start. A second run changes nothing and says so. It never changes an existing user's
password, and refuses to promote an existing non-superuser (do that knowingly, in the admin).
"""

from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from common.exceptions import DomainError
from sites import services
from sites.models import Membership, Project, Role

PASSWORD_ENV = "FEDPORTAL_BOOTSTRAP_PASSWORD"


class Command(BaseCommand):
    help = (
        "Create the first superuser (and with --project, a project they administer). "
        f"The password comes from --password or, better (it stays out of `ps`), {PASSWORD_ENV}. "
        "Safe to run again: existing objects are left as they are."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", required=True)
        parser.add_argument("--email", required=True)
        parser.add_argument("--password", help=f"default: ${PASSWORD_ENV}")
        parser.add_argument("--project", help="also create this project, with the user as admin")

    def handle(self, *args: Any, **options: Any) -> None:
        username: str = options["username"]
        email: str = options["email"]
        password: str | None = options["password"] or os.environ.get(PASSWORD_ENV) or None
        project_name: str | None = options["project"]
        done: list[str] = []
        User = get_user_model()
        try:
            with transaction.atomic():
                user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
                if user is None:
                    if not password:
                        raise CommandError(
                            f"user {username!r} does not exist yet: give --password or set "
                            f"{PASSWORD_ENV}"
                        )
                    candidate = User(**{User.USERNAME_FIELD: username, "email": email})
                    try:
                        validate_password(password, user=candidate)
                    except ValidationError as exc:
                        raise CommandError("password refused: " + " ".join(exc.messages)) from exc
                    user = User.objects.create_superuser(
                        username=username, email=email, password=password
                    )
                    done.append(f"created superuser {username!r}")
                elif not user.is_superuser:
                    raise CommandError(
                        f"user {username!r} exists and is not a superuser; bootstrap does not "
                        "promote existing accounts (use the admin or createsuperuser)"
                    )
                if project_name:
                    done += self._ensure_project(project_name, user)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        if done:
            for line in done:
                self.stdout.write(self.style.SUCCESS(line[0].upper() + line[1:] + "."))
        else:
            what = f"superuser {username!r}" + (
                f" and project {project_name!r} (with them as project admin)"
                if project_name
                else ""
            )
            self.stdout.write(f"Nothing to do: {what} exist already. Nothing was changed.")

    def _ensure_project(self, name: str, user: Any) -> list[str]:
        project = Project.objects.filter(name__iexact=name.strip()).first()
        if project is None:
            project = services.project_create(name=name, created_by=user)
            return [f"created project {project.name!r} with {user.get_username()!r} as its admin"]
        host = project.host_organization
        membership = Membership.objects.filter(user=user, organization=host).first()
        if membership is None:
            services.membership_add(
                organization=host, user=user, role=Role.PROJECT_ADMIN, added_by=user
            )
            return [f"made {user.get_username()!r} project admin of {project.name!r}"]
        if membership.role != Role.PROJECT_ADMIN:
            services.membership_update_role(
                membership=membership, role=Role.PROJECT_ADMIN, updated_by=user
            )
            return [f"made {user.get_username()!r} project admin of {project.name!r}"]
        return []
