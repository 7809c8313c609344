"""The model inspection sandbox (issue 9, section 3): untrusted ``.tflite`` bytes are parsed,
loaded in LiteRT, smoke-run and scored on the golden set only in a child process that cannot
hurt the control plane.

The child is a fresh interpreter (fork + exec: none of the worker's memory, database
connections or a signing key it loaded earlier is inherited) with an empty environment (no
``SIGNING_KEY_FILE``, ``DATABASE_URL`` or passwords) and no inherited file descriptors. Before
it reads a byte of the model it confines itself, in this order:

1. rlimits: address space (memory), CPU seconds, file size, no core dumps;
2. a network namespace of its own, which has no interface at all (``unshare(2)``);
3. it imports everything the job needs, then seccomp refuses ``socket(2)`` (also unix
   sockets, which namespaces do not cover), ``io_uring``, ``ptrace`` and leaving its process
   group, and Landlock limits it to *reading* the files it was given plus the CPU
   description LiteRT probes: no other file (the signing key included), no write, no TCP
   bind or connect, no signal to a process outside.

The parent gives the child a wall-clock deadline, reads at most ``REPORT_MAX_BYTES`` of its
JSON report and turns every way the child can end (report, failure, signal, CPU limit,
deadline) into a :class:`SandboxError` with a reason code and a sentence a person
understands. The report is data: callers check it (services._checked_report) and sign only
hashes they computed themselves.

This module imports nothing from Django: it is also the child's entry point
(``python -I -B sandbox.py``), so that the child never imports the control plane's settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import resource
import selectors
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
MODULE_NAME = "fleet.registry.sandbox"
SPEC_MAX_BYTES = 64 * 1024
REPORT_MAX_BYTES = 1024 * 1024
STDERR_TAIL_BYTES = 8 * 1024
# The child sees this environment and nothing else: no secret of the control plane, and
# one thread for every math library (Landlock confines only the thread that asks).
CHILD_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Imported before the child confines itself: after that it can no longer read module files.
PRELOAD = (
    "numpy",
    "numpy.lib.format",
    "zipfile",
    "encodings.cp437",
    "traceback",
    "agent.runtime",
    "agent.download",
)
# What LiteRT reads when it creates an interpreter (its CPU feature probe).
SYSTEM_READABLE = ("/proc/cpuinfo", "/sys/devices/system/cpu")


@dataclass(frozen=True)
class Limits:
    memory_bytes: int  # RLIMIT_AS of the child
    cpu_seconds: int  # RLIMIT_CPU of the child
    file_bytes: int  # RLIMIT_FSIZE of the child
    wall_seconds: float  # killed (with its process group) after this long
    require_isolation: bool = True  # refuse to run without network and filesystem isolation


class SandboxError(Exception):
    """The sandboxed job did not produce a result; ``code`` is the artifact's failure code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobFailure(Exception):
    """Raised by a job inside the child for an expected refusal (a bad model, a bad golden set)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- parent side


def run(*, job: str, args: dict[str, Any], readable: Sequence[Path], limits: Limits) -> dict[str, Any]:
    """Run ``job`` ("module:function") in a confined child and return its result.

    ``readable`` are the only files the child may read (besides the CPU description).
    Raises :class:`SandboxError` for every other ending.
    """
    spec = json.dumps(
        {"job": job, "args": args, "readable": [str(Path(p).resolve()) for p in readable], **asdict(limits)}
    ).encode()
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-I", "-B", str(Path(__file__).resolve())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=CHILD_ENV,
        cwd="/",
        close_fds=True,
        start_new_session=True,  # its own process group, killed as a whole at the deadline
    )
    try:
        stdout, stderr, timed_out = _collect(child, spec, deadline=started + limits.wall_seconds)
    finally:  # also when the Celery task is being stopped: never leave the child running
        _kill_group(child.pid)  # whatever it left behind
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        for pipe in (child.stdout, child.stderr):
            pipe.close()
    cpu_seconds = usage.ru_utime + usage.ru_stime
    if timed_out:
        raise SandboxError(
            "sandbox_timeout",
            f"Checking the model took longer than {limits.wall_seconds:g} s (SANDBOX_WALL_SECONDS) "
            "and was stopped.",
        )
    return _outcome(child.returncode, stdout, stderr, cpu_seconds=cpu_seconds, limits=limits)


def _collect(child: subprocess.Popen, spec: bytes, *, deadline: float) -> tuple[bytes, bytes, bool]:
    """Send the spec, read stdout (capped) and the tail of stderr until both close or time runs out.
    Never ``communicate()``: a hostile child could print gigabytes into the worker's memory."""
    assert child.stdin and child.stdout and child.stderr
    try:
        child.stdin.write(spec)
        child.stdin.close()
    except BrokenPipeError:  # it died at once; its exit status says why
        pass
    stdout, stderr = bytearray(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ, stdout)
        selector.register(child.stderr, selectors.EVENT_READ, stderr)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(stdout), bytes(stderr), True
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                buffer = key.data
                if buffer is stdout:
                    if len(stdout) <= REPORT_MAX_BYTES:
                        stdout += chunk
                else:
                    stderr += chunk
                    del stderr[:-STDERR_TAIL_BYTES]
    return bytes(stdout), bytes(stderr), False


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _last_line(stderr: bytes) -> str:
    """The child's last meaningful stderr line (LiteRT's abort message, Python's fatal error)."""
    lines = [
        line.strip()
        for line in stderr.decode("utf-8", "replace").splitlines()
        if line.strip() and not line.startswith("INFO:")
    ]
    return lines[-1][:300] if lines else ""


