"""Device reads: group membership (static and dynamic), per-device telemetry for gates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import BigIntegerField, Count, F, FloatField, Lookup, Max, Q, QuerySet, Sum
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Cast

from fleet.core.errors import InvalidInput
from fleet.core.lookups import any_of
from fleet.devices.choices import DeviceStatus, GroupKind
from fleet.devices.models import Device, DeviceEvent, DeviceGroup, TelemetryHourly, TelemetryWindow
from fleet.rollouts.models import Assignment

# What a dynamic group's saved filter may say, and how each key filters devices.
RULES = {
    "tags": lambda value: {"tags__contains": list(value)},  # every tag listed
    "hardware": lambda value: {"hardware": value},
    "status": lambda value: {"status": value},
    "online": lambda value: {"online": bool(value)},
    "runtime": lambda value: {"runtime": value},
    "agent_version": lambda value: {"agent_version": value},
    "supports_int8": lambda value: {"supports_int8": bool(value)},
}


TEXT_RULES = ("hardware", "runtime", "agent_version")
YES_NO_RULES = ("online", "supports_int8")


def _rules_error(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_rules", field="rules")


def validate_group_rules(rules: dict[str, Any]) -> None:
    """What a dynamic group's saved filter may say (the API's and the admin's check): known
    keys only, tags a list of words, status a device state, yes/no rules true or false
    (``"no"`` would filter as true), the rest text."""
    if not isinstance(rules, dict):
        raise _rules_error("rules must be an object.")
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise _rules_error(f"Unknown rule(s) {', '.join(unknown)}; use {', '.join(sorted(RULES))}.")
    if "tags" in rules and not (
        isinstance(rules["tags"], list) and all(isinstance(t, str) for t in rules["tags"])
    ):
        raise _rules_error("rules.tags must be a list of strings.")
    if "status" in rules and rules["status"] not in DeviceStatus.values:
        raise _rules_error(f"rules.status must be one of {DeviceStatus.values}.")
    for key in TEXT_RULES:
        if key in rules and not (isinstance(rules[key], str) and rules[key]):
            raise _rules_error(f"rules.{key} must be a non-empty string.")
    for key in YES_NO_RULES:
        if key in rules and not isinstance(rules[key], bool):
            raise _rules_error(f"rules.{key} must be true or false.")


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def group_rules_sentence(rules: dict[str, Any]) -> str:
    """A dynamic group's filter in words: "tags fleet and cam, hardware rpi4, online"."""
    rules = rules or {}
    parts = []
    for key in [*(key for key in RULES if key in rules), *(key for key in rules if key not in RULES)]:
        value = rules[key]
        if key == "tags" and isinstance(value, list) and value:
            parts.append(f"{'tags' if len(value) > 1 else 'tag'} {_and([str(tag) for tag in value])}")
        elif key == "status" and value in DeviceStatus.values:
            parts.append(DeviceStatus(value).label.lower())
        elif key == "online":
            parts.append("online" if value else "offline")
        elif key == "supports_int8":
            parts.append("runs int8" if value else "no int8")
        elif key == "agent_version":
            parts.append(f"agent {value}")
        elif key != "tags":
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "every device"


def group_devices(*, group: DeviceGroup, queryset: QuerySet[Device] | None = None) -> QuerySet[Device]:
    """The group's devices now: chosen members, or whatever matches the saved filter (so a
    device that enrolls later, or gets a tag, joins a dynamic group by itself)."""
    queryset = Device.objects.all() if queryset is None else queryset
    if group.kind == GroupKind.STATIC:
        return queryset.filter(static_groups=group)
    filters: dict[str, Any] = {}
    for key, value in group.rules.items():
        filters.update(RULES[key](value))
    return queryset.filter(**filters)


# --- telemetry, per device (rollout gates, issue 8 section 1)


