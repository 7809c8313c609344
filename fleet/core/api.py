"""The API's front door: ``GET /api/v1/`` names every top-level resource with its absolute
URL, and where the schema and the docs are, so a client (or a person with curl) can start
from one address."""

from __future__ import annotations

from django.urls import reverse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.registry.api import ERRORS

# Resource name -> URL name in fleet/urls.py; a test checks every top-level path is here.
RESOURCES = {
    "models": "model-list",
    "artifacts": "artifact-list",
    "signing-keys": "signing-key-list",
    "trust": "trust",
    "enroll": "enroll",
    "devices": "device-list",
    "device-groups": "device-group-list",
    "enrollment-tokens": "enrollment-token-list",
    "rollout-policies": "rollout-policy-list",
    "rollouts": "rollout-list",
}
DOCUMENTS = {"schema": "schema", "docs": "api-docs", "redoc": "api-redoc"}

_URL = serializers.URLField()
ApiRootSerializer = inline_serializer(
    "ApiRoot",
    {
        "resources": inline_serializer("ApiResources", {name: _URL for name in RESOURCES}),
        **{name: serializers.URLField() for name in DOCUMENTS},
    },
)


class ApiRoot(APIView):
    """Public like the schema: it lists addresses, never data (each resource checks its
    own role)."""

    permission_classes = [AllowAny]

    @extend_schema(responses={200: ApiRootSerializer, **ERRORS}, summary="The API's resources and docs")
    def get(self, request):
        def absolute(url_name: str) -> str:
            return request.build_absolute_uri(reverse(url_name))

        return Response(
            {
                "resources": {name: absolute(url_name) for name, url_name in RESOURCES.items()},
                **{name: absolute(url_name) for name, url_name in DOCUMENTS.items()},
            }
        )
