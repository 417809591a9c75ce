"""The endpoints site agents call: the CSR exchange, whoami (a signed heartbeat) and the
site's privacy policy."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from fedportal.api import JSONParser
from fedportal.api_views import errors, parse
from fedportal.throttling import CredentialFailures, EnrolThrottle, client_address
from sites import services
from sites.api import serializers as s
from sites.api.permissions import IsSiteAgent, site_identity
from sites.authentication import SiteSignatureAuthentication
from sites.exceptions import TokenInvalid
from sites.models import Project
from sites.services.privacy import site_privacy_policy_report


# These views have no model: their serializers describe plain bodies, or the request's identity.
class EnrolmentTokenView(generics.GenericAPIView[Any]):
    """An anonymous endpoint that takes a one-time enrolment token: throttled per client
    address, for every request and, more tightly, for unknown tokens (guesses)."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    throttle_classes = [EnrolThrottle, CredentialFailures]

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, TokenInvalid):
            CredentialFailures().record(self.request)
        return super().handle_exception(exc)


@extend_schema(tags=["agent"])
class EnrolView(EnrolmentTokenView):
    """The CSR exchange. No credentials but the one-time token, which the service checks."""

    serializer_class = s.EnrolRequestSerializer

    @extend_schema(
        request=s.EnrolRequestSerializer,
        responses={201: s.EnrolResponseSerializer, **errors(400, 409, 410, 429)},
        auth=[],
        description="The site's agent sends its one-time enrolment token and a CSR made with "
        "its own key; it gets its certificate and the project CA's certificate. A reused, "
        "expired, wrong-project or withdrawn token, a CSR whose subject is not the approved "
        "site, or a malformed CSR are refused with a code naming the cause; nothing changes.",
    )
    def post(self, request: Request) -> Response:
        data = parse(s.EnrolRequestSerializer, request.data)
        slug = data.get("project")
        project = None
        if slug is not None:
            # An unknown slug is answered like another project's, after the token is checked,
            # so that callers without a valid token learn nothing about which projects exist.
            project = Project.objects.filter(slug=slug).first() or Project(name=slug)
        enrolment = services.site_enrol(
            token=data["token"],
            csr_pem=data["csr_pem"],
            project=project,
            source_address=client_address(request),
        )
        body = s.EnrolResponseSerializer(enrolment).data
        return Response(body, status=status.HTTP_201_CREATED)


@extend_schema(tags=["agent"])
class EnrolCheckView(EnrolmentTokenView):
    """Which site a one-time enrolment token is for, without using it up."""

    serializer_class = s.EnrolCheckRequestSerializer

    @extend_schema(
        request=s.EnrolCheckRequestSerializer,
        responses={200: s.EnrolCheckResponseSerializer, **errors(400, 409, 410, 429)},
        auth=[],
        description="The agent's first step of `enrol`: it learns the site's and project's "
        "names, which its CSR's subject must carry. The token stays usable; an unknown, used, "
        "expired or withdrawn token is refused with the same codes as the enrolment itself.",
    )
    def post(self, request: Request) -> Response:
        data = parse(s.EnrolCheckRequestSerializer, request.data)
        site = services.enrolment_token_check(token=data["token"])
        return Response(s.EnrolCheckResponseSerializer(site).data)


@extend_schema(tags=["agent"])
class WhoamiView(generics.GenericAPIView[Any]):
    """For agents: which site the signed request proves, and a heartbeat (every verified
    signed request updates ``last_heartbeat``)."""

    authentication_classes = [SiteSignatureAuthentication]
    permission_classes = [IsSiteAgent]
    serializer_class = s.WhoamiSerializer

    @extend_schema(responses={200: s.WhoamiSerializer, **errors()})
    def get(self, request: Request) -> Response:
        return Response(self.get_serializer(site_identity(request)).data)


@extend_schema(tags=["agent"])
class AgentPrivacyPolicyView(generics.GenericAPIView[Any]):
    """The privacy policy the site's agent enforces (its ``privacy.toml``), and what the
    project has spent at the site by its ledger: reported by the agent after it connects and
    whenever it changes; read back with GET. The portal never changes it."""

    authentication_classes = [SiteSignatureAuthentication]
    permission_classes = [IsSiteAgent]
    parser_classes = [JSONParser]
    serializer_class = s.SitePrivacySerializer

    @extend_schema(responses={200: s.SitePrivacySerializer, **errors()})
    def get(self, request: Request) -> Response:
        return Response(s.SitePrivacySerializer(site_identity(request).site).data)

    @extend_schema(
        request=s.PrivacyPolicyReportSerializer,
        responses={200: s.SitePrivacySerializer, **errors(400)},
        description="A policy that the agent itself would refuse (an impossible value, an "
        "unknown field), or a history entry out of range, is a 400 whose `field` names it "
        "(`policy.budget.delta`, `project_history[2][1]`); nothing is stored. A policy whose "
        "SHA-256 differs from the stored one is recorded in the audit log.",
    )
    def post(self, request: Request) -> Response:
        data = parse(s.PrivacyPolicyReportSerializer, request.data)
        site = site_privacy_policy_report(
            site=site_identity(request).site,
            policy=data["policy"],
            project_history=data.get("project_history", []),
            project_epsilon=data.get("project_epsilon"),
            source_address=client_address(request),
        )
        return Response(s.SitePrivacySerializer(site).data)
