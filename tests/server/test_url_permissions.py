"""Every URL in fleet/urls.py has a permission test (issue 11, section 4).

`PERMISSIONS` maps each URL name to the requests to make and the status each role gets:
anonymous, a device with its own token, a viewer (bob), an operator (alice) and an admin
(ada). The walk at the bottom goes through fleet/urls.py recursively, the admin site
included, and fails when a URL has no entry, so a new endpoint without a permission test
fails the suite; an entry whose URL is gone fails it too.

The admin site is walked too. Its standard model pages (list, add, change, history,
delete) all come from Django's ModelAdmin and are opened by the role's Django permissions
(fleet/core/roles.py), whose effect per role is tested in test_admin_integrity.py; here
every admin URL must send anonymous and a device token (which the admin never accepts) to
the login page, and the project's own admin views get a row per role like the API.

Each request runs in the same small world, each role inside a savepoint that is rolled
back, so every role sees the world as it was and a write by one cannot help another.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from agent.trustctl import make_keyring, make_root
from fleet.devices import services as device_services
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceGroup
from fleet.registry import services as registry_services
from fleet.registry import signing, trust
from fleet.registry.choices import VersionStatus
from fleet.rollouts import services as rollout_services
from fleet.rollouts.models import Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]

ROLES = ("anonymous", "device", "viewer", "operator", "admin")
PERSONAS = {"viewer": "bob", "operator": "alice", "admin": "ada"}


def access(anonymous: int, device: int, viewer: int, operator: int, admin: int) -> dict[str, int]:
    return dict(zip(ROLES, (anonymous, device, viewer, operator, admin), strict=True))


def anyone(status: int = 200) -> dict[str, int]:
    return access(status, status, status, status, status)


def viewers(ok: int = 200) -> dict[str, int]:
    """People with a role read; a device token opens nothing meant for people."""
    return access(401, 403, ok, ok, ok)


def operators(ok: int = 200) -> dict[str, int]:
    return access(401, 403, 403, ok, ok)


def admins(ok: int = 200) -> dict[str, int]:
    return access(401, 403, 403, 403, ok)


def assigned_device_and_viewers(ok: int = 200) -> dict[str, int]:
    return access(401, ok, ok, ok, ok)


def admin_site(viewer: int, operator: int, admin: int) -> dict[str, int]:
    """The admin: anonymous and a bearer token are sent to the login page (302)."""
    return access(302, 302, viewer, operator, admin)


@dataclass
class World:
    artifact: int
    delta: int
    token: int
    rollout: int
    released_version: int
    device_pk: int
    model_pk: int
    enrollment_key: str
    keyring: dict
    device: APIClient
    personas: dict[str, Any]

    def client(self, role: str, *, session: bool) -> APIClient:
        if role == "device":
            return self.device
        client = APIClient()
        if role in PERSONAS:
            persona = self.personas[PERSONAS[role]]
            if session:
                client.force_login(persona.user)  # the admin site knows sessions only
            else:
                client.credentials(HTTP_AUTHORIZATION=f"Bearer {persona.token}")
        return client


@dataclass(frozen=True)
class Call:
    method: str
    # {artifact}, {delta}, {token}, {rollout}, {released_version}, {device_pk}, {model_pk}: the world's ids
    path: str
    expect: dict[str, int]
    body: Callable[[World], Any] | dict | None = None
    format: str = "json"
    prepare: Callable[[World], None] | None = None  # run before the call, in its savepoint
    session: bool = False  # an admin-site page: people log in with a session there

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def make(self, world: World, role: str):
        if self.prepare:
            self.prepare(world)
        client = world.client(role, session=self.session)
        path = self.path.format(**vars(world))
        data = self.body(world) if callable(self.body) else self.body
        return getattr(client, self.method.lower())(path, data, format=self.format)


def _upload(world: World) -> dict:
    from samples import digits

    data = digits.build_digits_models()["int8"]
    return {"variant": "int8", "file": SimpleUploadedFile("int8.tflite", data)}


def _start(world: World) -> None:
    rollout_services.rollout_start(rollout=Rollout.objects.get(pk=world.rollout))


def _start_and_pause(world: World) -> None:
    _start(world)
    rollout_services.rollout_pause(rollout=Rollout.objects.get(pk=world.rollout))


V1 = "/api/v1/models/digits/versions/1.0.0"
ROLLOUT_BODY = {"model": "digits", "version": "1.0.0", "policy": "canary", "targets": {"tags": ["pilot"]}}

PERMISSIONS: dict[str, list[Call]] = {
    # --- the API's front door, schema and docs: public, they describe and never show data
    "api-root": [Call("GET", "/api/v1/", anyone())],
    "schema": [Call("GET", "/api/schema/", anyone())],
    "api-docs": [Call("GET", "/api/docs/", anyone())],
    "api-redoc": [Call("GET", "/api/redoc/", anyone())],
    "api-not-found": [Call("GET", "/api/v1/nothing-here/", anyone(404))],
    # Off unless METRICS_TOKEN is set, and then for its bearer alone, whatever the role
    # (tests/server/test_metrics.py): no role's login opens it.
    "metrics": [Call("GET", "/metrics", anyone(404))],
    # --- registry
    "model-list": [
        Call("GET", "/api/v1/models/", viewers()),
        Call("POST", "/api/v1/models/", operators(201), {"name": "letters"}),
    ],
    "model-detail": [Call("GET", "/api/v1/models/digits/", viewers())],
    "version-list": [
        Call("GET", "/api/v1/models/digits/versions/", viewers()),
        Call("POST", "/api/v1/models/digits/versions/", operators(201), {"version": "2.0.0"}),
    ],
    "version-detail": [Call("GET", f"{V1}/", viewers())],
    "version-release": [Call("POST", f"{V1}/release", operators())],
    "version-deprecate": [Call("POST", "/api/v1/models/digits/versions/0.9.0/deprecate", operators())],
    "version-revoke": [Call("POST", f"{V1}/revoke", operators())],
    "version-artifacts": [
        Call("GET", f"{V1}/artifacts/", viewers()),
        Call("POST", f"{V1}/artifacts/?wait=0", operators(202), _upload, "multipart"),
    ],
    "version-compatibility": [Call("GET", f"{V1}/compatibility", viewers())],
    "artifact-list": [Call("GET", "/api/v1/artifacts/", viewers())],
    "artifact-detail": [Call("GET", "/api/v1/artifacts/{artifact}/", viewers())],
    "artifact-manifest": [
        Call("GET", "/api/v1/artifacts/{artifact}/manifest", assigned_device_and_viewers())
    ],
    "artifact-blob": [Call("GET", "/api/v1/artifacts/{artifact}/blob", assigned_device_and_viewers())],
    "artifact-golden": [Call("GET", "/api/v1/artifacts/{artifact}/golden", assigned_device_and_viewers())],
    "artifact-delta-manifest": [
        Call("GET", "/api/v1/artifacts/{artifact}/deltas/{delta}/manifest", assigned_device_and_viewers())
    ],
    "artifact-delta-blob": [
        Call("GET", "/api/v1/artifacts/{artifact}/deltas/{delta}/blob", assigned_device_and_viewers())
    ],
    "signing-key-list": [Call("GET", "/api/v1/signing-keys/", viewers())],
    "trust": [
        Call("GET", "/api/v1/trust", anyone()),  # a device reads it before it trusts anything
        Call("POST", "/api/v1/trust", admins(201), lambda world: world.keyring),
    ],
    # --- devices
    "enroll": [
        Call(
            "POST",
            "/api/v1/enroll",
            anyone(201),  # the enrollment token is the credential; the header is not read
            lambda world: {"device_id": "cam-new", "enrollment_token": world.enrollment_key},
        )
    ],
    "device-list": [Call("GET", "/api/v1/devices/", viewers())],
    "device-preauthorize": [
        Call("POST", "/api/v1/devices/preauthorize", operators(201), {"device_id": "cam-9"})
    ],
    "device-provision": [
        Call("POST", "/api/v1/devices/provision", admins(201), {"devices": [{"device_id": "cam-bulk"}]})
    ],
    "device-detail": [
        Call("GET", "/api/v1/devices/cam-1/", viewers()),
        Call("PATCH", "/api/v1/devices/cam-1/", operators(), {"tags": ["roof"]}),
    ],
    "device-approve": [Call("POST", "/api/v1/devices/cam-p/approve", operators())],
    "device-disable": [Call("POST", "/api/v1/devices/cam-1/disable", operators())],
    "device-retire": [Call("POST", "/api/v1/devices/cam-1/retire", operators())],
    "device-rotate-credentials": [Call("POST", "/api/v1/devices/cam-1/rotate-credentials", operators())],
    "device-group-list": [
        Call("GET", "/api/v1/device-groups/", viewers()),
        Call("POST", "/api/v1/device-groups/", operators(201), {"name": "outdoor", "kind": "static"}),
    ],
    "device-group-detail": [
        Call("GET", "/api/v1/device-groups/roof/", viewers()),
        Call("PATCH", "/api/v1/device-groups/roof/", operators(), {"members": []}),
        Call("DELETE", "/api/v1/device-groups/roof/", operators(204)),
    ],
    "enrollment-token-list": [
        Call("GET", "/api/v1/enrollment-tokens/", admins()),
        Call("POST", "/api/v1/enrollment-tokens/", admins(201), {"name": "line-2"}),
    ],
    "enrollment-token-revoke": [Call("POST", "/api/v1/enrollment-tokens/{token}/revoke", admins())],
    # --- rollouts
    "rollout-policy-list": [
        Call("GET", "/api/v1/rollout-policies/", viewers()),
        Call("POST", "/api/v1/rollout-policies/", operators(201), {"name": "nightly"}),
    ],
    "rollout-policy-detail": [
        Call("GET", "/api/v1/rollout-policies/canary/", viewers()),
        Call("PATCH", "/api/v1/rollout-policies/canary/", operators(), {"description": "small first"}),
    ],
    "rollout-list": [
        Call("GET", "/api/v1/rollouts/", viewers()),
        Call("POST", "/api/v1/rollouts/", operators(201), ROLLOUT_BODY),
    ],
    "rollout-detail": [Call("GET", "/api/v1/rollouts/{rollout}", viewers())],
    "rollout-start": [Call("POST", "/api/v1/rollouts/{rollout}/start", operators())],
    "rollout-pause": [Call("POST", "/api/v1/rollouts/{rollout}/pause", operators(), prepare=_start)],
    "rollout-resume": [
        Call("POST", "/api/v1/rollouts/{rollout}/resume", operators(), prepare=_start_and_pause)
    ],
    "rollout-promote": [Call("POST", "/api/v1/rollouts/{rollout}/promote", operators(), prepare=_start)],
    "rollout-abort": [Call("POST", "/api/v1/rollouts/{rollout}/abort", operators())],
    "rollout-rollback": [Call("POST", "/api/v1/rollouts/{rollout}/rollback", operators(), prepare=_start)],
    # --- the admin site: its front page, the login, and the project's own admin views
    "admin:index": [Call("GET", "/admin/", admin_site(200, 200, 200), session=True)],
    # Someone logged in already is sent on to the admin's front page.
    "admin:login": [Call("GET", "/admin/login/", access(200, 200, 302, 302, 302), session=True)],
    "admin:rollouts_rollout_live": [
        Call("GET", "/admin/rollouts/rollout/{rollout}/live/", admin_site(200, 200, 200), session=True)
    ],
    # The pages that refresh themselves (fleet/core/live.py): whoever may read the page.
    "fleet-dashboard-live": [Call("GET", "/admin/dashboard/live/", admin_site(200, 200, 200), session=True)],
    "admin:devices_device_live": [
        Call("GET", "/admin/devices/device/{device_pk}/live/", admin_site(200, 200, 200), session=True)
    ],
    "admin:registry_mlmodel_live": [
        Call("GET", "/admin/registry/mlmodel/{model_pk}/live/", admin_site(200, 200, 200), session=True)
    ],
    "admin:registry_modelversion_live": [
        Call(
            "GET",
            "/admin/registry/modelversion/{released_version}/live/",
            admin_site(200, 200, 200),
            session=True,
        )
    ],
    "admin:rollouts_rollout_act": [
        Call(
            "GET",
            "/admin/rollouts/rollout/{rollout}/act/pause/",
            admin_site(403, 200, 200),  # the API's IsOperator
            prepare=_start,
            session=True,
        )
    ],
    "admin:registry_modelversion_deprecate": [
        Call(
            "GET",
            "/admin/registry/modelversion/{released_version}/deprecate/",
            admin_site(403, 200, 200),
            session=True,
        )
    ],
}


# --- the world every request runs in


@pytest.fixture
def world(
    ada, alice, bob, broker, digits, version_v1, anonymous, enrollment_key, django_capture_on_commit_callbacks
):
    admin = broker.admin()
    artifact = ready_artifact(version_v1, "float32", digits.build_digits_models()["float32"], alice.user)
    released = registry_services.version_create(
        model=version_v1.model, version="0.9.0", created_by=alice.user
    )
    registry_services.version_set_status(version=released, status=VersionStatus.RELEASED)
    # A delta to the artifact, from an artifact of the released version (fine-tuned weights).
    from samples.retrained import fine_tune

    base = ready_artifact(released, "float32", fine_tune(digits.build_digits_models()["float32"]), alice.user)
    delta = registry_services.artifact_delta_make(target=artifact, base=base)
    assert delta is not None and delta.status == "ready", delta and delta.reason
    for device_id, status in (("cam-1", DeviceStatus.ACTIVE), ("cam-p", DeviceStatus.PENDING)):
        Device.objects.create(device_id=device_id, status=status, tags=["pilot"])
        admin.ensure_device(device_id, "pw")
    DeviceGroup.objects.create(name="roof").members.add(Device.objects.get(device_id="cam-1"))
    token = device_services.enrollment_token_create(name="line-1", created_by=ada.user)[0]
    policy = RolloutPolicy.objects.create(name="canary", gates={})
    rollout = Rollout.objects.create(
        model=version_v1.model, target_version=version_v1, targets={"tags": ["pilot"]}, policy=policy
    )
    # A device of its own, enrolled through the API, with the artifact assigned to it.
    enrolled = anonymous.post(
        "/api/v1/enroll", {"device_id": "cam-d", "enrollment_token": enrollment_key}, format="json"
    )
    assert enrolled.status_code == 201, enrolled.content
    device = APIClient()
    device.credentials(HTTP_AUTHORIZATION=f"Bearer {enrolled.json()['token']}")
    with django_capture_on_commit_callbacks(execute=True):
        device_services.devices_assign(
            devices=[Device.objects.get(device_id="cam-d")], artifacts={"digits": artifact}, publish="now"
        )
    # A root of trust, and the next keyring (signed by it) for an admin to upload.
    root_key = Ed25519PrivateKey.generate()
    trust.trust_upload(envelope=make_root(keys=[root_key]), user=ada.user, publish="now")
    _, active = signing.signing_key_active()
    keyring = make_keyring(root_keys=[root_key], version=1, signing_keys=[active.public_key()])
    return World(
        artifact=artifact.pk,
        delta=delta.pk,
        token=token.pk,
        rollout=rollout.pk,
        released_version=released.pk,
        device_pk=Device.objects.get(device_id="cam-1").pk,
        model_pk=version_v1.model.pk,
        enrollment_key=enrollment_key,
        keyring=json.loads(keyring),
        device=device,
        personas={"ada": ada, "alice": alice, "bob": bob},
    )


CALLS = [(name, call) for name, calls in PERMISSIONS.items() for call in calls]


@pytest.mark.parametrize("name, call", CALLS, ids=[f"{name}: {call}" for name, call in CALLS])
def test_each_role_gets_exactly_the_access_in_the_table(name, call, world):
    got = {}
    for role in ROLES:
        with transaction.atomic():
            response = call.make(world, role)
            transaction.set_rollback(True)
        got[role] = response.status_code
        if response.status_code in (401, 403) and not call.session:
            assert response["Content-Type"] == "application/json", (role, response.content[:200])
        if response.status_code == 302 and role in ("anonymous", "device"):
            assert response["Location"].startswith("/admin/login/"), (role, response["Location"])
    assert got == call.expect, {
        role: (got[role], call.expect[role]) for role in ROLES if got[role] != call.expect[role]
    }


# --- the walk: every URL has its entry


def url_patterns(patterns=None, prefix: str = "", namespace: str = "") -> Iterator[tuple[str, str | None]]:
    """(route, name) of every URL pattern, through includes; names are namespaced."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            yield from url_patterns(pattern.url_patterns, route, inner)
        else:
            assert isinstance(pattern, URLPattern)
            yield route, f"{namespace}{pattern.name}" if pattern.name else None


