"""Many virtual devices in one process, on one asyncio loop.

paho-mqtt's external-loop API (``on_socket_open`` / ``loop_read`` / ``loop_write`` /
``loop_misc``) puts every device's socket on the loop's selector: no thread per device, so
one process holds thousands. HTTP (enrollment, cache misses, hashing) runs on small thread
pools, because urllib3 and the agent's Downloader block.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import resource
import signal
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import urllib3

from agent import __version__
from agent.apply import MANIFEST_MAX_BYTES
from agent.config import BrokerConfig
from agent.download import Downloader
from agent.protocol.codes import Reason
from agent.sim.device import Behaviour, Credentials, DeviceSpec, VersionProfile, VirtualDevice

log = logging.getLogger(__name__)

CONNECTS_PER_TICK = 20  # handshakes block the loop: a few at a time, then let it breathe
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class SimConfig:
    """Everything a fleet process needs; picklable, made by the CLI."""

    url: str
    enrollment_token: str | None
    root_keys: tuple[str, ...]
    root_threshold: int = 1
    ca_file: str | None = None
    cache_dir: str = "var/sim-cache"
    seed: str = "sim"
    profiles: dict[str, VersionProfile] = field(default_factory=dict)
    default_profile: VersionProfile = field(default_factory=VersionProfile)
    inferences_per_s: float = 5.0
    label_rate: float = 0.1
    telemetry_interval_s: float = 30.0
    install_s: float = 0.2
    fail_reason: Reason = Reason.LOAD_FAILED
    flap_online_s: float = 20.0
    flap_offline_s: float = 5.0
    keepalive_s: int = 30
    enroll_concurrency: int = 4
    enroll_attempts: int = 20
    # Bulk provisioning (POST /api/v1/devices/provision) with an admin's API token instead
    # of one enrollment per device; devices per request.
    provision_token: str | None = None
    provision_batch: int = 500


@dataclass
class Stats:
    """One process's counters, sent to the parent as a dict."""

    process: int = 0
    pid: int = 0
    devices: int = 0
    enrolled: int = 0
    enroll_failed: int = 0
    enroll_s: float | None = None
    online: int = 0
    first_all_online_s: float | None = None
    connects: int = 0
    drops: int = 0
    desired: int = 0
    installs: int = 0
    failed: int = 0
    published: int = 0
    telemetry: int = 0
    cache_fetches: int = 0
    active: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # the process's CPU time so far
    cpu_s_enrolled: float = 0.0  # ... when enrollment ended and the devices started
    running_s: float = 0.0  # seconds since the devices started
    rss_mb: float = 0.0
    loop_lag_p95_ms: float = 0.0
    done: bool = False


