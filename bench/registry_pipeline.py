"""Registry pipeline cost against its unavoidable core (registry issue, "Done when").

Builds a ~100 MB float32 .tflite, uploads it through the registry service and times the
artifact pipeline (inspect + LiteRT load and smoke run + zstd + hashes + sign + store).
In the same run it times sha256 + zstd at the same level and thread count on the same
bytes alone. Target: pipeline / (sha256 + zstd) <= 1.5.

    .venv/bin/python bench/registry_pipeline.py [--size-mb 100] [--level 19]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET_RATIO = 1.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=100, help="model size in MiB (default 100)")
    parser.add_argument("--level", type=int, default=19, help="zstd level (default 19, the registry default)")
    parser.add_argument("--threads", type=int, default=-1, help="zstd threads (-1: one per CPU, the default)")
    return parser.parse_args()


def setup_django(var_dir: Path, level: int, threads: int) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "fleet.settings",
            "DEBUG": "1",
            "VAR_DIR": str(var_dir),
            "DATABASE_URL": f"sqlite:///{var_dir / 'bench.sqlite3'}",
            "ARTIFACT_ZSTD_LEVEL": str(level),
            "ARTIFACT_ZSTD_THREADS": str(threads),
            "CELERY_TASK_ALWAYS_EAGER": "0",
        }
    )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def baseline_seconds(path: Path, level: int, threads: int) -> float:
    """sha256 of the raw bytes + zstd at the same settings, nothing else, streamed the same way."""
    import zstandard

    started = time.perf_counter()
    digest = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(
        level=level, threads=threads, write_checksum=True, write_content_size=True
    )
    with (
        open(path, "rb") as raw,
        open(os.devnull, "wb") as sink,
        compressor.stream_writer(sink, size=path.stat().st_size, closefd=False) as writer,
    ):
        while chunk := raw.read(1 << 20):
            digest.update(chunk)
            writer.write(chunk)
    return time.perf_counter() - started


def pipeline_seconds(path: Path) -> tuple[float, object]:
    from django.core.files.uploadedfile import TemporaryUploadedFile

    from fleet.registry import services

    model = services.model_create(name=f"bench-{time.time_ns()}")
    version = services.version_create(model=model, version="1.0.0")
    upload = TemporaryUploadedFile("large.tflite", "application/octet-stream", path.stat().st_size, None)
    with open(path, "rb") as source:
        shutil.copyfileobj(source, upload.file, 1 << 20)
    upload.file.flush()
    upload.seek(0)
    artifact = services.artifact_upload(version=version, variant="float32", upload=upload)
    upload.close()  # storage moved the temporary file into place
    started = time.perf_counter()
    artifact = services.artifact_process(artifact_id=artifact.pk)
    return time.perf_counter() - started, artifact


def main() -> int:
    args = parse_args()
    var_dir = Path(tempfile.mkdtemp(prefix="modelfleet-bench-"))
    try:
        setup_django(var_dir, args.level, args.threads)
        from rich.console import Console
        from rich.table import Table

        from samples import digits

        console = Console()
        console.print(f"Building a {args.size_mb:g} MiB float32 model…")
        model_path = var_dir / "large.tflite"
        model_path.write_bytes(digits.build_large_model(args.size_mb))
        size = model_path.stat().st_size

        console.print(f"Timing sha256 + zstd level {args.level} alone…")
        baseline = baseline_seconds(model_path, args.level, args.threads)
        console.print("Timing the registry pipeline…")
        pipeline, artifact = pipeline_seconds(model_path)
        console.print("Timing sha256 + zstd alone again (to see drift)…")
        baseline_again = baseline_seconds(model_path, args.level, args.threads)

        assert artifact.status == "ready", (
            f"pipeline failed: {artifact.failure_code} {artifact.failure_reason}"
        )
        reference = min(baseline, baseline_again)
        ratio = pipeline / reference
        table = Table(title=f"Registry pipeline, {size / 2**20:.1f} MiB model, zstd level {args.level}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row(
            "sha256 + zstd alone (best of 2)", f"{reference:.2f} s  ({baseline:.2f} / {baseline_again:.2f})"
        )
        table.add_row("pipeline: inspect + smoke-run + zstd + hashes + sign + store", f"{pipeline:.2f} s")
        table.add_row(
            "blob size", f"{artifact.blob_size / 2**20:.1f} MiB ({artifact.compression_ratio:.2f}x)"
        )
        table.add_row("ratio pipeline / (sha256 + zstd)", f"{ratio:.2f}")
        table.add_row("target", f"<= {TARGET_RATIO}")
        console.print(table)
        verdict = "[green]PASS[/green]" if ratio <= TARGET_RATIO else "[red]FAIL[/red]"
        console.print(f"ratio {ratio:.2f} vs limit {TARGET_RATIO}: {verdict}")
        return 0 if ratio <= TARGET_RATIO else 1
    finally:
        shutil.rmtree(var_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
