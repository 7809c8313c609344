"""Reads for the fleet dashboard (the admin index): each figure in a fixed, small number of
queries whatever the fleet's size, and with the admin list that shows the devices, events or
rollouts behind it (issue 10, section 1)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlencode

from django.db.models import Count, F, Q
from django.urls import reverse
from django.utils import timezone

from fleet.devices import selectors as device_selectors
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent
from fleet.rollouts.choices import ACTIVE_STATES, IN_FLIGHT, AssignmentState
from fleet.rollouts.models import Assignment, Rollout

FAILURE_WINDOW = timedelta(hours=24)
INGEST_WINDOW = timedelta(minutes=5)
ON_CANDIDATE = (*IN_FLIGHT, AssignmentState.ACTIVE, AssignmentState.SHADOW)


def _link(name: str, **params) -> str:
    return reverse(f"admin:{name}") + ("?" + urlencode(params) if params else "")


@dataclass
class Figure:
    label: str
    value: int | str
    url: str


@dataclass
class RolloutProgress:
    rollout: Rollout
    url: str
    stage: str
    on_candidate: int
    total: int
    failed: int


@dataclass
class Dashboard:
    devices: list[Figure]
    versions: dict = field(default_factory=dict)  # the stacked bar: labels, variants, counts, links
    rollouts: list[RolloutProgress] = field(default_factory=list)
    failures: list[Figure] = field(default_factory=list)
    ingest_lag: dict = field(default_factory=dict)


def device_figures() -> list[Figure]:
    """Active devices online and offline, devices waiting for approval, and those whose
    applied generation lags the desired one (one query)."""
    counts = Device.objects.aggregate(
        n_online=Count("pk", filter=Q(status=DeviceStatus.ACTIVE, online=True)),
        n_offline=Count("pk", filter=Q(status=DeviceStatus.ACTIVE, online=False)),
        n_pending=Count("pk", filter=Q(status=DeviceStatus.PENDING)),
        n_lagging=Count(
            "pk", filter=Q(status=DeviceStatus.ACTIVE, applied_generation__lt=F("desired_generation"))
        ),
    )
    active = {"status__exact": DeviceStatus.ACTIVE}
    return [
        Figure("online", counts["n_online"], _link("devices_device_changelist", **active, online__exact=1)),
        Figure("offline", counts["n_offline"], _link("devices_device_changelist", **active, online__exact=0)),
        Figure(
            "behind their desired model",
            counts["n_lagging"],
            _link("devices_device_changelist", **active, generation="behind"),
        ),
        Figure(
            "waiting for approval",
            counts["n_pending"],
            _link("devices_device_changelist", status__exact=DeviceStatus.PENDING),
        ),
    ]


def version_counts() -> dict:
    """Active devices by the model, version and variant they report (one query): the series
    of a stacked bar, one bar per model version and one stack per variant."""
    rows = device_selectors.active_devices_by_variant()
    bars = sorted({(model, version or "?") for model, version, _, _ in rows})
    variants = sorted({variant or "?" for _, _, variant, _ in rows})
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * len(bars))
    for model, version, variant, n in rows:
        counts[variant or "?"][bars.index((model, version or "?"))] = n
    labels = [f"{model} {version}" for model, version in bars]
    links = {
        variant: [
            _link(
                "devices_device_changelist", status__exact=DeviceStatus.ACTIVE, running=f"{m}:{v}:{variant}"
            )
            for m, v in bars
        ]
        for variant in variants
    }
    return {
        "labels": labels,
        "series": [{"variant": v, "counts": counts[v], "links": links[v]} for v in variants],
        # The same numbers as a table (screen readers, no JavaScript).
        "rows": [
            {"label": label, "cells": [(counts[v][i], links[v][i]) for v in variants]}
            for i, label in enumerate(labels)
        ],
    }


def active_rollouts() -> list[RolloutProgress]:
    """Running and paused rollouts with their stage and devices (two queries)."""
    rollouts = list(
        Rollout.objects.filter(state__in=ACTIVE_STATES)
        .select_related("model", "target_version", "policy")
        .order_by("-started_at")
    )
    counts = defaultdict(lambda: defaultdict(int))
    for rollout_id, state, n in (
        Assignment.objects.filter(rollout__in=rollouts)
        .values_list("rollout_id", "state")
        .annotate(n=Count("pk"))
        .order_by()
    ):
        counts[rollout_id][state] = n
    return [
        RolloutProgress(
            rollout=rollout,
            url=reverse("admin:rollouts_rollout_change", args=[rollout.pk]),
            stage=f"stage {rollout.current_stage + 1} of {len(rollout.stages)}",
            on_candidate=sum(counts[rollout.pk][state] for state in ON_CANDIDATE),
            total=sum(n for state, n in counts[rollout.pk].items() if state != AssignmentState.SKIPPED),
            failed=counts[rollout.pk][AssignmentState.FAILED],
        )
        for rollout in rollouts
    ]


def failures(now) -> list[Figure]:
    """Device events with a reason code in the last 24 hours, by code (one query)."""
    since = now - FAILURE_WINDOW
    rows = (
        DeviceEvent.objects.filter(received_at__gte=since)
        .exclude(reason="")
        .values_list("reason")
        .annotate(n=Count("pk"))
        .order_by("-n", "reason")
    )
    return [
        Figure(
            reason,
            n,
            _link("devices_deviceevent_changelist", reason__exact=reason, received_at__gte=since.isoformat()),
        )
        for reason, n in rows
    ]


def ingest_lag(now) -> dict:
    """How late telemetry arrives: the delay from a window's end (the device's clock) to
    its arrival, median and 95th percentile over the last five minutes (one query)."""
    windows, p50, p95 = device_selectors.telemetry_arrival_delay(
        # The window bound lets PostgreSQL read only today's partitions.
        since=now - INGEST_WINDOW,
        window_start_after=now - INGEST_WINDOW - timedelta(hours=1),
    )
    return {"windows": windows, "p50": p50, "p95": p95}


def dashboard() -> Dashboard:
    now = timezone.now()
    return Dashboard(
        devices=device_figures(),
        versions=version_counts(),
        rollouts=active_rollouts(),
        failures=failures(now),
        ingest_lag=ingest_lag(now),
    )