def _outcome(
    returncode: int, stdout: bytes, stderr: bytes, *, cpu_seconds: float, limits: Limits
) -> dict[str, Any]:
    detail = _last_line(stderr)
    said = f" (it said: {detail})" if detail else ""
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_seconds >= limits.cpu_seconds - 0.5):
            raise SandboxError(
                "sandbox_cpu_limit",
                f"Running the model used more than {limits.cpu_seconds} s of CPU time "
                "(SANDBOX_CPU_SECONDS) and was stopped: its graph is too heavy, or never ends.",
            )
        if signum == signal.SIGXFSZ:
            raise SandboxError(
                "sandbox_file_limit",
                f"Checking the model tried to write more than {limits.file_bytes} bytes to a file "
                "(SANDBOX_FILE_BYTES) and was stopped.",
            )
        if "bad_alloc" in stderr.decode("utf-8", "replace"):
            raise SandboxError("sandbox_memory_limit", _memory_message(limits) + said)
        raise SandboxError(
            "sandbox_crashed",
            f"LiteRT crashed while loading or running the model (signal {name}){said}. "
            "The model is malformed or hostile; the control plane was not affected.",
        )
    try:
        report = json.loads(stdout) if len(stdout) <= REPORT_MAX_BYTES else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        if returncode == 0:
            raise SandboxError(
                "sandbox_bad_report",
                f"The model check sent no usable report (nothing, or more than {REPORT_MAX_BYTES} bytes).",
            )
        if "MemoryError" in detail or "bad_alloc" in detail:
            raise SandboxError("sandbox_memory_limit", _memory_message(limits) + said)
        raise SandboxError(
            "sandbox_crashed",
            f"The model check ended without a report (exit status {returncode}){said}.",
        )
    if report.get("ok") is True and isinstance(report.get("result"), dict):
        return {**report["result"], "isolation": report.get("isolation")}
    code, message = report.get("code"), report.get("message")
    if not (isinstance(code, str) and isinstance(message, str)):
        raise SandboxError("sandbox_bad_report", "The model check sent a report that makes no sense.")
    if code == "sandbox_memory_limit":
        message = _memory_message(limits)
    raise SandboxError(code[:40], message[:1000])


def _memory_message(limits: Limits) -> str:
    return (
        f"Checking the model needed more than {_human_bytes(limits.memory_bytes)} of memory "
        "(SANDBOX_MEMORY_BYTES) and was stopped."
    )


def _human_bytes(value: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:g} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- the jobs (run inside the child)


