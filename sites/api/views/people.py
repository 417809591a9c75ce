"""Projects, organisations, memberships and invitations: the people side of a project."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response

from fedportal.api_views import PersonView, errors, parse
from sites import selectors, services
from sites.api import serializers as s
from sites.api.permissions import require
from sites.api.views._base import (
    ONLY_ORG_ADMIN,
    ONLY_PROJECT_ADMIN,
    ProjectScopedView,
    shown_once,
)
from sites.models import Invitation, Membership, Organization, Project

# --- projects ----------------------------------------------------------------------------------


@extend_schema(tags=["projects"])
class ProjectListView(PersonView[Project], generics.ListAPIView[Project]):
    serializer_class = s.ProjectSerializer

    def get_queryset(self) -> QuerySet[Project]:
        return selectors.projects_visible_to(self.request.user)

    @extend_schema(
        request=s.ProjectCreateSerializer,
        responses={201: s.ProjectSerializer, **errors(400, 403, 409)},
        description="Superusers and users with the `sites.add_project` permission create "
        "projects; the creator becomes project admin.",
    )
    def post(self, request: Request) -> Response:
        require(
            selectors.can_create_project(request.user),
            "creating projects needs a superuser or the sites.add_project permission",
        )
        data = parse(s.ProjectCreateSerializer, request.data)
        project = services.project_create(
            **data, created_by=self.person, source_address=self.source_address
        )
        return Response(self.get_serializer(project).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["projects"])
class ProjectDetailView(ProjectScopedView[Project], generics.RetrieveAPIView[Project]):
    serializer_class = s.ProjectSerializer

    def get_object(self) -> Project:
        return self.get_project()

    @extend_schema(
        request=s.ProjectUpdateSerializer, responses={200: s.ProjectSerializer, **errors(400, 403)}
    )
    def patch(self, request: Request, project: str) -> Response:
        obj = self.get_project()
        require(selectors.is_project_admin(request.user, obj), ONLY_PROJECT_ADMIN)
        data = parse(s.ProjectUpdateSerializer, request.data)
        obj = services.project_update(
            project=obj, updated_by=self.person, source_address=self.source_address, **data
        )
        return Response(self.get_serializer(obj).data)


# --- organisations -----------------------------------------------------------------------------


@extend_schema(tags=["projects"])
class OrganizationListView(ProjectScopedView[Organization], generics.ListAPIView[Organization]):
    serializer_class = s.OrganizationSerializer

    def get_queryset(self) -> QuerySet[Organization]:
        return selectors.organizations_visible_to(self.request.user, project=self.get_project())

    @extend_schema(
        request=s.OrganizationWriteSerializer,
        responses={201: s.OrganizationSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, project: str) -> Response:
        proj = self.get_project()
        require(selectors.is_project_admin(request.user, proj), ONLY_PROJECT_ADMIN)
        data = parse(s.OrganizationWriteSerializer, request.data)
        organization = services.organization_create(
            project=proj, created_by=self.person, source_address=self.source_address, **data
        )
        return Response(self.get_serializer(organization).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["projects"])
class OrganizationDetailView(
    ProjectScopedView[Organization], generics.RetrieveAPIView[Organization]
):
    serializer_class = s.OrganizationSerializer

    def get_queryset(self) -> QuerySet[Organization]:
        return selectors.organizations_visible_to(self.request.user, project=self.get_project())

    @extend_schema(
        request=s.OrganizationWriteSerializer,
        responses={200: s.OrganizationSerializer, **errors(400, 403, 404, 409)},
    )
    def patch(self, request: Request, project: str, pk: int) -> Response:
        organization = self.get_object()
        require(selectors.is_project_admin(request.user, organization.project), ONLY_PROJECT_ADMIN)
        data = parse(s.OrganizationWriteSerializer, request.data)
        organization = services.organization_update(
            organization=organization,
            updated_by=self.person,
            source_address=self.source_address,
            **data,
        )
        return Response(self.get_serializer(organization).data)


# --- memberships -------------------------------------------------------------------------------


@extend_schema(tags=["members"])
@extend_schema_view(get=extend_schema(parameters=[s.MembershipQuerySerializer]))
class MembershipListView(ProjectScopedView[Membership], generics.ListAPIView[Membership]):
    serializer_class = s.MembershipSerializer

    def get_queryset(self) -> QuerySet[Membership]:
        query = self.query(s.MembershipQuerySerializer)
        qs = selectors.memberships_visible_to(self.request.user, project=self.get_project())
        if "organization" in query:
            qs = qs.filter(organization_id=query["organization"])
        return qs

    @extend_schema(
        request=s.MembershipCreateSerializer,
        responses={201: s.MembershipSerializer, **errors(400, 403, 404, 409)},
        description="Project admins give any role; org admins give org_admin, lead or member "
        "in their own organisation. project_admin exists only in the host organisation.",
    )
    def post(self, request: Request, project: str) -> Response:
        self.require_manager()
        data = parse(s.MembershipCreateSerializer, request.data, project=self.get_project())
        require(
            selectors.can_grant_role(request.user, data["organization"], data["role"]),
            f"you may not give the role {data['role']} in {data['organization'].name!r}",
        )
        membership = services.membership_add(
            organization=data["organization"],
            user=data["username"],
            role=data["role"],
            added_by=self.person,
            source_address=self.source_address,
        )
        return Response(self.get_serializer(membership).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["members"])
class MembershipDetailView(ProjectScopedView[Membership], generics.RetrieveAPIView[Membership]):
    serializer_class = s.MembershipSerializer

    def get_queryset(self) -> QuerySet[Membership]:
        return selectors.memberships_visible_to(self.request.user, project=self.get_project())

    @extend_schema(
        request=s.MembershipUpdateSerializer,
        responses={200: s.MembershipSerializer, **errors(400, 403, 404, 409)},
    )
    def patch(self, request: Request, project: str, pk: int) -> Response:
        membership = self.get_object()
        require(selectors.can_manage_membership(request.user, membership), ONLY_ORG_ADMIN)
        data = parse(s.MembershipUpdateSerializer, request.data)
        require(
            selectors.can_grant_role(request.user, membership.organization, data["role"]),
            f"you may not give the role {data['role']} in {membership.organization.name!r}",
        )
        membership = services.membership_update_role(
            membership=membership,
            role=data["role"],
            updated_by=self.person,
            source_address=self.source_address,
        )
        return Response(self.get_serializer(membership).data)

    @extend_schema(responses={204: None, **errors(403, 404, 409)})
    def delete(self, request: Request, project: str, pk: int) -> Response:
        membership = self.get_object()
        require(selectors.can_manage_membership(request.user, membership), ONLY_ORG_ADMIN)
        services.membership_remove(
            membership=membership, removed_by=self.person, source_address=self.source_address
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- invitations -------------------------------------------------------------------------------


class InvitationScopedView(ProjectScopedView[Invitation]):
    """Invitations the caller may manage: a project's for its project admins, an
    organisation's for its org admins; nobody else sees any."""

    serializer_class = s.InvitationSerializer

    def get_queryset(self) -> QuerySet[Invitation]:
        return selectors.invitations_visible_to(self.request.user, project=self.get_project())


