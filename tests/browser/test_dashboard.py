"""The fleet dashboard (admin index) in a real browser: its figures equal the database, the
stacked bar carries the expected series, a click on a figure opens the list of the same
devices, and the page fits a phone's width."""

from __future__ import annotations

import pytest
from django.db.models import F

from fleet.devices.models import Device
from tests.server import admin_world

pytestmark = pytest.mark.browser


@pytest.fixture
def fleet(world, people):
    world["rollout"] = admin_world.start(world, people["alice"])
    Device.objects.filter(pk__in=[d.pk for d in world["devices"][:4]]).update(online=True)
    return world


def test_the_dashboard_figures_equal_the_database(browser, fleet):
    browser.login("bob")
    active = Device.objects.filter(status="active")
    expected = {
        "online": active.filter(online=True).count(),
        "offline": active.filter(online=False).count(),
        "behind their desired model": active.filter(applied_generation__lt=F("desired_generation")).count(),
    }
    shown = {
        link.get_attribute("data-figure"): int(link.find_element("css selector", "strong").text)
        for link in browser.all("#figure-devices a[data-figure]")
    }
    assert {name: shown[name] for name in expected} == expected
    assert browser.axe() == []
    browser.shot("dashboard-viewer")
    browser.click('a[data-figure="online"]')
    assert f"{expected['online']} devices" in browser.text("#changelist-form")  # the list behind it


def test_the_version_chart_carries_the_expected_series(browser, fleet):
    browser.login("bob")
    chart = browser.driver.execute_script(
        "const chart = Chart.getChart(document.getElementById('versions-chart'));"
        "return {labels: chart.data.labels,"
        " series: chart.data.datasets.map(d => [d.label, d.data])};"
    )
    assert chart == {"labels": ["digits 1.0.0"], "series": [["float32", [10]]]}


def test_the_dashboard_fits_a_phone(browser, fleet):
    browser.login("bob")
    browser.driver.set_window_size(390, 844)
    browser.open("/admin/")
    browser.shot("dashboard-phone")
    assert browser.sideways() <= 0
    assert browser.axe() == []


def test_the_accessibility_check_sees_what_it_should(browser, people):
    """axe-core runs for real: the login page passes, and the same page with an image that
    has no text alternative fails (the positive control for every `axe() == []`)."""
    browser.open("/admin/login/")
    assert browser.axe() == []
    browser.driver.execute_script(
        "const img = document.createElement('img'); img.src = '/static/fleet/favicon.svg';"
        "document.getElementById('content').appendChild(img);"
    )
    assert [violation["id"] for violation in browser.axe()] == ["image-alt"]
