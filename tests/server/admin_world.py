"""A small fleet with a rollout, for the admin's tests (Django test client and browser).

Ten devices tagged "fleet" run digits 1.0.0 (float32); 2.0.0 is ready; the "canary" policy
has two stages (30 %, then 100 %) and no gates. Everything goes through the services."""

from __future__ import annotations

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.devices.services import devices_assign
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts.models import Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact


def build(digits_model, digits) -> dict:
    v1 = registry.version_create(model=digits_model, version="1.0.0")
    v2 = registry.version_create(model=digits_model, version="2.0.0")
    artifacts = {}
    for version in (v1, v2):
        models = digits.build_digits_models(version=version.version)
        artifacts[version.version] = ready_artifact(version, "float32", models["float32"])
    devices = [
        Device.objects.create(device_id=f"cam-{n:02d}", status=DeviceStatus.ACTIVE, tags=["fleet"])
        for n in range(10)
    ]
    devices_assign(devices=devices, artifacts={"digits": artifacts["1.0.0"]}, publish="now")
    for device in devices:
        device.refresh_from_db()
        Device.objects.filter(pk=device.pk).update(
            applied_generation=device.desired_generation,
            reported_models={"digits": {"version": "1.0.0", "variant": "float32"}},
        )
    policy = RolloutPolicy.objects.create(
        name="canary",
        stages=[
            {"kind": "percent", "value": 30, "soak_seconds": 0},
            {"kind": "percent", "value": 100, "soak_seconds": 0},
        ],
        gates={},
    )
    return {"v1": v1, "v2": v2, "devices": devices, "policy": policy}


def start(world: dict, by) -> Rollout:
    """A running rollout of 2.0.0 to every device of the world, started by ``by``."""
    rollout = services.rollout_create(
        model=world["v2"].model, version=world["v2"], targets={"tags": ["fleet"]}, policy=world["policy"]
    )
    return services.rollout_start(rollout=rollout, by=by, reason="canary for 2.0.0")
