"""The gate's evaluation query at fleet size (issue 13, section 2): 10,000 devices, a week
of telemetry partitions, a running rollout with half its devices on the candidate; times
the gate evaluation code path the beat task runs (``fleet.rollouts.services._gates``:
the arms from the assignments, the per-device sums from
``fleet.devices.selectors.telemetry_by_device``, the statistics) and the selector alone,
p50/p95 beside 200 ms, and prints EXPLAIN (ANALYZE, BUFFERS) of every SQL statement the
selector sends, so that partition pruning and index-only reads can be seen.

How the database is filled: the project's migrations, its partition maintenance
(``telemetry_partitions_ensure``, the same call the hourly beat task makes) for the last
eight days, then rows inserted by SQL with the contents the ingest bridge writes (a window
per device and model every 30 s, the agent's default; labels, latencies, health), and
the per-device hourly sums as the bridge's own INSERT computes them. A whole week of
windows for 10,000 devices is 201.6 million rows, about 130 GB at the 691 B a row
bench/db_sizing.py measures: more than this machine's disk, and more than a gate needs.

The gate reads the windows of the part hour its stage began in and the hourly sums for
the whole hours after (``telemetry_sums``, which reads the same windows through the sums
the ingest writes beside them). The windows therefore are: every window of the last
``--recent-minutes``, the part hour each longer stage begins with, and ten minutes of every
older day; the hourly sums cover the week. For the stages whose windows are all there, the
bench also times the windows alone (``hourly=False``, the previous query) and checks that
both give the same sums.

Real parts: PostgreSQL (a database of its own, created and dropped), the project's
migrations, partition maintenance, registry pipeline and gate code. Nothing is mocked.

    .venv/bin/python bench/gate_query.py [--devices 10000] [--stage-minutes 60 240]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import db_sizing  # noqa: E402 (after the path)

LIMIT_MS = 200.0
WINDOW_S = 30  # the agent's default telemetry_interval_s
DAYS = 7


def setup(database: str, var_dir: Path) -> None:
    os.environ["SIGNING_KEY_AUTOGENERATE"] = "1"  # the registry signs the versions it makes
    db_sizing.setup(database, var_dir)


def make_versions():
    """digits 1.0.0 (the incumbent) and 2.0.0 (the candidate), float32 and int8 each,
    through the registry's real pipeline."""
    from django.core.files.uploadedfile import TemporaryUploadedFile

    from fleet.registry import services
    from samples import digits

    model = services.model_create(name="digits", labels=digits.LABELS)
    artifacts = {}
    for number in ("1.0.0", "2.0.0"):
        version = services.version_create(model=model, version=number)
        for variant, data in digits.build_digits_models(version=number).items():
            upload = TemporaryUploadedFile(f"{variant}.tflite", "application/octet-stream", len(data), None)
            upload.write(data)
            upload.seek(0)
            artifact = services.artifact_upload(version=version, variant=variant, upload=upload)
            artifacts[number, variant] = services.artifact_process(artifact_id=artifact.pk)
    return model, artifacts


