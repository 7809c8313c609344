"""Fixtures for the deployment files (docker/, docker/systemd/). No container runtime runs
here: the files are parsed with the parsers their tools use or follow (PyYAML and the
Compose Specification's JSON Schema, dockerfile-parse, systemd-analyze) and every command
they name is checked against the project (tests/deploy/project_commands.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.project_commands import ROOT

COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (compose-spec "Interpolation"): ``$$`` is a literal
    ``$``; ``${VAR:-default}`` and ``${VAR-default}`` fall back when unset (or empty with
    the colon); ``${VAR:?message}`` requires it; ``${VAR:+other}`` replaces a set one."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise KeyError(f"{name}: {arg or 'required'}")
            return current
        if op in (":+", "+"):
            return "" if unset else arg
        return current or ""

    return _VARIABLE.sub(replace, value)


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines, comments and blank lines skipped (compose's .env format, unquoted)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="session")
def operator_dir(tmp_path_factory) -> Path:
    """What an operator has beside compose.yaml after `docker/secrets-init.sh`: secrets/ and .env."""
    directory = tmp_path_factory.mktemp("operator")
    subprocess.run(
        [str(ROOT / "docker" / "secrets-init.sh"), str(directory)], check=True, capture_output=True
    )
    return directory


@pytest.fixture(scope="session")
def compose_env(operator_dir) -> dict[str, str]:
    return read_env_file(operator_dir / ".env")


@pytest.fixture(scope="session")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def compose(compose_raw, compose_env) -> dict:
    """compose.yaml as Docker Compose sees it: YAML anchors merged, variables interpolated
    from the operator's .env (and nothing else: this process's environment is not used)."""
    return interpolate(compose_raw, compose_env)
