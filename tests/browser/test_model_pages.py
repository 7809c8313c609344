"""The model, version, artifact and device pages in a real browser (issue 10, sections 1
and 4): an operator deprecates a version whose canary was rolled back through the prompt's
button and its confirmation; a viewer sees the prompt and no button; the device page's
sparklines carry the rollups' points; no console errors, no serious accessibility
violation, nothing scrolls sideways on a phone. Screenshots are named in docs/admin.md."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from fleet.devices.models import TelemetryHourly
from fleet.registry import services as registry
from fleet.registry.choices import VersionStatus
from fleet.rollouts import services
from tests.conftest import wait_until
from tests.server import admin_world

pytestmark = pytest.mark.browser
PHONE = (390, 844)


@pytest.fixture
def failed_canary(world, people):
    """2.0.0 is released, and its rollout was rolled back by the gates' decision."""
    world["v2"] = registry.version_set_status(version=world["v2"], status=VersionStatus.RELEASED)
    rollout = admin_world.start(world, people["alice"])
    world["rollout"] = services.rollout_rollback(rollout=rollout, reason="accuracy gate failed")
    return world


def scroll_to(browser, css: str) -> None:
    """Bring a section to the top of the window, for its screenshot."""
    browser.driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", css)


def version_url(version) -> str:
    return f"/admin/registry/modelversion/{version.pk}/change/"


def test_an_operator_deprecates_a_version_whose_canary_failed(browser, failed_canary):
    v2 = failed_canary["v2"]
    browser.login("alice")
    browser.open(version_url(v2))
    assert "was rolled back" in browser.text("#deprecate-prompt")
    assert browser.all(f'tr[data-rollout="{failed_canary["rollout"].pk}"]')
    assert browser.sideways() <= 0
    assert browser.axe() == []
    browser.shot("version-deprecate-prompt")
    scroll_to(browser, f"#variants-{v2.pk}")
    browser.shot("version-variants-rollouts")

    browser.click("#deprecate-button")
    assert "should not be rolled out again" in browser.text("#action-impact")
    assert browser.axe() == []
    browser.shot("version-deprecate-confirm")
    v2.refresh_from_db()
    assert v2.status == VersionStatus.RELEASED  # nothing happens before the confirmation
    browser.click("input[name=confirm]")
    v2.refresh_from_db()
    assert v2.status == VersionStatus.DEPRECATED
    assert "is now deprecated" in browser.text(".messagelist")
    assert browser.all("#deprecate-prompt") == []
    browser.shot("version-deprecated")


def test_a_viewer_sees_the_prompt_but_no_button(browser, failed_canary):
    browser.login("bob")
    browser.open(version_url(failed_canary["v2"]))
    assert "An operator can deprecate it." in browser.text("#deprecate-prompt")  # control
    assert browser.all("#deprecate-button") == []
    browser.shot("version-viewer")


def test_the_model_page_fits_a_phone(browser, failed_canary):
    browser.login("bob")
    url = f"/admin/registry/mlmodel/{failed_canary['v1'].model_id}/change/"
    browser.open(url)
    assert "10 active devices (float32)" in browser.text(f"#running-{failed_canary['v1'].pk}")
    assert browser.sideways() <= 0
    assert browser.axe() == []
    scroll_to(browser, f"#version-{failed_canary['v2'].pk}")
    browser.shot("model-page")
    browser.driver.set_window_size(*PHONE)
    browser.open(url)
    assert browser.sideways() <= 0
    assert browser.axe() == []
    browser.shot("model-page-phone")


def test_the_artifact_page_reads_in_words_and_copies_a_hash(browser, world):
    artifact = world["v2"].artifacts.get()
    browser.login("bob")
    browser.open(f"/admin/registry/artifact/{artifact.pk}/change/")
    assert "x: float32 [1, 64]" in browser.text("#content-main")
    raw = browser.driver.find_element("css selector", "details")
    assert not raw.get_attribute("open")  # the JSON stays folded
    assert browser.axe() == []
    button = f'button[data-copy="{artifact.raw_sha256}"]'
    browser.driver.find_element("css selector", button).click()
    # Headless Chromium may refuse the clipboard: either way the page says what happened.
    status = f"{button} + .copy-status"
    wait_until(lambda: browser.all(status) and browser.text(status), timeout=5, message="the copy status")
    assert browser.axe() == []
    browser.shot("artifact-page")


