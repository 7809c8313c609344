"""MQTT topic layout of wire contract v1 (ARCHITECTURE.md, "MQTT topics")."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "fleet/v1"
# plane -> device
DESIRED = "desired"
# plane -> every device, retained: the root chain and keyring (docs/protocol.md, addition 6)
TRUST = "trust"
# ingest -> every device, retained: "send your recent telemetry again" (addition 7)
REPLAY = "replay"
# device -> plane, the only topics a device may publish to
DEVICE_TOPICS = ("status", "reported", "events", "telemetry")
INGEST_SHARE_GROUP = "fleet-ingest"


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def device(self, device_id: str, kind: str) -> str:
        if kind != DESIRED and kind not in DEVICE_TOPICS:
            raise ValueError(f"unknown topic kind {kind!r}")
        if not device_id or any(c in device_id for c in "/+#"):
            raise ValueError(f"device id {device_id!r} cannot be used in a topic")
        return f"{self.prefix}/devices/{device_id}/{kind}"

    def desired(self, device_id: str) -> str:
        return self.device(device_id, DESIRED)

    def trust(self) -> str:
        """One retained trust bundle for the whole fleet, e.g. ``fleet/v1/trust``."""
        return f"{self.prefix}/{TRUST}"

    def replay(self) -> str:
        """The ingest bridge's retained replay request, e.g. ``fleet/v1/replay``."""
        return f"{self.prefix}/{REPLAY}"

    def all_devices(self, kind: str) -> str:
        """Wildcard over every device for one kind, e.g. ``fleet/v1/devices/+/telemetry``."""
        return f"{self.prefix}/devices/+/{kind}"

    def shared(self, kind: str, group: str = INGEST_SHARE_GROUP) -> str:
        """Shared subscription so that several ingest bridges split the load."""
        return f"$share/{group}/{self.all_devices(kind)}"

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a device topic into ``(device_id, kind)``; raise ValueError otherwise."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or not parts[0] or (parts[1] != DESIRED and parts[1] not in DEVICE_TOPICS):
            raise ValueError(f"topic {topic!r} is not a device topic")
        return parts[0], parts[1]