@dataclass(frozen=True)
class DeviceTelemetry:
    device_pk: int
    device_id: str
    version: str
    variant: str
    windows: int
    inferences: int
    errors: int
    labeled: int
    correct: int
    latency_p95_ms: float | None  # inference-weighted mean of the windows' p95 (None without latency)
    shadow_version: str  # "" when no shadow
    shadow_variant: str
    shadow_sampled: int
    shadow_compared: int
    shadow_agreed: int
    shadow_errors: int
    shadow_latency_p95_ms: float | None  # compared-weighted mean of the windows' shadow p95


GROUP_BY = ("device_id", "version", "variant", "shadow_version", "shadow_variant")


def telemetry_by_device_queryset(
    *, devices: Iterable[int] | QuerySet, model: str, since: datetime, until: datetime | None = None
) -> QuerySet:
    """The query behind telemetry_by_device (one row of sums per group), for EXPLAIN. It
    reads only the index (model, device, window_start) INCLUDE (…) and, since the bounds
    are on the partition key, only the day partitions between ``since`` and ``until``."""
    if isinstance(devices, QuerySet):
        devices = devices.values_list("pk", flat=True) if devices.model is Device else devices
    pks = sorted({getattr(device, "pk", device) for device in devices})
    windows = TelemetryWindow.objects.filter(_of_devices(pks), model=model, window_start__gte=since)
    if until is not None:
        windows = windows.filter(window_start__lt=until)
    has_p95 = Q(latency_p95_ms__isnull=False)
    has_shadow_p95 = Q(shadow_latency_p95_ms__isnull=False)
    return (
        windows.values(*GROUP_BY)
        .annotate(
            windows=Count("*"),
            inferences_sum=Sum("inferences"),
            errors_sum=Sum("errors"),
            labeled_sum=Sum("labeled"),
            correct_sum=Sum("correct"),
            p95_weighted=Sum(F("latency_p95_ms") * F("inferences"), output_field=FloatField()),
            p95_weight=Sum("inferences", filter=has_p95),
            p95_windows=Count("latency_p95_ms"),  # counts the non-null ones
            p95_sum=Sum("latency_p95_ms"),
            shadow_sampled_sum=Sum("shadow_sampled"),
            shadow_compared_sum=Sum("shadow_compared"),
            shadow_agreed_sum=Sum("shadow_agreed"),
            shadow_errors_sum=Sum("shadow_errors"),
            shadow_p95_weighted=Sum(
                F("shadow_latency_p95_ms") * F("shadow_compared"), output_field=FloatField()
            ),
            shadow_p95_weight=Sum("shadow_compared", filter=has_shadow_p95),
            shadow_p95_windows=Count("shadow_latency_p95_ms"),
            shadow_p95_sum=Sum("shadow_latency_p95_ms"),
        )
        .order_by(*GROUP_BY)
    )


def _of_devices(pks: list[int], field: str = "device_id") -> Q | Lookup:
    """``field`` among ``pks``, as one array parameter (fleet/core/lookups.py)."""
    return any_of(field, pks)


GATE_QUERY_WORK_MEM = "64MB"  # for the gate's sums only (SET LOCAL), not the whole database


def _fetch(queryset: QuerySet) -> list[dict]:
    """The rows of a values() queryset as dicts, straight from the cursor: Django's
    per-value converters cost more than the aggregate at 10,000 groups. Sums of integers
    come back from PostgreSQL as numeric: read as ints (a Decimal each costs more)."""
    sql, params = queryset.query.sql_with_params()
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            from psycopg.types.numeric import IntLoader

            # 10,000 groups hash in memory; with the default 4 MB they were sorted on disk.
            cursor.execute(f"SET LOCAL work_mem = '{GATE_QUERY_WORK_MEM}'")
            cursor.cursor.adapters.register_loader("numeric", IntLoader)  # this cursor only
        cursor.execute(sql, params)
        names = [column.name for column in cursor.description]
        rows = cursor.fetchall()
    return [dict(zip(names, row, strict=True)) for row in rows]


def _weighted_mean(
    weighted: float | None, weight: int | None, plain: float | None, count: int
) -> float | None:
    """sum(x * w) / sum(w); the plain mean when every weight is 0; None without any x."""
    if not count:
        return None
    if weight:
        return weighted / weight
    return plain / count


