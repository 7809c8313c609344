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
    connection.connection.autocommit = True
    with connection.cursor() as c:
        c.execute("VACUUM ANALYZE")


def measure() -> dict[str, tuple[int, int, int]]:
    """(rows, table bytes, index bytes) per growing table; a partitioned table counts all its
    partitions. Table bytes include TOAST and the free space map."""
    from django.db import connection

    sizes = {}
    with connection.cursor() as c:
        for table in ("devices_telemetrywindow", "devices_telemetryhourly", "devices_deviceevent"):
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
            sizes[table] = (rows, table_bytes, index_bytes)
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
    per_device = {
        "telemetry windows": windows_per_day
        * settings.TELEMETRY_RETENTION_DAYS
        * per_row["devices_telemetrywindow"],
        "hourly sums": 24 * settings.TELEMETRY_HOURLY_RETENTION_DAYS * per_row["devices_telemetryhourly"],
    }
    print(
        f"per device and model: {windows_per_day:,} windows/day "
        f"({windows_per_day * per_row['devices_telemetrywindow'] / 2**20:.2f} MiB/day), 24 hourly sums/day; "
        f"kept {settings.TELEMETRY_RETENTION_DAYS} d and {settings.TELEMETRY_HOURLY_RETENTION_DAYS} d: "
        + ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in per_device.items())
    )
    steady = sum(per_device.values())
    for fleet in (1_000, 10_000, 100_000):
        print(
            f"{fleet:>7,} devices: {fleet / WINDOW_S:>6,.0f} windows/s to ingest, "
            f"steady state {fleet * steady / 2**30:,.1f} GiB (one model each)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
