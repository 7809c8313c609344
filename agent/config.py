"""The agent's configuration: one TOML file, checked completely before anything starts.

Like flyte/mqtt-io, the whole file is validated at start and *every* problem is reported
at once, each as ``key.path: what is wrong and what to do``, so an operator fixing a
device over a slow link edits the file once instead of once per mistake.

The dataclasses below hold the defaults; the parser only passes the keys the file sets,
so a default is written in exactly one place. The complete commented example is
:data:`EXAMPLE_CONFIG` (also ``docker/systemd/agent.toml.example`` and ``docs/agent.md``).
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.protocol import public_key_from_hex
from agent.protocol.schemas import DEVICE_ID_PATTERN
from agent.protocol.topics import DEFAULT_PREFIX

MQTT_DEFAULT_PORT = 1883
MQTTS_DEFAULT_PORT = 8883
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107


class ConfigError(Exception):
    """Everything wrong with a configuration, one ``key.path: problem`` per entry."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class BrokerConfig:
    url: str  # mqtt://host:port or mqtts://host:port
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # for mqtts; None means the system's trusted CAs
    topic_prefix: str = DEFAULT_PREFIX
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (MQTTS_DEFAULT_PORT if self.tls else MQTT_DEFAULT_PORT)


@dataclass(frozen=True)
class ControlPlaneConfig:
    url: str | None = None  # base for enrollment and for relative URLs in the desired state
    token: str | None = None  # the device's bearer token
    ca_file: Path | None = None  # for https downloads; None means the system's trusted CAs


@dataclass(frozen=True)
class LocalApiConfig:
    bind: str = "127.0.0.1:8787"  # "HOST:PORT" (port 0 = any free port) or "unix:/path/to.sock"
    max_body_bytes: int = 1_048_576
    # Binding beyond loopback lets other hosts call the agent: only when asked for.
    allow_remote: bool = False
    # Host header names accepted besides the loopback ones and the bound address (DNS
    # rebinding: a web page's request carries the page's own host name).
    allowed_hosts: tuple[str, ...] = ()

    @property
    def unix_path(self) -> Path | None:
        return parse_bind(self.bind)[0]

    @property
    def host(self) -> str | None:
        return parse_bind(self.bind)[1]

    @property
    def port(self) -> int | None:
        return parse_bind(self.bind)[2]


@dataclass(frozen=True)
class LimitsConfig:
    max_artifact_bytes: int = 512 * 1024 * 1024
    offline_queue_messages: int = 10_000
    offline_queue_bytes: int = 8 * 1024 * 1024
    download_timeout_s: float = 30.0
    download_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 60.0
    drain_timeout_s: float = 30.0
    recent_predictions: int = 10_000  # how many prediction ids are kept for feedback
    # Telemetry windows kept after sending, to send again when the ingest bridge asks
    # (docs/protocol.md, addition 7): 60 windows are 30 minutes at the default interval.
    replay_windows: int = 60
    # Requests waiting for the shadow model (docs/agent.md, "Shadow evaluation"); when full,
    # a sampled request is counted as skipped instead of making its caller wait.
    shadow_queue_samples: int = 64


@dataclass(frozen=True)
class DeviceConfig:
    hardware: str = "any"  # e.g. "rpi4", "jetson-nano"; manifests may require a hardware class
    int8: bool = True  # can run int8 (quantized) variants
    unsupported_ops: tuple[str, ...] = ()  # TFLite builtin op names this device's runtime lacks
    golden_tolerance: float = 0.02  # max accuracy drop on the golden set vs the server's figure


@dataclass(frozen=True)
class TrustConfig:
    """The pinned root of trust (docs/security.md, "Keys and rotation"): the signing keys
    themselves come from the root-signed keyring, so they rotate without touching this."""

    root_keys: tuple[str, ...]  # hex raw Ed25519 public keys (64 hex chars each), at least one
    root_threshold: int = 1  # how many of them must sign a root document


@dataclass(frozen=True)
class Config:
    device_id: str
    state_dir: Path
    broker: BrokerConfig
    trust: TrustConfig
    # Frozen, so one shared default instance is safe.
    control_plane: ControlPlaneConfig = ControlPlaneConfig()
    local_api: LocalApiConfig = LocalApiConfig()
    telemetry_interval_s: float = 30.0
    limits: LimitsConfig = LimitsConfig()
    device: DeviceConfig = DeviceConfig()
    path: Path | None = None  # the file it was read from


