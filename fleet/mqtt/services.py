"""Device credentials on the broker, as the control plane manages them (docs/mqtt.md).

Every change goes live through the dynamic security plugin: creating a device's client
and role, disabling it (which also disconnects it), changing its password, deleting it.
Each of them touches only a client that belongs to the device (``DynSec.ensure_device``):
a device id that names a service account raises ``ClientNotOwned`` and changes nothing.
"""

from __future__ import annotations

import logging

from django.conf import settings

from agent.protocol import Topics
from fleet.mqtt.broker import ClientNotOwned, DynSec

log = logging.getLogger(__name__)


def broker_admin() -> DynSec:
    return DynSec(
        settings.MQTT_URL,
        settings.MQTT_ADMIN_USERNAME,
        settings.MQTT_ADMIN_PASSWORD,
        topics=Topics(settings.MQTT_TOPIC_PREFIX),
        ca_file=settings.MQTT_CA_FILE,
    )


def device_credentials_set(*, device_id: str, password: str, enabled: bool) -> None:
    """Create the device's broker client (username = client id = device id) and its role
    (read its own desired state, write its own four topics, nothing else), or change the
    password of the client it already has, in place."""
    broker_admin().ensure_device(device_id, password, enabled=enabled)


def _leave_alone(device_id: str, exc: ClientNotOwned) -> None:
    # The device has no client of its own on the broker (the name is a service account's,
    # e.g. a device row left from before ids were checked): nothing of the device's to
    # change, and the account that holds the name must not be touched.
    log.warning("device %s: %s", device_id, exc)


def device_credentials_enable(*, device_id: str) -> None:
    try:
        if not broker_admin().enable_device(device_id):
            log.info("device %s has no broker client yet; it gets one, enabled, when it enrolls", device_id)
    except ClientNotOwned as exc:
        _leave_alone(device_id, exc)


def device_credentials_disable(*, device_id: str) -> None:
    """Refuse the device's connections from now on and drop the current one."""
    try:
        if not broker_admin().disable_device(device_id):
            log.info("device %s has no broker client; nothing to disable", device_id)
    except ClientNotOwned as exc:
        _leave_alone(device_id, exc)


def device_credentials_delete(*, device_id: str) -> None:
    try:
        broker_admin().delete_device(device_id)
    except ClientNotOwned as exc:
        _leave_alone(device_id, exc)


def devices_credentials_create(*, passwords: dict[str, str]) -> None:
    """Bulk provisioning: each device's broker client and role, enabled, in a few control
    messages (``DynSec.devices_create``). ClientNotOwned, changing nothing, when one of
    the names is held by a client that is not a device's."""
    broker_admin().devices_create(passwords)
