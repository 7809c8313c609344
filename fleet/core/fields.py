"""Serializer fields and validators shared by every app's API.

PostgreSQL stores no NUL character: text columns refuse the byte and jsonb refuses the
``\\u0000`` escape, so a NUL that reaches the database turns a bad request into a 500.
DRF's CharField already refuses NUL (code ``null_characters_not_allowed``); these do the
same for JSON values, at any depth, keys included.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

NUL = "\x00"


def nul_character_path(value: Any, path: str = "") -> str | None:
    """Where a NUL character hides in a JSON value (``""`` for the value itself), or None."""
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if NUL in str(key):
                return where
            found = nul_character_path(item, where)
            if found is not None:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = nul_character_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def refuse_nul_characters(value: Any) -> None:
    """A DRF validator: a 400 that says where, instead of the database's 500."""
    where = nul_character_path(value)
    if where is not None:
        at = f" (at {where})" if where else ""
        raise serializers.ValidationError(
            f"Null characters are not allowed{at}.", code="null_characters_not_allowed"
        )


class JSONField(serializers.JSONField):
    """DRF's JSONField that refuses NUL characters; fleet.core's AppConfig makes every
    ModelSerializer use it for model JSONFields."""

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        refuse_nul_characters(value)
        return value