@extend_schema(tags=["members"])
class InvitationListView(InvitationScopedView, generics.ListAPIView[Invitation]):
    @extend_schema(
        request=s.InvitationCreateSerializer,
        responses={201: s.InvitationCreatedSerializer, **errors(400, 403, 404)},
        description="The response carries the invitation token, once; the invitee accepts "
        "with it at POST /api/v1/invitations/accept/.",
    )
    def post(self, request: Request, project: str) -> Response:
        self.require_manager()
        data = parse(s.InvitationCreateSerializer, request.data, project=self.get_project())
        require(
            selectors.can_grant_role(request.user, data["organization"], data["role"]),
            f"you may not give the role {data['role']} in {data['organization'].name!r}",
        )
        invitation, token = services.invitation_create(
            **data, invited_by=self.person, source_address=self.source_address
        )
        body = s.InvitationCreatedSerializer(invitation, context={"token": token}).data
        return shown_once(body, status.HTTP_201_CREATED)


@extend_schema(tags=["members"])
class InvitationDetailView(InvitationScopedView, generics.RetrieveAPIView[Invitation]):
    pass


@extend_schema(tags=["members"])
class InvitationRevokeView(InvitationScopedView):
    @extend_schema(request=None, responses={200: s.InvitationSerializer, **errors(403, 404, 409)})
    def post(self, request: Request, project: str, pk: int) -> Response:
        invitation = self.get_object()
        require(
            selectors.can_grant_role(request.user, invitation.organization, invitation.role),
            ONLY_ORG_ADMIN,
        )
        invitation = services.invitation_revoke(
            invitation=invitation, revoked_by=self.person, source_address=self.source_address
        )
        return Response(self.get_serializer(invitation).data)


@extend_schema(tags=["members"])
class InvitationAcceptView(PersonView[Membership]):
    serializer_class = s.MembershipSerializer

    @extend_schema(
        request=s.InvitationAcceptSerializer,
        responses={201: s.MembershipSerializer, **errors(400, 403, 409, 410)},
        description="The invitee (the user the invitation names) joins the organisation.",
    )
    def post(self, request: Request) -> Response:
        data = parse(s.InvitationAcceptSerializer, request.data)
        membership = services.invitation_accept(
            token=data["token"], user=self.person, source_address=self.source_address
        )
        return Response(self.get_serializer(membership).data, status=status.HTTP_201_CREATED)
