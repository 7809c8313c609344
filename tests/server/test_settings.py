"""A bad setting stops the process at start, with a message that names the variable
(STYLE.md, "In this project", 4). Each case starts a fresh Python with a minimal env."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def start(tmp_path, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "fleet.settings",
        "VAR_DIR": str(tmp_path / "var"),
    }
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_message(result: subprocess.CompletedProcess) -> str:
    """The exception line that ends the traceback, without the source lines above it
    (which would name the variable even when the message does not)."""
    lines = result.stderr.splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=-1)
    return "\n".join(line for line in lines[last_frame + 1 :] if not line.startswith("    "))


def test_it_starts_with_a_good_environment(tmp_path):
    result = start(tmp_path, DEBUG="1", DATABASE_URL="postgres://postgres@127.0.0.1:5432/modelfleet")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "nonsense://x"),
        ("REDIS_URL", "http://x"),
        ("ARTIFACT_ZSTD_LEVEL", "99"),
        ("ARTIFACT_ZSTD_LEVEL", "0"),
        ("ARTIFACT_ZSTD_LEVEL", "abc"),
        ("ARTIFACT_STORAGE", "ftp"),
        ("SECRET_KEY_FILE", "/nonexistent"),
        ("ARTIFACT_MAX_UPLOAD_BYTES", "0"),
        ("ARTIFACT_MAX_UPLOAD_BYTES", "lots"),
    ],
)
def test_a_bad_value_stops_the_start_naming_the_variable(tmp_path, variable, value):
    result = start(tmp_path, **{"DEBUG": "1", variable: value})
    assert result.returncode != 0
    message = error_message(result)
    assert message.startswith("django.core.exceptions.ImproperlyConfigured:"), result.stderr
    assert variable in message


def test_without_debug_it_needs_a_secret_key(tmp_path):
    result = start(tmp_path, DEBUG="0")
    assert result.returncode != 0
    message = error_message(result)
    assert message.startswith("django.core.exceptions.ImproperlyConfigured:"), result.stderr
    assert "SECRET_KEY" in message


def test_without_debug_a_secret_key_is_enough(tmp_path):
    result = start(tmp_path, DEBUG="0", SECRET_KEY="s3cret-for-tests-only")
    assert result.returncode == 0, result.stderr
