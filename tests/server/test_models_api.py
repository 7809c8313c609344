"""Models through the API: create, list, detail, and the refusals with their error codes."""

from __future__ import annotations

import pytest

from fleet.registry.models import MLModel

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str, field: str | None) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    return error


def test_it_creates_a_model(alice):
    response = alice.client().post(
        "/api/v1/models/",
        {"name": "digits", "task": "classification", "labels": ["0", "1", "2"], "description": "8x8 digits"},
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["name"] == "digits"
    assert body["task"] == "classification"
    assert body["labels"] == ["0", "1", "2"]
    assert body["description"] == "8x8 digits"
    assert body["created_by"] == "alice"
    assert body["created_at"]
    model = MLModel.objects.get(name="digits")
    assert model.labels == ["0", "1", "2"]


def test_it_records_who_created_the_model(ada):
    ada.client().post("/api/v1/models/", {"name": "letters"}, format="json")
    assert MLModel.objects.get(name="letters").created_by == ada.user


def test_it_defaults_to_classification_without_labels(alice):
    response = alice.client().post("/api/v1/models/", {"name": "anomaly"}, format="json")
    assert response.status_code == 201, response.json()
    assert (response.json()["task"], response.json()["labels"]) == ("classification", [])


def test_it_ignores_a_created_by_in_the_body(alice, ada):
    alice.client().post("/api/v1/models/", {"name": "letters", "created_by": ada.user.pk}, format="json")
    assert MLModel.objects.get(name="letters").created_by == alice.user


def test_it_lists_models_by_name(alice, bob):
    for name, task in (("zebra", "detection"), ("digits", "classification"), ("mnist", "classification")):
        alice.client().post("/api/v1/models/", {"name": name, "task": task}, format="json")
    response = bob.client().get("/api/v1/models/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert [m["name"] for m in body["results"]] == ["digits", "mnist", "zebra"]


def test_it_filters_the_list_by_task(alice, bob):
    for name, task in (("zebra", "detection"), ("digits", "classification")):
        alice.client().post("/api/v1/models/", {"name": name, "task": task}, format="json")
    response = bob.client().get("/api/v1/models/?task=detection")
    assert [m["name"] for m in response.json()["results"]] == ["zebra"]


def test_it_shows_one_model(digits_model, digits, bob):
    response = bob.client().get("/api/v1/models/digits/")
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["labels"], body["created_by"]) == ("digits", digits.LABELS, "alice")


def test_it_answers_404_for_an_unknown_model(digits_model, bob):
    error = assert_error(bob.client().get("/api/v1/models/letters/"), 404, "unknown_model", None)
    assert "letters" in error["message"]


def test_it_refuses_a_duplicate_name(digits_model, alice):
    response = alice.client().post("/api/v1/models/", {"name": "digits"}, format="json")
    assert_error(response, 409, "duplicate_model", "name")
    assert MLModel.objects.count() == 1


@pytest.mark.parametrize("name", ["Digits", "my model", "-digits", "digits/v2", "ümlaut", ""], ids=repr)
def test_it_refuses_an_invalid_name(name, alice):
    response = alice.client().post("/api/v1/models/", {"name": name}, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == "name"
    assert not MLModel.objects.exists()


@pytest.mark.parametrize("name", ["Digits", "my model", "-digits", "digits/v2", "ümlaut"], ids=repr)
def test_it_says_invalid_name_for_a_name_with_bad_characters(name, alice):
    response = alice.client().post("/api/v1/models/", {"name": name}, format="json")
    assert_error(response, 400, "invalid_name", "name")


def test_it_refuses_an_unknown_task(alice):
    response = alice.client().post("/api/v1/models/", {"name": "digits", "task": "poetry"}, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["field"] == "task"
    assert "poetry" in error["message"]
    assert not MLModel.objects.exists()


def test_it_refuses_labels_that_are_not_a_list(alice):
    response = alice.client().post("/api/v1/models/", {"name": "digits", "labels": "0,1,2"}, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == "labels"
    assert not MLModel.objects.exists()
