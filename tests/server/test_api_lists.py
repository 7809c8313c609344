"""Every list endpoint pages, filters and orders the same way (docs/api.md, "Lists"), and
says so in the OpenAPI schema. The list endpoints are found in the schema itself (a GET
whose answer is a list of things), so a new list is checked without being named here."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from drf_spectacular.generators import SchemaGenerator

from fleet.core.listing import MAX_PAGE_SIZE
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceGroup
from fleet.devices.services import enrollment_token_create
from fleet.rollouts.models import Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact
from tests.server.test_api_errors import assert_json_error

pytestmark = pytest.mark.django_db

ENVELOPE = {"count", "next", "previous", "results"}
PATH_VALUES = {"name": "digits", "version": "1.0.0"}


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _answer_schema(schema: dict, operation: dict) -> dict:
    content = operation.get("responses", {}).get("200", {}).get("content", {})
    return _resolve(schema, content.get("application/json", {}).get("schema", {}))


def list_operations(schema: dict) -> list[str]:
    """The paths whose GET answers a list: a bare array, or a page of one."""
    found = []
    for path, operations in schema["paths"].items():
        answer = _answer_schema(schema, operations.get("get", {}))
        results = _resolve(schema, answer.get("properties", {}).get("results", {}))
        if answer.get("type") == "array" or results.get("type") == "array":
            found.append(path)
    return sorted(found)


def list_problems(schema: dict, path: str) -> list[str]:
    """What a list operation's schema lacks compared with the one list contract."""
    operation = schema["paths"][path]["get"]
    problems = []
    answer = _answer_schema(schema, operation)
    if not set(answer.get("properties", {})) >= ENVELOPE:
        problems.append(f"{path}: answers {answer.get('type', 'an object')}, not the page envelope")
    created = sorted(set(operation.get("responses", {})) & {"201", "202"})
    if created:
        problems.append(f"{path}: a GET that says it answers {', '.join(created)}")
    parameters = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
    for name in ("limit", "offset", "ordering"):
        if name not in parameters:
            problems.append(f"{path}: no {name} parameter")
    ordering = parameters.get("ordering", {}).get("schema", {})
    if ordering and not ordering.get("items", {}).get("enum"):
        problems.append(f"{path}: ordering without an allow-list (enum)")
    return problems


def _schema() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


SCHEMA = _schema()
LIST_PATHS = list_operations(SCHEMA)


def query_parameters(path: str) -> dict[str, dict]:
    operation = SCHEMA["paths"][path]["get"]
    return {p["name"]: p["schema"] for p in operation.get("parameters", []) if p["in"] == "query"}


def url(path: str) -> str:
    return path.format(**PATH_VALUES)


@pytest.fixture
def world(version_v1, digits, alice, ada):
    """At least one row in every list, and three devices to page through."""
    ready_artifact(version_v1, "float32", digits.build_digits_models()["float32"], alice.user)
    for n, status in enumerate([DeviceStatus.ACTIVE, DeviceStatus.ACTIVE, DeviceStatus.PENDING]):
        Device.objects.create(device_id=f"cam-{n}", status=status)
    DeviceGroup.objects.create(name="roof")
    enrollment_token_create(name="line-1", created_by=ada.user)
    policy = RolloutPolicy.objects.create(name="canary", gates={})
    Rollout.objects.create(
        model=version_v1.model, target_version=version_v1, targets={"tags": ["x"]}, policy=policy
    )


# --- the schema: every list is described the same way


def test_the_schema_finds_every_list_endpoint():
    """A floor, so that a broken finder cannot pass the walk below by finding nothing."""
    assert {
        "/api/v1/models/",
        "/api/v1/models/{name}/versions/",
        "/api/v1/models/{name}/versions/{version}/artifacts/",
        "/api/v1/artifacts/",
        "/api/v1/signing-keys/",
        "/api/v1/devices/",
        "/api/v1/device-groups/",
        "/api/v1/enrollment-tokens/",
        "/api/v1/rollout-policies/",
        "/api/v1/rollouts/",
    } <= set(LIST_PATHS)


