"""The agent's trust store: the pinned root keys, the root chain and keyring it followed
from them, kept crash-safe in the state directory (docs/protocol.md, addition 6).

Updates arrive as trust bundles on the retained trust topic (or over HTTP). Each update is
verified in full against what is trusted now and saved atomically before it is used, so a
crash leaves either the old or the new state, and a restart never forgets a version (an
older keyring replayed after a restart is still refused).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.protocol import trust
from agent.protocol.dsse import EnvelopeError
from agent.store import atomic_write

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
MAX_BUNDLE_BYTES = 256 * 1024  # a root chain and a keyring are a few kB


def bundle_applied(
    state: trust.TrustState, bundle: bytes | Mapping[str, Any], *, now: datetime
) -> trust.TrustState:
    """``state`` with a trust bundle (bytes as received, or parsed) applied; ``state``
    itself when the bundle changes nothing. Raises TrustError (or EnvelopeError) with the
    reason code when the bundle is refused. Pure: the caller keeps (and saves) the result."""
    if isinstance(bundle, (bytes, bytearray)):
        if len(bundle) > MAX_BUNDLE_BYTES:
            raise trust.MalformedTrust(f"trust bundle of {len(bundle)} bytes is over {MAX_BUNDLE_BYTES}")
        try:
            bundle = json.loads(bundle)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise trust.MalformedTrust("trust bundle is not JSON (or nested too deep)") from exc
    try:
        return state.with_bundle(bundle, now=now)
    except EnvelopeError:
        raise
    except Exception as exc:  # whatever a bundle does, it is only refused
        raise trust.MalformedTrust(f"trust bundle refused: {type(exc).__name__}: {exc}") from exc


class TrustStore:
    def __init__(self, *, root_keys: tuple[str, ...], root_threshold: int, state_dir: Path) -> None:
        self.path = state_dir / TRUST_FILE
        self._lock = threading.Lock()
        self._state = trust.TrustState.pinned(root_keys, root_threshold)
        if self.path.exists():
            try:
                self._state = self._state.restored(self.path.read_bytes())
            except Exception as exc:  # any doubt about the file means: start over
                # Written atomically by us: this is tampering or a changed pin, not a torn
                # write. Start from the pinned keys; the retained bundle brings the rest.
                log.error("ignoring %s: it does not verify against the pinned root keys: %s", self.path, exc)

    @property
    def state(self) -> trust.TrustState:
        return self._state

    def versions(self) -> dict[str, int | None]:
        state = self._state
        return {"root_version": state.root_version, "keyring_version": state.keyring_version}

    def update(self, bundle: bytes | Mapping[str, Any], *, now: datetime | None = None) -> bool:
        """Apply a trust bundle; True when the trusted state changed. Raises TrustError (or
        EnvelopeError) with the reason code when the bundle is refused."""
        with self._lock:
            new = bundle_applied(self._state, bundle, now=now or datetime.now(UTC))
            if new is self._state:
                return False
            try:
                atomic_write(self.path, new.to_json())
            except OSError as exc:
                # Not trusted until saved: a restart must never forget a version.
                raise trust.TrustNotSaved(f"cannot save {self.path}: {exc}") from exc
            self._state = new
            return True

    def verify(self, envelope: bytes | str | Mapping[str, Any], *, payload_type: str) -> bytes:
        return self._state.verify(envelope, payload_type=payload_type, now=datetime.now(UTC))
