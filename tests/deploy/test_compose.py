"""docker/compose.yaml: valid for the Compose Specification, and everything it runs exists."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema

from tests.deploy.conftest import read_env_file
from tests.deploy.project_commands import ROOT, check_command, parse_dockerfile, shell_words, split_shell

SCHEMA = json.loads((Path(__file__).parent / "compose_spec" / "compose-spec.json").read_text())
SETTINGS_SOURCE = (ROOT / "fleet" / "settings.py").read_text()
LONG_RUNNING = ("web", "worker", "beat", "ingest")
ONE_OFF = ("migrate", "broker-provision", "broker-init", "tls-init", "keys-init")


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def project_services(compose: dict) -> dict[str, dict]:
    """The services that run the control plane's image (built from docker/Dockerfile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "docker/Dockerfile"
    }


def image_env() -> dict[str, str]:
    parser = parse_dockerfile(ROOT / "docker" / "Dockerfile")
    return dict(parser.envs)


def rendered_configs(compose: dict) -> set[str]:
    command = compose["services"]["broker-init"]["command"]
    return {command[command.index("--out") + 1]}


def secret_path_map(compose: dict, operator_dir: Path) -> dict[str, str]:
    return {
        f"/run/secrets/{name}": str(operator_dir / spec["file"]) for name, spec in compose["secrets"].items()
    }


def test_compose_file_is_valid_against_the_compose_spec_schema(compose):
    assert schema_errors(compose) == []


def test_the_schema_check_refuses_a_broken_compose_file(compose):
    """Positive control: the same validation catches a misspelt key and a bad condition."""
    broken = copy.deepcopy(compose)
    broken["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["worker"]["comand"] = ["celery"]
    errors = schema_errors(broken)
    assert any("services/web/depends_on" in error for error in errors), errors
    assert any("comand" in error for error in errors), errors


def test_it_runs_every_process_issue_11_names(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "mosquitto", *LONG_RUNNING, *ONE_OFF):
        assert name in services, name
    # The S3-compatible store is optional: only with `--profile s3`.
    assert services["minio"]["profiles"] == ["s3"]
    assert services["minio-init"]["profiles"] == ["s3"]
    assert all("profiles" not in services[name] for name in (*LONG_RUNNING, *ONE_OFF, "mosquitto"))


def test_every_command_of_the_control_plane_image_exists_in_the_project(compose):
    rendered = rendered_configs(compose)
    checked = 0
    for name, service in project_services(compose).items():
        lines = [shell_words(service["command"])]
        test = service.get("healthcheck", {}).get("test")
        if test:
            assert test[0] in ("CMD", "CMD-SHELL"), name
            lines.append(test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]])
        for argv in lines:
            assert check_command(argv, rendered=rendered) == [], (name, argv)
            checked += 1
    assert checked >= 12


def test_the_command_check_refuses_what_does_not_exist():
    """Positive control for the checker the deployment tests share."""
    assert check_command(["python", "manage.py", "no_such_command"])
    assert check_command(["celery", "-A", "fleet", "wurker"])
    assert check_command(["celery", "-A", "no_such_app", "worker"])
    assert check_command(["gunicorn", "fleet.wsgi:no_such_app"])
    assert check_command(["python", "docker/no-such-script.py"])
    assert check_command(["mosquitto", "-c", "/etc/nowhere.conf"])
    assert check_command(["sh", "-c", "test -f x || exec python manage.py no_such_command"])
    assert check_command(["nginx"])
    assert check_command(["python", "manage.py", "migrate"]) == []
    assert check_command(["gunicorn", "fleet.wsgi", "--bind", "0.0.0.0:8000"]) == []


def test_broker_provision_is_a_management_command(compose):
    """The one provisioning command (issue 11). It lands with the deploy branch: until both
    are merged this fails, by design."""
    assert compose["services"]["broker-provision"]["command"] == ["python", "manage.py", "broker_provision"]
    assert check_command(["python", "manage.py", "broker_provision"]) == []


def test_shell_lines_are_split_into_the_commands_they_run():
    assert split_shell('test -f a || exec python manage.py x --out "b c"') == [
        ["test", "-f", "a"],
        ["python", "manage.py", "x", "--out", "b c"],
    ]