def make_rollout(model, artifacts, devices: int, now: datetime, stage_start: datetime):
    """A running rollout at its second stage (50 %): the first half of the devices run the
    candidate (active), the other half still run the incumbent (pending)."""
    from django.db import connection

    from fleet.devices.models import Device
    from fleet.rollouts.choices import AssignmentState, RolloutState
    from fleet.rollouts.models import Assignment, Rollout, RolloutPolicy

    with connection.cursor() as c:
        c.execute(
            """INSERT INTO devices_device (device_id, display_name, status, hardware, runtime,
                runtime_version, supports_int8, supported_ops, unsupported_ops, agent_version, tags,
                enrollment_code_sha256, online, applied_generation, reported_models, health,
                desired_generation, desired_artifacts, created_at)
            SELECT 'cam-' || lpad(i::text, 6, '0'), '', 'active', 'any', 'litert', '2.3.0', i %% 4 <> 0,
                '[]', '[]', '0.1.0', '["gate"]', '', true, 1, '{}', '{}', 1,
                jsonb_build_object('digits', CASE WHEN i %% 4 <> 0 THEN %s ELSE %s END), now()
            FROM generate_series(1, %s) i""",
            [artifacts["1.0.0", "int8"].pk, artifacts["1.0.0", "float32"].pk, devices],
        )
    policy = RolloutPolicy.objects.create(
        name="gate-bench",
        stages=[
            {"kind": "percent", "value": 10, "soak_seconds": 600},
            {"kind": "percent", "value": 50, "soak_seconds": 600},
            {"kind": "percent", "value": 100},
        ],
        gates={
            "max_install_failure_rate": 0.05,
            "max_error_rate": 0.02,
            "max_latency_p95_ratio": 1.5,
            "min_devices": 3,
            "accuracy": {"min_samples": 200, "min_devices": 3, "max_drop_pp": 2, "confidence": 0.95},
        },
    )
    rollout = Rollout.objects.create(
        model=model,
        target_version=artifacts["2.0.0", "int8"].version,
        targets={"tags": ["gate"]},
        policy=policy,
        policy_snapshot=policy.snapshot(),
        state=RolloutState.RUNNING,
        current_stage=1,
        started_at=stage_start - timedelta(hours=1),
        stage_started_at=stage_start,
        stage_looks=3,
    )
    rows = []
    for index, (pk, supports_int8) in enumerate(
        Device.objects.order_by("pk").values_list("pk", "supports_int8")
    ):
        variant = "int8" if supports_int8 else "float32"
        candidate = index < devices // 2
        rows.append(
            Assignment(
                rollout=rollout,
                device_id=pk,
                cohort_key=index,
                stage=(0 if index < devices // 10 else 1) if candidate else None,
                from_version="1.0.0",
                from_artifact=artifacts["1.0.0", variant],
                to_artifact=artifacts["2.0.0", variant],
                variant=variant,
                generation=2 if candidate else None,
                state=AssignmentState.ACTIVE if candidate else AssignmentState.PENDING,
                notified_at=stage_start - timedelta(minutes=5) if candidate else None,
            )
        )
    Assignment.objects.bulk_create(rows, batch_size=5000)
    return rollout


def fill_windows(devices: int, start: datetime, end: datetime) -> int:
    """Windows that began in [start, end), every 30 s per device; the candidate half
    reports 2.0.0 (slightly slower, as accurate), the other half 1.0.0."""
    from django.db import connection

    half = devices // 2
    with connection.cursor() as c:
        c.execute(
            """INSERT INTO devices_telemetrywindow (device_id, message_id, ts, window_start,
                received_at, window_s, model, version, variant, inferences, errors,
                latency_p50_ms, latency_p95_ms, latency_p99_ms, labeled, correct,
                shadow_version, shadow_variant, shadow_sampled, shadow_compared, shadow_agreed,
                shadow_errors, shadow_skipped, shadow_mean_abs_diff, shadow_latency_p95_ms,
                cpu_pct, rss_mb, temp_c)
            SELECT d.id, md5(d.id || '-' || w.t)::uuid::text, w.t + interval '30 seconds', w.t,
                w.t + interval '31 seconds', 30, 'digits',
                CASE WHEN d.rank <= %s THEN '2.0.0' ELSE '1.0.0' END,
                CASE WHEN d.supports_int8 THEN 'int8' ELSE 'float32' END,
                1500 + (d.id + w.n) %% 40, (d.id + w.n) %% 3, 0.4,
                CASE WHEN d.rank <= %s THEN 0.95 ELSE 0.9 END + ((d.id * 7 + w.n) %% 10) / 100.0,
                1.3, 210, 198 + (d.id + w.n) %% 7, '', '', 0, 0, 0, 0, 0, NULL, NULL,
                12.5, 61.2, 48.0
            FROM (SELECT id, supports_int8, row_number() OVER (ORDER BY id) AS rank
                  FROM devices_device) d,
                 (SELECT row_number() OVER () AS n, t
                  FROM generate_series(%s::timestamptz, %s::timestamptz - interval '30 seconds',
                                       interval '30 seconds') t) w
            ON CONFLICT DO NOTHING""",
            [half, half, start, end],
        )
        return c.rowcount


INSERT_HOURLY = """INSERT INTO devices_telemetryhourly (device_id, hour, model, version, variant,
                shadow_version, shadow_variant, windows, inferences, errors, labeled, correct,
                latency_p95_weighted_sum, latency_p95_weight, latency_p95_max_ms, shadow_sampled,
                shadow_compared, shadow_agreed, shadow_errors, shadow_skipped,
                shadow_latency_p95_weighted_sum, shadow_latency_p95_weight,
                shadow_mean_abs_diff_weighted_sum, shadow_mean_abs_diff_weight, cpu_pct_sum,
                cpu_pct_windows, rss_mb_sum, rss_mb_windows, temp_c_sum, temp_c_windows)"""


def fill_hourly(devices: int, days_start: datetime, now: datetime) -> int:
    """The per-device hourly sums for the whole week: computed from the windows, as the
    ingest's INSERT does, for the hours that have windows; the same sums as 120 such
    windows would give for the others."""
    from django.db import connection

    half = devices // 2
    with connection.cursor() as c:
        c.execute(
            f"""{INSERT_HOURLY}
            SELECT device_id, date_trunc('hour', window_start), model, version, variant,
                shadow_version, shadow_variant, count(*), sum(inferences), sum(errors),
                sum(labeled), sum(correct), sum(latency_p95_ms * inferences), sum(inferences),
                max(latency_p95_ms), 0, 0, 0, 0, 0, 0, 0, 0, 0, sum(cpu_pct), count(cpu_pct),
                sum(rss_mb), count(rss_mb), sum(temp_c), count(temp_c)
            FROM devices_telemetrywindow GROUP BY 1, 2, 3, 4, 5, 6, 7"""
        )
        from_windows = c.rowcount
        c.execute(
            f"""{INSERT_HOURLY}
            SELECT d.id, h, 'digits', CASE WHEN d.rank <= %s THEN '2.0.0' ELSE '1.0.0' END,
                CASE WHEN d.supports_int8 THEN 'int8' ELSE 'float32' END, '', '', 120, 182340,
                120, 25200, 24120, 173223.0, 182340, 1.04, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                1500.0, 120, 7344.0, 120, 5760.0, 120
            FROM (SELECT id, supports_int8, row_number() OVER (ORDER BY id) AS rank
                  FROM devices_device) d,
                 generate_series(%s::timestamptz, %s::timestamptz, interval '1 hour') h
            ON CONFLICT DO NOTHING""",
            [half, days_start, now],
        )
        return from_windows + c.rowcount


def statements(call) -> list[tuple[str, tuple]]:
    """The queries (with their parameters) that ``call`` sends, in order (not its SETs)."""
    from django.db import connection

    sent = []

    def record(execute, sql, params, many, context):
        sent.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        call()
    return [(sql, params) for sql, params in sent if sql.lstrip().upper().startswith("SELECT")]


def explain(sql: str, params) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement, its long id lists shortened."""
    from django.db import connection, transaction

    from fleet.devices.selectors import GATE_QUERY_WORK_MEM

    with transaction.atomic(), connection.cursor() as c:
        c.execute(f"SET LOCAL work_mem = '{GATE_QUERY_WORK_MEM}'")  # as the selector runs it
        c.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", params)
        plan = "\n".join(row[0] for row in c.fetchall())
    return re.sub(r"'\{(\d+),[\d,]*,(\d+)\}'", lambda m: f"'{{{m[1]},…,{m[2]}}}'", plan)


def timed(call, runs: int) -> tuple[float, float, object]:
    """(p50 ms, p95 ms, last result) over ``runs`` calls after one warm-up call."""
    result = call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument(
        "--stage-minutes",
        type=int,
        nargs="+",
        default=[5, 60, 24 * 60 + 17, DAYS * 24 * 60 - 43],
        help="stage ages to time (the gate reads the windows that began since)",
    )
    parser.add_argument(
        "--recent-minutes",
        type=int,
        default=75,
        help="every window of the last minutes (the others: see above)",
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--database", default="mf_scale_gate")
    parser.add_argument("--keep", action="store_true", help="keep the database (for poking at it)")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory(prefix="mf-gate-") as var_dir:
        setup(args.database, Path(var_dir))
        try:
            failed = run(args)
        finally:
            if not args.keep:
                db_sizing.drop_database(args.database)
    return 1 if failed else 0


def hour_ceil(moment: datetime) -> datetime:
    floor = moment.replace(minute=0)
    return floor if floor == moment else floor + timedelta(hours=1)


def fill(args, now: datetime) -> tuple[int, int]:
    """Windows: the last --recent-minutes, the part hour each longer stage starts with, ten
    minutes of 03:00 of every older day; hourly sums: the whole week."""
    recent = now - timedelta(minutes=args.recent_minutes)
    windows = fill_windows(args.devices, recent, now)
    for minutes in args.stage_minutes:
        since = now - timedelta(minutes=minutes)
        if since < recent and since != hour_ceil(since):
            windows += fill_windows(args.devices, since, min(hour_ceil(since), recent))
    for day in range(1, DAYS + 1):
        older = (now - timedelta(days=day)).replace(hour=3, minute=0)
        if older + timedelta(minutes=10) < recent:  # (a stage's part hour may hold them already)
            windows += fill_windows(args.devices, older, older + timedelta(minutes=10))
    return windows, fill_hourly(args.devices, (now - timedelta(days=DAYS)).replace(minute=0), now)


def same(a, b) -> bool:
    """Two telemetry_by_device answers agree: counts exactly, mean p95s to 1e-9."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for name, value in vars(x).items():
            other = getattr(y, name)
            if isinstance(value, float) and isinstance(other, float):
                if abs(value - other) > 1e-9 * max(1.0, abs(value)):
                    return False
            elif value != other:
                return False
    return True


def run(args) -> bool:
    from django.db import connection

    from fleet.devices.ingest import telemetry_partitions_ensure
    from fleet.devices.selectors import telemetry_by_device
    from fleet.rollouts import services
    from fleet.rollouts.models import Rollout

    now = datetime.now(UTC).replace(second=0, microsecond=0)
    telemetry_partitions_ensure(now=now, first_day=(now - timedelta(days=DAYS + 1)).date())
    with connection.cursor() as c:
        c.execute("SELECT count(*) FROM pg_partition_tree('devices_telemetrywindow') WHERE isleaf")
        print(f"telemetry_partitions_ensure: {c.fetchone()[0]} partitions (days and DEFAULT)")
    started = time.monotonic()
    model, artifacts = make_versions()
    rollout = make_rollout(model, artifacts, args.devices, now, now - timedelta(minutes=5))
    windows, hourly = fill(args, now)
    connection.connection.autocommit = True
    with connection.cursor() as c:
        c.execute("VACUUM ANALYZE")
        c.execute(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) "
            "FROM pg_partition_tree('devices_telemetrywindow')"
        )
        size = c.fetchone()[0]
    print(
        f"filled {args.devices:,} devices, {windows:,} telemetry windows ({size}), {hourly:,} hourly sums"
        f" in {time.monotonic() - started:.0f} s"
    )

    results = []
    for minutes in sorted(args.stage_minutes):
        since = now - timedelta(minutes=minutes)
        Rollout.objects.filter(pk=rollout.pk).update(stage_started_at=since)
        rollout.refresh_from_db()
        arms = services._arms(rollout)
        members = [*arms["candidate"], *arms["incumbent"], *arms["shadow"]]

        def selector(members=members, since=since, hourly=True):
            return telemetry_by_device(devices=members, model="digits", since=since, hourly=hourly)

        def gates(rollout=rollout):
            return services._gates(rollout, rollout.stage_looks + 1, now + timedelta(minutes=1))

        sel_p50, sel_p95, rows = timed(selector, args.runs)
        gate_p50, gate_p95, evaluations = timed(gates, args.runs)
        complete = since >= now - timedelta(minutes=args.recent_minutes)
        old = None
        if complete:  # every window is there: the windows alone must say the same
            old_p50, old_p95, old_rows = timed(lambda: selector(hourly=False), max(3, args.runs // 3))
            old = (old_p50, old_p95, same(rows, old_rows))
        read = sum(row.windows for row in rows)
        results.append((minutes, read, sel_p50, sel_p95, gate_p50, gate_p95, old))
        print(f"\n=== stage started {minutes:,} min ago: {read:,} windows of {len(members):,} devices summed")
        for evaluation in evaluations:
            print(f"  {evaluation.verdict:8} {evaluation.summary}")
        print("  EXPLAIN (ANALYZE, BUFFERS) of each statement telemetry_by_device sends:")
        for sql, params in statements(selector):
            plan = explain(sql, params)
            print("  " + plan.replace("\n", "\n  "))

    print(f"\nGate evaluation, {args.devices:,} devices, {DAYS} days of partitions; limit {LIMIT_MS:.0f} ms")
    print(
        f"{'stage age':>10} {'windows':>12} {'selector p50':>13} {'p95':>8} {'_gates p50':>11} {'p95':>8}"
        f"  {'limit':9} {'windows alone p50/p95, same sums':>34}"
    )
    failed = False
    for minutes, read, sel_p50, sel_p95, gate_p50, gate_p95, old in results:
        ok = gate_p95 <= LIMIT_MS
        failed |= not ok or (old is not None and not old[2])
        alone = (
            f"{old[0]:.0f} / {old[1]:.0f} ms, {'same' if old[2] else 'DIFFERENT'}" if old else "(not filled)"
        )
        print(
            f"{minutes:>6} min {read:>12,} {sel_p50:>10.0f} ms {sel_p95:>5.0f} ms {gate_p50:>8.0f} ms"
            f" {gate_p95:>5.0f} ms  {'PASS' if ok else 'FAIL'} <= {LIMIT_MS:.0f}  {alone:>34}"
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())
