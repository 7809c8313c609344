"""docker/Dockerfile (control plane) and docker/Dockerfile.agent: what they copy exists, what
they run is the project's, and the images run unprivileged on the Python the suite tests."""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path

import pytest

from tests.deploy.project_commands import (
    ROOT,
    check_command,
    check_python,
    parse_dockerfile,
    shell_words,
    split_shell,
)
from tests.deploy.test_compose import project_services

DOCKERFILES = {
    "control-plane": ROOT / "docker" / "Dockerfile",
    "agent": ROOT / "docker" / "Dockerfile.agent",
}


def instructions(path: Path, name: str) -> list[str]:
    return [item["value"] for item in parse_dockerfile(path).structure if item["instruction"] == name]


def copy_sources(path: Path) -> list[str]:
    sources = []
    for value in instructions(path, "COPY"):
        words = json.loads(value) if value.startswith("[") else value.split()
        assert not any(word.startswith("--from") for word in words), value
        sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    return any(
        fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/")
        for pattern in dockerignore_patterns()
    )


def run_commands(path: Path) -> list[list[str]]:
    """The simple commands of every RUN, leading VAR=value assignments dropped."""
    commands = []
    for value in instructions(path, "RUN"):
        for command in split_shell(value):
            while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
                command = command[1:]
            commands.append(command)
    return commands


def requirement_files(start: str) -> set[str]:
    """A requirements file and every file it includes with -r, as repository paths."""
    found, pending = set(), [start]
    while pending:
        current = pending.pop()
        found.add(current)
        for line in (ROOT / current).read_text().splitlines():
            if line.startswith("-r "):
                pending.append(str(Path(current).parent / line.split()[1]))
    return found


def copied(path: Path, file: str) -> bool:
    return any(file == source or file.startswith(source.rstrip("/") + "/") for source in copy_sources(path))


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_copy_source_exists_and_is_in_the_build_context(image):
    path = DOCKERFILES[image]
    sources = copy_sources(path)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is excluded by .dockerignore"


def test_the_build_context_leaves_out_secrets_and_local_state():
    for path in ("docker/.env", "docker/secrets", "docker/secrets/secret_key", ".venv", "var", ".git"):
        assert ignored(path), path
    assert not ignored("docker/mosquitto/render.py")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_requirements_file_it_installs_is_copied_with_its_includes(image):
    path = DOCKERFILES[image]
    installs = [c for c in run_commands(path) if c[:2] == ["pip", "install"]]
    assert installs
    for command in installs:
        for index, word in enumerate(command):
            if word == "-r":
                for requirement in requirement_files(command[index + 1].removeprefix("./")):
                    assert copied(path, requirement), requirement
            if word == ".":
                assert copied(path, "pyproject.toml")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_project_command_it_runs_exists(image):
    path = DOCKERFILES[image]
    for command in run_commands(path):
        if command[0] in ("python", "python3") and command[1:2] != ["-m"]:
            assert check_python(command[1:]) == [], command
    for value in instructions(path, "CMD"):
        assert check_command(shell_words(json.loads(value))) == [], value


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_runs_unprivileged_on_the_python_the_suite_tests(image):
    path = DOCKERFILES[image]
    parser = parse_dockerfile(path)
    assert re.fullmatch(r"python:(\d+\.\d+)-slim-(bookworm|trixie)", parser.baseimage), parser.baseimage
    assert parser.baseimage.split(":")[1].startswith(f"{sys.version_info.major}.{sys.version_info.minor}-")
    users = instructions(path, "USER")
    assert users and users[-1] not in ("root", "0"), users


def test_the_control_plane_image_collects_static_files_at_build():
    path = DOCKERFILES["control-plane"]
    assert ["python", "manage.py", "collectstatic", "--noinput"] in run_commands(path)
    env = parse_dockerfile(path).envs
    assert env["VAR_DIR"] == "/app/var"  # STATIC_ROOT is VAR_DIR/static, inside the image


def test_the_control_plane_image_holds_every_file_compose_runs(compose):
    path = DOCKERFILES["control-plane"]
    for name, service in project_services(compose).items():
        lines = [shell_words(service["command"]), service.get("healthcheck", {}).get("test", [])[1:]]
        for argv in lines:
            for word in argv:
                if word.endswith((".py", ".conf")) and (ROOT / word).is_file():
                    assert copied(path, word), (name, word)
    assert copied(path, "docker/mosquitto/mosquitto.conf")  # the template render.py fills in


def test_the_agent_image_has_no_django():
    path = DOCKERFILES["agent"]
    sources = copy_sources(path)
    assert "fleet" not in sources and "manage.py" not in sources
    for command in run_commands(path):
        for index, word in enumerate(command):
            if word == "-r":
                for requirement in requirement_files(command[index + 1]):
                    lines = (ROOT / requirement).read_text().lower().splitlines()
                    assert not [line for line in lines if line.startswith("django")], requirement
    assert json.loads(instructions(path, "CMD")[-1])[:2] == ["fleet-agent", "run"]