def test_mosquitto_runs_the_config_broker_init_renders(compose):
    services = compose["services"]
    out = rendered_configs(compose).pop()
    assert services["mosquitto"]["command"] == ["mosquitto", "-c", out]
    init = services["broker-init"]["command"]
    data_dir = init[init.index("--data-dir") + 1]
    broker_volume = next(v for v in services["mosquitto"]["volumes"] if v.startswith("broker-data:"))
    assert broker_volume == f"broker-data:{data_dir}"
    assert f"broker-data:{data_dir}" in services["broker-init"]["volumes"]
    assert out.startswith(data_dir + "/")
    # The control plane dials the TLS listener by the service name the certificate names.
    tls = split_shell(services["tls-init"]["command"][2])[1]
    assert tls[tls.index("--name") + 1] == "mosquitto"
    assert services["web"]["environment"]["MQTT_URL"] == "mqtts://mosquitto:8883"


def test_one_off_jobs_finish_before_the_processes_that_need_them(compose):
    services = compose["services"]

    def condition(service: str, on: str) -> str | None:
        return services[service].get("depends_on", {}).get(on, {}).get("condition")

    for name in LONG_RUNNING:
        assert condition(name, "migrate") == "service_completed_successfully", name
        assert services[name]["restart"] == "unless-stopped", name
    for name in ("web", "worker", "ingest"):
        assert condition(name, "broker-provision") == "service_completed_successfully", name
    for name in ("web", "worker"):
        assert condition(name, "keys-init") == "service_completed_successfully", name
        assert condition(name, "redis") == "service_healthy", name
        # MinIO only when its profile is on: a dependency that may be absent.
        assert services[name]["depends_on"]["minio-init"]["required"] is False
    assert condition("migrate", "postgres") == "service_healthy"
    assert condition("broker-provision", "mosquitto") == "service_healthy"
    assert condition("mosquitto", "broker-init") == "service_completed_successfully"
    assert condition("broker-init", "tls-init") == "service_completed_successfully"
    for name in ONE_OFF:
        assert services[name]["restart"] == "no", name


def test_every_service_waited_on_as_healthy_has_a_healthcheck(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                assert "test" in services[dependency].get("healthcheck", {}), (name, dependency)
    assert "healthcheck" in services["web"]


def test_state_lives_in_named_volumes_where_the_settings_put_it(compose):
    env = image_env()
    declared = set(compose["volumes"])

    def mounts(service: str) -> dict[str, str]:
        return {
            volume.split(":")[1]: volume.split(":")[0]
            for volume in compose["services"][service].get("volumes", [])
        }

    assert mounts("postgres")["/var/lib/postgresql/data"] in declared
    for name in ("web", "worker"):
        assert mounts(name)[env["ARTIFACT_ROOT"]] == "artifacts"
        assert mounts(name)[str(Path(env["SIGNING_KEY_FILE"]).parent)] == "keys"
        assert mounts(name)[str(Path(compose["services"][name]["environment"]["MQTT_CA_FILE"]).parent)]
    assert mounts("keys-init")[str(Path(env["SIGNING_KEY_FILE"]).parent)] == "keys"
    assert mounts("mosquitto")["/var/lib/mosquitto"] == "broker-data"
    assert mounts("minio")["/data"] == "s3-data"
    assert mounts("redis")["/data"] == "redis-data"
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared, volume


def setting_names() -> set[str]:
    return set(re.findall(r'"([A-Z][A-Z0-9_]+)"', SETTINGS_SOURCE))


def test_every_setting_it_passes_is_one_the_settings_read(compose):
    names = setting_names()
    secrets = set(re.findall(r'_secret\(\s*"([A-Z0-9_]+)"', SETTINGS_SOURCE))
    for name, service in project_services(compose).items():
        for key, value in service["environment"].items():
            if key.endswith("_FILE") and key != "MQTT_CA_FILE":
                assert key.removesuffix("_FILE") in secrets, (name, key)
                secret = value.removeprefix("/run/secrets/")
                assert value.startswith("/run/secrets/") and secret in service["secrets"], (name, key)
            else:
                assert key in names, (name, key)


def test_secrets_init_makes_every_file_compose_reads_and_keeps_them_private(compose, operator_dir):
    for name, spec in compose["secrets"].items():
        path = operator_dir / spec["file"]
        assert path.is_file() and path.read_text().strip(), name
        assert path.stat().st_mode & 0o777 == 0o644, name  # read by the containers' own user
    assert (operator_dir / "secrets").stat().st_mode & 0o777 == 0o700
    env_files = {entry["path"] for s in compose["services"].values() for entry in s.get("env_file", [])}
    assert env_files == {".env"}
    assert (operator_dir / ".env").stat().st_mode & 0o777 == 0o600
    # The database password in .env is the one PostgreSQL gets.
    password = (operator_dir / "secrets" / "postgres_password").read_text()
    assert f"modelfleet:{password}@postgres:5432/" in read_env_file(operator_dir / ".env")["DATABASE_URL"]


def test_secrets_init_keeps_what_is_there(operator_dir):
    before = {path.name: path.read_text() for path in (operator_dir / "secrets").iterdir()}
    env_before = (operator_dir / ".env").read_text()
    subprocess.run(
        [str(ROOT / "docker" / "secrets-init.sh"), str(operator_dir)], check=True, capture_output=True
    )
    assert {path.name: path.read_text() for path in (operator_dir / "secrets").iterdir()} == before
    assert (operator_dir / ".env").read_text() == env_before


def test_env_example_names_only_compose_variables_and_settings():
    compose_text = (ROOT / "docker" / "compose.yaml").read_text()
    compose_variables = set(re.findall(r"\$\$?\{?([A-Z][A-Z0-9_]*)", compose_text))
    names = setting_names()
    example = (ROOT / "docker" / "env.example").read_text()
    listed = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE)
    assert len(listed) >= 10
    for name in listed:
        assert name in compose_variables or name in names, name


