"""Device credentials on the broker, as the control plane manages them (docs/mqtt.md).

Every change goes live through the dynamic security plugin: creating a device's client
and role, disabling it (which also disconnects it), changing its password, deleting it.
"""

from __future__ import annotations

from django.conf import settings

from agent.protocol import Topics
from fleet.mqtt.broker import DynSec


def broker_admin() -> DynSec:
    return DynSec(
        settings.MQTT_URL,
        settings.MQTT_ADMIN_USERNAME,
        settings.MQTT_ADMIN_PASSWORD,
        topics=Topics(settings.MQTT_TOPIC_PREFIX),
    )


def device_credentials_set(*, device_id: str, password: str, enabled: bool) -> None:
    """Create or reset the device's broker client (username = client id = device id) and
    its role: read its own desired state, write its own four topics, nothing else."""
    admin = broker_admin()
    admin.ensure_device(device_id, password)
    if not enabled:
        admin.disable_client(device_id)


def device_credentials_enable(*, device_id: str) -> None:
    broker_admin().enable_client(device_id)


def device_credentials_disable(*, device_id: str) -> None:
    """Refuse the device's connections from now on and drop the current one."""
    broker_admin().disable_client(device_id)


def device_credentials_delete(*, device_id: str) -> None:
    admin = broker_admin()
    admin.command(
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": f"device-{device_id}"},
    )
