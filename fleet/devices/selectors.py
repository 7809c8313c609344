"""Device reads: group membership (static and dynamic)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from fleet.core.errors import InvalidInput
from fleet.devices.choices import DeviceStatus, GroupKind
from fleet.devices.models import Device, DeviceGroup

# What a dynamic group's saved filter may say, and how each key filters devices.
RULES = {
    "tags": lambda value: {"tags__contains": list(value)},  # every tag listed
    "hardware": lambda value: {"hardware": value},
    "status": lambda value: {"status": value},
    "online": lambda value: {"online": bool(value)},
    "runtime": lambda value: {"runtime": value},
    "agent_version": lambda value: {"agent_version": value},
    "supports_int8": lambda value: {"supports_int8": bool(value)},
}


def validate_group_rules(rules: dict[str, Any]) -> None:
    if not isinstance(rules, dict):
        raise InvalidInput("rules must be an object.", code="invalid_rules", field="rules")
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise InvalidInput(
            f"Unknown rule(s) {', '.join(unknown)}; use {', '.join(sorted(RULES))}.",
            code="invalid_rules",
            field="rules",
        )
    if "tags" in rules and not (
        isinstance(rules["tags"], list) and all(isinstance(t, str) for t in rules["tags"])
    ):
        raise InvalidInput("rules.tags must be a list of strings.", code="invalid_rules", field="rules")
    if "status" in rules and rules["status"] not in DeviceStatus.values:
        raise InvalidInput(
            f"rules.status must be one of {DeviceStatus.values}.", code="invalid_rules", field="rules"
        )


def group_devices(*, group: DeviceGroup, queryset: QuerySet[Device] | None = None) -> QuerySet[Device]:
    """The group's devices now: chosen members, or whatever matches the saved filter (so a
    device that enrolls later, or gets a tag, joins a dynamic group by itself)."""
    queryset = Device.objects.all() if queryset is None else queryset
    if group.kind == GroupKind.STATIC:
        return queryset.filter(static_groups=group)
    filters: dict[str, Any] = {}
    for key, value in group.rules.items():
        filters.update(RULES[key](value))
    return queryset.filter(**filters)
