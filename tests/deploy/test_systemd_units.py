"""docker/systemd/: a unit for every process, each hardened, each running a command that
exists, and systemd itself (systemd-analyze verify) finds nothing wrong with them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.project_commands import ROOT, check_command, signature
from tests.deploy.test_compose import project_services, setting_names

UNITS_DIR = ROOT / "docker" / "systemd"
CONTROL_PLANE_UNITS = sorted(UNITS_DIR.glob("fleet-*.service"))
SERVER_UNITS = [path for path in CONTROL_PLANE_UNITS if path.name != "fleet-agent.service"]
MOSQUITTO_DROP_IN = UNITS_DIR / "mosquitto.service.d" / "modelfleet.conf"
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost")
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as (key, value) lists in order (keys repeat: ExecStart=,
    LoadCredential=); comments dropped, backslash continuations joined (systemd.syntax(7))."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = None, ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def exec_lines(path: Path) -> list[list[str]]:
    """Every command the unit runs, with systemd's prefixes (+ - @ ! :) taken off."""
    commands = []
    for key in EXEC_KEYS:
        for value in values(parse_unit(path), "Service", key):
            if value:  # an empty ExecStart= resets the list (drop-ins)
                words = value.lstrip("+-@!:").split()
                commands.append([word.replace("%i", "1") for word in words])
    return commands


def rendered_by_drop_in() -> set[str]:
    render = next(argv for argv in exec_lines(MOSQUITTO_DROP_IN) if argv[1].endswith("/render.py"))
    return {render[render.index("--out") + 1]}


@pytest.mark.parametrize("path", [*CONTROL_PLANE_UNITS, MOSQUITTO_DROP_IN], ids=lambda path: path.name)
def test_every_command_a_unit_runs_exists(path):
    commands = exec_lines(path)
    assert commands
    for argv in commands:
        assert check_command(argv, rendered=rendered_by_drop_in()) == [], argv


@pytest.mark.parametrize("path", SERVER_UNITS, ids=lambda path: path.name)
def test_every_control_plane_unit_is_hardened_and_reads_the_settings_file(path):
    unit = parse_unit(path)
    for key, expected in HARDENING.items():
        assert values(unit, "Service", key) == [expected], key
    assert values(unit, "Service", "RestrictNamespaces"), "RestrictNamespaces"
    assert values(unit, "Service", "User") == ["modelfleet"]
    assert values(unit, "Service", "EnvironmentFile") == ["/etc/modelfleet/fleet.env"]
    assert values(unit, "Service", "WorkingDirectory") == ["/opt/modelfleet/app"]
    if values(unit, "Service", "Type") != ["oneshot"] or path.name == "fleet-broker-provision.service":
        assert values(unit, "Service", "Restart") == ["on-failure"]


def test_only_the_worker_may_make_the_namespaces_of_the_model_sandbox():
    for path in SERVER_UNITS:
        expected = "user net" if path.name == "fleet-worker.service" else "yes"
        assert values(parse_unit(path), "Service", "RestrictNamespaces") == [expected], path.name


@pytest.mark.parametrize("path", [*SERVER_UNITS, MOSQUITTO_DROP_IN], ids=lambda path: path.name)
def test_secrets_are_credentials_and_every_variable_is_a_setting(path):
    unit = parse_unit(path)
    credentials = {value.split(":", 1)[0] for value in values(unit, "Service", "LoadCredential")}
    names = setting_names()
    for assignment in values(unit, "Service", "Environment"):
        key, _, value = assignment.partition("=")
        assert key in names or key.removesuffix("_FILE") in names, key
        if value.startswith("%d/"):
            assert value.removeprefix("%d/") in credentials, key
    for credential in values(unit, "Service", "LoadCredential"):
        assert credential.split(":", 1)[1].startswith("/etc/modelfleet/"), credential


def test_the_settings_file_example_names_only_settings():
    names = setting_names()
    listed = re.findall(r"^([A-Z][A-Z0-9_]*)=", (UNITS_DIR / "fleet.env.example").read_text(), re.MULTILINE)
    assert len(listed) >= 10
    assert [name for name in listed if name not in names] == []
    assert not [name for name in listed if "PASSWORD" in name or name == "SECRET_KEY"]


def test_every_compose_process_has_a_unit_with_the_same_command(compose):
    """Compose and bare Debian run the same commands; tls-init and keys-init are the
    one-time steps docs/operations.md has the operator do by hand on a server."""
    units = {signature(argv) for path in [*SERVER_UNITS, MOSQUITTO_DROP_IN] for argv in exec_lines(path)}
    for name, service in project_services(compose).items():
        if name in ("tls-init", "keys-init"):
            continue
        assert signature(list(service["command"])) in units, name


def test_the_target_starts_every_control_plane_unit():
    target = parse_unit(UNITS_DIR / "modelfleet.target")
    wanted = {unit for value in values(target, "Unit", "Wants") for unit in value.split()}
    expected = {path.name for path in SERVER_UNITS if "@" not in path.name} | {"fleet-ingest@1.service"}
    assert wanted == expected


def _verify(directory: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", *units],
        cwd=directory,
        env={"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{directory}:"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _units_for_this_machine(directory: Path) -> None:
    """The units with the server's paths pointing at this checkout and its virtualenv, so
    that systemd can check every executable they name."""
    venv = ROOT / ".venv"
    for path in [*UNITS_DIR.glob("*.service"), *UNITS_DIR.glob("*.target"), MOSQUITTO_DROP_IN]:
        text = (
            path.read_text()
            .replace("/opt/modelfleet/venv", str(venv))
            .replace("/opt/modelfleet/app", str(ROOT))
        )
        text = text.replace(f"{venv}/bin/fleet-agent", f"{venv}/bin/python")  # not pip-installed here
        target = directory / path.relative_to(UNITS_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    shutil.copy("/lib/systemd/system/mosquitto.service", directory / "mosquitto.service")


def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze (package systemd) is needed"
    _units_for_this_machine(tmp_path)
    units = sorted(path.name.replace("@.", "@1.") for path in tmp_path.iterdir() if path.is_file())
    result = _verify(tmp_path, *units)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path):
    """Positive control: a misspelt key and a command that is not there are reported."""
    _units_for_this_machine(tmp_path)
    web = tmp_path / "fleet-web.service"
    web.write_text(
        web.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=").replace("/gunicorn ", "/gunicorm ")
    )
    result = _verify(tmp_path, "fleet-web.service")
    output = result.stdout + result.stderr
    assert "NoNewPrivilege" in output and "gunicorm" in output, output


def test_procfile_and_compose_run_the_same_commands(compose):
    """The Procfile's processes are the compose services' commands."""
    procfile = ROOT / "Procfile"
    from tests.deploy.project_commands import split_shell

    compose_signatures = {signature(list(s["command"])) for s in project_services(compose).values()}
    for line in procfile.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            for command in split_shell(line.partition(":")[2]):
                if command[0] in ("python", "gunicorn", "celery", "mosquitto"):
                    assert signature(command) in compose_signatures, line
