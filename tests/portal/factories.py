"""factory_boy factories for the sites app. Objects with rules (a project's CA, a site's
state) are made through the services, so tests start from states the portal can reach."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import factory
from django.contrib.auth.models import User
from factory.base import Factory
from factory.declarations import LazyAttribute, LazyFunction, Sequence, SubFactory

from client_agent import signing
from sites import services
from sites.models import Certificate, Membership, Organization, Project, Role, Site


def creator_of(project: Project) -> User:
    """The user who made ``project``, its first project admin. The column is nullable so that
    deleting a user keeps the project; every project made here has its creator."""
    assert project.created_by is not None
    return project.created_by


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = User
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = Sequence(lambda n: f"user{n}")
    email = LazyAttribute(lambda u: f"{u.username}@example.org")
    # Hashed at build time and saved with the row (a post-generation set_password is not saved).
    password = factory.django.Password("pw")


class ProjectFactory(Factory[Project]):
    """A project made by ``project_create``: CA, host organisation, creator as project admin."""

    class Meta:
        model = Project

    name = Sequence(lambda n: f"Project {n}")
    created_by = SubFactory(UserFactory)
    description = ""

    @classmethod
    def _create(cls, model_class: type[Project], *args: Any, **kwargs: Any) -> Project:
        return services.project_create(**kwargs)

    @classmethod
    def _build(cls, model_class: type[Project], *args: Any, **kwargs: Any) -> Project:
        raise TypeError(
            "a project needs its CA, which only create makes: use ProjectFactory.create()"
        )


class OrganizationFactory(Factory[Organization]):
    class Meta:
        model = Organization

    project = SubFactory(ProjectFactory)
    name = Sequence(lambda n: f"Hospital {n}")

    @classmethod
    def _create(cls, model_class: type[Organization], *args: Any, **kwargs: Any) -> Organization:
        project = kwargs["project"]
        return services.organization_create(
            project=project, name=kwargs["name"], created_by=creator_of(project)
        )


class MembershipFactory(factory.django.DjangoModelFactory[Membership]):
    class Meta:
        model = Membership

    user = SubFactory(UserFactory)
    organization = SubFactory(OrganizationFactory)
    role = Role.MEMBER


class SiteFactory(Factory[Site]):
    """A requested site (``site_request``); approve and enrol it with the helpers below."""

    class Meta:
        model = Site

    organization = SubFactory(OrganizationFactory)
    name = Sequence(lambda n: f"site-{n}")
    contact_email = LazyAttribute(lambda s: f"ops@{s.name}.example.org")
    resources = LazyFunction(lambda: {"gpus": 1, "memory_gb": 32})

    @classmethod
    def _create(cls, model_class: type[Site], *args: Any, **kwargs: Any) -> Site:
        organization = kwargs["organization"]
        return services.site_request(
            organization=organization,
            name=kwargs["name"],
            contact_email=kwargs["contact_email"],
            resources=kwargs["resources"],
            requested_by=creator_of(organization.project),
        )


@dataclass
class EnrolledSite:
    """A site as its agent holds it: private key and certificate, ready to sign requests."""

    site: Site
    key: signing.PrivateKey
    certificate: Certificate
    ca_certificate_pem: str

    def headers(self, method: str, path: str, body: bytes = b"", **kwargs: Any) -> dict[str, str]:
        return signing.sign_request(
            key=self.key,
            cert_pem_or_fingerprint=self.certificate.pem,
            method=method,
            path=path,
            body=body,
            **kwargs,
        )


def approved_site(**kwargs: Any) -> tuple[Site, str]:
    """A site approved by its project's creator, and the plaintext enrolment token."""
    site = SiteFactory.create(**kwargs)
    return services.site_approve(site=site, approved_by=creator_of(site.project))


def enrolled_site(key: signing.PrivateKey | None = None, **kwargs: Any) -> EnrolledSite:
    site, token = approved_site(**kwargs)
    key = key or signing.generate_key()
    csr = signing.make_csr(key, site.name, site.project.name)
    enrolment = services.site_enrol(token=token, csr_pem=csr)
    site.refresh_from_db()
    return EnrolledSite(site, key, enrolment.certificate, enrolment.ca_certificate_pem)
