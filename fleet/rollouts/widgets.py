"""The policy editor's inputs (issue 10, section 1): a policy's stages and gates as rows and
fields with their units instead of JSON, and a diagram of the stages.

Each widget turns its inputs back into the policy document (percentages into fractions, a
blank field into "not set") and leaves every check to ``policy_validate``
(fleet/rollouts/policy.py), the API's own: a value that is not a number is passed on as
typed, so the message names the field as the API does ("stages[1].value: …"). Experts may
still post the JSON document itself under the field's own name, as the API takes it.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from rest_framework.fields import empty

from fleet.rollouts.choices import StageMode
from fleet.rollouts.policy import AccuracyGateSerializer, GatesSerializer, ShadowGateSerializer
from fleet.rollouts.selectors import stage_label

STAGE_KINDS = (("percent", "% of eligible devices"), ("count", "devices"))
STAGE_MODES = ((StageMode.LIVE, "live"), (StageMode.SHADOW, "shadow (beside the live model)"))
SPARE_STAGES = 2  # empty rows under the stages, for adding some
MAX_STAGES = 50

# (key, label, unit, scale from the document to what people type): percentages are typed as
# percentages and stored as fractions.
GATES = (
    ("max_install_failure_rate", "Install failures at most", "% of the stage's devices", 100),
    ("max_error_rate", "Inference errors at most", "% of inferences", 100),
    ("max_latency_p95_ratio", "p95 latency at most", "times the incumbent's", 1),
    ("min_inferences", "Inferences needed", "per arm", 1),
    ("min_devices", "Devices needed", "per arm (at least 4)", 1),
)
ACCURACY_GATE = (
    ("max_drop_pp", "Accuracy drop at most", "pp (percentage points)", 1),
    ("confidence", "Confidence", "%", 100),
    ("min_samples", "Labels needed", "per arm", 1),
    ("min_devices", "Devices needed", "per arm and variant (at least 4)", 1),
)
SHADOW_GATE = (
    ("min_agreement", "Agreement with the live model at least", "%", 100),
    ("max_latency_p95_ratio", "Shadow p95 latency at most", "times the live model's", 1),
    ("confidence", "Confidence", "%", 100),
    ("min_samples", "Compared requests needed", "in all", 1),
    ("min_devices", "Shadowing devices needed", "(at least 5)", 1),
)
SECTIONS = (
    # (key in gates, title, fields, declared by)
    ("", "", GATES, GatesSerializer),
    ("accuracy", "Accuracy: candidate vs incumbent, per variant", ACCURACY_GATE, AccuracyGateSerializer),
    ("shadow", "Shadow stages: the candidate beside the live model", SHADOW_GATE, ShadowGateSerializer),
)


def _document(value: Any, kind: type) -> Any:
    """The widget's value as the document (a bound form gives JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return kind()
    return value if isinstance(value, kind) else kind()


