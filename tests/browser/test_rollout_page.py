"""The rollout page in a real browser (issue 10, section 4): each role logs in through the
form; a viewer sees no action button; an operator pauses and resumes a running rollout with
the buttons (confirmation, reason, database state, audit entry); nobody edits a started
rollout. The `browser` fixture fails a test on any JavaScript console error."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from fleet.rollouts.choices import RolloutState
from fleet.rollouts.models import AuditEntry
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
