"""The Python client example in docs/api.md works: a client generated from the schema the
server serves, running the docs' own code block against a live server.

It needs openapi-python-client (the generator, in requirements/dev.txt; the client it
writes needs httpx and attrs, which the generator brings); OPENAPI_PYTHON_CLIENT may point
at another executable. The generated package goes
to a temporary directory and runs in the generator's own interpreter, so nothing is
installed into the project's environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from django.utils import timezone

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device

ROOT = Path(__file__).resolve().parents[2]
# requirements/dev.txt installs it beside the interpreter running the tests.
GENERATOR = (
    os.environ.get("OPENAPI_PYTHON_CLIENT")
    or shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    or shutil.which("openapi-python-client")
)


def docs_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    match = re.search(r"<!-- client-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/api.md lost its client example"
    return match.group(1)


def generate_client(schema_url: str, target: Path) -> None:
    subprocess.run(
        [GENERATOR, "generate", "--url", schema_url, "--meta", "none", "--output-path", str(target)],
        check=True,
        capture_output=True,
        timeout=300,
        # The generator formats with ruff when it finds it; the project's own will do.
        env={**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"},
    )


def run_example(workdir: Path, base_url: str, token: str) -> list[str]:
    python = Path(GENERATOR).resolve().parent / "python"
    script = workdir / "example.py"
    script.write_text(docs_example())
    done = subprocess.run(
        [str(python), str(script)],
        cwd=workdir,
        env={"PATH": os.environ.get("PATH", ""), "MODELFLEET_URL": base_url, "MODELFLEET_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_docs_client_example_runs_against_a_live_server(transactional_db, live_server, alice, tmp_path):
    now = timezone.now()
    for n, minutes_ago in enumerate([30, 5, 20]):
        Device.objects.create(
            device_id=f"cam-{n}",
            status=DeviceStatus.ACTIVE,
            last_seen_at=now - timedelta(minutes=minutes_ago),
        )
    Device.objects.create(device_id="cam-pending", status=DeviceStatus.PENDING)
    generate_client(f"{live_server.url}/api/schema/?format=json", tmp_path / "modelfleet_client")

    first = run_example(tmp_path, live_server.url, alice.token)
    # Three active devices, most recently seen first, over two pages of two.
    assert first == ["created: letters", "device: cam-1", "device: cam-2", "device: cam-0"]
    # The same again: the model exists now, and the client hands back the error's code.
    assert run_example(tmp_path, live_server.url, alice.token)[0] == "refused: duplicate_model"