class MqttIo:
    """paho clients on an asyncio loop (paho's examples/loop_asyncio.py, with one shared
    timer for keepalives instead of one task per client)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.open: dict[mqtt.Client, int] = {}

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def _on_open(self, client, userdata, sock) -> None:
        fd = sock.fileno()
        self.open[client] = fd
        self.loop.add_reader(fd, self._read, client, sock)

    def _read(self, client: mqtt.Client, sock) -> None:
        client.loop_read()
        # TLS may hold whole records the selector will not report again: drain them.
        while client.socket() is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
            client.loop_read()

    def _on_close(self, client, userdata, sock) -> None:
        fd = self.open.pop(client, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)

    def _on_register_write(self, client, userdata, sock) -> None:
        self.loop.add_writer(sock.fileno(), client.loop_write)

    def _on_unregister_write(self, client, userdata, sock) -> None:
        fd = self.open.get(client)
        if fd is not None:
            self.loop.remove_writer(fd)

    async def keepalive(self) -> None:
        while True:
            for client in list(self.open):
                client.loop_misc()
            await asyncio.sleep(1)


class ArtifactCache:
    """Manifests and blobs shared by every device of every process, on disk, by sha256.

    The cache only saves transfers: each device still verifies the manifest's signature and
    pin, and hashes the blob file itself. A miss is downloaded once per process (concurrent
    askers wait for the same transfer) with the agent's Downloader (retries, resume, size
    and hash checks), using the bearer token of the device that asked first.
    """

    def __init__(self, root: Path, *, ca_file: str | None, stats: Stats) -> None:
        self.root = root
        self.ca_file = ca_file
        self.stats = stats
        (root / "manifests").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="sim-http")
        self._manifests: dict[str, bytes] = {}
        self._inflight: dict[str, asyncio.Future] = {}

    def _downloader(self, token: str) -> Downloader:
        headers = {"Authorization": f"Bearer {token}", "User-Agent": f"fleet-agent-sim/{__version__}"}
        http = urllib3.PoolManager(
            headers=headers, maxsize=1, **({"ca_certs": self.ca_file} if self.ca_file else {})
        )
        return Downloader(http=http, timeout_s=30, attempts=5, backoff_initial_s=0.5, backoff_max_s=10)

    async def _once(self, key: str, fetch) -> Any:
        future = self._inflight.get(key)
        if future is None:
            future = self._inflight[key] = asyncio.get_running_loop().run_in_executor(self.pool, fetch)
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def manifest(self, spec: dict[str, Any], *, token: str) -> bytes:
        key = spec["manifest_sha256"]
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        path = self.root / "manifests" / f"{key}.dsse"

        def fetch() -> bytes:
            with contextlib.suppress(FileNotFoundError):
                return path.read_bytes()
            self.stats.cache_fetches += 1
            envelope = self._downloader(token).fetch_bytes(spec["manifest_url"], max_bytes=MANIFEST_MAX_BYTES)
            _atomic_write(path, envelope)
            return envelope

        envelope = await self._once(f"manifest:{key}", fetch)
        self._manifests[key] = envelope
        return envelope

    def forget_manifest(self, spec: dict[str, Any]) -> None:
        key = spec["manifest_sha256"]
        self._manifests.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "manifests" / f"{key}.dsse").unlink()

    async def blob(self, url: str, blob: dict[str, Any], *, token: str) -> Path:
        path = self.root / "blobs" / blob["sha256"]
        if path.exists():
            return path

        def fetch() -> Path:
            if path.exists():  # another process fetched it meanwhile
                return path
            self.stats.cache_fetches += 1
            partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.part")
            self._downloader(token).fetch_blob(url, partial=partial, size=blob["size"], sha256=blob["sha256"])
            os.replace(partial, path)
            return path

        return await self._once(f"blob:{blob['sha256']}", fetch)

    async def sha256_of(self, path: Path) -> str:
        def digest() -> str:
            hasher = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    hasher.update(chunk)
            return hasher.hexdigest()

        return await asyncio.get_running_loop().run_in_executor(self.pool, digest)


def _atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


class EnrollmentError(Exception):
    pass


def identity(spec: DeviceSpec) -> dict[str, Any]:
    """What a virtual device says about itself when it enrolls or is provisioned."""
    return {
        "hardware": spec.hardware,
        "supports_int8": spec.int8,
        "agent_version": __version__,
        "runtime": "simulated",
    }


def credentials(answer: dict[str, Any], config: SimConfig) -> Credentials:
    """A device's credentials from its enrollment answer (or its entry in a bulk one)."""
    broker = answer["mqtt"]
    return Credentials(
        token=answer["token"],
        broker=BrokerConfig(
            url=broker["url"],
            username=broker["username"],
            password=broker["password"],
            ca_file=Path(config.ca_file) if config.ca_file else None,
            topic_prefix=broker["topic_prefix"],
        ),
    )


