"""Running and administering Mosquitto with the project's own configuration.

Two halves:

* ``start_broker`` runs a Mosquitto of our own (tests, ``make demo``) from
  ``docker/mosquitto/mosquitto.conf``, on ports of its own: a TLS listener for devices with
  a certificate from a CA made for the run (``fleet.core.tls``), and plain MQTT on loopback
  for the control plane's accounts; the dynamic security plugin is initialised with an
  admin account.
* ``DynSec`` drives the dynamic security plugin over ``$CONTROL/dynamic-security/v1``:
  per-device credentials and roles, disabling clients, and the control plane's own roles
  and service accounts (``DynSec.provision``, the ``BrokerProvisioner`` of
  ``fleet.mqtt.provisioning``). Changes are live; the broker is never restarted or reloaded.

This module imports no Django, so the agent's tests and the demo can use it too.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.topics import DEVICE_TOPICS, Topics
from fleet.core.tls import LocalCA, local_ca_create
from fleet.mqtt.provisioning import Acl, BrokerPlan, ServiceAccount, broker_provision

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG_TEMPLATE = ROOT / "docker" / "mosquitto" / "mosquitto.conf"
PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
ADMIN_USER = "fleet-admin"
# The plain listener's address in the shipped config: loopback only (docs/mqtt.md).
PLAIN_HOST = "127.0.0.1"
MQTT_PORT = 1883
MQTTS_PORT = 8883


# Anything not granted by a role is refused, including receiving messages.
DEFAULT_DENY = (
    ("publishClientSend", False),
    ("publishClientReceive", False),
    ("subscribe", False),
    ("unsubscribe", True),
)

# A control message stays under the shipped max_packet_size (256 KiB) with room to spare;
# each command grows by its correlation id on the way out.
CONTROL_MESSAGE_BYTES = 200_000
CORRELATION_BYTES = 64
# ...and holds at most this many commands: the broker answers a message once, after its
# last command, and Mosquitto 2.0's plugin rewrites its whole file after every command that
# changes something (0.3 s each at 10,000 devices here), so a message of many such commands
# would outlast DynSec.timeout_s, the more so queued behind another admin's message
# (docs/benchmarks.md, "Fleet at 10,000 devices").
CONTROL_MESSAGE_COMMANDS = 8

# Stamped (textdescription) on the clients the control plane creates for devices.
DEVICE_CLIENT_MARKER = "modelfleet-device:"


class BrokerError(RuntimeError):
    pass


class ClientNotOwned(BrokerError):
    """A client of the device's name exists but is not that device's (a service account,
    or one an operator made): device provisioning refuses to touch it."""


def find_dynsec_plugin() -> str:
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise BrokerError(
        "Mosquitto's dynamic security plugin was not found; install the Debian package "
        f"'mosquitto' (2.0 or newer). Looked in: {', '.join(PLUGIN_CANDIDATES)}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class BrokerProcess:
    """A Mosquitto we started. ``stop()`` and ``start()`` keep its data (retained
    messages, sessions, credentials, certificates), like a real broker restart.

    ``url`` is the plain loopback listener (the control plane's accounts); ``tls_url`` the
    TLS listener devices use, whose certificate verifies against ``ca_file``."""

    data_dir: Path
    port: int
    admin_password: str
    tls_port: int
    tls_bind: str = PLAIN_HOST
    process: subprocess.Popen | None = None
    # The service accounts' passwords, once ``provision`` made them.
    publisher_password: str = ""
    ingest_password: str = ""
    tls_dir: Path | None = None  # the listener's CA and certificate; data_dir/tls by default

    @property
    def url(self) -> str:
        return f"mqtt://{PLAIN_HOST}:{self.port}"

    @property
    def tls(self) -> LocalCA:
        return LocalCA.at(self.tls_dir or self.data_dir / "tls")

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    @property
    def tls_url(self) -> str:
        # A wildcard bind is reached on loopback here; 127.0.0.1 is in the certificate.
        host = PLAIN_HOST if self.tls_bind in ("0.0.0.0", "::", "") else self.tls_bind
        return f"mqtts://{f'[{host}]' if ':' in host else host}:{self.tls_port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        tls_host = urlparse(self.tls_url).hostname or PLAIN_HOST
        while not (port_open(PLAIN_HOST, self.port) and port_open(tls_host, self.tls_port)):
            if self.process.poll() is not None:
                raise BrokerError(f"mosquitto exited: {self.process.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"mosquitto did not listen on {self.port} and {self.tls_port} within {timeout}s"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: Mosquitto saves its persistence file
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()

    def admin(self) -> DynSec:
        return DynSec(self.url, ADMIN_USER, self.admin_password)

    def provision(self) -> BrokerProcess:
        """Default deny and the control plane's service accounts, with fresh passwords:
        what ``manage.py broker_provision`` does on a production broker, by the same code."""
        self.publisher_password = secrets.token_urlsafe(16)
        self.ingest_password = secrets.token_urlsafe(16)
        broker_provision(
            self.admin(),
            topics=Topics(),
            publisher_password=self.publisher_password,
            ingest_password=self.ingest_password,
        )
        return self


def render_config(*, port: int, tls_port: int, tls_bind: str, tls: LocalCA, data_dir: Path) -> str:
    replacements = {
        "@USER@": getpass.getuser(),
        "@PORT@": str(port),
        "@TLS_PORT@": str(tls_port),
        "@TLS_BIND@": tls_bind,
        "@TLS_CA_FILE@": str(tls.ca_file),
        "@TLS_CERT_FILE@": str(tls.cert_file),
        "@TLS_KEY_FILE@": str(tls.key_file),
        "@DATA_DIR@": str(data_dir),
        "@DYNSEC_PLUGIN@": find_dynsec_plugin(),
        "@DYNSEC_FILE@": str(data_dir / "dynamic-security.json"),
    }
    text = CONFIG_TEMPLATE.read_text()
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text


def broker_prepare(
    data_dir: Path,
    *,
    admin_password_file: Path | None = None,
    port: int = 0,
    tls_port: int = 0,
    tls_bind: str = PLAIN_HOST,
    tls_names: tuple[str, ...] = (),
    tls_dir: Path | None = None,
) -> BrokerProcess:
    """Write a Mosquitto's files in ``data_dir`` (created if needed) without starting it:
    ``mosquitto -c <data_dir>/mosquitto.conf`` then runs it (``make up``'s Procfile), or
    the handle's ``start()``.

    Port 0 picks a free port. The dynamic security plugin starts with the admin account
    whose password ``admin_password_file`` holds (``data_dir/admin-password``, made at
    random, by default). The TLS listener uses the CA and certificate in ``tls_dir``
    (``manage.py tls_local_ca``'s files); by default a CA made in ``data_dir/tls`` on first
    use (kept for restarts) whose certificate names the loopback addresses and ``tls_names``."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_ctrl") is None:
        raise BrokerError(
            "mosquitto and mosquitto_ctrl are needed: apt-get install mosquitto mosquitto-clients"
        )
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    password_file = Path(admin_password_file or data_dir / "admin-password")
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(24))
        password_file.chmod(0o600)
    admin_password = password_file.read_text().strip()
    dynsec_file = data_dir / "dynamic-security.json"
    if not dynsec_file.exists():
        subprocess.run(
            ["mosquitto_ctrl", "dynsec", "init", str(dynsec_file), ADMIN_USER, admin_password],
            check=True,
            capture_output=True,
        )
    broker = BrokerProcess(
        data_dir, port or free_port(), admin_password, tls_port or free_port(), tls_bind, tls_dir=tls_dir
    )
    if not broker.ca_file.exists():
        local_ca_create(broker.tls.directory, names=tls_names)
    broker.config_path.write_text(
        render_config(
            port=broker.port, tls_port=broker.tls_port, tls_bind=tls_bind, tls=broker.tls, data_dir=data_dir
        )
    )
    return broker


def start_broker(
    data_dir: Path,
    *,
    port: int = 0,
    tls_port: int = 0,
    tls_bind: str = PLAIN_HOST,
    tls_names: tuple[str, ...] = (),
) -> BrokerProcess:
    """Start a Mosquitto with the project's config in ``data_dir`` (``broker_prepare``)."""
    broker = broker_prepare(data_dir, port=port, tls_port=tls_port, tls_bind=tls_bind, tls_names=tls_names)
    broker.start()
    return broker


def mqtt_client_unconnected(
    url: str,
    *,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
    ca_file: str | Path | None = None,
    manual_ack: bool = False,
) -> mqtt.Client:
    """The one place the control plane makes a paho client: MQTT v5, the login, TLS for an
    ``mqtts://`` URL. Not connected yet: for a long-lived client that sets its own callbacks
    and connects itself (the ingest bridge); everything else wants ``mqtt_client``."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
    )
    if username is not None:
        client.username_pw_set(username, password)
    tls_configure(client, url, ca_file)
    return client


def mqtt_client(
    url: str,
    *,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    receive_maximum: int | None = None,
    ca_file: str | Path | None = None,
) -> mqtt.Client:
    """A connected MQTT v5 client with its network loop running (and reconnecting).

    With ``clean_start=False`` and a ``session_expiry_s``, the broker keeps the session's
    subscriptions and queued QoS 1 messages while the client is away. Over ``mqtts://`` the
    broker's certificate must verify against ``ca_file`` (the system's CAs without it)."""
    client = mqtt_client_unconnected(
        url, client_id=client_id, username=username, password=password, ca_file=ca_file
    )
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        connected.set()

    client.on_connect = on_connect
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum:  # how many QoS 1 messages the broker may have in flight to us
        properties.ReceiveMaximum = receive_maximum
    client.connect(
        *host_port(url),
        keepalive=30,
        clean_start=clean_start,
        properties=properties,
    )
    client.loop_start()
    if not connected.wait(10) or result["rc"].is_failure:
        client.loop_stop()
        raise BrokerError(f"cannot connect to {url} as {username!r}: {result.get('rc', 'timeout')}")
    client.on_connect = None
    return client


def host_port(url: str) -> tuple[str, int]:
    """Where an MQTT URL points; the default port follows the scheme (8883 for TLS)."""
    parsed = urlparse(url)
    return parsed.hostname or PLAIN_HOST, parsed.port or (
        MQTTS_PORT if parsed.scheme == "mqtts" else MQTT_PORT
    )


def tls_configure(client: mqtt.Client, url: str, ca_file: str | Path | None) -> None:
    """TLS for an ``mqtts://`` or ``wss://`` URL: the server's certificate must chain to
    ``ca_file`` (or to a system CA without it) and name the host dialled (paho checks the
    host name unless told otherwise, which nothing here does). Nothing for plain URLs."""
    if urlparse(url).scheme in ("mqtts", "wss"):
        client.tls_set(ca_certs=str(ca_file) if ca_file else None)


@dataclass
class DynSec:
    """Client of Mosquitto's dynamic security control API (mosquitto_ctrl dynsec, over MQTT)."""

    url: str
    username: str
    password: str
    topics: Topics = field(default_factory=Topics)
    timeout_s: float = 10.0
    ca_file: str | Path | None = None

    def command(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        """Send commands in one message; raise BrokerError naming the first that failed."""
        with self.session() as send:
            return self._checked(send(list(commands)))

    @staticmethod
    def _checked(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for response in responses:
            if response.get("error"):
                raise BrokerError(f"{response.get('command')}: {response['error']}")
        return responses

    @contextlib.contextmanager
    def session(self) -> Iterator[Callable[[list[dict[str, Any]]], list[dict[str, Any]]]]:
        """One admin connection for several control messages: yields ``send(commands)``,
        which sends the commands in one message and answers their responses in order,
        failed ones included (each says its ``error``).

        Every admin client hears every answer on the one response topic: a correlation id
        per command picks ours out, or two enrollments at once (two web workers, a fleet
        simulator) would each read the other's answer."""
        client = mqtt_client(
            self.url,
            client_id=f"fleet-dynsec-{uuid.uuid4().hex[:8]}",
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
        )
        by_tag: dict[str, dict[str, Any]] = {}
        waiting: dict[str, Any] = {"tags": set(), "answered": threading.Event()}
        lock = threading.Lock()

        def on_message(client, userdata, message):
            with lock:
                for response in json.loads(message.payload).get("responses", []):
                    tag = response.pop("correlationData", None)  # ours to match, not the caller's
                    if tag in waiting["tags"]:
                        by_tag[tag] = response
                if waiting["tags"] and waiting["tags"] <= by_tag.keys():
                    waiting["answered"].set()

        def send(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
            ours = [f"{uuid.uuid4().hex}-{n}" for n in range(len(commands))]
            tagged = [
                {**command, "correlationData": tag} for command, tag in zip(commands, ours, strict=True)
            ]
            with lock:
                waiting["tags"], waiting["answered"] = set(ours), threading.Event()
            client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            if not waiting["answered"].wait(self.timeout_s):
                raise BrokerError("the broker did not answer the dynamic security command")
            with lock:
                return [by_tag.pop(tag) for tag in ours]

        try:
            subscribed = threading.Event()
            client.on_message = on_message
            client.on_subscribe = lambda *args: subscribed.set()
            client.subscribe(f"{CONTROL_TOPIC}/response", qos=1)
            if not subscribed.wait(self.timeout_s):
                raise BrokerError("the broker did not confirm the control response subscription")
            yield send
        finally:
            client.disconnect()
            client.loop_stop()

    def send_batched(
        self, send: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], commands: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """``commands`` over ``send`` in as few messages as the broker's packet limit
        allows (docker/mosquitto/mosquitto.conf: max_packet_size) and CONTROL_MESSAGE_COMMANDS
        lets, in order."""
        responses: list[dict[str, Any]] = []
        message: list[dict[str, Any]] = []
        size = 0
        for command in commands:
            length = len(json.dumps(command)) + CORRELATION_BYTES
            full = size + length > CONTROL_MESSAGE_BYTES or len(message) == CONTROL_MESSAGE_COMMANDS
            if message and full:
                responses += send(message)
                message, size = [], 0
            message.append(command)
            size += length
        if message:
            responses += send(message)
        return responses

    # --- roles and clients

    def _role_commands(self, role: str, acls: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [
            {"command": "createRole", "rolename": role},
            *[
                {
                    "command": "addRoleACL",
                    "rolename": role,
                    "acltype": acl_type,
                    "topic": topic,
                    "priority": 0,
                    "allow": True,
                }
                for acl_type, topic in acls
            ],
        ]

    def _ignore_existing(self, *commands: dict[str, Any]) -> None:
        for command in commands:
            with contextlib.suppress(BrokerError):
                self.command(command)

    def device_acls(self, device_id: str) -> list[tuple[str, str]]:
        """Exactly the contract: read own desired, the fleet's trust bundle and the ingest
        bridge's replay request, write own status/reported/events/telemetry."""
        desired = self.topics.desired(device_id)
        return [
            ("subscribeLiteral", desired),
            ("publishClientReceive", desired),
            ("subscribeLiteral", self.topics.trust()),
            ("publishClientReceive", self.topics.trust()),
            ("subscribeLiteral", self.topics.replay()),
            ("publishClientReceive", self.topics.replay()),
            *[("publishClientSend", self.topics.device(device_id, kind)) for kind in DEVICE_TOPICS],
        ]

    # --- a device's own client and role
    #
    # Issue 9, section 1: provisioning a device may create a client, or change one that
    # belongs to that device, and nothing else. A device id equal to a service account's name
    # must never delete, rewrite or disable that account.

    def get_client(self, username: str) -> dict[str, Any] | None:
        """The client's record (username, clientid, textname, textdescription, roles,
        groups, disabled), or None when there is no such client."""
        return self._get({"command": "getClient", "username": username}, "client")

    @staticmethod
    def device_role(device_id: str) -> str:
        return f"device-{device_id}"

    @staticmethod
    def device_marker(device_id: str) -> str:
        """Stamped on the clients we create for a device (textdescription), so that we can
        tell them from the service accounts and from anything an operator made by hand."""
        return f"{DEVICE_CLIENT_MARKER}{device_id}"

    def is_device_client(self, client: dict[str, Any], device_id: str) -> bool:
        if client.get("textdescription") == self.device_marker(device_id):
            return True
        # Clients made before the marker existed: exactly the shape ensure_device gave them
        # (the device's own role and nothing else, client id pinned to the device id). No
        # service account has it: theirs are roles of their own, without a client id.
        roles = [role.get("rolename") for role in client.get("roles") or []]
        return (
            roles == [self.device_role(device_id)]
            and client.get("clientid") == device_id
            and not client.get("groups")
        )

    def _device_client(self, device_id: str) -> dict[str, Any] | None:
        """The device's client, None if it has none; ClientNotOwned if the name is taken by
        a client that is not the device's."""
        client = self.get_client(device_id)
        if client is not None and not self.is_device_client(client, device_id):
            raise ClientNotOwned(
                f"the broker client {device_id!r} exists and was not created for a device; "
                "it is left untouched"
            )
        return client

    def ensure_device(self, device_id: str, password: str, *, enabled: bool = True) -> None:
        """Create the device's client and role, or, when the device already has its client,
        change its password in place (the broker disconnects a client whose password
        changed). Never touches a client that is not the device's (ClientNotOwned)."""
        state = {"command": "enableClient" if enabled else "disableClient", "username": device_id}
        if self._device_client(device_id) is not None:
            self.command({"command": "setClientPassword", "username": device_id, "password": password}, state)
            return
        role = self.device_role(device_id)
        # A role of that name is ours (the "device-" names are the devices' namespace): one
        # left behind by a retire that lost the broker halfway is started afresh.
        self._ignore_existing({"command": "deleteRole", "rolename": role})
        # One control message: the broker runs its commands in order, so a new client of a
        # device that is not active is never enabled, not even for a moment.
        self.command(*self._device_create_commands(device_id, password), state)

    def enable_device(self, device_id: str) -> bool:
        """Enable the device's client; False when it has none yet (a pre-authorized device
        that has not enrolled: its client is created enabled when it does)."""
        if self._device_client(device_id) is None:
            return False
        self.enable_client(device_id)
        return True

    def disable_device(self, device_id: str) -> bool:
        """Disable the device's client and drop its connection; False when it has none (then
        there is nothing to keep out)."""
        if self._device_client(device_id) is None:
            return False
        self.disable_client(device_id)
        return True

    def delete_device(self, device_id: str) -> bool:
        """Delete the device's client and role; False when it had no client."""
        client = self._device_client(device_id)
        if client is not None:
            self.command({"command": "deleteClient", "username": device_id})
        self._ignore_existing({"command": "deleteRole", "rolename": self.device_role(device_id)})
        return client is not None

    def _device_create_commands(self, device_id: str, password: str) -> list[dict[str, Any]]:
        """The device's role, its ACLs given in the same command, and its client: two
        commands, since Mosquitto 2.0's plugin rewrites its whole configuration file after
        every command that changes something (docs/benchmarks.md, "Fleet at 10,000 devices")."""
        role = self.device_role(device_id)
        return [
            {
                "command": "createRole",
                "rolename": role,
                "acls": [
                    {"acltype": acl_type, "topic": topic, "priority": 0, "allow": True}
                    for acl_type, topic in self.device_acls(device_id)
                ],
            },
            {
                "command": "createClient",
                "username": device_id,
                "password": password,
                "clientid": device_id,
                "textname": "Modelfleet device",
                "textdescription": self.device_marker(device_id),
                "roles": [{"rolename": role}],
            },
        ]

    @staticmethod
    def _found(response: dict[str, Any], key: str) -> dict[str, Any] | None:
        """A get command's record; None for "not found"; BrokerError for any other failure."""
        if response.get("error"):
            if "not found" in str(response["error"]).lower():
                return None
            raise BrokerError(f"{response.get('command')}: {response['error']}")
        return response.get("data", {}).get(key) or {}

    def devices_create(self, passwords: dict[str, str]) -> None:
        """Bulk provisioning (docs/enrollment.md, "Bulk provisioning"): for each device id,
        what ``ensure_device(device_id, password, enabled=True)`` does, over one connection
        in as few control messages as fit.

        It reads first (cheap for the broker) and changes nothing if any name is held by a
        client that is not a device's (ClientNotOwned). A device's own client (left by an
        attempt the database forgot) gets the new password and is enabled; a leftover role
        of a device's name is started afresh; everything else is two commands per device."""
        reads = [
            command
            for device_id in passwords
            for command in (
                {"command": "getClient", "username": device_id},
                {"command": "getRole", "rolename": self.device_role(device_id)},
            )
        ]
        with self.session() as send:
            answers = self.send_batched(send, reads)
            writes: list[dict[str, Any]] = []
            for index, (device_id, password) in enumerate(passwords.items()):
                client = self._found(answers[2 * index], "client")
                if client is not None:
                    if not self.is_device_client(client, device_id):
                        raise ClientNotOwned(
                            f"the broker client {device_id!r} exists and was not created for a "
                            "device; nothing was changed"
                        )
                    writes += [
                        {"command": "setClientPassword", "username": device_id, "password": password},
                        {"command": "enableClient", "username": device_id},
                    ]
                    continue
                if self._found(answers[2 * index + 1], "role") is not None:
                    writes.append({"command": "deleteRole", "rolename": self.device_role(device_id)})
                writes += self._device_create_commands(device_id, password)
            self._checked(self.send_batched(send, writes))

    # --- the control plane's own roles and accounts (BrokerProvisioner)

    def _get(self, command: dict[str, Any], key: str) -> dict[str, Any] | None:
        try:
            responses = self.command(command)
        except BrokerError as exc:
            if "not found" in str(exc).lower():
                return None
            raise
        return responses[0].get("data", {}).get(key) or {}

    def login_works(self, username: str, password: str) -> bool:
        try:
            client = mqtt_client(
                self.url,
                client_id=f"fleet-check-{uuid.uuid4().hex[:8]}",
                username=username,
                password=password,
                ca_file=self.ca_file,
            )
        except BrokerError:
            return False
        client.disconnect()
        client.loop_stop()
        return True

    def _role_changes(self, role: str, acls: frozenset[Acl]) -> tuple[list[dict[str, Any]], str | None]:
        current = self._get({"command": "getRole", "rolename": role}, "role")
        if current is None:
            return self._role_commands(role, sorted((acl.type.value, acl.topic) for acl in acls)), (
                f"role {role} created with {len(acls)} ACL entries"
            )
        have = {
            (entry["acltype"], entry["topic"])
            for entry in current.get("acls") or []
            if entry.get("allow", True)
        }
        denied = [(e["acltype"], e["topic"]) for e in current.get("acls") or [] if not e.get("allow", True)]
        want = {(acl.type.value, acl.topic) for acl in acls}
        remove = sorted((have - want) | set(denied))
        add = sorted(want - have)
        commands = [
            {"command": "removeRoleACL", "rolename": role, "acltype": kind, "topic": topic}
            for kind, topic in remove
        ] + self._role_commands(role, add)[1:]
        if not commands:
            return [], None
        return commands, f"role {role}: {len(add)} ACL entries added, {len(remove)} removed"

    def _account_changes(self, account: ServiceAccount) -> tuple[list[dict[str, Any]], list[str]]:
        client = self.get_client(account.username)
        if client is None:
            return [
                {
                    "command": "createClient",
                    "username": account.username,
                    "password": account.password,
                    "textname": "Modelfleet service account",
                    "roles": [{"rolename": account.role}],
                }
            ], [f"account {account.username} created with role {account.role}"]
        if (client.get("textdescription") or "").startswith(DEVICE_CLIENT_MARKER):
            raise ClientNotOwned(
                f"the broker client {account.username!r} belongs to a device; it is left untouched "
                "(choose another MQTT_*_USERNAME)"
            )
        commands: list[dict[str, Any]] = []
        changes: list[str] = []
        roles = {role.get("rolename") for role in client.get("roles") or []}
        for role in sorted(roles - {account.role}):
            commands.append({"command": "removeClientRole", "username": account.username, "rolename": role})
            changes.append(f"account {account.username}: role {role} removed")
        if account.role not in roles:
            commands.append(
                {"command": "addClientRole", "username": account.username, "rolename": account.role}
            )
            changes.append(f"account {account.username}: role {account.role} added")
        password = {
            "command": "setClientPassword",
            "username": account.username,
            "password": account.password,
        }
        if client.get("disabled"):  # a disabled account cannot prove its password: set it too
            commands += [password, {"command": "enableClient", "username": account.username}]
            changes.append(f"account {account.username} enabled, password set")
        elif not self.login_works(account.username, account.password):
            # Checked by logging in, since the broker keeps only a hash: an unchanged
            # password is not set again (which would drop the account's connections).
            commands.append(password)
            changes.append(f"account {account.username}: password changed")
        return commands, changes

    def provision(self, plan: BrokerPlan) -> list[str]:
        """``BrokerProvisioner`` for Mosquitto: reads the current state first, then sends
        every change in one control message (the broker runs them in order)."""
        commands: list[dict[str, Any]] = []
        changes: list[str] = []
        default = self._get({"command": "getDefaultACLAccess"}, "acls")
        if {(entry["acltype"], entry["allow"]) for entry in default or []} != set(DEFAULT_DENY):
            commands.append(
                {
                    "command": "setDefaultACLAccess",
                    "acls": [{"acltype": kind, "allow": allow} for kind, allow in DEFAULT_DENY],
                }
            )
            changes.append("default access set to deny")
        for role, acls in plan.roles.items():
            role_commands, change = self._role_changes(role, acls)
            commands += role_commands
            changes += [change] if change else []
        for account in plan.accounts:
            account_commands, account_changes = self._account_changes(account)
            commands += account_commands
            changes += account_changes
        if commands:
            self.command(*commands)
        return changes

    def disable_client(self, username: str) -> None:
        """Refuse new connections and kick the current one (dynsec disconnects it)."""
        self.command({"command": "disableClient", "username": username})

    def enable_client(self, username: str) -> None:
        self.command({"command": "enableClient", "username": username})

    def set_password(self, username: str, password: str) -> None:
        self.command({"command": "setClientPassword", "username": username, "password": password})
