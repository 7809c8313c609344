"""The agent's on-disk store (ARCHITECTURE.md, "The agent on a device").

Layout under ``state_dir``::

    state.json                                   applied generation, active/previous/shadow per model
    models/<model>/<version>-<variant>/model.tflite
    models/<model>/<version>-<variant>/manifest.json   the verified manifest payload
    models/<model>/<version>-<variant>/golden.npz      when the version has one
    downloads/<blob sha256>.part                 partial downloads, resumed with Range

Every file that matters is written as temp file + fsync + rename + directory fsync, so a
power cut leaves either the old or the new file, never half of one. The state file is
written last: until it names a model directory, that directory is just a candidate.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)


def atomic_move(source: Path, target: Path) -> None:
    """Move a finished, fsynced file into place and make the rename durable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(source, target)
    fsync_dir(target.parent)


@dataclass(frozen=True)
class Installed:
    version: str
    variant: str

    @property
    def key(self) -> str:
        return f"{self.version}-{self.variant}"


@dataclass
class ModelState:
    active: Installed | None = None
    previous: Installed | None = None
    # The candidate running in shadow (docs/protocol.md addition 5), so that a restart
    # resumes it: the retained desired state that named it is already applied.
    shadow: Installed | None = None
    shadow_sample_rate: float | None = None

    def kept(self) -> set[Installed]:
        """The versions whose files must stay on disk: active, previous and shadow."""
        return {item for item in (self.active, self.previous, self.shadow) if item is not None}


@dataclass
class AgentState:
    applied_generation: int = 0
    models: dict[str, ModelState] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AgentState:
        raw = json.loads(data)

        def installed(value: Any) -> Installed | None:
            return Installed(value["version"], value["variant"]) if value else None

        return cls(
            applied_generation=int(raw.get("applied_generation", 0)),
            models={
                name: ModelState(
                    installed(entry.get("active")),
                    installed(entry.get("previous")),
                    installed(entry.get("shadow")),
                    entry.get("shadow_sample_rate"),
                )
                for name, entry in raw.get("models", {}).items()
            },
        )


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        for directory in (self.root, self.models_dir, self.downloads_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # --- state

    def load_state(self) -> AgentState:
        path = self.root / STATE_FILE
        if not path.exists():
            return AgentState()
        return AgentState.from_json(path.read_bytes())

    def save_state(self, state: AgentState) -> None:
        atomic_write(self.root / STATE_FILE, state.to_json())

    # --- model directories

    def model_dir(self, model: str, installed: Installed) -> Path:
        return self.models_dir / model / installed.key

    def model_path(self, model: str, installed: Installed) -> Path:
        return self.model_dir(model, installed) / "model.tflite"

    def is_complete(self, model: str, installed: Installed) -> bool:
        directory = self.model_dir(model, installed)
        return (directory / "model.tflite").is_file() and (directory / "manifest.json").is_file()

    def manifest(self, model: str, installed: Installed) -> bytes:
        """The manifest payload stored with an installed version (verified when installed)."""
        return (self.model_dir(model, installed) / "manifest.json").read_bytes()

    def install(
        self, model: str, installed: Installed, *, tflite_temp: Path, manifest: bytes, golden: bytes | None
    ) -> Path:
        """Put a verified model in place. The manifest is written last: it marks the
        directory complete."""
        directory = self.model_dir(model, installed)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "manifest.json").unlink(missing_ok=True)
        atomic_move(tflite_temp, directory / "model.tflite")
        if golden is not None:
            atomic_write(directory / "golden.npz", golden)
        atomic_write(directory / "manifest.json", manifest)
        return directory / "model.tflite"

    def prune(self, model: str, keep: set[Installed]) -> None:
        """Remove versions of ``model`` other than ``keep`` (``ModelState.kept()``: the
        active, previous and shadow ones)."""
        keys = {item.key for item in keep}
        model_root = self.models_dir / model
        if not model_root.is_dir():
            return
        for directory in model_root.iterdir():
            if directory.is_dir() and directory.name not in keys:
                shutil.rmtree(directory, ignore_errors=True)

    # --- downloads

    def partial_path(self, blob_sha256: str) -> Path:
        return self.downloads_dir / f"{blob_sha256}.part"

    def scratch_path(self, name: str) -> Path:
        return self.downloads_dir / name