def check_model(
    *,
    model_path: str,
    golden_path: str | None,
    max_tensor_bytes: int,
    golden_max_samples: int,
    golden_max_bytes: int,
    latency_runs: int = 0,
) -> dict[str, Any]:
    """Hash, inspect, load, smoke-run, time and score one model. Its bytes are untrusted."""
    from agent import download, runtime

    tflite = _tflite_module()
    digest, size = hashlib.sha256(), 0
    with open(model_path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    try:
        signature = tflite.inspect_file(model_path)
        tflite.check_tensor_sizes(model_path, max_bytes=max_tensor_bytes)
    except tflite.InvalidModel as exc:
        raise JobFailure(exc.code, f"Not a usable TFLite model: {exc.message}") from exc
    try:
        interpreter = runtime.load(model_path)
        runtime.smoke_run(interpreter)
    except runtime.RuntimeLoadError as exc:
        raise JobFailure("unloadable_model", f"LiteRT cannot run this model: {exc}") from exc
    latency_ms = _median_latency_ms(interpreter, latency_runs) if latency_runs else None
    accuracy, samples = None, None
    if golden_path:
        try:
            x, y = download.read_golden_set(
                golden_path, max_samples=golden_max_samples, max_bytes=golden_max_bytes
            )
        except runtime.GoldenSetError as exc:
            raise JobFailure("invalid_golden_set", f"The version's golden set is not usable: {exc}") from exc
        try:
            accuracy, samples = runtime.golden_accuracy(interpreter, x, y), len(x)
        except (runtime.GoldenSetError, ValueError) as exc:
            raise JobFailure(
                "golden_shape_mismatch", f"The golden set does not fit this model: {exc}"
            ) from exc
    return {
        "raw_sha256": digest.hexdigest(),
        "raw_size": size,
        "signature": signature,
        "golden_accuracy": accuracy,
        "golden_samples": samples,
        "latency_ms": latency_ms,
    }


def _median_latency_ms(interpreter: Any, runs: int) -> float:
    """Median wall time of ``runs`` single inferences (on the smoke run's zeros), after one
    warm-up: what one request costs on this CPU with one thread."""
    import numpy as np

    zeros = [np.zeros(d["shape"], dtype=d["dtype"]) for d in interpreter.get_input_details()]
    for detail, value in zip(interpreter.get_input_details(), zeros, strict=True):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _tflite_module() -> Any:
    """fleet/registry/tflite.py, loaded by path: importing the ``fleet`` package would import
    Celery and the control plane's settings into the child."""
    name = "fleet.registry.tflite"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tflite.py"))
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- child side: confinement


def _set_limits(spec: dict[str, Any]) -> None:
    for limit, value in (
        (resource.RLIMIT_AS, spec["memory_bytes"]),
        (resource.RLIMIT_FSIZE, spec["file_bytes"]),
        (resource.RLIMIT_CORE, 0),  # a crash must not write a core file of the model's memory
    ):
        resource.setrlimit(limit, (value, value))
    # SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_seconds"], spec["cpu_seconds"] + 1))


def _close_inherited_fds() -> None:
    """Close every descriptor but stdin/stdout/stderr (close_fds already did; this is the
    child's own guarantee that no inherited socket survives)."""
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _leave_network() -> str:
    """A network namespace of our own: no interface but a loopback that is down. Needs
    CAP_SYS_ADMIN, or an unprivileged user namespace around it."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if _libc.unshare(flags) == 0:
            return "namespace"
    return "none"


# Landlock (linux/landlock.h). Syscall numbers are the same on every architecture.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_READ_FILE, _FS_READ_DIR = 1 << 2, 1 << 3
_PR_SET_NO_NEW_PRIVS = 38


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(readable: Sequence[str]) -> int:
    """Allow reading ``readable`` and nothing else; return the Landlock ABI used (0: none)."""
    abi = _libc.syscall(_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    handled_fs = (1 << 13) - 1  # ABI 1: execute ... make_sym
    for version, bit in ((2, 13), (3, 14), (5, 15)):  # refer, truncate, ioctl_dev
        if abi >= version:
            handled_fs |= 1 << bit
    attr = _RulesetAttr(
        handled_access_fs=handled_fs,
        handled_access_net=0b11 if abi >= 4 else 0,  # tcp bind, tcp connect: no rule allows any
        scoped=0b11 if abi >= 6 else 0,  # abstract unix sockets, signals outside the sandbox
    )
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return 0
    try:
        for path in readable:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                access = _FS_READ_FILE | (_FS_READ_DIR if os.path.isdir(path) else 0)
                rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
                if _libc.syscall(
                    _LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0
                ):
                    return 0
            finally:
                os.close(fd)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            return 0
        if _libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0):
            return 0
    finally:
        os.close(ruleset)
    return abi


# seccomp: a classic BPF filter refusing a few system calls with EPERM.
_SECCOMP_SET_MODE_FILTER = 1
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALL_NR = {
    # socket, io_uring_setup, ptrace, process_vm_readv, process_vm_writev, setsid, setpgid
    "x86_64": {"socket": 41, "io_uring_setup": 425, "ptrace": 101, "process_vm_readv": 310,
               "process_vm_writev": 311, "setsid": 112, "setpgid": 109},
    "aarch64": {"socket": 198, "io_uring_setup": 425, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "setsid": 157, "setpgid": 154},
}  # fmt: skip
_SYSCALL_NR_SECCOMP = {"x86_64": 317, "aarch64": 277}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp() -> bool:
    machine = platform.machine()
    if machine not in _AUDIT_ARCH:
        return False
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill, refuse = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM
    denied = list(_SYSCALL_NR[machine].values())
    program = [
        (ld_abs, 0, 0, 4),  # arch
        (jeq, 1, 0, _AUDIT_ARCH[machine]),
        (ret, 0, 0, kill),  # another ABI (i386 via int 0x80) could dodge the numbers below
        (ld_abs, 0, 0, 0),  # syscall number
        (jge, len(denied) + 1, 0, 0x40000000),  # x32 syscalls: refused too
    ]
    program += [(jeq, len(denied) - i, 0, nr) for i, nr in enumerate(denied)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, refuse)]
    raw = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(raw)
    fprog = _SockFprog(len(program), ctypes.addressof(buffer))
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    installed = _libc.syscall(_SYSCALL_NR_SECCOMP[machine], _SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog))
    return installed == 0


def _resolve(job: str) -> Callable[..., dict[str, Any]]:
    module_name, _, function = job.partition(":")
    # This file runs as __main__ in the child; its own jobs must not import it again as a
    # package module (that would import the control plane).
    module = sys.modules["__main__"] if module_name == MODULE_NAME else importlib.import_module(module_name)
    return getattr(module, function)


def _report(report: dict[str, Any]) -> None:
    data = json.dumps(report).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def child_main() -> None:
    spec = json.loads(sys.stdin.buffer.read(SPEC_MAX_BYTES))
    _close_inherited_fds()
    _set_limits(spec)
    network = _leave_network()  # before any thread exists: unshare refuses threaded processes
    sys.path.insert(0, str(ROOT))
    for name in PRELOAD:
        importlib.import_module(name)
    from agent import runtime

    runtime.runtime()  # imports the interpreter module now, while module files are readable
    _tflite_module()
    job = _resolve(spec["job"])
    threads = len(os.listdir("/proc/self/task"))
    syscalls = _seccomp()
    # Landlock confines the calling thread only; with one thread that is the whole process.
    filesystem = _landlock([*spec["readable"], *SYSTEM_READABLE]) if threads == 1 else 0
    isolation = {"network": network, "syscalls": syscalls, "landlock_abi": filesystem}
    if spec["require_isolation"] and not (network == "namespace" and syscalls and filesystem):
        _report(
            {
                "ok": False,
                "code": "sandbox_unavailable",
                "message": f"This host cannot confine the model check ({isolation}); it was not run. "
                "Use a Linux kernel with Landlock and namespaces, or set SANDBOX_REQUIRE_ISOLATION=0.",
            }
        )
        return
    try:
        result = job(**spec["args"])
    except JobFailure as exc:
        _report({"ok": False, "code": exc.code, "message": exc.message, "isolation": isolation})
    except MemoryError:
        _report({"ok": False, "code": "sandbox_memory_limit", "message": "", "isolation": isolation})
    except Exception as exc:
        _report(
            {
                "ok": False,
                "code": "inspection_failed",
                "message": f"Checking the model failed: {type(exc).__name__}: {exc}",
                "isolation": isolation,
            }
        )
    else:
        _report({"ok": True, "result": result, "isolation": isolation})


if __name__ == "__main__":
    child_main()
