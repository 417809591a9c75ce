"""A person's API tokens: made (the key shown once), listed, revoked."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response

from fedportal.api_views import PersonView, errors, parse
from sites import selectors, services
from sites.api import serializers as s
from sites.api.views._base import shown_once
from sites.models import ApiToken


class ApiTokenScopedView(PersonView[ApiToken]):
    serializer_class = s.ApiTokenSerializer

    def get_queryset(self) -> QuerySet[ApiToken]:
        return selectors.api_tokens_of(self.request.user)


@extend_schema(tags=["api-tokens"])
class ApiTokenListView(ApiTokenScopedView, generics.ListAPIView[ApiToken]):
    @extend_schema(
        request=s.ApiTokenCreateSerializer,
        responses={201: s.ApiTokenCreatedSerializer, **errors(400)},
        description="A token acting as the caller, with their roles. The key is shown once. "
        "Made with an expiring API token, it expires no later than that token (at the same "
        "time by default).",
    )
    def post(self, request: Request) -> Response:
        data = parse(s.ApiTokenCreateSerializer, request.data)
        token, key = services.api_token_create(
            user=self.person,
            created_with=request.auth if isinstance(request.auth, ApiToken) else None,
            source_address=self.source_address,
            **data,
        )
        body = s.ApiTokenCreatedSerializer(token, context={"key": key}).data
        return shown_once(body, status.HTTP_201_CREATED)


@extend_schema(tags=["api-tokens"])
class ApiTokenDetailView(ApiTokenScopedView, generics.RetrieveAPIView[ApiToken]):
    pass


@extend_schema(tags=["api-tokens"])
class ApiTokenRevokeView(ApiTokenScopedView):
    @extend_schema(request=None, responses={200: s.ApiTokenSerializer, **errors(404, 409)})
    def post(self, request: Request, pk: int) -> Response:
        token = services.api_token_revoke(
            token=self.get_object(), revoked_by=self.person, source_address=self.source_address
        )
        return Response(self.get_serializer(token).data)
