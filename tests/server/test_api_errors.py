"""Every error under /api/ is JSON in the one error shape (issue 9, section 5):
`{"error": {"code": str, "message": str, "field": str | null}}` — unknown endpoints, wrong
methods, Django's own 400/403/500, a browser that asked for HTML. The admin keeps its HTML
pages. `error_shape_problem` is the check the API fuzzer (test_api_fuzz.py) applies to
every answer it gets; the tests at the bottom show that it does fail on the wrong thing."""

from __future__ import annotations

import json

import pytest
from django.http import HttpResponse
from django.test import Client, RequestFactory
from rest_framework.test import APIClient

from fleet.core import errors

pytestmark = pytest.mark.django_db


def error_shape_problem(status: int, content_type: str, content: bytes) -> str | None:
    """What is wrong with an answer, measured against the error contract; None when fine."""
    if status < 400:
        return None
    if content_type.split(";")[0].strip() != "application/json":
        return f"{status} answered with {content_type or 'no content type'}, not JSON: {content[:200]!r}"
    try:
        body = json.loads(content)
    except ValueError:
        return f"{status} answered with a body that is not JSON: {content[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"{status} answered without an 'error' object: {body!r}"
    if not (isinstance(error.get("code"), str) and error["code"]):
        return f"{status}: error.code must be a non-empty string: {error!r}"
    if not (isinstance(error.get("message"), str) and error["message"]):
        return f"{status}: error.message must be a non-empty string: {error!r}"
    if "field" not in error or not (error["field"] is None or isinstance(error["field"], str)):
        return f"{status}: error.field must be present, a string or null: {error!r}"
    return None


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    problem = error_shape_problem(response.status_code, response.get("Content-Type", ""), response.content)
    assert problem is None, problem
    assert response.status_code == status, response.content
    error = json.loads(response.content)["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --- unknown endpoints (404)


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete", "options"])
def test_an_unknown_api_path_is_a_json_404_with_any_method_and_debug_on_or_off(settings, method, debug):
    settings.DEBUG = debug  # with DEBUG on, Django answers Http404 with its HTML debug page
    response = getattr(APIClient(), method)("/api/v1/nothing-here/")
    error = assert_json_error(response, 404, "not_found")
    assert "/api/v1/nothing-here/" in error["message"]


def test_the_bare_api_prefix_and_an_unknown_version_are_json_404s(anonymous):
    for path in ("/api/", "/api/v2/models/", "/api/schema/extra"):
        assert_json_error(anonymous.get(path), 404, "not_found")


@pytest.mark.parametrize("debug", [False, True])
def test_a_post_without_the_trailing_slash_is_a_json_404_that_names_the_right_path(settings, alice, debug):
    """APPEND_SLASH would redirect (dropping the body) or, with DEBUG on, raise a 500."""
    settings.DEBUG = debug
    response = alice.client().post("/api/v1/models", {"name": "letters"}, format="json")
    error = assert_json_error(response, 404, "not_found")
    assert "/api/v1/models/" in error["message"]


def test_a_get_without_the_trailing_slash_is_still_redirected(bob):
    response = bob.client().get("/api/v1/models?task=classification")
    assert response.status_code == 301
    assert response["Location"] == "/api/v1/models/?task=classification"


def test_a_get_without_the_trailing_slash_where_none_exists_is_a_json_404(bob):
    assert_json_error(bob.client().get("/api/v1/nothing"), 404, "not_found")


def test_a_path_that_does_not_match_a_pattern_is_a_json_404(bob):
    for path in ("/api/v1/rollouts/abc", "/api/v1/artifacts/-1/", "/api/v1/models/UPPER/"):
        assert_json_error(bob.client().get(path), 404, "not_found")


def test_an_unknown_api_path_is_a_json_404_even_for_a_session_without_a_csrf_token(ada):
    """CsrfViewMiddleware would refuse the POST with Django's HTML 403 page first."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(ada.user)
    assert_json_error(client.post("/api/v1/nothing-here/", {"a": "b"}), 404, "not_found")


def test_a_known_object_that_does_not_exist_is_a_json_404(bob):
    assert_json_error(bob.client().get("/api/v1/models/nope/"), 404, "unknown_model")


def test_the_admin_keeps_its_html_404(ada):
    client = Client()
    client.force_login(ada.user)
    response = client.get("/admin/nothing-here/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


# --- wrong methods (405)


@pytest.mark.parametrize(
    "method, path",
    [
        ("delete", "/api/v1/models/"),
        ("put", "/api/v1/models/digits/"),
        ("get", "/api/v1/enroll"),
        ("put", "/api/v1/devices/cam-1/"),  # a view that narrows http_method_names
        ("delete", "/api/v1/rollout-policies/canary/"),
        ("post", "/api/schema/"),
    ],
)
def test_a_wrong_method_is_a_json_405(ada, method, path):
    response = getattr(ada.client(), method)(path)
    assert_json_error(response, 405, "method_not_allowed")


# --- Django-level errors


def test_a_disallowed_host_is_a_json_400_under_api_and_html_elsewhere(anonymous):
    assert_json_error(anonymous.get("/api/v1/models/", HTTP_HOST="evil.example"), 400, "bad_request")
    response = Client().get("/admin/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


def test_too_many_form_fields_is_a_json_400(settings, alice):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    body = "&".join(f"f{n}=x" for n in range(50))
    response = alice.client().post("/api/v1/models/", body, content_type="application/x-www-form-urlencoded")
    assert_json_error(response, 400, "bad_request")


def test_a_body_over_the_memory_limit_is_a_json_413(settings, alice):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = "name=" + "x" * 5000
    response = alice.client().post("/api/v1/models/", body, content_type="application/x-www-form-urlencoded")
    assert_json_error(response, 413, "too_large")


@pytest.mark.parametrize(
    "handler, status, code",
    [(errors.json_400, 400, "bad_request"), (errors.json_403, 403, "permission_denied")],
)
def test_the_django_400_and_403_handlers_answer_json_under_api_and_html_elsewhere(handler, status, code):
    api = handler(RequestFactory().get("/api/v1/models/"), Exception("refused"))
    assert_json_error(api, status, code)
    page = handler(RequestFactory().get("/admin/"), Exception("refused"))
    assert page.status_code == status
    assert page["Content-Type"].startswith("text/html")


def test_the_django_500_handler_answers_json_under_api_and_html_elsewhere():
    assert_json_error(errors.json_500(RequestFactory().get("/api/v1/models/")), 500, "server_error")
    page = errors.json_500(RequestFactory().get("/admin/"))
    assert page.status_code == 500
    assert page["Content-Type"].startswith("text/html")


def test_a_browser_that_asks_for_html_still_gets_json_errors(bob, anonymous):
    """The browsable API renders successes as HTML for people; errors stay in the contract."""
    assert_json_error(bob.client().get("/api/v1/models/nope/", HTTP_ACCEPT="text/html"), 404)
    assert_json_error(anonymous.get("/api/v1/models/", HTTP_ACCEPT="text/html"), 401)
    assert (
        bob.client().get("/api/v1/models/", HTTP_ACCEPT="text/html")["Content-Type"].startswith("text/html")
    )


# --- positive controls: the contract check fails on what it must refuse


def test_the_error_check_refuses_djangos_html_404_page(ada):
    client = Client()
    client.force_login(ada.user)
    page = client.get("/admin/nothing-here/")
    problem = error_shape_problem(page.status_code, page["Content-Type"], page.content)
    assert problem and "not JSON" in problem


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"detail": "Not found."}',  # DRF's default shape
        b'{"error": "not_found"}',
        b'{"error": {"code": "", "message": "x", "field": null}}',
        b'{"error": {"code": "x", "message": "x"}}',
        b'{"error": {"code": "x", "message": "x", "field": 3}}',
    ],
)
def test_the_error_check_refuses_json_in_another_shape(body):
    assert error_shape_problem(404, "application/json", body)


def test_the_error_check_accepts_the_contract_and_ignores_successes():
    assert (
        error_shape_problem(
            409, "application/json", b'{"error": {"code": "c", "message": "m", "field": null}}'
        )
        is None
    )
    assert error_shape_problem(200, "text/html", b"<html></html>") is None


# --- regressions: bugs found while fuzzing the API (NUL characters reached PostgreSQL: 500s;
# the enrollment token schema required a key that lists never carry)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "nightly", "maintenance_window": {"days\x00": "mon"}},
        {"name": "nightly", "maintenance_window": {"days": ["mon\x00"]}},
        {"name": "nightly", "gates": {"min_accuracy": "\x00"}},
    ],
)
def test_a_nul_character_in_a_policys_json_is_a_400_not_a_500(alice, body):
    response = alice.client().post("/api/v1/rollout-policies/", body, format="json")
    error = assert_json_error(response, 400, "null_characters_not_allowed")
    assert error["field"] in ("maintenance_window", "gates")


def test_a_nul_character_in_a_groups_rules_or_a_tokens_tags_is_a_400(alice, ada):
    group = {"name": "roof", "kind": "dynamic", "rules": {"tags": ["roof\x00"]}}
    response = alice.client().post("/api/v1/device-groups/", group, format="json")
    assert assert_json_error(response, 400, "null_characters_not_allowed")["field"] == "rules"
    token = {"name": "line-3", "tags": ["a\x00"]}
    response = ada.client().post("/api/v1/enrollment-tokens/", token, format="json")
    assert assert_json_error(response, 400, "null_characters_not_allowed")["field"] == "tags"


@pytest.mark.usefixtures("broker_settings")
def test_a_nul_character_in_an_enrolling_devices_identity_is_a_400_not_a_500(anonymous, enrollment_key):
    for identity in ({"hardware": "rpi\x00"}, {"supported_ops": ["ADD\x00"]}, {"x\x00": 1}):
        body = {"device_id": "cam-nul", "enrollment_token": enrollment_key, "identity": identity}
        response = anonymous.post("/api/v1/enroll", body, format="json")
        assert assert_json_error(response, 400, "null_characters_not_allowed")["field"] == "identity"
    # Positive control: the same enrollment without the NUL goes through.
    body = {"device_id": "cam-nul", "enrollment_token": enrollment_key, "identity": {"hardware": "rpi"}}
    assert anonymous.post("/api/v1/enroll", body, format="json").status_code == 201


def test_the_enrollment_token_schema_says_only_the_post_answer_carries_the_key(anonymous):
    """The fuzzer's schema check: a listed token has no key, so the schema must not require it."""
    schema = anonymous.get("/api/schema/?format=json").json()
    listed = schema["components"]["schemas"]["EnrollmentToken"]
    assert "key" not in listed["properties"]
    created = schema["paths"]["/api/v1/enrollment-tokens/"]["post"]["responses"]["201"]
    ref = created["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "key" in schema["components"]["schemas"][ref]["required"]


# --- an unhandled crash (500), end to end through the handlers (tests/server/planted_urls.py)


@pytest.mark.urls("tests.server.planted_urls")
@pytest.mark.parametrize("path", ["/api/v1/planted-crash", "/api/v1/planted-drf-crash"])
def test_an_unhandled_crash_under_api_is_a_json_500(settings, path, caplog):
    settings.DEBUG = False  # with DEBUG on, Django shows its traceback page (docs/api.md)
    response = Client(raise_request_exception=False).get(path)
    error = assert_json_error(response, 500, "server_error")
    assert "planted bug" not in error["message"]  # the traceback goes to the log, not the client
    assert "planted bug" in caplog.text


@pytest.mark.urls("tests.server.planted_urls")
def test_an_unhandled_crash_outside_api_keeps_djangos_html_500(settings):
    """Positive control: the same crash outside /api/ is Django's page, so the JSON above
    comes from the API's handler and not from some blanket rewrite."""
    settings.DEBUG = False
    response = Client(raise_request_exception=False).get("/planted-crash")
    assert response.status_code == 500
    assert response["Content-Type"].startswith("text/html")


# --- CSRF: a session (the admin's login) must send the token on unsafe requests

CSRF_SECRET = "a" * 32  # a well-formed csrftoken cookie value; the header must repeat it


def _session_client(persona) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(persona.user)
    client.cookies["csrftoken"] = CSRF_SECRET
    return client


def test_a_session_post_without_the_csrf_token_is_a_json_403(alice):
    response = _session_client(alice).post("/api/v1/models/", {"name": "letters"})
    error = assert_json_error(response, 403, "permission_denied")
    assert error["message"].startswith("CSRF Failed")


def test_a_session_post_with_the_csrf_token_goes_through(alice):
    """Positive control for the refusal above."""
    response = _session_client(alice).post(
        "/api/v1/models/", {"name": "letters"}, HTTP_X_CSRFTOKEN=CSRF_SECRET
    )
    assert response.status_code == 201, response.content


def _csrf_refusal(path: str):
    """Django's own CsrfViewMiddleware (the one in MIDDLEWARE) on a plain Django view that
    is not CSRF-exempt: DRF's views are exempt and check CSRF themselves, so this is the
    path a non-DRF view under /api/ would take."""
    from django.middleware.csrf import CsrfViewMiddleware

    def plain_view(request):
        return HttpResponse("changed")

    request = RequestFactory().post(path, {"a": "b"})
    request.COOKIES["csrftoken"] = CSRF_SECRET
    return CsrfViewMiddleware(plain_view).process_view(request, plain_view, (), {})


def test_djangos_csrf_refusal_is_json_under_api_and_html_elsewhere():
    error = assert_json_error(_csrf_refusal("/api/v1/anything"), 403, "permission_denied")
    assert error["message"].startswith("CSRF Failed")
    page = _csrf_refusal("/admin/anything/")
    assert page.status_code == 403 and page["Content-Type"].startswith("text/html")
