"""Sites and their enrolment decisions, and the certificates their agents hold."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response

from fedportal.api_views import errors, parse
from sites import conf, selectors, services
from sites.api import serializers as s
from sites.api.permissions import require
from sites.api.views._base import (
    ONLY_ORG_ADMIN,
    ONLY_PROJECT_ADMIN,
    ProjectScopedView,
    shown_once,
)
from sites.models import Certificate, Site
from sites.secret_tokens import hash_secret

# --- sites -------------------------------------------------------------------------------------


def _enrolment(request: Request, site: Site, token: str, expires_at: Any) -> dict[str, Any]:
    """The one-time token with the exact command that enrols the site with it."""
    command = conf.enrol_command(request, token)
    return {
        "site": site,
        "enrolment": {"token": token, "expires_at": expires_at, "command": command},
    }


class SiteScopedView(ProjectScopedView[Site]):
    serializer_class = s.SiteSerializer

    def get_queryset(self) -> QuerySet[Site]:
        return selectors.sites_visible_to(self.request.user, project=self.get_project())


@extend_schema(tags=["sites"])
@extend_schema_view(get=extend_schema(parameters=[s.SiteQuerySerializer]))
class SiteListView(SiteScopedView, generics.ListAPIView[Site]):
    def get_queryset(self) -> QuerySet[Site]:
        query = self.query(s.SiteQuerySerializer)
        qs = selectors.sites_visible_to(
            self.request.user, project=self.get_project(), state=query.get("state")
        )
        if "organization" in query:
            qs = qs.filter(organization_id=query["organization"])
        return qs

    @extend_schema(
        request=s.SiteRequestSerializer,
        responses={201: s.SiteSerializer, **errors(400, 403, 404, 409)},
        description="An org admin asks for a site in their organisation; a project admin then "
        "approves or denies it.",
    )
    def post(self, request: Request, project: str) -> Response:
        self.require_manager()
        data = parse(s.SiteRequestSerializer, request.data, project=self.get_project())
        require(selectors.can_request_site(request.user, data["organization"]), ONLY_ORG_ADMIN)
        site = services.site_request(
            **data, requested_by=self.person, source_address=self.source_address
        )
        return Response(self.get_serializer(site).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["sites"])
class SiteDetailView(SiteScopedView, generics.RetrieveAPIView[Site]):
    @extend_schema(
        request=s.SiteUpdateSerializer,
        responses={200: s.SiteSerializer, **errors(400, 403, 404, 409)},
    )
    def patch(self, request: Request, project: str, pk: int) -> Response:
        site = self.get_object()
        require(selectors.can_manage_site(request.user, site), ONLY_ORG_ADMIN)
        data = parse(s.SiteUpdateSerializer, request.data)
        site = services.site_update(
            site=site, updated_by=self.person, source_address=self.source_address, **data
        )
        return Response(self.get_serializer(site).data)


@extend_schema(tags=["sites"])
class SiteApproveView(SiteScopedView):
    @extend_schema(
        request=None,
        responses={200: s.SiteEnrolmentSerializer, **errors(403, 404, 409)},
        description="Approve a requested site. The response shows its one-time enrolment token "
        "and the command to run at the site; neither is shown again.",
    )
    def post(self, request: Request, project: str, pk: int) -> Response:
        site = self.get_object()
        require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
        site, token = services.site_approve(
            site=site, approved_by=self.person, source_address=self.source_address
        )
        expires_at = site.enrolment_tokens.get(token_hash=hash_secret(token)).expires_at
        body = _enrolment(request, site, token, expires_at)
        return shown_once(s.SiteEnrolmentSerializer(body).data)


@extend_schema(tags=["sites"])
class SiteDenyView(SiteScopedView):
    @extend_schema(
        request=s.ReasonSerializer, responses={200: s.SiteSerializer, **errors(400, 403, 404, 409)}
    )
    def post(self, request: Request, project: str, pk: int) -> Response:
        site = self.get_object()
        require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
        data = parse(s.ReasonSerializer, request.data)
        site = services.site_deny(
            site=site, denied_by=self.person, source_address=self.source_address, **data
        )
        return Response(self.get_serializer(site).data)


@extend_schema(tags=["sites"])
class SiteEnrolmentTokenView(SiteScopedView):
    @extend_schema(
        request=None,
        responses={201: s.SiteEnrolmentSerializer, **errors(403, 404, 409)},
        description="A new one-time enrolment token for an approved or enrolled site (e.g. to "
        "enrol again with a new key); earlier unused tokens stop working.",
    )
    def post(self, request: Request, project: str, pk: int) -> Response:
        site = self.get_object()
        require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
        token, plaintext = services.enrolment_token_reissue(
            site=site, issued_by=self.person, source_address=self.source_address
        )
        body = _enrolment(request, token.site, plaintext, token.expires_at)
        return shown_once(s.SiteEnrolmentSerializer(body).data, status.HTTP_201_CREATED)


@extend_schema(tags=["sites"])
class SiteRevokeView(SiteScopedView):
    @extend_schema(
        request=s.ReasonSerializer,
        responses={200: s.SiteSerializer, **errors(400, 403, 404, 409)},
        description="Withdraw an enrolled site for good; its certificates are revoked with it.",
    )
    def post(self, request: Request, project: str, pk: int) -> Response:
        site = self.get_object()
        require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
        data = parse(s.ReasonSerializer, request.data)
        site = services.site_revoke(
            site=site, revoked_by=self.person, source_address=self.source_address, **data
        )
        return Response(self.get_serializer(site).data)


# --- certificates ------------------------------------------------------------------------------


class CertificateScopedView(ProjectScopedView[Certificate]):
    serializer_class = s.CertificateSerializer

    def get_queryset(self) -> QuerySet[Certificate]:
        return selectors.certificates_visible_to(self.request.user, project=self.get_project())


@extend_schema(tags=["certificates"])
@extend_schema_view(get=extend_schema(parameters=[s.CertificateQuerySerializer]))
class CertificateListView(CertificateScopedView, generics.ListAPIView[Certificate]):
    def get_queryset(self) -> QuerySet[Certificate]:
        query = self.query(s.CertificateQuerySerializer)
        qs = selectors.certificates_visible_to(
            self.request.user, project=self.get_project(), revoked=query.get("revoked")
        )
        if "site" in query:
            qs = qs.filter(site_id=query["site"])
        return qs


@extend_schema(tags=["certificates"])
class CertificateDetailView(CertificateScopedView, generics.RetrieveAPIView[Certificate]):
    pass


@extend_schema(tags=["certificates"])
class CertificateRevokeView(CertificateScopedView):
    @extend_schema(
        request=s.ReasonSerializer,
        responses={200: s.CertificateSerializer, **errors(400, 403, 404, 409)},
        description="Revoke one certificate; the agent using it is refused from its next request.",
    )
    def post(self, request: Request, project: str, pk: int) -> Response:
        certificate = self.get_object()
        require(selectors.can_decide_site(request.user, certificate.site), ONLY_PROJECT_ADMIN)
        data = parse(s.ReasonSerializer, request.data)
        certificate = services.certificate_revoke(
            certificate=certificate,
            revoked_by=self.person,
            source_address=self.source_address,
            **data,
        )
        return Response(self.get_serializer(certificate).data)
