"""The OpenAPI schema (ARCHITECTURE.md, "HTTP API"): it builds without a warning, names
every registry path, and is served at /api/schema/ to anyone, like the docs page.

The schema is public on purpose: drf-spectacular's default SERVE_PERMISSIONS is AllowAny
and fleet/settings.py does not change it. It describes endpoints, never data."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from django.core.management import call_command

REGISTRY_PATHS = [
    "/api/v1/models/",
    "/api/v1/models/{name}/",
    "/api/v1/models/{name}/versions/",
    "/api/v1/models/{name}/versions/{version}/",
    "/api/v1/models/{name}/versions/{version}/release",
    "/api/v1/models/{name}/versions/{version}/deprecate",
    "/api/v1/models/{name}/versions/{version}/revoke",
    "/api/v1/models/{name}/versions/{version}/artifacts/",
    "/api/v1/artifacts/",
    "/api/v1/artifacts/{id}/",
    "/api/v1/artifacts/{id}/manifest",
    "/api/v1/artifacts/{id}/blob",
    "/api/v1/artifacts/{id}/golden",
    "/api/v1/signing-keys/",
]


def test_it_generates_a_valid_schema_without_warnings(tmp_path, capsys):
    target = tmp_path / "schema.yaml"
    try:
        call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    except Exception as exc:  # report the warnings drf-spectacular printed, not only "failed"
        pytest.fail(f"{type(exc).__name__}: {exc}\n{capsys.readouterr().err}")
    schema = yaml.safe_load(target.read_text())
    assert schema["info"]["title"] == "Modelfleet control plane API"
    assert set(REGISTRY_PATHS) <= set(schema["paths"])


def test_it_gives_each_version_action_its_own_operation_id(tmp_path):
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--file", str(target))
    paths = yaml.safe_load(target.read_text())["paths"]
    ids = [
        paths[f"/api/v1/models/{{name}}/versions/{{version}}/{a}"]["post"]["operationId"]
        for a in ("release", "deprecate", "revoke")
    ]
    assert ids == ["models_versions_release", "models_versions_deprecate", "models_versions_revoke"]


def test_it_documents_bearer_token_authentication(tmp_path):
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--file", str(target))
    schemes = yaml.safe_load(target.read_text()).get("components", {}).get("securitySchemes", {})
    assert any(s.get("type") == "http" and s.get("scheme") == "bearer" for s in schemes.values()), schemes


@pytest.mark.django_db
def test_it_serves_the_schema_to_anyone(anonymous):
    response = anonymous.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert set(REGISTRY_PATHS) <= set(schema["paths"])


@pytest.mark.django_db
def test_it_serves_the_schema_as_yaml_by_default(bob):
    response = bob.client().get("/api/schema/")
    assert response.status_code == 200
    assert "/api/v1/artifacts/{id}/blob" in yaml.safe_load(response.content)["paths"]


@pytest.mark.django_db
def test_it_serves_the_docs_page_to_anyone(anonymous):
    response = anonymous.get("/api/docs/")
    assert response.status_code == 200
    assert b"/api/schema/" in response.content


@pytest.mark.django_db
def test_a_bad_token_is_refused_even_on_the_public_schema(anonymous):
    anonymous.credentials(HTTP_AUTHORIZATION="Bearer mf_unknown")
    assert anonymous.get("/api/schema/").status_code == 401


@pytest.mark.parametrize("url", ["/api/docs/", "/api/redoc/"])
def test_the_docs_pages_load_nothing_from_another_host(client, url):
    """Swagger UI and Redoc come from drf-spectacular-sidecar's static files: an offline ops
    network still gets them (issue 10, section 3)."""
    from django.contrib.staticfiles import finders

    page = client.get(url).content.decode()
    # Everything the page itself loads: src and href attributes, CSS url(...) and @import.
    loads = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page) + re.findall(r"url\(([^)]*)\)", page)
    assert loads and all(link.startswith("/") and not link.startswith("//") for link in loads), loads
    assert "@import" not in page
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert any(asset.endswith(".js") for asset in assets)  # control: the page does load its code
    for asset in assets:
        assert finders.find(asset.removeprefix("/static/")), asset
