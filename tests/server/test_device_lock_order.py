"""Writers of many device rows lock them in id order, as the ingest bridge does, so that a
stage's promotion (``devices_assign``) and a bridge's batch queue behind each other instead
of deadlocking. Seen at 10,000 devices in bench/fleet.py (docs/benchmarks.md): a plain
``UPDATE … WHERE id = ANY(…)`` locks in its scan's order, the rows' physical order.

Real PostgreSQL, two connections: one holds the lowest id's row the way a bridge's batch
does and then asks for the next; the promotion runs in another thread with a sequential
scan (what the planner picks for thousands of ids) over rows whose physical order is not
their id order."""

import threading

import psycopg
import pytest
from django.db import connection, connections

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.devices.services import devices_assign
from tests.conftest import wait_until
from tests.server.conftest import ready_artifact

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker_settings")]

LOCK = "SELECT 1 FROM devices_device WHERE id = %s FOR NO KEY UPDATE"


def waiting_on_a_lock(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return bool(row) and row[0] == "Lock"


def test_a_promotion_and_a_bridge_batch_queue_instead_of_deadlocking(version_v1, digits):
    artifact = ready_artifact(version_v1, "int8", digits.build_digits_models()["int8"])
    low = Device.objects.create(device_id="lock-a", status=DeviceStatus.ACTIVE)
    high = Device.objects.create(device_id="lock-b", status=DeviceStatus.ACTIVE)
    Device.objects.filter(pk=low.pk).update(tags=["moved"])  # its row now lies after high's
    assert low.pk < high.pk

    outcome: dict[str, object] = {}

    def promote() -> None:
        try:
            with connection.cursor() as cursor:
                outcome["pid"] = connection.connection.info.backend_pid
                cursor.execute("SET enable_indexscan = off")
                cursor.execute("SET enable_bitmapscan = off")
            devices_assign(devices=[low.pk, high.pk], artifacts={"digits": artifact}, publish="now")
            outcome["assigned"] = True
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc
        finally:
            connections.close_all()

    params = connection.get_connection_params()
    with psycopg.connect(**params) as bridge:  # a transaction, as a bridge's batch is
        bridge.execute("SET lock_timeout = '10s'")
        bridge.execute(LOCK, [low.pk])
        thread = threading.Thread(target=promote)
        thread.start()
        wait_until(
            lambda: "pid" in outcome or "error" in outcome, timeout=10, message="the promotion started"
        )
        wait_until(
            lambda: "error" in outcome or waiting_on_a_lock(outcome["pid"]),
            timeout=10,
            message="the promotion waiting for the bridge's row",
        )
        # The bridge's next row: free if the promotion waits for the lowest id first; held by
        # the promotion (and a deadlock, one side aborted) if it locked in physical order.
        bridge.execute(LOCK, [high.pk])
        bridge.commit()
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome.get("assigned") is True
    # Positive control: the promotion did happen, after the bridge's batch.
    generations = dict(
        Device.objects.filter(pk__in=[low.pk, high.pk]).values_list("pk", "desired_generation")
    )
    assert generations == {low.pk: 1, high.pk: 1}
