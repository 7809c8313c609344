"""Does a command line that a deployment file names exist in this project?

One checker for docker/compose.yaml, the Dockerfiles and the systemd units, so that every
file is held to the same idea of "exists": a `manage.py` command is one Django's
`get_commands()` lists, a gunicorn WSGI path imports to a callable, `celery -A` finds its
app the way celery does and names one of celery's own subcommands, a project script or
file is in the repository. Paths inside an image or on a server (/app, /opt/modelfleet/app)
map to the repository root.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import shlex
import tomllib
from pathlib import Path, PurePosixPath

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent.parent
# Where the repository sits in the image (docker/Dockerfile's WORKDIR) and on a server
# (the systemd units' WorkingDirectory).
APP_DIRS = ("/app", "/opt/modelfleet/app")
# Where the programs of the project's virtualenv live there.
VENV_BIN_DIRS = ("/opt/venv/bin", "/opt/modelfleet/venv/bin")
SHELL_SEPARATORS = {";", "&&", "||", "|", "&"}
# Harmless shell words that may surround a project command in `sh -c`.
SHELL_BUILTINS = {"test", "[", "exec", "true", ":"}


def repo_path(path: str) -> Path:
    """A path as the image or server sees it, mapped into the repository."""
    for app_dir in APP_DIRS:
        if path == app_dir or path.startswith(app_dir + "/"):
            return ROOT / path[len(app_dir) :].lstrip("/")
    return ROOT / path


def program_name(argv0: str) -> str:
    posix = PurePosixPath(argv0)
    if str(posix.parent) in (*VENV_BIN_DIRS, "/usr/sbin", "/usr/bin", "/usr/local/bin", "."):
        return posix.name
    return argv0


def split_shell(script: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ; && || | &), ``exec`` dropped."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    commands = [command for command in commands if command]
    return [command[1:] if command[0] == "exec" else command for command in commands]


def django_commands() -> set[str]:
    from django.core.management import get_commands

    return set(get_commands())


def _positionals(args: list[str], options_with_value: set[str]) -> list[str]:
    positionals, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options_with_value:
            skip = True
        elif not arg.startswith("-"):
            positionals.append(arg)
    return positionals


def check_python(args: list[str]) -> list[str]:
    if not args:
        return ["python without arguments"]
    if args[0] == "manage.py":
        if len(args) < 2:
            return ["manage.py without a command"]
        if args[1] not in django_commands():
            return [f"manage.py {args[1]}: no such management command (get_commands())"]
        return []
    if args[0] == "-m":
        if len(args) < 2 or importlib.util.find_spec(args[1]) is None:
            return [f"python -m {args[1:2]}: no such module"]
        return []
    if args[0].endswith(".py"):
        return [] if repo_path(args[0]).is_file() else [f"{args[0]}: no such project script"]
    return [f"python {args[0]}: not a project command"]


def check_gunicorn(args: list[str]) -> list[str]:
    options = {"-b", "--bind", "-w", "--workers", "-t", "--timeout", "-k", "--worker-class"}
    options |= {"--access-logfile", "--error-logfile", "-c", "--config", "--threads"}
    positionals = _positionals(args, options)
    if len(positionals) != 1:
        return [f"gunicorn: expected one WSGI path, got {positionals}"]
    module_name, _, attribute = positionals[0].partition(":")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, attribute or "application", None)):
        return [f"gunicorn {positionals[0]}: no WSGI callable"]
    return []


def check_celery(args: list[str]) -> list[str]:
    from celery.app.utils import find_app
    from celery.bin.celery import celery as celery_cli

    if "-A" not in args and "--app" not in args:
        return ["celery without -A"]
    index = args.index("-A") if "-A" in args else args.index("--app")
    problems = []
    try:
        find_app(args[index + 1])
    except Exception as exc:  # celery's own lookup: any failure means celery could not start
        problems.append(f"celery -A {args[index + 1]}: {exc}")
    rest = args[index + 2 :]
    if not rest or rest[0] not in celery_cli.commands:
        problems.append(f"celery: {rest[:1]} is not a celery command")
    return problems


def check_fleet_agent(args: list[str]) -> list[str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    target = scripts.get("fleet-agent")
    if target is None:
        return ["fleet-agent: not a [project.scripts] entry of pyproject.toml"]
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, function, None)):
        return [f"fleet-agent: {target} is not callable"]
    parser: argparse.ArgumentParser = module.build_parser()
    try:
        parser.parse_args(args)
    except SystemExit:
        return [f"fleet-agent {' '.join(args)}: the agent's command line refuses it"]
    return []


def check_mosquitto(args: list[str], rendered: set[str]) -> list[str]:
    if args[:1] != ["-c"] or len(args) != 2:
        return [f"mosquitto {args}: expected -c CONFIG"]
    if args[1] not in rendered and not repo_path(args[1]).is_file():
        return [f"mosquitto -c {args[1]}: nothing renders or ships that config"]
    return []


def check_command(argv: list[str], *, rendered: set[str] = frozenset()) -> list[str]:
    """Problems with one command line (empty when it names something that exists).
    ``rendered`` are config paths a deployment step writes (mosquitto's -c target)."""
    if not argv:
        return ["empty command"]
    program, args = program_name(argv[0]), argv[1:]
    if program in ("sh", "/bin/sh", "bash", "/bin/bash") and args[:1] == ["-c"]:
        problems = []
        for command in split_shell(args[1]):
            if program_name(command[0]) not in SHELL_BUILTINS:
                problems += check_command(command, rendered=rendered)
        return problems
    if program in ("python", "python3"):
        return check_python(args)
    checkers = {
        "gunicorn": check_gunicorn,
        "celery": check_celery,
        "fleet-agent": check_fleet_agent,
        "mosquitto": lambda args: check_mosquitto(args, rendered),
    }
    if program not in checkers:
        return [f"{argv[0]}: not a command of this project"]
    return checkers[program](args)


def signature(argv: list[str]) -> tuple[str, ...]:
    """What makes two command lines the same process, options aside: the program and its
    subcommand (``manage.py mqtt_ingest``, ``celery fleet worker``, ``gunicorn fleet.wsgi``)."""
    program, args = program_name(argv[0]), argv[1:]
    if program in ("python", "python3") and args[:1] == ["manage.py"]:
        return ("manage.py", args[1])
    if program in ("python", "python3"):
        return ("python", repo_path(args[0]).relative_to(ROOT).as_posix())
    if program == "celery":
        index = args.index("-A")
        return ("celery", args[index + 1], args[index + 2])
    if program == "gunicorn":
        return ("gunicorn", _positionals(args, {"-b", "--bind", "-w", "--workers", "--timeout"})[0])
    return (program,)


def shell_words(command: str | list[str]) -> list[str]:
    """A compose/Dockerfile command, list (exec form) or string (shell form)."""
    return list(command) if isinstance(command, list) else shlex.split(command)


def parse_dockerfile(path: Path) -> DockerfileParser:
    """dockerfile-parse on one file (given a path, it would look for path/Dockerfile)."""
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
