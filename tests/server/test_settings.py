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
        ("LOG_FORMAT", "xml"),
        ("INGEST_METRICS_PORT", "70000"),
        ("WORKER_METRICS_PORT", "-1"),
        ("METRICS_TOKEN_FILE", "/nonexistent"),
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


def check_deploy(tmp_path, **env: str) -> subprocess.CompletedProcess:
    production = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "fleet.settings",
        "VAR_DIR": str(tmp_path / "var"),
        "DEBUG": "0",
        "SECRET_KEY": "a-long-random-production-secret-" + "x" * 40,
        "ALLOWED_HOSTS": "fleet.example.com",
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "PUBLIC_BASE_URL": "https://fleet.example.com",
        "MQTT_PUBLIC_URL": "mqtts://broker.example.com:8883",
    }
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env={**production, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_pass_check_deploy_with_no_warning(tmp_path):
    result = check_deploy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    # Positive control: the same check fails when one of the defaults is turned off.
    weakened = check_deploy(tmp_path, SECURE_SSL_REDIRECT="0")
    assert weakened.returncode != 0 and "security.W008" in weakened.stdout + weakened.stderr


def test_check_deploy_warns_when_devices_are_told_to_dial_without_tls(tmp_path):
    # The positive control is the test above: the same check with TLS URLs is clean.
    result = check_deploy(
        tmp_path, PUBLIC_BASE_URL="http://fleet.example.com", MQTT_PUBLIC_URL="mqtt://b:1883"
    )
    assert result.returncode != 0
    assert "fleet.W001" in result.stdout + result.stderr and "fleet.W002" in result.stdout + result.stderr


def test_a_proxy_ssl_header_is_read_from_its_name(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.conf import settings; "
            "print(settings.SECURE_PROXY_SSL_HEADER)",
        ],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "DJANGO_SETTINGS_MODULE": "fleet.settings",
            "VAR_DIR": str(tmp_path / "var"),
            "DEBUG": "1",
            "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "('HTTP_X_FORWARDED_PROTO', 'https')", result.stderr