def _window_sums(pks: list[int], model: str, since: datetime, until: datetime | None) -> list[dict]:
    """Per group, the sums of the windows that began in [since, until), in the shape
    ``_add`` takes (one query on the gate index)."""
    sums = []
    queryset = telemetry_by_device_queryset(devices=pks, model=model, since=since, until=until)
    for row in _fetch(queryset.order_by()):  # sorted in Python: PostgreSQL may hash the groups
        row["hourly"], row["has_p95"] = False, row["p95_windows"] > 0
        sums.append(row)
    return sums


def _hourly_sums(pks: list[int], model: str, since: datetime, until: datetime | None) -> list[dict]:
    """Per group, the hourly sums of the whole hours in [since, until) (both on the hour)."""
    rows = TelemetryHourly.objects.filter(_of_devices(pks), model=model, hour__gte=since)
    if until is not None:
        rows = rows.filter(hour__lt=until)
    sums = []
    queryset = rows.values(*GROUP_BY).annotate(
        windows=Sum("windows"),
        inferences_sum=Sum("inferences"),
        errors_sum=Sum("errors"),
        labeled_sum=Sum("labeled"),
        correct_sum=Sum("correct"),
        p95_weighted=Sum("latency_p95_weighted_sum"),
        p95_weight=Sum("latency_p95_weight"),
        p95_max=Max("latency_p95_max_ms"),
        shadow_sampled_sum=Sum("shadow_sampled"),
        shadow_compared_sum=Sum("shadow_compared"),
        shadow_agreed_sum=Sum("shadow_agreed"),
        shadow_errors_sum=Sum("shadow_errors"),
        shadow_p95_weighted=Sum("shadow_latency_p95_weighted_sum"),
        shadow_p95_weight=Sum("shadow_latency_p95_weight"),
    )
    for row in _fetch(queryset.order_by()):
        # The hourly sums keep no plain mean of the p95s (what a group whose windows with a
        # p95 all had no inferences gets): whether any window had one is all they tell.
        row["hourly"], row["has_p95"] = True, row.pop("p95_max") is not None
        row["p95_windows"] = row["shadow_p95_windows"] = 0
        row["p95_sum"] = row["shadow_p95_sum"] = None
        sums.append(row)
    return sums


SUMMED = (
    "windows",
    "inferences_sum",
    "errors_sum",
    "labeled_sum",
    "correct_sum",
    "p95_weighted",
    "p95_weight",
    "p95_windows",
    "p95_sum",
    "shadow_sampled_sum",
    "shadow_compared_sum",
    "shadow_agreed_sum",
    "shadow_errors_sum",
    "shadow_p95_weighted",
    "shadow_p95_weight",
    "shadow_p95_windows",
    "shadow_p95_sum",
)


def _add(total: dict, row: dict) -> None:
    for name in SUMMED:
        if row[name] is not None:
            total[name] = (total.get(name) or 0) + row[name]
        else:
            total.setdefault(name, None)
    for name in ("hourly", "has_p95"):
        total[name] = total.get(name, False) or row[name]


def _needs_windows(total: dict) -> bool:
    """Whether a group that has hourly sums in it needs the plain mean of its p95s, which only
    the windows have: some window had a p95 but none with inferences behind it; for the
    shadow's p95, whose presence the hourly sums do not tell, any shadow without weight."""
    plain = not total["p95_weight"] and total["has_p95"]
    shadow_plain = not total["shadow_p95_weight"] and total["shadow_version"] != ""
    return total["hourly"] and (plain or shadow_plain)


def _hour_ceil(moment: datetime) -> datetime:
    floor = moment.replace(minute=0, second=0, microsecond=0)
    return floor if floor == moment else floor + timedelta(hours=1)


