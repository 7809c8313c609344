"""The rollout page in a real browser (issue 10, section 4): each role logs in through the
form; a viewer sees no action button; an operator pauses and resumes a running rollout with
the buttons (confirmation, reason, database state, audit entry); nobody edits a started
rollout. The `browser` fixture fails a test on any JavaScript console error."""

from __future__ import annotations

import pytest
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from fleet.devices.models import DeviceEvent
from fleet.rollouts import services
from fleet.rollouts.choices import AssignmentState, Decision, Metric, RolloutState, Verdict
from fleet.rollouts.models import AuditEntry, GateEvaluation, Rollout, RolloutPolicy
from tests.conftest import wait_until
from tests.server import admin_world

pytestmark = pytest.mark.browser


@pytest.fixture
def running(world, people):
    return admin_world.start(world, people["alice"])


def rollout_url(rollout) -> str:
    return f"/admin/rollouts/rollout/{rollout.pk}/change/"


@pytest.mark.parametrize(("name", "role"), [("bob", "viewer"), ("alice", "operator"), ("ada", "admin")])
def test_each_role_logs_in_and_sees_the_rollouts(browser, running, name, role):
    browser.login(name)
    browser.shot(f"index-{role}")
    browser.open("/admin/rollouts/rollout/")
    assert "digits → 2.0.0" in browser.text("#result_list")
    assert "Running" in browser.text("#result_list")
    browser.shot(f"rollouts-{role}")


def test_a_viewer_sees_no_action_buttons_on_a_running_rollout(browser, running):
    browser.login("bob")
    browser.open(rollout_url(running))
    # No evaluation yet: each chart says there is nothing to draw.
    empty = [note.text for note in browser.all(".chart-empty") if note.is_displayed()]
    assert empty == ["Nothing to draw yet."] * 5
    assert browser.text("#rollout-headline").startswith("Running by alice at ")
    assert browser.text("#rollout-headline").endswith(": canary for 2.0.0")
    assert browser.all("[data-action]") == []
    assert browser.all("#rollout-stages")  # control: the page itself is there
    assert browser.sideways() <= 0  # at 1,440 px nothing scrolls sideways
    assert browser.axe() == []
    browser.shot("rollout-viewer")


def test_an_operator_pauses_and_resumes_with_the_buttons(browser, running, people):
    browser.login("alice")
    browser.open(rollout_url(running))
    shown = {button.get_attribute("data-action") for button in browser.all("[data-action]")}
    assert shown == {"pause", "promote", "abort", "rollback"}
    assert browser.axe() == []
    browser.shot("rollout-running-operator")

    browser.click("[data-action=pause]")
    assert "devices keep 2.0.0" in browser.text("#action-impact")
    assert browser.axe() == []
    browser.shot("rollout-pause-confirm")
    browser.click("input[name=confirm]")  # no reason: the form asks for one, nothing happens
    assert browser.all(".errorlist")
    running.refresh_from_db()
    assert running.state == RolloutState.RUNNING
    confirm(browser, "latency alarms in eu-west")
    assert_audited(running, "pause", RolloutState.PAUSED, people["alice"], "latency alarms in eu-west")
    assert "Paused by alice" in browser.text("#rollout-headline")
    shown = {button.get_attribute("data-action") for button in browser.all("[data-action]")}
    assert shown == {"resume", "abort", "rollback"}
    browser.shot("rollout-paused")

    browser.click("[data-action=resume]")
    confirm(browser, "alarm was a false positive")
    assert_audited(running, "resume", RolloutState.RUNNING, people["alice"], "alarm was a false positive")
    assert browser.text("#rollout-headline").endswith(": alarm was a false positive")


def confirm(browser, reason: str) -> None:
    browser.driver.find_element(By.NAME, "reason").send_keys(reason)
    browser.click("input[name=confirm]")


def assert_audited(rollout, action: str, state: str, actor, reason: str) -> None:
    rollout.refresh_from_db()
    assert rollout.state == state
    entry = AuditEntry.objects.filter(rollout=rollout, action=action).get()
    assert (entry.actor, entry.reason) == (actor, reason)


def test_a_started_rollout_cannot_be_edited(browser, running, world):
    browser.login("ada")  # even a superuser
    browser.open(rollout_url(running))
    form = browser.driver.find_element(By.ID, "rollout_form")
    fields = form.find_elements(By.CSS_SELECTOR, "input:not([type=hidden]), select, textarea")
    assert fields == []
    assert browser.all("input[name=_save]") == [] and browser.all("a.deletelink") == []
    assert "2.0.0" in form.text  # control: the rollout is shown, read-only
    browser.shot("rollout-read-only")


