"""Swagger UI and Redoc render in a real browser from the control plane's own static files
(drf-spectacular-sidecar): no CDN, so an offline ops network gets them too (issue 10,
section 3). The `browser` fixture fails a test on any JavaScript console error."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.browser
TITLE = "Modelfleet control plane API"


@pytest.mark.parametrize(
    ("path", "title", "operation"),
    [
        ("/api/docs/", ".swagger-ui .info .title", ".opblock-summary-path"),
        ("/api/redoc/", "h1", "[data-section-id^='operation/']"),
    ],
)
def test_the_api_docs_render_offline(browser, path, title, operation):
    browser.open(path)
    wait_until(
        lambda: browser.all(title) and TITLE in browser.text(title), timeout=20, message=f"{path} title"
    )
    wait_until(lambda: len(browser.all(operation)) > 10, timeout=20, message=f"{path} operations")
    browser.shot("api-" + path.strip("/").split("/")[-1])


def test_a_request_to_another_host_is_seen(browser):
    """The positive control of the check every browser test ends with: a page that asks
    another host for anything is caught (here another loopback address, refused at once)."""
    browser.open("/admin/login/")
    browser.driver.execute_script(
        "const img = document.createElement('img'); img.alt = ''; img.src = 'http://127.0.0.2:9/logo.svg';"
        "document.body.appendChild(img);"
    )
    wait_until(browser.foreign_requests, timeout=10, message="the planted request")
    assert browser.foreign_requests() == ["http://127.0.0.2:9/logo.svg"]
    # Planted on purpose: once its console error is in, forget both so the fixture's own
    # checks pass.
    wait_until(lambda: [e for e in browser.errors() if "127.0.0.2" in e], timeout=10, message="the error")
    browser.requests.clear()
    browser.console.clear()
