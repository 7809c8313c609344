"""Request ids and the JSON log format (fleet/core/logs.py): every response names its
request id, the client's own when it is a plain token; lines logged while a request runs
carry it, with the rollout or device they are about."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from django.test import Client

from agent.metrics import json_formatter
from fleet.core.logs import REQUEST_ID_HEADER, ContextFilter, log_context
from tests.server import test_rollouts_api

world = test_rollouts_api.world
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


def capture(name: str):
    """The JSON lines a logger writes, as LOG_FORMAT=json writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def json_lines():
    yield from capture("fleet.rollouts.services")


@pytest.fixture
def request_lines():
    yield from capture("django.request")


def test_a_request_gets_an_id_of_its_own_and_keeps_a_plain_one_the_client_sent(bob):
    generated = bob.client().get("/api/v1/models/")[REQUEST_ID_HEADER]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert bob.client().get("/api/v1/models/")[REQUEST_ID_HEADER] != generated
    given = bob.client().get("/api/v1/models/", headers={REQUEST_ID_HEADER: "lb-7f3a.1"})
    assert given[REQUEST_ID_HEADER] == "lb-7f3a.1"
    # Not a plain token (it would end up in log lines as it is): replaced.
    for bad in ("two words", "x" * 200, "a\u00e9"):
        answer = Client().get("/api/v1/models/", headers={REQUEST_ID_HEADER: bad})
        assert re.fullmatch(r"[0-9a-f]{32}", answer[REQUEST_ID_HEADER]), bad


def test_a_rollout_action_logs_a_json_line_with_the_request_and_rollout_ids(world, alice, json_lines):
    response = alice.client().post(
        f"/api/v1/rollouts/{world.pk}/abort", headers={REQUEST_ID_HEADER: "req-42"}
    )
    assert response.status_code == 200, response.content
    (line,) = [line for line in json_lines() if "abort" in line["message"]]
    assert line["request_id"] == "req-42"
    assert line["rollout_id"] == world.pk
    assert line["level"] == "INFO" and line["logger"] == "fleet.rollouts.services"
    assert line["time"].endswith("+00:00")


def test_the_context_ends_with_the_request_and_with_the_block(json_lines):
    logger = logging.getLogger("fleet.rollouts.services")
    with log_context(rollout_id=3, device_id="cam-9"):
        logger.info("inside")
    logger.info("outside")
    inside, outside = json_lines()
    assert (inside["rollout_id"], inside["device_id"]) == (3, "cam-9")
    assert "rollout_id" not in outside and "device_id" not in outside and "request_id" not in outside


def test_djangos_line_for_a_refused_request_names_the_request_id(bob, request_lines):
    assert bob.client().get("/api/v1/nothing-here", headers={REQUEST_ID_HEADER: "req-404"}).status_code == 404
    (line,) = request_lines()
    assert line["request_id"] == "req-404"
    assert line["level"] == "WARNING" and "/api/v1/nothing-here" in line["message"]