def test_every_list_in_the_schema_is_paged_and_ordered_the_same_way():
    assert [problem for path in LIST_PATHS for problem in list_problems(SCHEMA, path)] == []


def test_the_schema_check_reports_a_bare_list_and_a_list_without_ordering():
    """Positive control: what the walk above would catch."""
    array = {"type": "array", "items": {"$ref": "#/components/schemas/Thing"}}
    thing = {"type": "object", "properties": {"id": {"type": "integer"}}}
    answer = {
        "200": {"content": {"application/json": {"schema": array}}},
        "201": {"content": {"application/json": {"schema": thing}}},
    }
    schema = {
        "components": {"schemas": {"Thing": thing}},
        "paths": {"/things/": {"get": {"parameters": [], "responses": answer}}},
    }
    assert list_operations(schema) == ["/things/"]
    problems = list_problems(schema, "/things/")
    assert any("not the page envelope" in p for p in problems)
    assert any("no ordering parameter" in p for p in problems)
    assert any("a GET that says it answers 201" in p for p in problems)


def test_the_paging_parameters_carry_their_bounds_in_the_schema():
    parameters = query_parameters("/api/v1/devices/")
    assert parameters["limit"] | {} == {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_PAGE_SIZE,
        "default": 100,
    }
    assert parameters["offset"]["minimum"] == 0


# --- every list, over HTTP


@pytest.mark.parametrize("path", LIST_PATHS)
def test_every_list_answers_a_page_in_the_same_envelope(path, world, ada):
    client = ada.client()
    first = client.get(url(path), {"limit": 1})
    assert first.status_code == 200, first.content
    body = first.json()
    assert set(body) == ENVELOPE
    assert body["count"] >= 1 and len(body["results"]) == 1
    assert body["previous"] is None
    past_the_end = client.get(url(path), {"limit": 1, "offset": body["count"]}).json()
    assert past_the_end["results"] == [] and past_the_end["next"] is None


@pytest.mark.parametrize("path", LIST_PATHS)
def test_every_list_takes_each_ordering_it_offers(path, world, ada):
    offered = query_parameters(path)["ordering"]["items"]["enum"]
    for value in offered:
        response = ada.client().get(url(path), {"ordering": value})
        assert response.status_code == 200, (value, response.content)
    both = ",".join(offered[:2])
    assert ada.client().get(url(path), {"ordering": both}).status_code == 200


