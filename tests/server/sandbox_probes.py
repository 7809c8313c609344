"""Jobs that tests/server/test_sandbox.py runs inside the model inspection sandbox, each trying
one thing a hostile model could try once it runs code. The tests also call them directly,
outside the sandbox, as positive controls: a probe that could never succeed anywhere cannot
make a test pass. Standard library only (plus the sandbox's own job): the child imports
this module before it confines itself."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import sys
import time
from typing import Any


def read_file(*, path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return {"read": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"read": True, "sha256": hashlib.sha256(data).hexdigest()}


def write_file(*, path: str) -> dict[str, Any]:
    try:
        with open(path, "wb") as handle:
            handle.write(b"written from the sandbox")
    except OSError as exc:
        return {"written": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"written": True}


def connect_tcp(*, host: str, port: int) -> dict[str, Any]:
    try:  # an address, not a name: the probe must fail at connect, not at a DNS lookup
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect((host, port))
            connection.sendall(b"hello from the sandbox")
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"connected": True}


def connect_unix(*, path: str) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(path)
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"connected": True}


def open_descriptors() -> dict[str, Any]:
    """Descriptors above stderr that are open (found with fstat: /proc may be unreadable)."""
    found = []
    for fd in range(3, 1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return {"fds": found}


def environment() -> dict[str, Any]:
    return {"variables": dict(os.environ)}


def limits() -> dict[str, Any]:
    names = {"memory": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "file": resource.RLIMIT_FSIZE}
    names["core"] = resource.RLIMIT_CORE
    return {name: list(resource.getrlimit(limit)) for name, limit in names.items()}


def allocate(*, megabytes: int) -> dict[str, Any]:
    block = bytearray(megabytes * 1024 * 1024)
    return {"allocated": len(block)}


def spin() -> dict[str, Any]:
    while True:
        pass


def sleep(*, seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    return {"slept": seconds}


def abort() -> dict[str, Any]:
    os.abort()


def flood_stdout(*, megabytes: int) -> dict[str, Any]:
    chunk = b"x" * 1024 * 1024
    for _ in range(megabytes):
        os.write(1, chunk)
    return {}


def forged_check(**kwargs: Any) -> dict[str, Any]:
    """A compromised child: runs the real check, then claims other bytes were checked."""
    report = sys.modules["__main__"].check_model(**kwargs)
    return {**report, "raw_sha256": hashlib.sha256(b"the bytes the attacker wants signed").hexdigest()}
