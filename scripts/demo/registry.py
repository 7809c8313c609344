"""Step: upload digits 1.0.0 through the HTTP API and show what the registry made of it."""

from __future__ import annotations

import requests
from rich.panel import Panel
from rich.table import Table

from samples import digits

from .common import Demo, api_call, console


def upload_version(
    session: requests.Session, api: str, version: str, models: dict[str, bytes], notes: str, demo: Demo
) -> list[dict]:
    """One version of digits with its golden set, each variant uploaded and waited for
    (inspect, smoke-run, golden set, zstd, sign), then released."""
    with demo.task(f"Creating digits {version} with its golden set"):
        api_call(
            session,
            "POST",
            f"{api}/models/digits/versions/",
            201,
            data={"version": version, "notes": notes},
            files={"golden_set": ("golden.npz", digits.golden_set_npz())},
        )
    artifacts = []
    for variant, tflite in models.items():
        with demo.task(
            f"Uploading {version} {variant} ({len(tflite):,} bytes): "
            "inspect, smoke-run, golden set, zstd, sign"
        ):
            artifacts.append(
                api_call(
                    session,
                    "POST",
                    f"{api}/models/digits/versions/{version}/artifacts/?wait=120",
                    201,
                    data={"variant": variant},
                    files={"file": (f"{variant}.tflite", tflite)},
                )
            )
    api_call(session, "POST", f"{api}/models/digits/versions/{version}/release", 200)
    return artifacts


def upload_v1(demo: Demo) -> None:
    """Upload digits 1.0.0 as float32 and int8 through the HTTP API, as an operator with an
    API token, and show what the registry made of them (size, compression, golden-set
    accuracy, signed manifest)."""
    with demo.task("Creating model 'digits'"):
        api_call(
            demo.session,
            "POST",
            f"{demo.api}/models/",
            201,
            json={
                "name": "digits",
                "task": "classification",
                "labels": digits.LABELS,
                "description": "8x8 handwritten digits (scikit-learn), MLP 64-32-10",
            },
        )
    demo.artifacts = upload_version(
        demo.session, demo.api, "1.0.0", digits.build_digits_models(), "first release", demo
    )
    table = Table(title="digits 1.0.0 in the registry")
    for column in ("variant", "status", "size", "compressed", "ratio", "golden accuracy", "manifest sha256"):
        table.add_column(column, justify="right" if column in ("size", "compressed", "ratio") else "left")
    for artifact in demo.artifacts:
        table.add_row(
            artifact["variant"],
            f"[green]{artifact['status']}[/green]",
            f"{artifact['raw_size']:,} B",
            f"{artifact['blob_size']:,} B",
            f"{artifact['compression_ratio']:.2f}x",
            f"{artifact['golden_accuracy']:.1%} of {artifact['golden_samples']}",
            artifact["manifest_sha256"][:16] + "…",
        )
    console.print(table)


def show_access(demo: Demo) -> None:
    """Where to look: the admin with its credentials, the API docs, the operator's token."""
    base, token = demo.base, demo.token
    console.print(
        Panel.fit(
            f"Admin:     [bold]{base}/admin/[/bold]  "
            f"user [bold]admin[/bold] / password [bold]{demo.admin_password}[/bold]\n"
            f"API docs:  {base}/api/docs/\n"
            f"Operator:  olivia, API token [bold]{token}[/bold]\n"
            f"Try:       curl -H 'Authorization: Bearer {token}' {base}/api/v1/artifacts/",
            title="Modelfleet control plane is running",
        )
    )