# Every admin URL, whatever it is: filled with an object id (the object need not exist;
# the login comes first) and requested without a session.
_ADMIN_PARAMETERS = [
    (r"<int:pk>", "1"),
    (r"<path:object_id>", "1"),
    (r"<path:content_type_id>", "1"),
    (r"<id>", "1"),
    (r"<slug:action>", "pause"),
    (r"\^\(\?P<app_label>[^)]*\)/\$", "registry/"),
    (r"\(\?P<url>\.\*\)\$", "nothing-here/"),
]


def admin_path(route: str) -> str:
    path = route
    for parameter, value in _ADMIN_PARAMETERS:
        path = re.sub(parameter, value, path)
    assert not re.search(r"[<>^$(]", path), f"fill in the parameters of {route} in _ADMIN_PARAMETERS"
    return "/" + path


ADMIN_ROUTES = sorted({route for route, _ in url_patterns() if route.startswith("admin/")})


def untested_urls(patterns: list[tuple[str, str | None]], table: dict[str, list[Call]]) -> list[str]:
    """URLs without a row: outside the admin every URL needs one, by name; inside it the
    walk below covers every route, and a project admin view (not Django's standard model
    pages) needs a row too."""
    standard = re.compile(
        r"^admin:(\w+_(changelist|add|history|delete|change)|logout|password_change(_done)?"
        r"|autocomplete|jsi18n|view_on_site|app_list)$"
    )
    missing = []
    for route, name in patterns:
        if route.startswith("admin/"):
            if name and not standard.match(name) and name not in table:
                missing.append(f"{name} ({route})")
        elif name is None or name not in table:
            missing.append(f"{name or 'an unnamed URL'} ({route})")
    return missing