def telemetry_sums(
    *,
    devices: Iterable[int] | QuerySet,
    model: str,
    since: datetime,
    until: datetime | None = None,
    hourly: bool = True,
) -> list[dict]:
    """The per-group sums behind telemetry_by_device. The whole hours of window start inside
    [since, until) come from the hourly sums, which the ingest writes in the same statement
    as the windows and from the rows it really inserted, so they hold exactly the same
    windows; only the part hours at either end are read from the windows. A gate at 10,000
    devices then reads 10,000 rows an hour of its stage instead of 1.2 million (bench/
    gate_query.py). A group whose mean p95 needs what only the windows keep (below) is
    read again from its windows alone. ``hourly=False`` reads every window instead (what
    the tests and bench/gate_query.py compare with)."""
    if isinstance(devices, QuerySet):
        devices = devices.values_list("pk", flat=True) if devices.model is Device else devices
    pks = sorted({getattr(device, "pk", device) for device in devices})
    if not pks:
        return []
    # Hours as the ingest's date_trunc makes them: on the database session's clock, UTC.
    since = since.astimezone(UTC)
    until = None if until is None else until.astimezone(UTC)
    first_hour = _hour_ceil(since)
    last_hour = None if until is None else until.replace(minute=0, second=0, microsecond=0)
    if not hourly or (last_hour is not None and last_hour <= first_hour):
        parts = _window_sums(pks, model, since, until)  # no whole hour in between
    else:
        parts = _hourly_sums(pks, model, first_hour, last_hour)
        if since < first_hour:
            parts += _window_sums(pks, model, since, first_hour)
        if last_hour is not None and last_hour < until:
            parts += _window_sums(pks, model, last_hour, until)
    totals: dict[tuple, dict] = {}
    for row in parts:
        key = tuple(row[name] for name in GROUP_BY)
        _add(totals.setdefault(key, dict(zip(GROUP_BY, key, strict=True))), row)
    again = sorted({total["device_id"] for total in totals.values() if _needs_windows(total)})
    if again:
        totals = {key: total for key, total in totals.items() if total["device_id"] not in again}
        for row in _window_sums(again, model, since, until):
            totals[tuple(row[name] for name in GROUP_BY)] = row
    return [totals[key] for key in sorted(totals)]


def telemetry_by_device(
    *,
    devices: Iterable[int] | QuerySet,
    model: str,
    since: datetime,
    until: datetime | None = None,
    hourly: bool = True,
) -> list[DeviceTelemetry]:
    """Per-device sums of the windows of `model` that BEGAN at or after `since` (window_start >= since,
    and < until when given), for the given device pks only, grouped by (device, version, variant,
    shadow_version, shadow_variant); whole hours are read from the hourly sums (telemetry_sums)."""
    rows = telemetry_sums(devices=devices, model=model, since=since, until=until, hourly=hourly)
    names = dict(
        Device.objects.filter(_of_devices(sorted({row["device_id"] for row in rows}), "pk")).values_list(
            "pk", "device_id"
        )
    )
    return [
        DeviceTelemetry(
            device_pk=row["device_id"],
            device_id=names.get(row["device_id"], ""),
            version=row["version"],
            variant=row["variant"],
            windows=row["windows"],
            inferences=row["inferences_sum"],
            errors=row["errors_sum"],
            labeled=row["labeled_sum"],
            correct=row["correct_sum"],
            latency_p95_ms=_weighted_mean(
                row["p95_weighted"], row["p95_weight"], row["p95_sum"], row["p95_windows"] or row["has_p95"]
            ),
            shadow_version=row["shadow_version"],
            shadow_variant=row["shadow_variant"],
            shadow_sampled=row["shadow_sampled_sum"],
            shadow_compared=row["shadow_compared_sum"],
            shadow_agreed=row["shadow_agreed_sum"],
            shadow_errors=row["shadow_errors_sum"],
            shadow_latency_p95_ms=_weighted_mean(
                row["shadow_p95_weighted"],
                row["shadow_p95_weight"],
                row["shadow_p95_sum"],
                row["shadow_p95_windows"] or bool(row["shadow_p95_weight"]),
            ),
        )
        for row in rows
    ]


# --- the device page (admin, issue 10 section 1): health over time, events, rollout history

