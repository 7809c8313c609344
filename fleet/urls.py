from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from fleet.core import admin as core_admin
from fleet.core import api as core_api
from fleet.core import errors, metrics
from fleet.devices import api as devices_api
from fleet.registry import api as registry_api
from fleet.rollouts import api as rollouts_api

VERSION = r"(?P<version>[0-9A-Za-z.+-]+)"
NAME = r"(?P<name>[a-z0-9][a-z0-9_.-]*)"
DEVICE = r"(?P<device_id>[A-Za-z0-9][A-Za-z0-9_.-]*)"

api_v1 = [
    path("", core_api.ApiRoot.as_view(), name="api-root"),
    path("models/", registry_api.ModelListCreate.as_view(), name="model-list"),
    re_path(rf"^models/{NAME}/$", registry_api.ModelDetail.as_view(), name="model-detail"),
    re_path(rf"^models/{NAME}/versions/$", registry_api.VersionListCreate.as_view(), name="version-list"),
    re_path(
        rf"^models/{NAME}/versions/{VERSION}/$", registry_api.VersionDetail.as_view(), name="version-detail"
    ),
    *[
        re_path(
            rf"^models/{NAME}/versions/{VERSION}/{action}$",
            registry_api.version_action_view(action).as_view(),
            name=f"version-{action}",
        )
        for action in registry_api.VERSION_ACTIONS
    ],
    re_path(
        rf"^models/{NAME}/versions/{VERSION}/artifacts/$",
        registry_api.VersionArtifacts.as_view(),
        name="version-artifacts",
    ),
    re_path(
        rf"^models/{NAME}/versions/{VERSION}/compatibility$",
        rollouts_api.VersionCompatibility.as_view(),
        name="version-compatibility",
    ),
    path("artifacts/", registry_api.ArtifactList.as_view(), name="artifact-list"),
    path("artifacts/<int:id>/", registry_api.ArtifactDetail.as_view(), name="artifact-detail"),
    path("artifacts/<int:id>/manifest", registry_api.ArtifactManifest.as_view(), name="artifact-manifest"),
    path("artifacts/<int:id>/blob", registry_api.ArtifactBlob.as_view(), name="artifact-blob"),
    path("artifacts/<int:id>/golden", registry_api.ArtifactGolden.as_view(), name="artifact-golden"),
    path(
        "artifacts/<int:id>/deltas/<int:delta_id>/manifest",
        registry_api.ArtifactDeltaManifest.as_view(),
        name="artifact-delta-manifest",
    ),
    path(
        "artifacts/<int:id>/deltas/<int:delta_id>/blob",
        registry_api.ArtifactDeltaBlob.as_view(),
        name="artifact-delta-blob",
    ),
    path("signing-keys/", registry_api.SigningKeyList.as_view(), name="signing-key-list"),
    path("trust", registry_api.TrustView.as_view(), name="trust"),
    path("enroll", devices_api.Enroll.as_view(), name="enroll"),
    path("devices/", devices_api.DeviceList.as_view(), name="device-list"),
    path("devices/preauthorize", devices_api.DevicePreauthorize.as_view(), name="device-preauthorize"),
    path("devices/provision", devices_api.DeviceProvision.as_view(), name="device-provision"),
    re_path(rf"^devices/{DEVICE}/$", devices_api.DeviceDetail.as_view(), name="device-detail"),
    *[
        re_path(
            rf"^devices/{DEVICE}/{action}$",
            devices_api.device_action_view(action).as_view(),
            name=f"device-{action}",
        )
        for action in devices_api.DEVICE_ACTIONS
    ],
    re_path(
        rf"^devices/{DEVICE}/rotate-credentials$",
        devices_api.DeviceRotateCredentials.as_view(),
        name="device-rotate-credentials",
    ),
    path("device-groups/", devices_api.DeviceGroupListCreate.as_view(), name="device-group-list"),
    path("device-groups/<slug:name>/", devices_api.DeviceGroupDetail.as_view(), name="device-group-detail"),
    path("enrollment-tokens/", devices_api.EnrollmentTokenListCreate.as_view(), name="enrollment-token-list"),
    path(
        "enrollment-tokens/<int:id>/revoke",
        devices_api.EnrollmentTokenRevoke.as_view(),
        name="enrollment-token-revoke",
    ),
    path("rollout-policies/", rollouts_api.PolicyListCreate.as_view(), name="rollout-policy-list"),
    path("rollout-policies/<slug:name>/", rollouts_api.PolicyDetail.as_view(), name="rollout-policy-detail"),
    path("rollouts/", rollouts_api.RolloutListCreate.as_view(), name="rollout-list"),
    path("rollouts/<int:id>", rollouts_api.RolloutDetail.as_view(), name="rollout-detail"),
    *[
        path(
            f"rollouts/<int:id>/{action}",
            rollouts_api.rollout_action_view(action).as_view(),
            name=f"rollout-{action}",
        )
        for action in rollouts_api.ACTIONS
    ],
]

urlpatterns = [
    # The dashboard (admin index) refreshing itself; the admin's login and staff check first.
    path(
        "admin/dashboard/live/", admin.site.admin_view(core_admin.dashboard_live), name="fleet-dashboard-live"
    ),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="schema", template_name="api/redoc.html"),
        name="api-redoc",
    ),
    # Last: whatever else starts with api/ is an unknown endpoint, answered in JSON.
    re_path(r"^api/", errors.api_not_found, name="api-not-found"),
]

# Errors raised before or outside a view; JSON under /api/, Django's pages elsewhere.
handler400 = "fleet.core.errors.json_400"
handler403 = "fleet.core.errors.json_403"
handler404 = "fleet.core.errors.json_404"
handler500 = "fleet.core.errors.json_500"