def test_every_url_has_a_permission_test():
    assert untested_urls(list(url_patterns()), PERMISSIONS) == []


def test_every_entry_in_the_table_is_a_url_that_exists():
    names = {name for _, name in url_patterns() if name}
    assert sorted(set(PERMISSIONS) - names) == []


def test_the_walk_reports_a_new_endpoint_without_an_entry():
    """Positive control: an endpoint added to fleet/urls.py without a row fails the suite,
    in the API and among the project's own admin views alike."""
    patterns = [
        *url_patterns(),
        ("api/v1/new-thing/", "new-thing"),
        ("admin/x/y/<int:pk>/go/", "admin:x_y_go"),
    ]
    assert untested_urls(patterns, PERMISSIONS) == [
        "new-thing (api/v1/new-thing/)",
        "admin:x_y_go (admin/x/y/<int:pk>/go/)",
    ]
    assert untested_urls([("api/v1/", None)], PERMISSIONS) == ["an unnamed URL (api/v1/)"]


# The two admin URLs that do not ask for a login first: the login page, and the logout,
# which changes nothing without a session and sends a GET back to the front page.
_ADMIN_OPEN = {"admin/login/": (200, ""), "admin/logout/": (302, "/admin/")}


def test_every_admin_url_sends_anonymous_and_a_device_token_to_the_login_page(world):
    wrong = []
    for route in ADMIN_ROUTES:
        path = admin_path(route)
        status, target = _ADMIN_OPEN.get(route, (302, "/admin/login/?next="))
        for role in ("anonymous", "device"):
            response = world.client(role, session=False).get(path)
            location = response.get("Location", "")
            if response.status_code != status or not location.startswith(target):
                wrong.append(f"{role} GET {path}: {response.status_code} {location}")
    assert len(ADMIN_ROUTES) > 50  # the standard model pages are there too
    assert wrong == []


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_every_role_gets_a_page_from_the_admin_and_charlie_does_not(role, world, charlie):
    """A control for the redirects above: the same pages open once a role logs in."""
    assert world.client(role, session=True).get("/admin/").status_code == 200
    nobody = APIClient()
    nobody.force_login(charlie.user)
    assert nobody.get("/admin/").status_code == 302