def parse_bind(bind: str) -> tuple[Path | None, str | None, int | None]:
    """Split ``local_api.bind`` into ``(unix_path, host, port)``; raise ValueError if malformed.

    IPv6 hosts are written in brackets (``[::1]:8787``) and returned without them.
    """
    if bind.startswith("unix:"):
        path = bind.removeprefix("unix:")
        if not path:
            raise ValueError('a unix socket needs a path, e.g. "unix:/run/modelfleet/agent.sock"')
        return Path(path), None, None
    host, colon, port_text = bind.rpartition(":")
    if not colon:
        raise ValueError('expected "HOST:PORT" (e.g. "127.0.0.1:8787") or "unix:/path/to.sock"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError('write an IPv6 address in brackets, e.g. "[::1]:8787"')
    if not host:
        raise ValueError('the host is missing, e.g. "127.0.0.1:8787"')
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"port {port_text!r} must be a number from 0 to 65535 (0 = any free port)")
    return None, host, int(port_text)


# --- reading the TOML


def _describe(value: Any) -> str:
    """Name a TOML value's type the way the TOML spec does, for error messages."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


class _Reader:
    """Converts TOML values to typed ones and collects every problem instead of stopping.

    Each getter returns ``None`` when the key is absent or wrong; the caller then leaves
    the dataclass default in place (absent) or never builds the dataclass (wrong, since
    :func:`parse_config` raises once all errors are in).
    """

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{key}: {message}")

    def table(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.error(name, f"must be a table ([{name}]), got {_describe(value)}")
            return {}
        return value

    def check_keys(self, table: dict[str, Any], prefix: str, known: Iterable[str]) -> None:
        known = list(known)
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            self.error(_join(prefix, key), f"unknown key, {hint}")

    def string(self, table: dict[str, Any], prefix: str, key: str, *, required: str = "") -> str | None:
        """A non-empty string. ``required`` is the advice given when the key is missing."""
        if key not in table:
            if required:
                self.error(_join(prefix, key), f"required; {required}")
            return None
        value = table[key]
        if not isinstance(value, str):
            self.error(_join(prefix, key), f"expected a string, got {_describe(value)}")
            return None
        if not value.strip():
            self.error(_join(prefix, key), "must not be empty")
            return None
        return value

    def integer(
        self, table: dict[str, Any], prefix: str, key: str, *, minimum: int = 1, maximum: int | None = None
    ) -> int | None:
        if key not in table:
            return None
        value = table[key]
        # bool is a subclass of int in Python; in TOML `true` is no number.
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(_join(prefix, key), f"expected an integer, got {_describe(value)}")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            self.error(_join(prefix, key), _range_message(value, minimum, maximum))
            return None
        return value

    def number(
        self,
        table: dict[str, Any],
        prefix: str,
        key: str,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        positive: bool = True,
    ) -> float | None:
        """An integer or float; ``positive`` excludes ``minimum`` itself (> 0 by default)."""
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.error(_join(prefix, key), f"expected a number, got {_describe(value)}")
            return None
        value = float(value)
        too_small = value <= minimum if positive else value < minimum
        # TOML allows nan, which compares false with everything and would pass both bounds.
        if math.isnan(value) or too_small or (maximum is not None and value > maximum):
            if positive and maximum is None:
                self.error(_join(prefix, key), f"must be greater than {minimum:g}, got {value:g}")
            else:
                self.error(_join(prefix, key), _range_message(value, minimum, maximum))
            return None
        return value

    def boolean(self, table: dict[str, Any], prefix: str, key: str) -> bool | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, bool):
            self.error(_join(prefix, key), f"expected true or false, got {_describe(value)}")
            return None
        return value

    def strings(self, table: dict[str, Any], prefix: str, key: str) -> list[str] | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, list):
            self.error(
                _join(prefix, key), f'expected an array of strings (["A", "B"]), got {_describe(value)}'
            )
            return None
        good = True
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.error(
                    f"{_join(prefix, key)}[{index}]", f"expected a non-empty string, got {_describe(item)}"
                )
                good = False
        return value if good else None

    def path(self, value: str) -> Path:
        """Relative paths are relative to the config file's directory, not to the cwd,
        which for a systemd service is ``/``."""
        path = Path(value)
        if path.is_absolute():
            return path
        return (self.base_dir or Path.cwd()) / path

    def readable_file(self, table: dict[str, Any], prefix: str, key: str) -> Path | None:
        value = self.string(table, prefix, key)
        if value is None:
            return None
        path = self.path(value)
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            self.error(_join(prefix, key), f"cannot read {path}: {exc.strerror or exc}")
            return None
        return path

    def secret(self, table: dict[str, Any], prefix: str, key: str) -> str | None:
        """``key`` inline or ``key_file``, a file holding it (stripped of its trailing
        newline, which every editor and ``echo`` adds); never both."""
        file_key = f"{key}_file"
        inline = self.string(table, prefix, key)
        if file_key not in table:
            return inline
        if key in table:
            self.error(
                _join(prefix, file_key),
                f"set either {_join(prefix, key)} or {_join(prefix, file_key)}, not both",
            )
            return None
        file_name = self.string(table, prefix, file_key)
        if file_name is None:
            return None
        path = self.path(file_name)
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            self.error(_join(prefix, file_key), f"cannot read {path}: {exc.strerror or exc}")
            return None
        except UnicodeDecodeError:
            self.error(_join(prefix, file_key), f"{path} is not UTF-8 text")
            return None
        if not secret.strip():
            self.error(_join(prefix, file_key), f"{path} is empty")
            return None
        return secret


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _range_message(value: float, minimum: float, maximum: float | None) -> str:
    if maximum is None:
        return f"must be at least {minimum:g}, got {value:g}"
    return f"must be from {minimum:g} to {maximum:g}, got {value:g}"


# --- one function per table


def _device_id(reader: _Reader, data: dict[str, Any]) -> str | None:
    device_id = reader.string(data, "", "device_id", required="the id this device was enrolled with")
    if device_id is None:
        return None
    if any(char in device_id for char in "/+#"):
        reader.error("device_id", f"{device_id!r} must not contain '/', '+' or '#' (it names MQTT topics)")
    elif not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        reader.error(
            "device_id",
            f"{device_id!r} is not a valid device id: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters",
        )
    return device_id


def _broker(reader: _Reader, data: dict[str, Any]) -> BrokerConfig | None:
    table = reader.table(data, "broker")
    reader.check_keys(table, "broker", [f.name for f in fields(BrokerConfig)] + ["password_file"])
    url = reader.string(
        table, "broker", "url", required='the MQTT broker, e.g. "mqtts://fleet.example.com:8883"'
    )
    if url is not None:
        _check_broker_url(reader, url)
    kwargs: dict[str, Any] = {
        "username": reader.string(table, "broker", "username"),
        "password": reader.secret(table, "broker", "password"),
        "ca_file": reader.readable_file(table, "broker", "ca_file"),
        "topic_prefix": reader.string(table, "broker", "topic_prefix"),
        # MQTT carries keepalive in 16 bits and the session expiry interval in 32.
        "keepalive_s": reader.integer(table, "broker", "keepalive_s", minimum=1, maximum=65535),
        "session_expiry_s": reader.integer(table, "broker", "session_expiry_s", minimum=0, maximum=2**32 - 1),
    }
    if kwargs["password"] is not None and kwargs["username"] is None:
        reader.error("broker.password", "set broker.username too: MQTT sends a password only with a username")
    if kwargs["ca_file"] is not None and url is not None and urlsplit(url).scheme == "mqtt":
        reader.error("broker.ca_file", "only used with TLS: change broker.url to mqtts://")
    prefix = kwargs["topic_prefix"]
    if prefix is not None and (
        any(char in prefix for char in "+#") or prefix.startswith(("/", "$")) or prefix.endswith("/")
    ):
        reader.error(
            "broker.topic_prefix",
            f"{prefix!r} must not contain '+' or '#', start with '/' or '$', or end with '/' "
            f'(the default is "{DEFAULT_PREFIX}")',
        )
    if url is None:
        return None
    return BrokerConfig(url=url, **{key: value for key, value in kwargs.items() if value is not None})


def _check_broker_url(reader: _Reader, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        reader.error("broker.url", f"{url!r} must start with mqtt:// or mqtts:// (TLS)")
        return
    if not parts.hostname:
        reader.error("broker.url", f"{url!r} has no host, e.g. mqtts://fleet.example.com:8883")
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        reader.error("broker.url", f"{url!r} has a bad port: use 1 to 65535, or leave it out")
    if parts.username is not None or parts.password is not None:
        reader.error(
            "broker.url", "put credentials in broker.username and broker.password_file, not in the URL"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        reader.error("broker.url", f"{url!r} must be just scheme://host:port, without a path or query")


def _control_plane(reader: _Reader, data: dict[str, Any]) -> ControlPlaneConfig:
    table = reader.table(data, "control_plane")
    reader.check_keys(table, "control_plane", ["url", "token", "token_file", "ca_file"])
    url = reader.string(table, "control_plane", "url")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            reader.error(
                "control_plane.url", f"{url!r} must be an http(s) URL, e.g. https://fleet.example.com"
            )
    ca_file = reader.readable_file(table, "control_plane", "ca_file")
    if ca_file is not None and url is not None and urlsplit(url).scheme == "http":
        reader.error("control_plane.ca_file", "only used with TLS: change control_plane.url to https://")
    return ControlPlaneConfig(url=url, token=reader.secret(table, "control_plane", "token"), ca_file=ca_file)


def _trust(reader: _Reader, data: dict[str, Any]) -> TrustConfig:
    table = reader.table(data, "trust")
    if "public_keys" in table:
        reader.error(
            "trust.public_keys",
            "replaced by trust.root_keys: pin the fleet's ROOT public key(s) (`python -m agent.trustctl "
            "keygen` prints one); signing keys now come from the root-signed keyring (docs/security.md)",
        )
        return TrustConfig(root_keys=())
    reader.check_keys(table, "trust", ["root_keys", "root_threshold"])
    pin_advice = "pin the fleet's root public key (hex), from `manage.py trust status` or your offline root"
    if "root_keys" not in table:
        reader.error("trust.root_keys", f"required; {pin_advice}")
        return TrustConfig(root_keys=())
    keys = reader.strings(table, "trust", "root_keys")
    if keys is None:
        return TrustConfig(root_keys=())
    if not keys:
        reader.error("trust.root_keys", f"must list at least one key; {pin_advice}")
    for index, key in enumerate(keys):
        if not re.fullmatch(r"[0-9a-fA-F]{64}", key):
            reader.error(
                f"trust.root_keys[{index}]",
                f"{key!r} is not a raw Ed25519 public key: expected 64 hex characters, got {len(key)}"
                + ("" if re.fullmatch(r"[0-9a-fA-F]*", key) else " with non-hex characters"),
            )
            continue
        try:
            public_key_from_hex(key)
        except ValueError as exc:
            reader.error(f"trust.root_keys[{index}]", f"{key!r} does not decode as Ed25519: {exc}")
    if len({key.lower() for key in keys}) != len(keys):
        reader.error("trust.root_keys", "lists the same key twice; a threshold counts distinct keys")
    threshold = reader.integer(
        table, "trust", "root_threshold", minimum=1, maximum=max(1, len({key.lower() for key in keys}))
    )
    # Lower case, so that the same key written twice in different case compares equal.
    return TrustConfig(root_keys=tuple(key.lower() for key in keys), root_threshold=threshold or 1)


def _local_api(reader: _Reader, data: dict[str, Any]) -> LocalApiConfig:
    table = reader.table(data, "local_api")
    reader.check_keys(table, "local_api", [f.name for f in fields(LocalApiConfig)])
    kwargs: dict[str, Any] = {
        "max_body_bytes": reader.integer(table, "local_api", "max_body_bytes"),
        "allow_remote": reader.boolean(table, "local_api", "allow_remote"),
    }
    allowed_hosts = reader.strings(table, "local_api", "allowed_hosts")
    if allowed_hosts is not None:
        kwargs["allowed_hosts"] = tuple(host.lower() for host in allowed_hosts)
    bind = reader.string(table, "local_api", "bind")
    if bind is not None:
        try:
            unix_path = parse_bind(bind)[0]
        except ValueError as exc:
            reader.error("local_api.bind", f"{bind!r}: {exc}")
        else:
            if unix_path is not None:
                unix_path = reader.path(str(unix_path))
                bind = f"unix:{unix_path}"
                if len(str(unix_path).encode()) > UNIX_SOCKET_PATH_MAX:
                    reader.error(
                        "local_api.bind",
                        f"socket path is longer than {UNIX_SOCKET_PATH_MAX} bytes, which Linux refuses; "
                        "use a shorter one such as unix:/run/modelfleet/agent.sock",
                    )
            kwargs["bind"] = bind
            host = parse_bind(bind)[1]
            if host is not None and not is_loopback(host) and not kwargs["allow_remote"]:
                reader.error(
                    "local_api.bind",
                    f"{bind!r} is not a loopback address, so other hosts could call the agent; "
                    "bind 127.0.0.1 (or a unix socket), or set local_api.allow_remote = true",
                )
    return LocalApiConfig(**{key: value for key, value in kwargs.items() if value is not None})


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (brackets allowed)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _limits(reader: _Reader, data: dict[str, Any]) -> LimitsConfig:
    table = reader.table(data, "limits")
    known = fields(LimitsConfig)
    reader.check_keys(table, "limits", [f.name for f in known])
    kwargs: dict[str, Any] = {}
    for limit in known:
        # The default's type is the field's type: whole counts are ints, durations floats.
        if isinstance(limit.default, int):
            value: float | None = reader.integer(table, "limits", limit.name, minimum=1)
        else:
            value = reader.number(table, "limits", limit.name)
        if value is not None:
            kwargs[limit.name] = value
    limits = LimitsConfig(**kwargs)
    for kind in ("backoff", "reconnect"):
        initial, maximum = getattr(limits, f"{kind}_initial_s"), getattr(limits, f"{kind}_max_s")
        if maximum < initial:
            reader.error(
                f"limits.{kind}_max_s",
                f"{maximum:g} is less than limits.{kind}_initial_s ({initial:g}); it must be at least that",
            )
    return limits


def _device(reader: _Reader, data: dict[str, Any]) -> DeviceConfig:
    table = reader.table(data, "device")
    reader.check_keys(table, "device", [f.name for f in fields(DeviceConfig)])
    ops = reader.strings(table, "device", "unsupported_ops")
    kwargs: dict[str, Any] = {
        "hardware": reader.string(table, "device", "hardware"),
        "int8": reader.boolean(table, "device", "int8"),
        "unsupported_ops": tuple(op.upper() for op in ops) if ops is not None else None,
        "golden_tolerance": reader.number(
            table, "device", "golden_tolerance", minimum=0.0, maximum=1.0, positive=False
        ),
    }
    return DeviceConfig(**{key: value for key, value in kwargs.items() if value is not None})


TOP_LEVEL_KEYS = (
    "device_id",
    "state_dir",
    "telemetry_interval_s",
    "broker",
    "control_plane",
    "trust",
    "local_api",
    "limits",
    "device",
)


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None, path: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML, or raise :class:`ConfigError` with every problem.

    Relative paths (state_dir, *_file, a unix socket) resolve against ``base_dir``, or
    against the current directory when it is None.
    """
    reader = _Reader(base_dir)
    reader.check_keys(data, "", TOP_LEVEL_KEYS)
    device_id = _device_id(reader, data)
    state_dir_text = reader.string(
        data, "", "state_dir", required='where models and state live, e.g. "/var/lib/modelfleet"'
    )
    telemetry_interval_s = reader.number(data, "", "telemetry_interval_s")
    broker = _broker(reader, data)
    trust = _trust(reader, data)
    control_plane = _control_plane(reader, data)
    local_api = _local_api(reader, data)
    limits = _limits(reader, data)
    device = _device(reader, data)
    if reader.errors:
        raise ConfigError(reader.errors)
    assert device_id is not None and state_dir_text is not None and broker is not None  # else an error
    # Left out when absent, so the default stays written only in the dataclass.
    optional = {} if telemetry_interval_s is None else {"telemetry_interval_s": telemetry_interval_s}
    return Config(
        device_id=device_id,
        state_dir=reader.path(state_dir_text),
        broker=broker,
        trust=trust,
        control_plane=control_plane,
        local_api=local_api,
        limits=limits,
        device=device,
        path=path,
        **optional,
    )


