"""The fleet dashboard (admin index): each figure equals what the database holds, links to
the admin list that shows the same devices, events or rollouts, and the page costs a
bounded number of queries whatever the fleet's size. Django's test client, real PostgreSQL."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from django.db.models import F
from django.test import Client
from django.utils import timezone

from fleet.devices.models import Device, DeviceEvent, TelemetryWindow
from tests.server import admin_world

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


@pytest.fixture
def fleet(digits_model, digits, alice, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        world = admin_world.build(digits_model, digits)
        world["rollout"] = admin_world.start(world, alice.user)
    devices = world["devices"]
    Device.objects.filter(pk__in=[d.pk for d in devices[:6]]).update(online=True)
    Device.objects.filter(pk=devices[9].pk).update(
        reported_models={"digits": {"version": "0.9.0", "variant": "int8"}}
    )
    now = timezone.now()
    for n, (reason, age) in enumerate(
        [("hash_mismatch", 1), ("hash_mismatch", 2), ("golden_failed", 3), ("golden_failed", 30), ("", 1)]
    ):
        DeviceEvent.objects.create(
            device=devices[n],
            message_id=f"e{n}",
            type="failed" if reason else "active",
            reason=reason,
            ts=now - timedelta(hours=age),
            received_at=now - timedelta(hours=age),
        )
    for n, delay in enumerate((0.4, 0.8, 1.2, 2.0)):
        end = now - timedelta(seconds=30)
        TelemetryWindow.objects.create(
            device=devices[n],
            message_id=uuid.uuid4().hex,
            ts=end,
            window_start=end - timedelta(seconds=30),
            received_at=end + timedelta(seconds=delay),
            window_s=30,
            model="digits",
            version="1.0.0",
            variant="float32",
            inferences=10,
            errors=0,
        )
    return world


def figures(page: str) -> dict[str, tuple[str, str]]:
    """data-figure name -> (value, link)."""
    return {
        name: (value, url.replace("&amp;", "&"))
        for url, name, value in re.findall(
            r'<a href="([^"]+)" data-figure="([^"]+)"><strong>([^<]+)</strong>', page
        )
    }


def listed(client: Client, url: str) -> int:
    response = client.get(url)
    assert response.status_code == 200 and "e=1" not in response.request.get("QUERY_STRING", ""), url
    return response.context["cl"].result_count


def test_the_dashboard_figures_equal_the_database_and_link_to_the_same_rows(fleet, bob):
    client = Client()
    client.force_login(bob.user)  # a viewer
    page = client.get("/admin/").content.decode()
    shown = figures(page)
    active = Device.objects.filter(status="active")
    expected = {
        "online": active.filter(online=True).count(),
        "offline": active.filter(online=False).count(),
        "behind their desired model": active.filter(applied_generation__lt=F("desired_generation")).count(),
        "failure-hash_mismatch": 2,
        "failure-golden_failed": 1,  # the one from 30 hours ago is not counted
    }
    assert expected["behind their desired model"] == 3  # control: the rollout's first stage
    for name, value in expected.items():
        assert int(shown[name][0]) == value, name
        assert listed(client, shown[name][1]) == value, name
    assert re.search(r'data-figure="lag-p50">1\.0 s<', page) and re.search(
        r'data-figure="lag-p95">1\.9 s<', page
    )
    rollout = fleet["rollout"]
    assert f'href="/admin/rollouts/rollout/{rollout.pk}/change/">{rollout}</a>' in page
    assert "3 of 10" in page


def test_the_stacked_bar_has_one_series_per_variant_and_links_to_its_devices(fleet, bob):
    client = Client()
    client.force_login(bob.user)
    page = client.get("/admin/").content.decode()
    data = json.loads(
        re.search(r'<script id="versions-data" type="application/json">(.*?)</script>', page).group(1)
    )
    assert data["labels"] == ["digits 0.9.0", "digits 1.0.0"]
    series = {s["variant"]: s["counts"] for s in data["series"]}
    assert series == {"float32": [0, 9], "int8": [1, 0]}
    links = {s["variant"]: s["links"] for s in data["series"]}
    assert listed(client, links["float32"][1]) == 9
    assert listed(client, links["int8"][0]) == 1


def test_the_dashboard_costs_a_bounded_number_of_queries(fleet, bob, django_assert_max_num_queries):
    client = Client()
    client.force_login(bob.user)
    client.get("/admin/")  # warm caches (content types, sessions)
    with django_assert_max_num_queries(12):
        assert client.get("/admin/").status_code == 200