def provision(
    http: urllib3.PoolManager, config: SimConfig, specs: list[DeviceSpec], stop: threading.Event
) -> list[Credentials]:
    """Provision ``specs`` in one ``POST /api/v1/devices/provision`` (docs/enrollment.md,
    "Bulk provisioning"), retrying a control plane or broker that is briefly unavailable.
    The request is all or nothing, so a retry after a 503 starts clean."""
    body = json.dumps(
        {"devices": [{"device_id": spec.device_id, "identity": identity(spec)} for spec in specs]}
    ).encode()
    url = urllib.parse.urljoin(config.url, "/api/v1/devices/provision")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.provision_token}"}
    for _ in range(config.enroll_attempts):
        if stop.is_set():
            break
        try:
            response = http.request("POST", url, body=body, headers=headers, timeout=600, retries=False)
        except urllib3.exceptions.HTTPError as exc:
            log.warning("bulk provisioning failed: %s; retrying", exc)
            stop.wait(1)
            continue
        if response.status == 201:
            return [credentials(answer, config) for answer in json.loads(response.data)["devices"]]
        if response.status == 429 or response.status >= 500:
            log.warning("bulk provisioning answered %s: %s; retrying", response.status, response.data[:300])
            stop.wait(2)
            continue
        raise EnrollmentError(f"bulk provisioning refused: {response.status} {response.data[:300]!r}")
    raise EnrollmentError(f"bulk provisioning did not succeed after {config.enroll_attempts} attempts")


