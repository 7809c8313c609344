"""Device bearer tokens (`Authorization: Bearer md_…`) for the device-facing endpoints."""

from __future__ import annotations

from dataclasses import dataclass

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from fleet.core import logs
from fleet.core.auth import bearer_key
from fleet.devices.choices import DeviceStatus


@dataclass
class DevicePrincipal:
    """``request.user`` when a device calls. It has no role: people's endpoints refuse it,
    and the artifact endpoints ask it which artifacts it may fetch."""

    device: object
    is_authenticated: bool = True
    is_active: bool = True
    is_superuser: bool = False
    is_staff: bool = False
    is_device: bool = True

    @property
    def pk(self):
        return None

    def may_fetch_artifact(self, artifact) -> bool:
        """Only what its desired state names, live or in shadow (registry
        selectors.artifact_fetchable_by)."""
        device = self.device
        shadows = {entry.get("artifact") for entry in device.desired_shadows.values()}
        return artifact.pk in set(device.desired_artifacts.values()) | shadows

    def __str__(self) -> str:
        return f"device {self.device}"


class DeviceTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        from fleet.devices.models import DeviceToken
        from fleet.devices.services import DEVICE_TOKEN_PREFIX, sha256

        key = bearer_key(request)
        if key is None or not key.startswith(DEVICE_TOKEN_PREFIX):
            return None
        token = (
            DeviceToken.objects.select_related("device")
            .filter(key_sha256=sha256(key), revoked_at=None)
            .first()
        )
        if token is None or token.device.status != DeviceStatus.ACTIVE:
            raise exceptions.AuthenticationFailed("Invalid or revoked device token.")
        logs.device_id.set(token.device.device_id)  # for this request's log lines only
        return DevicePrincipal(token.device), token

    def authenticate_header(self, request) -> str:
        return self.keyword


class DeviceTokenScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema about device bearer tokens."""

    target_class = DeviceTokenAuthentication
    name = "deviceToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "md_<key>"}