# --- the rollout page's evidence: stages, charts, devices, timeline, live refresh


@pytest.fixture
def evidence(running):
    return admin_world.evidence(running)


def chart(browser, name: str) -> dict[str, list[list[float]]]:
    """The series a chart draws: label -> [[x, y], …]."""
    return browser.driver.execute_script(
        "const chart = Chart.getChart(document.getElementById(arguments[0]));"
        "return Object.fromEntries(chart.data.datasets.map(d => [d.label, d.data.map(p => [p.x, p.y])]));",
        f"chart-{name}",
    )


def test_the_charts_carry_the_stored_evaluations_and_telemetry(browser, running, evidence):
    browser.login("alice")
    browser.open(rollout_url(running))
    accuracy = chart(browser, "accuracy")
    assert [y for _, y in accuracy["candidate 2.0.0 (float32)"]] == [91.2, 80.0, 72.0]
    assert [y for _, y in accuracy["incumbent (float32)"]] == [97.5, 97.4, 97.5]
    times = [x for x, _ in accuracy["candidate 2.0.0 (float32)"]]
    assert times[-1] == int((evidence["at"]).timestamp()) - 10
    drop = chart(browser, "drop")
    assert [y for _, y in drop["drop (float32)"]][-1] == 25.5
    assert [y for _, y in drop["confidence sequence, lower end (float32)"]] == [-3.1, 8.2, 18.2]
    assert [y for _, y in drop["confidence sequence (float32)"]] == [12.7, 26.7, 32.9]
    assert {y for _, y in drop["allowed drop (float32)"]} == {2}
    assert [y for _, y in chart(browser, "labels")["candidate labels (float32)"]] == [100, 200, 300]
    assert [y for _, y in chart(browser, "latency")["p95 2.0.0"]] == [1.4]
    errors = chart(browser, "errors")
    assert [y for _, y in errors["error rate 2.0.0"]] == [1.0]
    assert [y for _, y in errors["ceiling"]] == [1.0, 1.0]  # across the chart
    assert not [note for note in browser.all(".chart-empty") if note.is_displayed()]  # all drawn
    assert browser.sideways() <= 0  # at 1,440 px nothing scrolls sideways
    assert browser.axe() == []
    browser.shot("rollout-page")
    browser.driver.execute_script("document.getElementById('rollout-charts').scrollIntoView()")
    browser.shot("rollout-charts")
    browser.driver.execute_script("document.getElementById('rollout-devices').scrollIntoView()")
    browser.shot("rollout-devices")


def test_the_device_table_shows_the_failed_devices_only(browser, running, evidence):
    browser.login("bob")
    browser.open(rollout_url(running))
    assert len(browser.all("#rollout-devices-table tbody tr")) == 10
    browser.click("a[data-filter=failed]")
    rows = browser.all("#rollout-devices-table tbody tr")
    assert [row.get_attribute("data-device") for row in rows] == [evidence["failed"].device.device_id]
    assert "golden_failed" in rows[0].text and "1.0.0 → 2.0.0" in rows[0].text
    browser.shot("rollout-failed-devices")