def _shown(value: Any, scale: float) -> str:
    """A number as people type it: 0.07 at scale 100 → "7"; anything else as it is."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value * scale:.10g}"
    return str(value)


def _typed(text: str, scale: float = 1) -> Any:
    """What people typed, as a number of the document (a percentage as a fraction); text that
    is no number is passed on as it is, for policy_validate to name."""
    try:
        number: int | float = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return text
    return number / scale if scale != 1 else number


def gates_text(gates: Any) -> str:
    """The gates in words with units, as the editor labels them (a viewer's page)."""
    gates = gates if isinstance(gates, dict) else {}
    parts = []
    for key, title, fields, _ in SECTIONS:
        current = gates.get(key) if key else gates
        if not isinstance(current, dict):
            continue  # the gate is off
        items = [
            f"{label} {_shown(current[field], scale)} {unit}"
            for field, label, unit, scale in fields
            if current.get(field) is not None
        ]
        if key:
            parts.append(f"{title}: {', '.join(items) or 'on, with its defaults'}")
        else:
            parts.extend(items)
    return "; ".join(parts) or "only the defaults"


def stage_diagram(stages: list) -> list[dict]:
    """One box per stage, in order: its size, mode and soak, for the diagram."""
    boxes = []
    for number, spec in enumerate(stages, start=1):
        try:
            size = stage_label(spec)
        except (KeyError, TypeError, ValueError):
            size = "?"
        soak = spec.get("soak_seconds") if isinstance(spec, dict) else None
        boxes.append({"number": number, "size": size, "soak": _shown(soak, 1) if soak else ""})
    return boxes


class StagesWidget(forms.Widget):
    """A row per stage: its size (a percentage or a count), the least devices, the soak in
    seconds, live or shadow and, for shadow, the share of requests; and the diagram."""

    template_name = "admin/rollouts/widgets/stages.html"

    def get_context(self, name, value, attrs):
        context = super().get_context(name, value, attrs)
        stages = _document(value, list)
        rows = [
            {
                "value": _shown(spec.get("value"), 1),
                "kind": spec.get("kind", "percent"),
                "min_devices": _shown(spec.get("min_devices"), 1),
                "soak_seconds": _shown(spec.get("soak_seconds"), 1),
                "mode": spec.get("mode", StageMode.LIVE),
                "sample_rate": _shown(spec.get("sample_rate"), 100),
            }
            for spec in stages
            if isinstance(spec, dict)
        ]
        rows += [{"kind": "percent", "mode": StageMode.LIVE}] * SPARE_STAGES
        context["stages"] = {
            "rows": list(enumerate(rows)),
            "count": len(rows),
            "kinds": STAGE_KINDS,
            "modes": STAGE_MODES,
            "diagram": stage_diagram([spec for spec in stages if isinstance(spec, dict)]),
        }
        return context

    def value_from_datadict(self, data, files, name):
        if f"{name}-rows" not in data:
            return data.get(name)  # the document itself (experts, scripts)
        try:
            count = min(int(data[f"{name}-rows"]), MAX_STAGES)
        except ValueError:
            count = 0
        stages = []
        for index in range(count):

            def typed(key: str, default: str = "", scale: float = 1, index: int = index) -> Any:
                text = (data.get(f"{name}-{index}-{key}") or "").strip() or default
                return _typed(text, scale) if text else None

            if typed("value") is None:
                continue  # an empty row
            stage = {
                "kind": data.get(f"{name}-{index}-kind") or "percent",
                "value": typed("value"),
                "min_devices": typed("min_devices", "1"),
                "soak_seconds": typed("soak_seconds", "0"),
                "mode": data.get(f"{name}-{index}-mode") or StageMode.LIVE,
            }
            if stage["mode"] == StageMode.SHADOW:
                stage["sample_rate"] = typed("sample_rate", "25", scale=100)
            stages.append(stage)
        return json.dumps(stages)

    def value_omitted_from_data(self, data, files, name):
        return f"{name}-rows" not in data and name not in data


class GatesWidget(forms.Widget):
    """The gates as labelled fields with units; a blank field is not set (its default, shown
    in grey, applies), and the accuracy and shadow gates are switched on with a box."""

    template_name = "admin/rollouts/widgets/gates.html"

    def get_context(self, name, value, attrs):
        context = super().get_context(name, value, attrs)
        gates = _document(value, dict)
        sections = []
        for key, title, fields, declared in SECTIONS:
            current = (gates.get(key) or {}) if key else gates
            defaults = declared().fields
            sections.append(
                {
                    "key": key or "gates",
                    "title": title,
                    "optional": bool(key),
                    "on": bool(key) and isinstance(gates.get(key), dict),
                    "fields": [
                        {
                            "input": f"{name}-{key or 'gates'}-{field}",
                            "label": label,
                            "unit": unit,
                            "value": _shown(current.get(field), scale) if isinstance(current, dict) else "",
                            "default": ""
                            if defaults[field].default in (empty, None)
                            else _shown(defaults[field].default, scale),
                        }
                        for field, label, unit, scale in fields
                    ],
                }
            )
        context["gates"] = {"sections": sections}
        return context

    def value_from_datadict(self, data, files, name):
        if f"{name}-form" not in data:
            return data.get(name)  # the document itself (experts, scripts)
        gates: dict[str, Any] = {}
        for key, _, fields, _ in SECTIONS:
            if key and not data.get(f"{name}-{key}-on"):
                continue  # the gate is off
            values = {}
            for field, _, _, scale in fields:
                text = (data.get(f"{name}-{key or 'gates'}-{field}") or "").strip()
                if text:
                    values[field] = _typed(text, scale)
            if key:
                gates[key] = values
            else:
                gates.update(values)
        return json.dumps(gates)

    def value_omitted_from_data(self, data, files, name):
        return f"{name}-form" not in data and name not in data