@pytest.fixture
def camera(world):
    device = world["devices"][0]
    this_hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for age, inferences, cpu in ((0, 1200, 14.0), (1, 900, 11.5), (5, 300, 9.0)):
        TelemetryHourly.objects.create(
            device=device,
            hour=this_hour - timedelta(hours=age),
            model="digits",
            version="1.0.0",
            variant="float32",
            windows=120,
            inferences=inferences,
            errors=age,
            latency_p95_weighted_sum=inferences * 1.5,
            latency_p95_weight=inferences,
            cpu_pct_sum=120 * cpu,
            cpu_pct_windows=120,
            rss_mb_sum=120 * 60.0,
            rss_mb_windows=120,
            temp_c_sum=120 * 45.0,
            temp_c_windows=120,
        )
    return device


def test_the_device_sparklines_carry_the_rollups_points(browser, camera):
    browser.login("bob")
    browser.open(f"/admin/devices/device/{camera.pk}/change/")
    charts = browser.driver.execute_script(
        "const out = {};"
        "for (const c of document.querySelectorAll('#device-health canvas')) {"
        "  const chart = Chart.getChart(c); out[c.id] = chart.data.datasets[0].data; }"
        "return out;"
    )
    assert sorted(charts) == sorted(
        f"spark-{key}" for key in ("inferences", "latency_p95_ms", "errors", "cpu_pct", "rss_mb", "temp_c")
    )
    gap = [None] * 3
    assert charts["spark-inferences"][-6:] == [300, *gap, 900, 1200]
    assert charts["spark-errors"][-6:] == [5, *gap, 1, 0]
    assert charts["spark-cpu_pct"][-6:] == [9.0, *gap, 11.5, 14.0]
    assert charts["spark-latency_p95_ms"][-1] == 1.5 and charts["spark-temp_c"][-1] == 45.0
    assert all(len(points) == 24 for points in charts.values())
    assert browser.sideways() <= 0
    assert browser.axe() == []
    browser.shot("device-page")
    scroll_to(browser, "#device-health")
    browser.shot("device-health")
    browser.driver.set_window_size(*PHONE)
    browser.open(f"/admin/devices/device/{camera.pk}/change/")
    assert browser.sideways() <= 0
    assert browser.axe() == []
    browser.shot("device-page-phone")


def test_the_compatibility_matrix_fits_a_phone_and_a_desk(browser, world, digits):
    """The version page's matrix (issue 12 §3): an int8 variant for rpi4 only, devices of two
    hardware classes, one of which cannot run int8."""
    from fleet.devices.models import Device, DeviceGroup
    from tests.server.conftest import ready_artifact

    ready_artifact(world["v2"], "int8", digits.build_digits_models(version="2.0.0")["int8"])
    world["v2"].artifacts.filter(variant="int8").update(requires_hardware=["rpi4"])
    Device.objects.filter(device_id__in=["cam-00", "cam-01", "cam-02"]).update(hardware="rpi4")
    Device.objects.filter(device_id="cam-02").update(supports_int8=False)
    DeviceGroup.objects.create(name="dock").members.set(
        Device.objects.filter(device_id__in=["cam-00", "cam-03"])
    )
    browser.login("bob")
    url = version_url(world["v2"])
    for size in ((1440, 900), PHONE):
        browser.driver.set_window_size(*size)
        browser.open(url)
        table = browser.text("#compatibility").lower()  # the admin's headers are in capitals
        assert "needs rpi4 only, int8 support" in table
        assert browser.sideways() <= 0
        assert browser.axe() == []
    scroll_to(browser, "#compatibility")
    browser.shot("version-compatibility-phone")


def test_the_version_page_compares_produced_variants_and_fits_a_phone(
    browser, world, digits, people, settings
):
    """A float32 upload that asked for int8-dynamic and float16: the int8 one lost too much
    accuracy (tests/server/test_quantization.py's outlier model) and is rejected with its
    reason; the table scrolls in its box, the page does not."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from fleet.registry.choices import ArtifactStatus, QuantRecipe
    from tests.server.test_quantization import outlier_float_model, produce

    settings.QUANT_MAX_ACCURACY_DROP_PP = 1.0
    version = registry.version_create(
        model=world["v1"].model,
        version="5.0.0",
        golden_set=SimpleUploadedFile("golden.npz", digits.golden_set_npz()),
        created_by=people["alice"],
    )
    _, children = produce(
        version, outlier_float_model(digits), [QuantRecipe.DYNAMIC_INT8, QuantRecipe.FLOAT16]
    )
    assert children["int8-dynamic"].status == ArtifactStatus.REJECTED
    browser.login("bob")
    for size in ((1440, 900), PHONE):
        browser.driver.set_window_size(*size)
        browser.open(version_url(version))
        assert "Rejected: golden accuracy" in browser.text('tr[data-variant="int8-dynamic"]')
        assert "pp lower" in browser.text('tr[data-variant="int8-dynamic"]')
        assert browser.sideways() <= 0
        assert browser.axe() == []
    scroll_to(browser, f"#variants-{version.pk}")
    browser.shot("version-produced-variants-phone")
