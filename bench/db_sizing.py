"""PostgreSQL sizing per device (issue 11, scaling out): bytes on disk per stored row of the
tables that grow with the fleet, and what N devices need at the default settings.

The rows are what the ingest bridge writes for devices running the agent's defaults: one
telemetry window per model every 30 s (`telemetry_interval_s`), kept
TELEMETRY_RETENTION_DAYS (7) in daily partitions; one per-device hourly sum per model and
hour, kept TELEMETRY_HOURLY_RETENTION_DAYS (90); device events (a handful per rollout that
reaches the device). They are inserted by SQL with realistic contents (a 36-character
message id, model/version/variant names, every counter, percentiles and health figures
set) into the real, migrated schema with its indexes, then measured with
pg_total_relation_size (heap, TOAST and indexes) after VACUUM ANALYZE. Device rows, status
and reported state are updated in place and do not grow with time.

Real parts: PostgreSQL (a database of its own, created and dropped), the project's
migrations and its partition maintenance (telemetry_partitions_ensure).

    .venv/bin/python bench/db_sizing.py [--devices 200] [--hours 24] [--database mf_sizing]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SERVER_URL = "postgres://postgres@127.0.0.1:5432"
WINDOW_S = 30  # the agent's default telemetry_interval_s
EVENTS_PER_DEVICE = 6  # downloading, verifying, active … of one rollout, and a trust event
ROLLOUTS_PER_WEEK = 1  # the projection's assumption: one rollout reaches every device a week
LOOKS = 2_000  # gate evaluations stored for the per-row figure (a day is 17,280 at 5 s)
GATES_PER_LOOK = 4  # install, error rate, accuracy per variant (two variants)
GROWING = (
    "devices_telemetrywindow",
    "devices_telemetryhourly",
    "devices_deviceevent",
    "devices_ingestrefusal",
    "rollouts_assignment",
    "rollouts_gateevaluation",
    "rollouts_rollouthour",
)


def postgres():
    import psycopg

    return psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True)


def setup(database: str, var_dir: Path) -> None:
    with postgres() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database}"')
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "fleet.settings",
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(32),
            "VAR_DIR": str(var_dir),
            "DATABASE_URL": f"{SERVER_URL}/{database}",
        }
    )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def drop_database(database: str) -> None:
    from django.db import connections

    connections.close_all()
    with postgres() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def fill(devices: int, hours: int) -> None:
    from django.db import connection

    from fleet.devices.ingest import telemetry_partitions_ensure

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=hours)
    telemetry_partitions_ensure(now=now, first_day=(start - timedelta(days=1)).date())
    with connection.cursor() as c:
        c.execute(
            """INSERT INTO devices_device (device_id, display_name, status, hardware, runtime,
                runtime_version, supports_int8, supported_ops, unsupported_ops, agent_version, tags,
                enrollment_code_sha256, online, applied_generation, reported_models, health,
                desired_generation, desired_artifacts, created_at)
            SELECT 'cam-' || lpad(i::text, 6, '0'), '', 'active', 'any', 'litert', '2.3.0', true,
                '[]', '[]', '0.1.0', '[]', '', true, 1, '{}', '{}', 1, '{}', now()
            FROM generate_series(1, %s) i""",
            [devices],
        )
        c.execute(
            """INSERT INTO devices_telemetrywindow (device_id, message_id, ts, window_start,
                received_at, window_s, model, version, variant, inferences, errors,
                latency_p50_ms, latency_p95_ms, latency_p99_ms, labeled, correct,
                shadow_version, shadow_variant, shadow_sampled, shadow_compared, shadow_agreed,
                shadow_errors, shadow_skipped, shadow_mean_abs_diff, shadow_latency_p95_ms,
                cpu_pct, rss_mb, temp_c)
            SELECT d.id, substr(md5(d.id || '-' || w), 1, 8) || '-' || substr(md5(w || '-' || d.id), 1, 27),
                t + interval '30 seconds', t, t + interval '31 seconds', 30, 'digits', '1.4.0', 'int8',
                1500 + w %% 40, w %% 3, 0.4, 0.9, 1.3, 210, 203, '', '', 0, 0, 0, 0, 0, NULL, NULL,
                12.5, 61.2, 48.0
            FROM devices_device d,
                 (SELECT row_number() OVER () AS w, t
                  FROM generate_series(%s::timestamptz, %s::timestamptz - interval '30 seconds',
                                       interval '30 seconds') t) windows""",
            [start, now],
        )
        c.execute(
            """INSERT INTO devices_telemetryhourly (device_id, hour, model, version, variant,
                shadow_version, shadow_variant, windows, inferences, errors, labeled, correct,
                latency_p95_weighted_sum, latency_p95_weight, latency_p95_max_ms, shadow_sampled,
                shadow_compared, shadow_agreed, shadow_errors, shadow_skipped,
                shadow_latency_p95_weighted_sum, shadow_latency_p95_weight,
                shadow_mean_abs_diff_weighted_sum, shadow_mean_abs_diff_weight, cpu_pct_sum,
                cpu_pct_windows, rss_mb_sum, rss_mb_windows, temp_c_sum, temp_c_windows)
            SELECT d.id, h, 'digits', '1.4.0', 'int8', '', '', 120, 180000, 12, 25200, 24360,
                162000.0, 180000, 1.4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1500.0, 120, 7344.0, 120, 5760.0, 120
            FROM devices_device d,
                 generate_series(%s::timestamptz, %s::timestamptz - interval '1 hour',
                                 interval '1 hour') h""",
            [start, now],
        )
        c.execute(
            """INSERT INTO devices_deviceevent (device_id, message_id, type, generation, model,
                version, variant, reason, message, ts, received_at)
            SELECT d.id, md5(d.id || '-ev-' || e), 'active', 2, 'digits', '1.4.0', 'int8', '',
                'swapped to digits 1.4.0 int8 after the golden set passed', now(), now()
            FROM devices_device d, generate_series(1, %s) e""",
            [EVENTS_PER_DEVICE],
        )
        c.execute(
            """INSERT INTO devices_ingestrefusal (device_id, reason, count, first_at, last_at)
            SELECT d.id, 'clock', 3, now(), now() FROM devices_device d"""
        )
    fill_rollout(start, now)
    connection.connection.autocommit = True
    with connection.cursor() as c:
        c.execute("VACUUM ANALYZE")


def fill_rollout(start: datetime, now: datetime) -> None:
    """One rollout over every device (an assignment each), LOOKS evaluations of its gates as
    services._store writes them (sentences and inputs of a 10,000-device comparison, no
    per-device inputs beyond 50 devices), and its per-hour sums."""
    from django.db import connection

    from fleet.registry import services as registry
    from fleet.rollouts.models import Rollout, RolloutPolicy

    model = registry.model_create(name="digits", labels=[str(n) for n in range(10)])
    version = registry.version_create(model=model, version="2.0.0")
    rollout = Rollout.objects.create(
        model=model,
        target_version=version,
        policy=RolloutPolicy.objects.create(name="sizing"),
        state="running",
    )
    summary = (
        "accuracy (int8): 95.7 % (3,750 devices, n = 23,625,000) vs 95.7 % (3,750 devices, "
        "n = 23,625,000), drop 0.0 pp (97.5 % CS -0.1 to 0.1 pp, one device set aside each way) "
        "< 2.0 pp allowed"
    )
    inputs = (
        '{"candidate": {"devices": 3750, "n": 23625000, "k": 22613000, "n_capped": 23625000.0, '
        '"k_capped": 22613000.0, "cap_n": 126000.0, "capped_devices": []}, "incumbent": {"devices": 3750, '
        '"n": 23625000, "k": 22610000, "n_capped": 23625000.0, "k_capped": 22610000.0, "cap_n": 126000.0, '
        '"capped_devices": []}, "drop_pp": 0.01, "alpha": 0.025, "looks": 120}'
    )
    with connection.cursor() as c:
        c.execute(
            """INSERT INTO rollouts_assignment (rollout_id, device_id, cohort_key, stage, from_version,
                to_artifact_id, from_artifact_id, variant, generation, state, reason, skip_code,
                notified_at, updated_at)
            SELECT %s, d.id, (d.id * 2654435761) %% 4294967296, 1, '1.4.0', NULL, NULL, 'int8', 2,
                'active', '', '', now(), now()
            FROM devices_device d""",
            [rollout.pk],
        )
        c.execute(
            """INSERT INTO rollouts_gateevaluation (rollout_id, stage, metric, variant, verdict,
                candidate_value, incumbent_value, candidate_n, incumbent_n, candidate_devices,
                incumbent_devices, threshold, p_value, lower, upper, method, looks, note, summary,
                inputs, decision, evaluated_at)
            SELECT %s, 1, 'accuracy', 'int8', 'wait', 0.957, 0.957, 23625000, 23625000, 3750, 3750,
                2.0, 0.41, -0.1, 0.1, 'mixture confidence sequence, cluster variance', l, '', %s,
                %s::jsonb, 'wait', now() - l * interval '5 seconds'
            FROM generate_series(1, %s) l, generate_series(1, %s) g""",
            [rollout.pk, summary, inputs, LOOKS, GATES_PER_LOOK],
        )
        c.execute(
            """INSERT INTO rollouts_rollouthour (rollout_id, version, hour, inferences, errors,
                latency_p95_weighted_sum, latency_p95_weight)
            SELECT %s, v, h, 18000000, 1200, 16200000.0, 18000000
            FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 hour', interval '1 hour') h,
                 unnest(ARRAY['1.4.0', '2.0.0']) v""",
            [rollout.pk, start, now],
        )


def measure() -> dict[str, tuple[int, int, int]]:
    """(rows, table bytes, index bytes) per growing table; a partitioned table counts all its
    partitions. Table bytes include TOAST and the free space map."""
    from django.db import connection

    sizes = {}
    with connection.cursor() as c:
        for table in GROWING:
            c.execute(f"SELECT count(*) FROM {table}")
            rows = c.fetchone()[0]
            c.execute(
                """SELECT sum(pg_table_size(relid)), sum(pg_indexes_size(relid))
                FROM (SELECT relid FROM pg_partition_tree(%s) WHERE isleaf
                      UNION SELECT %s::regclass WHERE NOT EXISTS (SELECT 1 FROM pg_inherits
                          WHERE inhparent = %s::regclass)) parts""",
                [table, table, table],
            )
            table_bytes, index_bytes = c.fetchone()
            sizes[table] = (rows, int(table_bytes), int(index_bytes))
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--database", default="mf_sizing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mf-sizing-") as var_dir:
        setup(args.database, Path(var_dir))
        try:
            started = time.monotonic()
            fill(args.devices, args.hours)
            print(f"filled {args.devices} devices x {args.hours} h in {time.monotonic() - started:.1f} s")
            sizes = measure()
        finally:
            drop_database(args.database)

    from django.conf import settings

    per_row = {table: (heap + index) / rows for table, (rows, heap, index) in sizes.items()}
    for table, (rows, heap, index) in sizes.items():
        print(
            f"{table:28} {rows:>9,} rows: table {heap / rows:>4.0f} B/row"
            f" + indexes {index / rows:>4.0f} B/row"
            f" = {per_row[table]:>4.0f} B/row ({(heap + index) / 2**20:,.1f} MiB)"
        )
    windows_per_day = 86400 // WINDOW_S
    per_day = {  # bytes a device adds a day (one model), and how long they are kept (days)
        "telemetry windows": (
            windows_per_day * per_row["devices_telemetrywindow"],
            settings.TELEMETRY_RETENTION_DAYS,
        ),
        "hourly sums": (24 * per_row["devices_telemetryhourly"], settings.TELEMETRY_HOURLY_RETENTION_DAYS),
        "events": (
            EVENTS_PER_DEVICE * ROLLOUTS_PER_WEEK / 7 * per_row["devices_deviceevent"],
            settings.TELEMETRY_RETENTION_DAYS,
        ),
        "assignments": (ROLLOUTS_PER_WEEK / 7 * per_row["rollouts_assignment"], None),
    }
    print(
        f"\nper device and model, a day (assuming {ROLLOUTS_PER_WEEK} rollout a week reaches every device):"
    )
    steady = 0.0
    for name, (daily, kept) in per_day.items():
        held = daily * kept if kept else None
        steady += held or 0.0
        print(
            f"  {name:18} {daily:>10,.0f} B/day; "
            + (f"kept {kept} d: {held / 2**20:,.2f} MiB" if held else "kept with the rollout's history")
        )
    print(
        f"  {'refusal counts':18} {per_row['devices_ingestrefusal']:>10,.0f} B per device and reason at most"
        " (upserted, deleted after TELEMETRY_RETENTION_DAYS)"
    )
    looks_per_day = 86400 // 5
    evaluation = per_row["rollouts_gateevaluation"] * GATES_PER_LOOK
    print(
        f"per running rollout: {looks_per_day:,} gate evaluations a day x {GATES_PER_LOOK} rows"
        f" = {looks_per_day * evaluation / 2**20:,.0f} MiB/day while it runs; past"
        f" GATE_EVALUATION_RETENTION_DAYS ({settings.GATE_EVALUATION_RETENTION_DAYS}) thinned to 24 a day"
        f" ({24 * evaluation / 2**10:,.0f} KiB/day); rollout hours {per_row['rollouts_rollouthour']:.0f} B"
        " per version and hour"
    )
    for fleet in (1_000, 10_000, 100_000, 1_000_000):
        print(
            f"{fleet:>9,} devices: {fleet / WINDOW_S:>7,.0f} windows/s to ingest, "
            f"{fleet * sum(daily for daily, _ in per_day.values()) / 2**30:,.1f} GiB written a day, "
            f"steady state {fleet * steady / 2**30:,.1f} GiB (one model each)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
