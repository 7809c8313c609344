"""The rollout policy document, declared once (docs/rollouts.md, "Policy").

Stages and gates are JSON chosen by people; every field is declared here with its type,
range and default, so a mistake is refused at once with a JSON 400 that names the field
(``stages[1].value``, ``gates.accuracy.confidence``) instead of breaking the evaluator
later. The API, the admin and ``RolloutPolicy`` creation in code all go through
``policy_validate``.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fleet.core.errors import InvalidInput
from fleet.rollouts.choices import StageMode


class _Strict(serializers.Serializer):
    """Refuses keys it does not declare: a misspelt gate must not be silently ignored."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
        return super().to_internal_value(data)


class StageSerializer(_Strict):
    kind = serializers.ChoiceField(choices=("percent", "count"))
    value = serializers.FloatField(min_value=0, help_text="percent of eligible devices (0-100] or a count")
    min_devices = serializers.IntegerField(min_value=1, default=1)
    soak_seconds = serializers.IntegerField(min_value=0, default=0)
    mode = serializers.ChoiceField(choices=StageMode.choices, default=StageMode.LIVE)
    sample_rate = serializers.FloatField(
        min_value=0.001, max_value=1, default=0.25, help_text="shadow stages: share of requests run in shadow"
    )

    def validate(self, attrs: dict) -> dict:
        if attrs["value"] <= 0:
            raise serializers.ValidationError({"value": ["Must be greater than 0."]})
        if attrs["kind"] == "percent" and attrs["value"] > 100:
            raise serializers.ValidationError({"value": ["A percent is at most 100."]})
        if attrs["kind"] == "count" and attrs["value"] != int(attrs["value"]):
            raise serializers.ValidationError({"value": ["A count is a whole number."]})
        return attrs


class AccuracyGateSerializer(_Strict):
    min_samples = serializers.IntegerField(min_value=1, default=100, help_text="labels per arm")
    min_devices = serializers.IntegerField(
        min_value=1, default=4, help_text="devices per arm and variant (the statistics need at least 4)"
    )
    # A margin of 0 could never be passed with confidence: the drop would have to be negative.
    max_drop_pp = serializers.FloatField(min_value=0.1, max_value=100, default=2.0)
    confidence = serializers.FloatField(min_value=0.5, max_value=0.9999, default=0.95)


class ShadowGateSerializer(_Strict):
    min_agreement = serializers.FloatField(min_value=0, max_value=0.999, default=0.9)
    max_latency_p95_ratio = serializers.FloatField(min_value=0.01, allow_null=True, default=2.0)
    min_samples = serializers.IntegerField(min_value=1, default=100, help_text="compared requests")
    min_devices = serializers.IntegerField(
        min_value=1, default=5, help_text="shadowing devices (the statistics need at least 5)"
    )
    confidence = serializers.FloatField(min_value=0.5, max_value=0.9999, default=0.95)


class GatesSerializer(_Strict):
    max_install_failure_rate = serializers.FloatField(
        min_value=0, max_value=1, allow_null=True, required=False
    )
    # A ceiling of 0 could never be passed with confidence; the install ceiling counts devices.
    max_error_rate = serializers.FloatField(min_value=0.0001, max_value=1, allow_null=True, required=False)
    max_latency_p95_ratio = serializers.FloatField(min_value=0.01, allow_null=True, required=False)
    min_inferences = serializers.IntegerField(min_value=0, default=100)
    min_devices = serializers.IntegerField(
        min_value=1, default=4, help_text="devices per arm for the error-rate and latency gates (4 at least)"
    )
    accuracy = AccuracyGateSerializer(allow_null=True, required=False)
    shadow = ShadowGateSerializer(allow_null=True, required=False)


HH_MM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class MaintenanceWindowSerializer(_Strict):
    """When new stages may start, in UTC; ``end`` before ``start`` crosses midnight."""

    start = serializers.RegexField(
        HH_MM, help_text="HH:MM, UTC", error_messages={"invalid": "Use HH:MM (UTC)."}
    )
    end = serializers.RegexField(
        HH_MM, help_text="HH:MM, UTC", error_messages={"invalid": "Use HH:MM (UTC)."}
    )

    def validate(self, attrs: dict) -> dict:
        if attrs["start"] == attrs["end"]:
            raise serializers.ValidationError(
                {"end": ["A window that ends when it starts never opens; leave out the window for any time."]}
            )
        return attrs


def _first_error(errors: Any, path: str) -> tuple[str, str]:
    """The path and message of the first error in DRF's nested error structure."""
    if isinstance(errors, dict):
        key, value = next(iter(errors.items()))
        if key == "non_field_errors":
            return _first_error(value, path)
        if isinstance(key, int):  # a list's errors, by index
            return _first_error(value, f"{path}[{key}]")
        return _first_error(value, f"{path}.{key}" if path else str(key))
    if isinstance(errors, list):
        for index, value in enumerate(errors):
            if value:
                if isinstance(value, (dict, list)) and not isinstance(value, str):
                    return _first_error(value, f"{path}[{index}]")
                return path, str(value)
    return path, str(errors)


def policy_validate(*, stages: Any, gates: Any, maintenance_window: Any = None) -> tuple[list[dict], dict]:
    """Check a policy's stages, gates and maintenance window (None: any time); return the
    stages and gates with every default filled in. Raises InvalidInput (400, codes
    ``invalid_stages`` / ``invalid_gates`` / ``invalid_maintenance_window``) naming the field."""
    if maintenance_window not in (None, {}):  # none (or empty): any time
        checked_window = MaintenanceWindowSerializer(data=maintenance_window)
        if not isinstance(maintenance_window, dict) or not checked_window.is_valid():
            errors = (
                checked_window.errors if isinstance(maintenance_window, dict) else ["Give start and end."]
            )
            field, message = _first_error(errors, "maintenance_window")
            raise InvalidInput(f"{field}: {message}", code="invalid_maintenance_window", field=field)
    if not isinstance(stages, list) or not stages:
        raise InvalidInput(
            "A policy needs at least one stage (a list).", code="invalid_stages", field="stages"
        )
    checked_stages = StageSerializer(data=stages, many=True)
    if not checked_stages.is_valid():
        field, message = _first_error(checked_stages.errors, "stages")
        raise InvalidInput(f"{field}: {message}", code="invalid_stages", field=field)
    if checked_stages.validated_data[-1]["mode"] == StageMode.SHADOW:
        raise InvalidInput(
            "The last stage must be live: a shadow stage only prepares the next one.",
            code="invalid_stages",
            field=f"stages[{len(stages) - 1}].mode",
        )
    if not isinstance(gates, dict):
        raise InvalidInput("gates must be an object.", code="invalid_gates", field="gates")
    checked_gates = GatesSerializer(data=gates)
    if not checked_gates.is_valid():
        field, message = _first_error(checked_gates.errors, "gates")
        raise InvalidInput(f"{field}: {message}", code="invalid_gates", field=field)
    return [dict(stage) for stage in checked_stages.validated_data], _plain(checked_gates.validated_data)


def _plain(value: Any) -> Any:
    """OrderedDicts from DRF into plain JSON values."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