HEALTH_HOURS = 24
# (key, label, unit, decimals): the sparklines of the device page, in this order.
HEALTH_SERIES = (
    ("inferences", "Inferences", "per hour", 0),
    ("latency_p95_ms", "p95 latency", "ms", 1),
    ("errors", "Errors", "per hour", 0),
    ("cpu_pct", "CPU", "%", 1),
    ("rss_mb", "RSS", "MB", 1),
    ("temp_c", "Temperature", "°C", 1),
)


def telemetry_final_hour(now: datetime) -> datetime:
    """Hours of window start before the returned hour can no longer change: the ingest
    refuses windows whose ts is older than INGEST_MAX_AGE_S, a window starts at most
    INGEST_MAX_WINDOW_S before its ts, and an hour's margin covers a batch still on its way
    to the database."""
    oldest = now - timedelta(seconds=settings.INGEST_MAX_AGE_S + settings.INGEST_MAX_WINDOW_S + 3600)
    return oldest.replace(minute=0, second=0, microsecond=0)


def telemetry_hourly_sums(
    *, model: str, devices: QuerySet, since: datetime, until: datetime | None
) -> list[dict[str, Any]]:
    """Per version and hour of window start in [since, until) (until None: no end), the
    hourly rollups of ``devices`` (a queryset of device pks) for ``model`` summed: inferences,
    errors and the inference-weighted p95 latency's sum and weight (one query)."""
    rows = TelemetryHourly.objects.filter(model=model, hour__gte=since, device_id__in=devices)
    if until is not None:
        rows = rows.filter(hour__lt=until)
    return list(
        rows.values("version", "hour")
        .annotate(
            inferences_sum=Sum("inferences"),
            errors_sum=Sum("errors"),
            p95_weighted=Sum("latency_p95_weighted_sum", output_field=FloatField()),
            p95_weight=Sum("latency_p95_weight"),
        )
        .order_by("version", "hour")
    )


def _ratio(total: float | None, n: int | None, decimals: int) -> float | None:
    return round(total / n, decimals) if n else None