def test_the_page_refreshes_itself_after_a_change_without_a_reload(browser, running, evidence):
    browser.login("bob")
    browser.open(rollout_url(running))
    browser.driver.execute_script("window.notReloaded = true;")
    stage = '#rollout-stages tr[data-stage="1"] li[data-state="active"] strong'
    # Read in one script: the part may be replaced between finding an element and reading it.
    figure = lambda: browser.driver.execute_script(  # noqa: E731
        "const e = document.querySelector(arguments[0]); return e && e.textContent;", stage
    )
    assert figure() == "1"
    # A poll with nothing new leaves the page's elements alone (nothing flickers, no
    # element a reader holds goes stale).
    browser.driver.execute_script("document.getElementById('rollout-headline').kept = true;")
    wait_until(lambda: "Updated" in browser.text("#live-status"), timeout=20, message="a first poll")
    assert browser.driver.execute_script("return document.getElementById('rollout-headline').kept === true;")
    # A second device of stage 1 reports the candidate active; the evaluator's sync moves it.
    notified = running.assignments.get(stage=0, state=AssignmentState.NOTIFIED)
    now = timezone.now()
    DeviceEvent.objects.create(
        device_id=notified.device_id,
        message_id="active-2",
        type="active",
        generation=notified.generation,
        model="digits",
        version="2.0.0",
        variant="float32",
        ts=now,
        received_at=now,
    )
    services.assignments_sync(rollout=running)
    # And the gates look again: a fourth accuracy evaluation.
    GateEvaluation.objects.create(
        rollout=running,
        stage=0,
        metric=Metric.ACCURACY,
        variant="float32",
        verdict=Verdict.FAIL,
        candidate_value=0.6549,
        incumbent_value=0.975,
        candidate_n=400,
        incumbent_n=4000,
        lower=25.0,
        upper=39.0,
        threshold=2.0,
        inputs={"drop_pp": 32.01},
        decision=Decision.ROLLBACK,
        evaluated_at=evidence["at"],  # after the fixture's three (a minute into the rollout)
    )
    wait_until(lambda: figure() == "2", timeout=20, message="the page to show 2 active devices")
    wait_until(
        lambda: (
            [y for _, y in chart(browser, "accuracy")["candidate 2.0.0 (float32)"]]
            == [91.2, 80.0, 72.0, 65.5]
        ),
        timeout=20,
        message="the accuracy chart to gain the new evaluation",
    )
    assert browser.driver.execute_script("return window.notReloaded === true;")
    assert "device event" in browser.text("#rollout-timeline")


def test_the_rollout_page_fits_a_phone(browser, running, evidence):
    browser.login("bob")
    browser.driver.set_window_size(390, 844)
    browser.open(rollout_url(running))
    assert browser.sideways() <= 0
    assert browser.axe() == []
    browser.shot("rollout-phone")


def test_an_operator_previews_a_rollout_before_creating_it(browser, world):
    browser.login("alice")
    browser.open("/admin/rollouts/rollout/add/")
    Select(browser.driver.find_element(By.NAME, "version")).select_by_visible_text("digits 2.0.0")
    Select(browser.driver.find_element(By.NAME, "policy")).select_by_visible_text("canary")
    browser.driver.find_element(By.NAME, "tags").send_keys("fleet")
    browser.click("input[name=_preview]")
    assert "10 active devices targeted: 10 get float32." in browser.text("#preview-summary")
    added = [cell.text for cell in browser.all("#preview-stages td[data-added]")]
    assert added == ["3", "7"]
    assert not Rollout.objects.exists()  # a preview writes nothing
    assert browser.axe() == []
    browser.shot("rollout-add-preview")
    browser.click("input[name=_save]")
    draft = Rollout.objects.get()
    assert draft.state == RolloutState.DRAFT
    assert browser.all("#rollout-preview") and {
        b.get_attribute("data-action") for b in browser.all("[data-action]")
    } == {
        "start",
        "abort",
    }
    assert browser.axe() == []
    browser.shot("rollout-draft-preview")


def test_an_operator_writes_a_policy_with_the_editor(browser, people):
    browser.login("alice")
    browser.open("/admin/rollouts/rolloutpolicy/add/")  # the defaults: 10 %, 50 %, 100 %
    typed = {
        "name": "careful",
        "stages-1-value": "100",
        "stages-1-soak_seconds": "0",
        "stages-2-value": "",  # a stage removed
        "gates-gates-max_error_rate": "0.5",
        "gates-accuracy-max_drop_pp": "3",
    }
    for name, text in typed.items():
        field = browser.driver.find_element(By.NAME, name)
        field.clear()
        field.send_keys(text)
    assert browser.axe() == []
    browser.click("input[name=_continue]")
    assert browser.all(".errornote") == [], browser.text("#content-main")[:1500]
    policy = RolloutPolicy.objects.get(name="careful")
    assert [(s["value"], s["soak_seconds"]) for s in policy.stages] == [(10, 600), (100, 0)]
    assert policy.gates["max_error_rate"] == 0.005 and policy.gates["accuracy"]["max_drop_pp"] == 3
    boxes = [box.text.replace("\n", " ") for box in browser.all(".stage-diagram li")]
    assert boxes == ["Stage 1 10 % soak 600 s", "Stage 2 100 %"]
    assert browser.sideways() <= 0
    browser.shot("policy-editor")
    browser.driver.set_window_size(390, 844)
    browser.open(f"/admin/rollouts/rolloutpolicy/{policy.pk}/change/")
    assert browser.sideways() <= 0
    assert browser.axe() == []
    browser.shot("policy-editor-phone")
