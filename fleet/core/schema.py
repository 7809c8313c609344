"""How the OpenAPI schema describes the API (drf-spectacular), so that generated clients
(docs/api.md, "A Python client generated from the schema") come out right."""

from __future__ import annotations

from drf_spectacular import openapi


class AutoSchema(openapi.AutoSchema):
    """Documents one request content type per operation: the view's first parser (JSON for
    most; multipart where a file is sent). The others DRF accepts (form, multipart) still
    work, but listed side by side with the same body they make generated clients guess:
    openapi-python-client 0.29 sends every JSON body as multipart and fails to import."""

    def map_parsers(self) -> list:
        return super().map_parsers()[:1]


def ordering_enum_names(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: names for the ``ordering`` values, so that a
    generated client says ``CREATED_AT_DESC`` for ``-created_at`` (x-enum-varnames, which
    openapi-python-client and openapi-generator read) rather than ``VALUE_1``."""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                items = parameter.get("schema", {}).get("items", {})
                if parameter.get("name") == "ordering" and items.get("enum"):
                    items["x-enum-varnames"] = [
                        value.lstrip("-").upper() + ("_DESC" if value.startswith("-") else "")
                        for value in items["enum"]
                    ]
    return result
