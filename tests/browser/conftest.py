"""Browser tests: Debian's Chromium, driven by Selenium through Debian's chromium-driver
(both installed by scripts/system-deps.sh; nothing downloads a browser or a driver), against
pytest-django's live server on real PostgreSQL. Every test logs in through the real login
form, fails on any JavaScript console error, and leaves screenshots in
<VAR_DIR>/screenshots/ (var/test/screenshots/ under `make test`, named in docs/admin.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from django.conf import settings
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from fleet.celery import app as celery_app
from fleet.core.choices import Role
from fleet.core.services import user_ensure
from fleet.registry import services as registry
from tests.conftest import wait_until
from tests.server import admin_world

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "correct horse battery staple"
WIDE = (1440, 900)
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="session")
def driver():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: run scripts/system-deps.sh (installs chromium, chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={WIDE[0]},{WIDE[1]}",
    ):
        options.add_argument(argument)
    # The console (errors fail a test) and the network (every request must stay on the server).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield chrome
    chrome.quit()


def _gone(element) -> bool:
    try:
        element.tag_name  # noqa: B018 (any call on an element of a page left behind raises)
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        # Caught mid-navigation, chromedriver may say so in its own words instead.
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


class Browser:
    """One person at the browser: logs in, opens pages, clicks, takes screenshots."""

    def __init__(self, driver, base_url: str, shots: Path):
        self.driver = driver
        self.base_url = base_url
        self.shots = shots
        self.console: list[dict] = []
        self.requests: list[str] = []

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)
        self.loaded()

    def loaded(self) -> None:
        wait_until(
            lambda: self.driver.execute_script("return document.readyState") == "complete",
            timeout=10,
            message="the page to load",
        )
        self._drain()

    def _drain(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def foreign_requests(self) -> list[str]:
        """Requests to anywhere but the server under test (a CDN, a font host, a logo)."""
        self._drain()
        local = ("data:", "blob:", self.base_url + "/")
        return [url for url in self.requests if not url.startswith(local)]

    def login(self, username: str) -> None:
        self.open("/admin/login/")
        self.driver.find_element(By.NAME, "username").send_keys(username)
        self.driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        self.click("input[type=submit]")
        assert self.driver.find_elements(By.ID, "logout-form"), f"{username} could not log in"

    def click(self, css: str) -> None:
        """Click what leads to another page (a link, a submit button) and wait for that page."""
        before = self.driver.find_element(By.TAG_NAME, "html")
        self.driver.find_element(By.CSS_SELECTOR, css).click()
        wait_until(lambda: _gone(before), timeout=10, message=f"the page after clicking {css}")
        self.loaded()

    def all(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def sideways(self) -> int:
        """How many pixels the page scrolls sideways (0 when it fits the window)."""
        return self.driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )

    def axe(self) -> list[dict]:
        """Serious and critical accessibility violations on the page (axe-core, vendored)."""
        self.driver.execute_script(AXE.read_text())
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations),"
            " e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));"
        )
        return [
            {
                "id": v["id"],
                "impact": v["impact"],
                "help": v["help"],
                "nodes": [n["target"] for n in v["nodes"]],
            }
            for v in result
            if v["impact"] in ("serious", "critical")
        ]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def errors(self) -> list[str]:
        self._drain()
        return [entry["message"] for entry in self.console if entry["level"] == "SEVERE"]


@pytest.fixture
def browser(driver, live_server):
    shots = Path(settings.VAR_DIR) / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    driver.delete_all_cookies()
    driver.set_window_size(*WIDE)
    driver.get_log("browser")  # forget the previous test's messages and requests
    driver.get_log("performance")
    page = Browser(driver, live_server.url, shots)
    yield page
    errors = page.errors()
    assert errors == [], "JavaScript console errors:\n" + "\n".join(errors)
    foreign = page.foreign_requests()
    assert foreign == [], "requests to other hosts:\n" + "\n".join(foreign)


@pytest.fixture
def people(transactional_db):
    """Ada (admin), alice (operator) and bob (viewer), each with a password to log in."""
    return {
        name: user_ensure(username=name, role=role, password=PASSWORD)
        for name, role in (("ada", Role.ADMIN), ("alice", Role.OPERATOR), ("bob", Role.VIEWER))
    }


@pytest.fixture
def world(people, digits, broker_settings, eager_celery):
    """tests/server/admin_world.py's fleet, with the digits model made by alice."""
    model = registry.model_create(name="digits", labels=digits.LABELS, created_by=people["alice"])
    return admin_world.build(model, digits)


@pytest.fixture
def eager_celery():
    """Desired states are published by Celery tasks after commit; here they run in-process
    (against the test broker) instead of waiting in a queue that no worker reads."""
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False
