"""GET /api/v1/: the API's front door names every top-level resource with its absolute URL,
and the schema and docs; a client can start from it alone."""

from __future__ import annotations

import pytest
from django.urls import URLPattern, resolve

from fleet.core.api import RESOURCES
from fleet.urls import api_v1
from tests.server.test_api_errors import assert_json_error

pytestmark = pytest.mark.django_db


def test_it_lists_every_resource_and_the_docs_as_absolute_urls(anonymous):
    response = anonymous.get("/api/v1/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"resources", "schema", "docs", "redoc"}
    assert body["resources"]["models"] == "http://testserver/api/v1/models/"
    assert body["resources"]["rollouts"] == "http://testserver/api/v1/rollouts/"
    assert body["schema"] == "http://testserver/api/schema/"
    assert body["docs"] == "http://testserver/api/docs/"


def test_every_listed_url_leads_somewhere_real(anonymous, bob):
    body = anonymous.get("/api/v1/").json()
    for name, url in [*body["resources"].items(), ("schema", body["schema"]), ("docs", body["docs"])]:
        path = url.removeprefix("http://testserver")
        assert resolve(path).url_name != "api-not-found", name
    # A viewer follows one: the listed URL answers the resource itself.
    assert bob.client().get(body["resources"]["devices"]).json()["count"] == 0


def test_every_top_level_path_of_the_api_is_listed():
    """A new resource (a new first path segment under /api/v1/) must be added to the root."""
    segments = set()
    for pattern in api_v1:
        assert isinstance(pattern, URLPattern)
        first = str(pattern.pattern).lstrip("^").split("/")[0]
        if first:
            segments.add(first)
    assert segments == set(RESOURCES)


def test_a_bad_token_is_refused_even_on_the_public_root(anonymous):
    anonymous.credentials(HTTP_AUTHORIZATION="Bearer mf_unknown")
    assert_json_error(anonymous.get("/api/v1/"), 401, "authentication_failed")


def test_the_root_takes_only_reads(alice):
    assert_json_error(alice.client().post("/api/v1/", {}, format="json"), 405, "method_not_allowed")


def test_the_root_is_in_the_schema(anonymous):
    schema = anonymous.get("/api/schema/?format=json").json()
    assert "get" in schema["paths"]["/api/v1/"]