def control_plane_environment(compose: dict, operator_dir: Path, service: str, **overrides) -> dict[str, str]:
    """The environment `service` starts with: the image's ENV, .env, the service's own
    `environment`; secrets and the broker's CA at their paths on this machine."""
    from fleet.core.tls import local_ca_create

    ca = local_ca_create(operator_dir / "tls")
    paths = secret_path_map(compose, operator_dir) | {"/etc/modelfleet/tls/ca.pem": str(ca.ca_file)}
    env = {
        **image_env(),
        **read_env_file(operator_dir / ".env"),
        **compose["services"][service]["environment"],
    }
    env = {key: paths.get(value, value) for key, value in env.items()}
    env["VAR_DIR"] = str(operator_dir / "var")  # /app/var is the repository's var/ in the image
    return {"PATH": os.environ["PATH"], "HOME": str(operator_dir), **env, **overrides}


def deploy_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`manage.py check --deploy`, warnings counted as failures, in a process of its own."""
    command = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_control_plane_passes_the_deploy_checks_with_the_compose_settings(compose, operator_dir):
    """Production settings as compose gives them: Django's `check --deploy` finds nothing."""
    env = control_plane_environment(compose, operator_dir, "web")
    result = deploy_check(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert env["DEBUG"] == "0"


def test_the_s3_profile_wires_django_storages_to_the_minio_service(compose, operator_dir):
    example = (ROOT / "docker" / "env.example").read_text()
    s3_lines = dict(
        line.removeprefix("# ").split("=", 1)
        for line in example.splitlines()
        if line.startswith("# ARTIFACT_")
    )
    env = control_plane_environment(compose, operator_dir, "worker", **s3_lines)
    code = (
        "import django, json; django.setup(); from django.conf import settings; "
        "print(json.dumps(settings.STORAGES['artifacts']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "fleet.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    storage = json.loads(result.stdout)
    assert storage["BACKEND"] == "storages.backends.s3.S3Storage"
    options = storage["OPTIONS"]
    assert options["endpoint_url"] == "http://minio:9000" and "minio" in compose["services"]
    assert options["bucket_name"] == read_env_file(operator_dir / ".env")["ARTIFACT_S3_BUCKET"]
    assert options["access_key"] == (operator_dir / "secrets" / "s3_access_key").read_text()
    assert options["secret_key"] == (operator_dir / "secrets" / "s3_secret_key").read_text()
    # The bucket minio-init makes is the one the settings name.
    assert "ARTIFACT_S3_BUCKET" in compose["services"]["minio-init"]["entrypoint"][2]


def test_the_deploy_check_does_fail_on_a_setting_it_warns_about(compose, operator_dir):
    """Positive control: the same run with devices told plain HTTP fails the check."""
    env = control_plane_environment(compose, operator_dir, "web", PUBLIC_BASE_URL="http://fleet.example.com")
    result = deploy_check(env)
    assert result.returncode != 0
    assert "PUBLIC_BASE_URL" in result.stdout + result.stderr