def device_health_series(*, device: Device, now: datetime, hours: int = HEALTH_HOURS) -> dict[str, Any]:
    """The device's telemetry hour by hour over the last ``hours`` hours (the current one
    included) from the hourly rollups, all models together (one query): inferences and
    errors summed, p95 latency weighted by inferences, health figures averaged over the
    windows that reported them. An hour without telemetry is None (a gap), not 0."""
    first = (now - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
    rows = {
        row["hour"]: row
        for row in TelemetryHourly.objects.filter(device=device, hour__gte=first, hour__lte=now)
        .values("hour")
        .annotate(
            inferences=Sum("inferences"),
            errors=Sum("errors"),
            p95=Sum("latency_p95_weighted_sum"),
            p95_n=Sum("latency_p95_weight"),
            **{f"{name}_sum": Sum(f"{name}_sum") for name in ("cpu_pct", "rss_mb", "temp_c")},
            **{f"{name}_n": Sum(f"{name}_windows") for name in ("cpu_pct", "rss_mb", "temp_c")},
        )
        .order_by("hour")
    }
    buckets = [first + timedelta(hours=n) for n in range(hours)]
    points: dict[str, list] = {key: [] for key, *_ in HEALTH_SERIES}
    for hour in buckets:
        row = rows.get(hour)
        if row is None:
            for values in points.values():
                values.append(None)
            continue
        points["inferences"].append(row["inferences"])
        points["errors"].append(row["errors"])
        points["latency_p95_ms"].append(_ratio(row["p95"], row["p95_n"], 2))
        for name in ("cpu_pct", "rss_mb", "temp_c"):
            points[name].append(_ratio(row[f"{name}_sum"], row[f"{name}_n"], 2))
    return {
        "hours": [int(hour.timestamp()) for hour in buckets],
        "series": [
            {"key": key, "label": label, "unit": unit, "decimals": decimals, "points": points[key]}
            for key, label, unit, decimals in HEALTH_SERIES
        ],
    }


DEVICE_PAGE_ROWS = 20


def device_recent_events(*, device: Device, limit: int = DEVICE_PAGE_ROWS) -> list[DeviceEvent]:
    """The device's latest events, newest first (one query)."""
    return list(DeviceEvent.objects.filter(device=device).order_by("-received_at", "-pk")[:limit])


def device_rollout_history(*, device: Device, limit: int = DEVICE_PAGE_ROWS) -> list[Assignment]:
    """The device's assignments in rollouts, newest rollout first (one query)."""
    return list(
        Assignment.objects.filter(device=device)
        .select_related("rollout__model", "rollout__target_version", "from_artifact", "to_artifact__version")
        .order_by("-rollout__created_at", "-rollout_id")[:limit]
    )


def devices_by_status() -> dict[tuple[str, bool], int]:
    """(status, online) -> number of devices, in one query (the metrics endpoint)."""
    rows = Device.objects.order_by().values_list("status", "online").annotate(n=Count("id"))
    return {(status, online): n for status, online, n in rows}


def online_devices_by_version() -> dict[tuple[str, str], int]:
    """(model, version) -> active devices online that report serving it, in one query.

    PostgreSQL expands each device's reported models in the database; another database
    (the SQLite demo) counts them here."""
    online = Device.objects.filter(status=DeviceStatus.ACTIVE, online=True)
    if connection.vendor == "postgresql":
        query, params = online.values("reported_models").query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT m.key, m.value ->> 'version', count(*) "
                f"FROM ({query}) AS d, jsonb_each(d.reported_models) AS m "
                "WHERE jsonb_typeof(d.reported_models) = 'object' GROUP BY 1, 2",
                params,
            )
            return {(model, version or ""): n for model, version, n in cursor.fetchall()}
    counts: dict[tuple[str, str], int] = {}
    for reported in online.values_list("reported_models", flat=True):
        for model, entry in (reported if isinstance(reported, dict) else {}).items():
            key = (model, str(entry.get("version", "")) if isinstance(entry, dict) else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- for other apps: what a device reports and was last sent (docs/architecture.md, "App
# boundaries"). A queryset, so that an app can join it in its own single statement (the
# rollouts update thousands of assignments in one UPDATE … FROM) without naming this app's
# tables or columns.


def device_model_states(*, model: str) -> QuerySet[Device]:
    """One row per device: ``id``; ``reported_version``, the version of ``model`` it reports
    serving (NULL when none); ``desired_artifact_id``, the artifact of ``model`` its latest
    desired state names (NULL when none); ``generation``, that desired state's generation."""
    return Device.objects.order_by().values(
        "id",
        reported_version=KeyTextTransform("version", KeyTransform(model, "reported_models")),
        desired_artifact_id=Cast(KeyTextTransform(model, "desired_artifacts"), BigIntegerField()),
        generation=F("desired_generation"),
    )


# --- the fleet dashboard (fleet/core/dashboard.py): the devices' own tables, read here


def active_devices_by_variant() -> list[tuple[str, str | None, str | None, int]]:
    """(model, version, variant, active devices reporting it), sorted, in one query."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT m.key, m.value ->> 'version', m.value ->> 'variant', count(*)"
            " FROM devices_device AS d, jsonb_each(d.reported_models) AS m"
            " WHERE d.status = %s AND jsonb_typeof(m.value) = 'object'"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            [DeviceStatus.ACTIVE],
        )
        return cursor.fetchall()


def telemetry_arrival_delay(*, since: datetime, window_start_after: datetime) -> tuple[int, Any, Any]:
    """(windows, median, 95th percentile) of the seconds from a telemetry window's end (the
    device's clock) to its arrival, over the windows received since ``since``, in one query.
    ``window_start_after`` bounds the windows' start, so that PostgreSQL reads only the
    partitions that can hold them."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*),"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - ts)),"
            " percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - ts))"
            " FROM devices_telemetrywindow WHERE window_start >= %s AND received_at >= %s",
            [window_start_after, since],
        )
        return cursor.fetchone()
