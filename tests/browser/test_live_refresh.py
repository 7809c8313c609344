"""Pages refresh themselves (issue 10, section 2) in a real browser: with a page open, the
database changes and the page's figures, tables and charts follow without a reload (a
marker set in the page survives), what someone is typing in a form stays, the status line
says when it last updated and, once the session is gone, that the connection is lost."""

from __future__ import annotations

import pytest
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fleet.devices.models import Device, DeviceEvent
from tests.server import admin_world

pytestmark = pytest.mark.browser
# A refresh every 5 s; a few of them, on a busy machine.
PATIENCE_S = 30


def js(browser, script: str, *args):
    """Read the page in one script: a part may be replaced between finding and reading."""
    return browser.driver.execute_script(script, *args)


def wait(browser, condition, message: str):
    return WebDriverWait(browser.driver, PATIENCE_S, poll_frequency=0.1).until(
        lambda driver: condition(), message=f"waiting for {message}"
    )


def mark_not_reloaded(browser) -> None:
    js(browser, "window.__noReload = 1;")


def not_reloaded(browser) -> bool:
    return js(browser, "return window.__noReload === 1;")


def text_of(browser, css: str) -> str | None:
    return js(browser, "const e = document.querySelector(arguments[0]); return e && e.textContent;", css)


@pytest.fixture
def fleet(world, people):
    world["rollout"] = admin_world.start(world, people["alice"])
    return world


def test_the_dashboard_follows_the_database_without_a_reload(browser, fleet):
    browser.login("bob")  # the dashboard is the page after logging in
    mark_not_reloaded(browser)
    online = '#figure-devices a[data-figure="online"] strong'
    assert text_of(browser, online) == "0"
    versions = "return Chart.getChart(document.getElementById('versions-chart')).data.labels;"
    assert js(browser, versions) == ["digits 1.0.0"]

    devices = [device.pk for device in fleet["devices"][:3]]
    Device.objects.filter(pk__in=devices).update(
        online=True, reported_models={"digits": {"version": "2.0.0", "variant": "float32"}}
    )
    wait(browser, lambda: text_of(browser, online) == "3", "the dashboard to show 3 devices online")
    wait(browser, lambda: js(browser, versions) == ["digits 1.0.0", "digits 2.0.0"], "a bar for 2.0.0")
    stacks = js(
        browser, "return Chart.getChart(document.getElementById('versions-chart')).data.datasets[0].data;"
    )
    assert stacks == [7, 3]
    assert "digits 2.0.0" in text_of(browser, "#versions-table")  # the table behind the chart too
    assert not_reloaded(browser)
    assert text_of(browser, "#live-status [data-live-clock]").startswith("Updated ")
    assert browser.axe() == []
    browser.shot("dashboard-live")


def test_the_device_page_follows_the_database_and_keeps_what_is_typed(browser, fleet):
    camera = fleet["devices"][0]
    browser.login("alice")  # an operator: the page has a form (name, tags)
    browser.open(f"/admin/devices/device/{camera.pk}/change/")
    mark_not_reloaded(browser)
    tags = browser.driver.find_element(By.NAME, "tags")
    tags.clear()
    tags.send_keys("fleet, lab")  # typed, not saved
    browser.driver.find_element(By.ID, "h-health").click()  # focus leaves the field
    online = ".field-online_dot .readonly"
    assert "offline" in text_of(browser, online)
    inferences = (
        "return Chart.getChart(document.getElementById('spark-inferences')).data.datasets[0].data.at(-1);"
    )
    assert js(browser, inferences) is None

    now = timezone.now()
    Device.objects.filter(pk=camera.pk).update(online=True, last_seen_at=now)
    DeviceEvent.objects.create(
        device=camera, message_id="live-1", type="failed", reason="golden_failed", ts=now, received_at=now
    )
    admin_world.hourly(camera, now.replace(minute=0, second=0, microsecond=0), windows=2, inferences=640)

    wait(browser, lambda: "offline" not in text_of(browser, online), "the device to show online")
    wait(browser, lambda: "golden_failed" in text_of(browser, "#device-events"), "the new event")
    wait(browser, lambda: js(browser, inferences) == 640, "the sparkline's newest hour")
    assert text_of(browser, '[data-latest="inferences"]') == "640 per hour"
    assert "s ago" in text_of(browser, ".field-last_seen .readonly")
    assert browser.driver.find_element(By.NAME, "tags").get_attribute("value") == "fleet, lab"
    assert not_reloaded(browser)
    assert browser.axe() == []
    browser.shot("device-live")


def test_the_status_line_says_when_the_connection_is_lost(browser, fleet):
    browser.login("bob")
    mark_not_reloaded(browser)
    wait(browser, lambda: text_of(browser, "[data-live-clock]").startswith("Updated "), "a first refresh")
    assert text_of(browser, "[data-live-alert]") == ""  # control: nothing wrong yet
    browser.driver.delete_cookie("sessionid")  # logged out: the live view answers the login page
    wait(browser, lambda: "Connection lost" in text_of(browser, "[data-live-alert]"), "the lost connection")
    alert = browser.driver.find_element(By.CSS_SELECTOR, "[data-live-alert]")
    assert alert.get_attribute("aria-live") == "polite"
    assert "Retrying in 10 s" in alert.text  # backs off: 5 s, then 10 s, 20 s … up to a minute
    assert not_reloaded(browser)


def test_polling_pauses_while_the_tab_is_hidden(browser, fleet):
    browser.login("bob")
    wait(browser, lambda: text_of(browser, "[data-live-clock]").startswith("Updated "), "a first refresh")
    hide = (
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => arguments[0]});"
        "document.dispatchEvent(new Event('visibilitychange'));"
    )
    js(browser, hide, True)
    wait(browser, lambda: text_of(browser, "[data-live-clock]") == "Paused while the tab is hidden.", "pause")
    js(browser, hide, False)  # back: it refreshes at once
    wait(
        browser, lambda: text_of(browser, "[data-live-clock]").startswith("Updated "), "the refresh on return"
    )