def enroll(
    http: urllib3.PoolManager, config: SimConfig, spec: DeviceSpec, stop: threading.Event
) -> Credentials:
    """Enroll one device through ``POST /api/v1/enroll``, waiting out the rate limit (429
    with Retry-After) and retrying a control plane that is briefly unavailable."""
    body = json.dumps(
        {"device_id": spec.device_id, "enrollment_token": config.enrollment_token, "identity": identity(spec)}
    ).encode()
    url = urllib.parse.urljoin(config.url, "/api/v1/enroll")
    for _ in range(config.enroll_attempts):
        if stop.is_set():
            break
        try:
            response = http.request(
                "POST",
                url,
                body=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            log.warning("%s: enrollment failed: %s; retrying", spec.device_id, exc)
            stop.wait(1)
            continue
        if response.status in (200, 201):
            return credentials(json.loads(response.data), config)
        if response.status >= 500:
            log.warning(
                "%s: enrollment answered %s: %s; retrying",
                spec.device_id,
                response.status,
                response.data[:300],
            )
        if response.status == 429 or response.status >= 500:
            retry_after = response.headers.get("Retry-After", "1")
            stop.wait(min(60.0, float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0))
            continue
        raise EnrollmentError(
            f"{spec.device_id}: enrollment refused: {response.status} {response.data[:300]!r}"
        )
    raise EnrollmentError(
        f"{spec.device_id}: enrollment did not succeed after {config.enroll_attempts} attempts"
    )


class Fleet:
    """The virtual devices of one process."""

    def __init__(self, config: SimConfig, specs: list[DeviceSpec], *, process: int) -> None:
        self.config = config
        self.specs = specs
        self.stats = Stats(process=process, pid=os.getpid(), devices=len(specs))
        self.loop = asyncio.new_event_loop()
        self.io = MqttIo(self.loop)
        self.cache = ArtifactCache(Path(config.cache_dir), ca_file=config.ca_file, stats=self.stats)
        self.devices: list[VirtualDevice] = []
        self._connects: collections.deque[VirtualDevice] = collections.deque()
        self._connect_wakeup = asyncio.Event()
        self._tls: ssl.SSLContext | None = None
        self._lags: collections.deque[float] = collections.deque(maxlen=600)
        self.started = time.monotonic()
        self.running_since: float | None = None  # when the devices started, after enrolling
        self._process = psutil.Process()

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self.config.ca_file)
        return self._tls

    def connect_soon(self, device: VirtualDevice) -> None:
        self._connects.append(device)
        self._connect_wakeup.set()

    async def _connector(self) -> None:
        while True:
            await self._connect_wakeup.wait()
            self._connect_wakeup.clear()
            while self._connects:
                for _ in range(min(CONNECTS_PER_TICK, len(self._connects))):
                    self._connects.popleft().connect()
                await asyncio.sleep(0)

    async def _lag_probe(self) -> None:
        while True:
            before = self.loop.time()
            await asyncio.sleep(0.1)
            self._lags.append(max(0.0, self.loop.time() - before - 0.1) * 1000)

    def _cpu_s(self) -> float:
        times = self._process.cpu_times()
        return round(times.user + times.system, 2)

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats
        online = [d for d in self.devices if d.connected]
        stats.online = len(online)
        expected = sum(1 for s in self.specs if s.behaviour != Behaviour.OFFLINE)
        if stats.first_all_online_s is None and self.devices and stats.online >= expected:
            stats.first_all_online_s = round(time.monotonic() - self.started, 2)
        active: collections.Counter[str] = collections.Counter()
        for device in self.devices:
            for name, (version, variant) in device.active.items():
                active[f"{name} {version} {variant}"] += 1
        stats.active = dict(active)
        stats.cpu_s = self._cpu_s()
        stats.running_s = round(time.monotonic() - self.running_since, 2) if self.running_since else 0.0
        stats.rss_mb = round(self._process.memory_info().rss / 2**20, 1)
        lags = sorted(self._lags)
        stats.loop_lag_p95_ms = round(lags[int(len(lags) * 0.95)] if lags else 0.0, 1)
        return asdict(stats)

    def enroll_all(self, stop: threading.Event) -> list[tuple[DeviceSpec, Credentials]]:
        started = time.monotonic()
        http = urllib3.PoolManager(
            maxsize=self.config.enroll_concurrency,
            **({"ca_certs": self.config.ca_file} if self.config.ca_file else {}),
        )
        enrolled = []
        if self.config.provision_token:
            batch = self.config.provision_batch
            for start in range(0, len(self.specs), batch):
                specs = self.specs[start : start + batch]
                try:
                    enrolled += zip(specs, provision(http, self.config, specs, stop), strict=True)
                    self.stats.enrolled += len(specs)
                except EnrollmentError as exc:
                    log.error("%s", exc)
                    self.stats.enroll_failed += len(specs)
            self.stats.enroll_s = round(time.monotonic() - started, 2)
            return enrolled
        with concurrent.futures.ThreadPoolExecutor(self.config.enroll_concurrency) as pool:
            futures = {pool.submit(enroll, http, self.config, spec, stop): spec for spec in self.specs}
            for future in concurrent.futures.as_completed(futures):
                try:
                    enrolled.append((futures[future], future.result()))
                    self.stats.enrolled += 1
                except EnrollmentError as exc:
                    log.error("%s", exc)
                    self.stats.enroll_failed += 1
        self.stats.enroll_s = round(time.monotonic() - started, 2)
        return sorted(enrolled, key=lambda pair: pair[0].index)

    async def run(self, stop: threading.Event, report) -> None:
        enrolling = self.loop.run_in_executor(None, self.enroll_all, stop)
        while not enrolling.done():
            report(self.snapshot())
            await asyncio.wait([enrolling], timeout=1)
        enrolled = enrolling.result()
        self.stats.cpu_s_enrolled = self._cpu_s()
        self.running_since = time.monotonic()
        background = [
            self.loop.create_task(coro)
            for coro in (self.io.keepalive(), self._connector(), self._lag_probe())
        ]
        for spec, credentials in enrolled:
            device = VirtualDevice(self, spec, credentials)
            self.devices.append(device)
            device.start()
        while not stop.is_set():
            report(self.snapshot())
            await asyncio.sleep(1)
        for device in self.devices:
            device.stop()
        # Let the offline statuses and DISCONNECTs go out before the sockets close.
        deadline = self.loop.time() + 10
        while self.io.open and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in background:
            task.cancel()
        self.stats.done = True
        report(self.snapshot())


def run_process(
    config: SimConfig, specs: list[DeviceSpec], process: int, stop, reports, log_level: str
) -> None:
    """Entry point of one fleet process (multiprocessing)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s sim[{process}] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fleet = Fleet(config, specs, process=process)
    # multiprocessing's Event is waited on from a thread: the loop never blocks on it.
    local_stop = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), local_stop.set()), daemon=True).start()
    try:
        fleet.loop.run_until_complete(fleet.run(local_stop, reports.put))
    finally:
        fleet.cache.pool.shutdown(wait=False, cancel_futures=True)
        fleet.loop.close()