BAD_QUERIES = [
    ({"ordering": "no_such_field"}, "ordering"),
    ({"ordering": "created_at;drop"}, "ordering"),
    ({"limit": "0"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": str(MAX_PAGE_SIZE + 1)}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"offset": "1.5"}, "offset"),
    ({"stauts": "ready"}, "stauts"),  # an unknown parameter: a typo must not list everything
]


@pytest.mark.parametrize("path", LIST_PATHS)
def test_every_list_refuses_a_bad_paging_or_ordering_value_with_a_json_400(path, world, ada):
    for query, field in BAD_QUERIES:
        error = assert_json_error(ada.client().get(url(path), query), 400)
        assert error["field"] == field, (query, error)


@pytest.mark.parametrize("path", LIST_PATHS)
def test_every_list_refuses_a_filter_value_outside_its_type_with_a_json_400(path, world, ada):
    """Choices and booleans have values that cannot be right; free-text filters do not."""
    checked = 0
    for name, schema in query_parameters(path).items():
        if name in ("limit", "offset", "ordering"):
            continue
        if schema.get("enum"):
            good, bad = schema["enum"][0], "no-such-" + name
        elif schema.get("type") == "boolean":
            good, bad = "true", "maybe"
        else:
            continue
        assert ada.client().get(url(path), {name: good}).status_code == 200, (name, good)
        error = assert_json_error(ada.client().get(url(path), {name: bad}), 400)
        assert error["field"] == name, error
        checked += 1
    if path not in ("/api/v1/models/{name}/versions/{version}/artifacts/",):
        assert checked or path == "/api/v1/models/{name}/versions/", f"{path} has no typed filter to check"


# --- what the parameters do


def _walk(client, first_url: str) -> list[dict[str, Any]]:
    rows, next_url = [], first_url
    while next_url:
        page = client.get(next_url).json()
        rows += page["results"]
        next_url = page["next"]
    return rows


def test_pages_ordered_by_a_repeated_value_neither_overlap_nor_skip(world, bob):
    """Two of the three devices share a status: the id breaks the tie, page after page."""
    rows = _walk(bob.client(), "/api/v1/devices/?ordering=status&limit=1")
    assert sorted(row["device_id"] for row in rows) == ["cam-0", "cam-1", "cam-2"]
    assert [row["status"] for row in rows] == sorted(row["status"] for row in rows)


def test_the_next_link_is_absolute_and_keeps_the_filters(world, bob):
    page = bob.client().get("/api/v1/devices/", {"status": "active", "limit": 1}).json()
    assert page["count"] == 2
    link = urlsplit(page["next"])
    assert link.scheme == "http" and link.path == "/api/v1/devices/"
    assert parse_qs(link.query) == {"status": ["active"], "limit": ["1"], "offset": ["1"]}


def test_ordering_orders_and_a_minus_reverses(world, bob):
    ids = [d["device_id"] for d in bob.client().get("/api/v1/devices/?ordering=-device_id").json()["results"]]
    assert ids == ["cam-2", "cam-1", "cam-0"]


def test_empty_orderings_say_nothing(world, bob):
    """Found by the fuzzer: "?ordering=,,," was a 500; it is the default order."""
    default = bob.client().get("/api/v1/devices/").json()["results"]
    for query in ("?ordering=,,,", "?ordering=", "?ordering=-device_id,,"):
        response = bob.client().get(f"/api/v1/devices/{query}")
        assert response.status_code == 200, (query, response.content)
    assert bob.client().get("/api/v1/devices/?ordering=,,,").json()["results"] == default
    ids = [
        d["device_id"] for d in bob.client().get("/api/v1/devices/?ordering=-device_id,,").json()["results"]
    ]
    assert ids == ["cam-2", "cam-1", "cam-0"]  # control: the ordering given still holds


def test_several_orderings_come_comma_separated_or_repeated(world, bob):
    """The schema says comma-separated; generated clients repeat the parameter instead."""
    Device.objects.filter(device_id="cam-2").update(status=DeviceStatus.ACTIVE)
    for query in ("?ordering=status,-device_id", "?ordering=status&ordering=-device_id"):
        ids = [d["device_id"] for d in bob.client().get(f"/api/v1/devices/{query}").json()["results"]]
        assert ids == ["cam-2", "cam-1", "cam-0"], query
    error = assert_json_error(bob.client().get("/api/v1/devices/?ordering=status&ordering=nope"), 400)
    assert error["field"] == "ordering"


def test_a_boolean_filter_takes_true_false_one_and_zero(world, bob):
    Device.objects.filter(device_id="cam-1").update(online=True)
    for value, expected in (("true", ["cam-1"]), ("1", ["cam-1"]), ("FALSE", ["cam-0", "cam-2"])):
        rows = bob.client().get("/api/v1/devices/", {"online": value}).json()["results"]
        assert [d["device_id"] for d in rows] == expected, value


def test_the_artifact_filters_keep_their_first_names(world, bob):
    """docs/api.md named them version__model__name and version__version before model and
    version existed; clients that use them keep working."""
    new = bob.client().get("/api/v1/artifacts/", {"model": "digits", "version": "1.0.0"}).json()
    old = bob.client().get(
        "/api/v1/artifacts/", {"version__model__name": "digits", "version__version": "1.0.0"}
    )
    assert new["count"] == 1 and old.json() == new
    assert bob.client().get("/api/v1/artifacts/", {"model": "letters"}).json()["count"] == 0


def test_a_limit_asks_for_fewer_rows_than_the_default_page(world, bob):
    assert len(bob.client().get("/api/v1/devices/").json()["results"]) == 3
    assert len(bob.client().get("/api/v1/devices/", {"limit": 2}).json()["results"]) == 2
