"""Every page of the admin in a real browser (issue 10, section 2): each registered model's
list, add page and the change page of its first object, and the dashboard, as an admin,
fit a phone (390 px) and a wide screen (1,440 px) without scrolling sideways, with no
serious accessibility violation (axe-core) and no JavaScript console error (the browser
fixture fails on one). Each is screenshot as ``every-<app>-<model>[-add|-change]-<width>.png``
(named in docs/admin.md). A model added to the admin is walked without a change here."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.test import RequestFactory

from fleet.devices.choices import GroupKind
from fleet.devices.models import DeviceGroup
from fleet.devices.services import enrollment_token_create
from tests.browser.conftest import WIDE
from tests.server import admin_world

pytestmark = pytest.mark.browser
PHONE = (390, 844)


@pytest.fixture
def everything(world, people):
    """At least one object of every kind ops staff look at."""
    rollout = admin_world.start(world, people["alice"])
    admin_world.evidence(rollout)
    DeviceGroup.objects.create(name="lab", kind=GroupKind.DYNAMIC, rules={"tags": ["fleet"], "online": True})
    enrollment_token_create(name="factory", created_by=people["alice"], tags=["fleet", "line-2"])
    return world


def admin_pages(user) -> list[str]:
    """The dashboard; each model's list, its add page where the admin offers one, and the
    change page of its first object."""
    request = RequestFactory().get("/admin/")
    request.user = user
    pages = ["/admin/"]
    for model, model_admin in admin.site._registry.items():
        base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        pages.append(base)
        if model_admin.has_add_permission(request):
            pages.append(f"{base}add/")
        first = model._default_manager.order_by("pk").first()
        if first is not None:
            pages.append(f"{base}{first.pk}/change/")
    return pages


def shot_name(page: str) -> str:
    """/admin/devices/device/3/change/ -> devices-device-change; /admin/ -> dashboard."""
    parts = [part for part in page.strip("/").split("/")[1:] if not part.isdigit()]
    return "-".join(parts) if parts else "dashboard"


def test_every_page_fits_a_phone_and_a_wide_screen(browser, everything, people):
    browser.login("ada")
    pages = admin_pages(people["ada"])
    assert len(pages) >= 30  # control: the walk reaches the admin's pages
    wide_or_narrow, violations = [], []
    for size in (PHONE, WIDE):
        browser.driver.set_window_size(*size)
        for page in pages:
            browser.open(page)
            if browser.driver.find_elements("id", "login-form"):
                raise AssertionError(f"{page}: sent to the login page")
            browser.shot(f"every-{shot_name(page)}-{size[0]}")
            if browser.sideways() > 0:
                wide_or_narrow.append(f"{page} at {size[0]} px: {browser.sideways()} px sideways")
            if size == WIDE:
                violations += [f"{page}: {v['id']} ({v['impact']}): {v['nodes'][:3]}" for v in browser.axe()]
    assert not wide_or_narrow, "\n".join(wide_or_narrow)
    assert not violations, "serious accessibility violations:\n" + "\n".join(violations)
