"""What every demo step shares: the console, the run's state (`Demo`) and small helpers to
run manage.py, start and stop processes, poll for a condition and call the API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

console = Console()
VAR = Path(os.environ.get("DEMO_VAR_DIR", ROOT / "var" / "demo"))
# The demo's database, dropped and created anew on every run, dropped again at the end.
DEMO_DATABASE = os.environ.get("DEMO_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/modelfleet_demo")


@dataclass
class Demo:
    """The run's state, filled in by the steps in order."""

    stack: ExitStack
    progress: Progress
    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    broker: Any = None
    admin_password: str = ""
    token: str = ""
    viewer_token: str = ""
    enrollment_token: str = ""
    root_key_hex: str = ""
    artifacts: list[dict] = field(default_factory=list)
    agents: list[dict] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    simulator: dict | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def api(self) -> str:
        return f"{self.base}/api/v1"

    def task(self, description: str) -> TaskDone:
        """A spinner line for one piece of a step, ticked when the block ends."""
        return TaskDone(self.progress, description)


class TaskDone:
    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description

    def __enter__(self) -> TaskDone:
        self.id = self.progress.add_task(self.description, total=None)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.progress.update(self.id, total=1, completed=1)
        else:
            self.progress.stop_task(self.id)


def new_progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode:
        console.print(f"[red]manage.py {' '.join(args)} failed:[/red]\n{result.stderr}")
        raise SystemExit(1)
    return result.stdout.strip()


# Every process the demo started, with the signal that stops it cleanly.
STARTED: list[tuple[subprocess.Popen, int]] = []


def signal_all() -> None:
    """Ask every process the demo started to stop, all at once; each one's own callback then
    waits for it (so twelve agents stop together, not one after the other)."""
    for process, stop_signal in STARTED:
        if process.poll() is None:
            process.send_signal(stop_signal)


def start(stack: ExitStack, name: str, env: dict[str, str], *args: str, stop_signal=signal.SIGTERM):
    """Start a process with its output in var/demo/logs/NAME.log; stopped when the demo ends."""
    log = (VAR / "logs" / f"{name}.log").open("wb")
    stack.callback(log.close)
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    STARTED.append((process, stop_signal))

    def stop() -> None:
        if process.poll() is None:
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    stack.callback(stop)
    return process


def wait_for(what: str, check, process: subprocess.Popen | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{what} exited; see {VAR / 'logs'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {timeout:.0f}s; see {VAR / 'logs'}")
        time.sleep(0.2)


def api_call(session: requests.Session, method: str, url: str, expect: int, **kwargs) -> dict:
    response = session.request(method, url, timeout=300, **kwargs)
    if response.status_code != expect:
        raise SystemExit(f"{method} {url} answered {response.status_code}: {response.text}")
    return response.json()


def agent_health(port: int) -> dict | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).json()
    except requests.RequestException:
        return None