def load_config(path: str | Path) -> Config:
    """Read and check a TOML config file; an unreadable file or bad TOML is a ConfigError too."""
    path = Path(path).absolute()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return parse_config(data, base_dir=path.parent, path=path)


def example_config() -> str:
    """The complete commented example; docs/agent.md and docker/systemd/ hold the same text."""
    return EXAMPLE_CONFIG


EXAMPLE_CONFIG = """\
# Modelfleet agent configuration: /etc/modelfleet/agent.toml
# (fleet-agent run --config /etc/modelfleet/agent.toml). docs/agent.md describes every key.
# The agent checks the whole file at start and reports every mistake at once.
# Relative paths are relative to the directory of this file.

# This device's id, as enrolled. It names the device's MQTT topics and is its broker
# username. Letters, digits, '.', '_' and '-'.
device_id = "cam-0042"

# Models, partial downloads and state.json live here. The systemd unit's
# StateDirectory=modelfleet creates it, owned by the agent's user.
state_dir = "/var/lib/modelfleet"

# Seconds between telemetry windows (inferences, latency, feedback, health).
telemetry_interval_s = 30.0

[broker]
# mqtts:// is TLS (default port 8883); plain mqtt:// (1883) only on a trusted network.
url = "mqtts://fleet.example.com:8883"
# One credential per device: the username is the device id.
username = "cam-0042"
# The broker password, read from a file the agent's user can read (trailing newline
# ignored). `password = "..."` works too, but not both.
# password_file = "/etc/modelfleet/mqtt-password"
# A private CA for the broker's certificate; without it the system's CAs are trusted.
# ca_file = "/etc/modelfleet/ca.pem"
topic_prefix = "fleet/v1"
keepalive_s = 30
# How long the broker keeps this device's session and queued messages while it is
# offline (seconds; 604800 = one week).
session_expiry_s = 604800

[control_plane]
# Base URL for `fleet-agent enroll` and for relative URLs in the desired state.
url = "https://fleet.example.com"
# The device's bearer token for manifest, blob and golden-set downloads.
# `token = "..."` works too, but not both.
# token_file = "/etc/modelfleet/device-token"
# A private CA for the control plane's HTTPS certificate; without it the system's CAs
# are trusted.
# ca_file = "/etc/modelfleet/ca.pem"

[trust]
# The fleet's ROOT public key(s), hex, kept offline by your operators
# (docs/security.md, "Keys and rotation"). The keys that sign desired states and
# manifests come from the keyring these root keys sign, so they rotate and are revoked
# over the air; the root itself moves on by a chain of root documents.
# REPLACE this placeholder: its private half was thrown away, so nothing verifies
# until you pin your own root key.
root_keys = [
    "37f5fe9076643c92283716f2c8f3a1f3eeb3fa22c0ac57f7c33bb98d1e4d015f",
]
# How many of root_keys must sign a root document (default 1).
# root_threshold = 1

[local_api]
# Where local apps call predict, feedback and health: "HOST:PORT" or
# "unix:/path/to.sock". It has no authentication: keep it on localhost or a socket.
bind = "127.0.0.1:8787"
# Larger request bodies are refused with 413.
max_body_bytes = 1048576

[limits]
# Artifacts (compressed blob or model) larger than this are refused (too_large).
max_artifact_bytes = 536870912
# Messages kept while the broker is unreachable. When full, the oldest is dropped
# and the number dropped is reported in telemetry.
offline_queue_messages = 10000
offline_queue_bytes = 8388608
# Per-request timeout and attempts for manifest, blob and golden-set downloads.
download_timeout_s = 30.0
download_attempts = 5
# Wait between download attempts: doubles from initial up to max, with jitter.
backoff_initial_s = 1.0
backoff_max_s = 60.0
# Wait between broker reconnects, the same way.
reconnect_initial_s = 1.0
reconnect_max_s = 60.0
# After a swap, how long requests still running on the old model may take.
drain_timeout_s = 30.0
# How many recent prediction ids are remembered for POST /v1/feedback.
recent_predictions = 10000
# Telemetry windows kept after sending, sent again when the control plane asks
# (after its broker restarted): 60 windows are 30 minutes at a 30 s interval.
replay_windows = 60

[device]
# This device's hardware class. A manifest lists the classes it runs on
# (requires.hardware); "any" there means every device.
hardware = "rpi4"
# Whether this device can run int8 (quantized) variants.
int8 = true
# TFLite builtin ops this device's runtime lacks, e.g. ["GELU"]; a model that uses one
# is refused (incompatible) before it is loaded.
unsupported_ops = []
# The largest accuracy drop on the golden set, compared with the figure the server
# measured, that still lets a candidate replace the live model (0.02 = 2 points).
golden_tolerance = 0.02
"""
