"""The agent's configuration (agent/config.py): every mistake is reported at once."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    BrokerConfig,
    Config,
    ConfigError,
    DeviceConfig,
    LimitsConfig,
    LocalApiConfig,
    TrustConfig,
    example_config,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"  # test vector's public key
MINIMAL = {
    "device_id": "cam-0042",
    "state_dir": "/var/lib/modelfleet",
    "broker": {"url": "mqtt://broker.local"},
    "trust": {"root_keys": [KEY]},
}


def config(**tables: Any) -> dict[str, Any]:
    """MINIMAL with some keys replaced; ``broker={"keepalive_s": 5}`` merges into the table."""
    data = copy.deepcopy(MINIMAL)
    for key, value in tables.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def errors_of(data: dict[str, Any], **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, **kwargs)
    return caught.value.errors


def the_error(data: dict[str, Any], key: str) -> str:
    """The one error ``data`` causes, which must be about ``key``."""
    errors = errors_of(data)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{key}: "), errors
    return errors[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the example and its copies


def test_the_example_parses():
    parsed = parse_config(tomllib.loads(example_config()))

    assert parsed.device_id == "cam-0042"
    assert parsed.broker.tls and parsed.broker.port == 8883
    assert len(parsed.trust.root_keys) == 1


def test_the_example_file_in_docker_systemd_is_the_same_text():
    assert (ROOT / "docker/systemd/agent.toml.example").read_text() == example_config()


def test_the_example_in_the_docs_is_the_same_text():
    assert example_config() in (ROOT / "docs/agent.md").read_text()


def test_the_example_sets_every_key_with_its_default_where_it_has_one():
    """So the example documents the defaults truthfully."""
    example = tomllib.loads(example_config())

    for table, dataclass_default in (("limits", LimitsConfig()), ("local_api", LocalApiConfig())):
        for key, value in example[table].items():
            assert getattr(dataclass_default, key) == value, (table, key)
    assert example["broker"]["keepalive_s"] == BrokerConfig("mqtt://x").keepalive_s
    assert example["broker"]["session_expiry_s"] == BrokerConfig("mqtt://x").session_expiry_s


# --- all errors at once


def test_three_mistakes_in_a_file_are_reported_together(tmp_path):
    path = write(
        tmp_path / "agent.toml",
        f"""
device_id = "cam/0042"
state_dir = "state"

[broker]
url = "mqtt://broker.local"
keepalive = 30

[trust]
root_keys = ["{KEY[:-1]}x"]
""",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    errors = caught.value.errors
    assert len(errors) == 3, errors
    assert any(e.startswith("device_id: ") and "'/'" in e for e in errors)
    assert any(e.startswith("broker.keepalive: unknown key, did you mean 'keepalive_s'?") for e in errors)
    assert any(e.startswith("trust.root_keys[0]: ") and "non-hex" in e for e in errors)


def test_config_error_prints_one_error_per_line():
    error = ConfigError(["a: one", "b: two"])

    assert str(error) == "a: one\nb: two"
    assert error.errors == ["a: one", "b: two"]


def test_missing_required_keys_are_each_reported():
    errors = errors_of({})

    assert [e.split(":")[0] for e in errors] == ["device_id", "state_dir", "broker.url", "trust.root_keys"]
    assert "manage.py trust status" in errors[3]


# --- defaults


def test_defaults_are_what_the_dataclasses_say():
    parsed = parse_config(copy.deepcopy(MINIMAL))

    assert parsed == Config(
        device_id="cam-0042",
        state_dir=Path("/var/lib/modelfleet"),
        broker=BrokerConfig(url="mqtt://broker.local"),
        trust=TrustConfig(root_keys=(KEY,)),
    )
    assert parsed.broker.topic_prefix == "fleet/v1"
    assert parsed.broker.keepalive_s == 30
    assert parsed.broker.session_expiry_s == 604800
    assert parsed.broker.username is None and parsed.broker.password is None and parsed.broker.ca_file is None
    assert parsed.control_plane.url is None and parsed.control_plane.token is None
    assert parsed.local_api.bind == "127.0.0.1:8787"
    assert parsed.local_api.max_body_bytes == 1_048_576
    assert parsed.telemetry_interval_s == 30.0
    assert parsed.limits == LimitsConfig()
    assert parsed.limits.max_artifact_bytes == 512 * 1024 * 1024
    assert parsed.limits.recent_predictions == 10_000
    assert parsed.device == DeviceConfig(hardware="any", int8=True, unsupported_ops=(), golden_tolerance=0.02)
    assert parsed.path is None


def test_every_value_given_is_used():
    parsed = parse_config(
        config(
            telemetry_interval_s=10,
            broker={"username": "cam-0042", "password": "s3cret", "topic_prefix": "acme/fleet"},
            control_plane={"url": "https://fleet.example.com", "token": "tok"},
            local_api={"bind": "unix:/run/modelfleet/agent.sock", "max_body_bytes": 4096},
            limits={"download_attempts": 2, "backoff_max_s": 5},
            device={
                "hardware": "jetson-nano",
                "int8": False,
                "unsupported_ops": ["gelu"],
                "golden_tolerance": 0,
            },
        )
    )

    assert parsed.telemetry_interval_s == 10.0
    assert (parsed.broker.username, parsed.broker.password, parsed.broker.topic_prefix) == (
        "cam-0042",
        "s3cret",
        "acme/fleet",
    )
    assert (parsed.control_plane.url, parsed.control_plane.token) == ("https://fleet.example.com", "tok")
    assert parsed.local_api.unix_path == Path("/run/modelfleet/agent.sock")
    assert parsed.local_api.max_body_bytes == 4096
    assert (parsed.limits.download_attempts, parsed.limits.backoff_max_s) == (2, 5.0)
    assert isinstance(parsed.limits.backoff_max_s, float)
    # Op names are compared with the manifest's, which TFLite spells in upper case.
    assert parsed.device == DeviceConfig("jetson-nano", False, ("GELU",), 0.0)


# --- unknown keys


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"device": {"hardwre": "rpi4"}}, "device.hardwre", "hardware"),
        ({"limits": {"max_artifact_byte": 1}}, "limits.max_artifact_byte", "max_artifact_bytes"),
        ({"broker": {"passwrod": "x"}}, "broker.passwrod", "password"),
        ({"control_plane": {"token_fil": "x"}}, "control_plane.token_fil", "token_file"),
        ({"trust": {"root_key": [KEY]}}, "trust.root_key", "root_keys"),
        ({"local_api": {"bnd": "x"}}, "local_api.bnd", "bind"),
        ({"devce": {}}, "devce", "device"),
        ({"telemetry_interval": 5}, "telemetry_interval", "telemetry_interval_s"),
    ],
)
def test_an_unknown_key_suggests_the_closest_known_one(data, key, suggestion):
    assert the_error(config(**data), key) == f"{key}: unknown key, did you mean {suggestion!r}?"


def test_an_unknown_key_with_no_close_match_lists_the_known_ones():
    error = the_error(config(device={"gpu": True}), "device.gpu")

    assert "known keys: hardware, int8, unsupported_ops, golden_tolerance" in error


# --- types


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"limits": {"download_attempts": True}}, "limits.download_attempts", "expected an integer"),
        ({"broker": {"keepalive_s": False}}, "broker.keepalive_s", "expected an integer"),
        ({"local_api": {"max_body_bytes": True}}, "local_api.max_body_bytes", "expected an integer"),
        ({"telemetry_interval_s": True}, "telemetry_interval_s", "expected a number"),
        ({"device": {"golden_tolerance": True}}, "device.golden_tolerance", "expected a number"),
    ],
)
def test_a_boolean_is_not_a_number(data, key, expected):
    error = the_error(config(**data), key)

    assert expected in error and "a boolean" in error


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"device_id": 42}, "device_id", "expected a string, got an integer (42)"),
        ({"state_dir": ["a"]}, "state_dir", "expected a string, got an array"),
        ({"broker": {"url": 1883}}, "broker.url", "expected a string"),
        (
            {"limits": {"max_artifact_bytes": 1.5}},
            "limits.max_artifact_bytes",
            "expected an integer, got a float",
        ),
        (
            {"limits": {"download_timeout_s": "30"}},
            "limits.download_timeout_s",
            "expected a number, got a string",
        ),
        ({"device": {"int8": "yes"}}, "device.int8", "expected true or false"),
        ({"device": {"unsupported_ops": "GELU"}}, "device.unsupported_ops", "expected an array of strings"),
        (
            {"device": {"unsupported_ops": ["GELU", 3]}},
            "device.unsupported_ops[1]",
            "expected a non-empty string",
        ),
        ({"trust": {"root_keys": KEY}}, "trust.root_keys", "expected an array of strings"),
        ({"control_plane": "https://x"}, "control_plane", "must be a table"),
        ({"device_id": ""}, "device_id", "must not be empty"),
    ],
)
def test_a_value_of_the_wrong_type_is_reported(data, key, expected):
    assert expected in the_error(config(**data), key)


def test_a_toml_date_is_named_in_the_error(tmp_path):
    path = write(tmp_path / "agent.toml", 'device_id = 2026-11-28\nstate_dir = "s"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "device_id: expected a string, got a date/time (2026-11-28)" in caught.value.errors


# --- device_id


@pytest.mark.parametrize("device_id", ["cam/0042", "cam+", "#", "fleet/v1/#"])
def test_a_device_id_must_not_contain_topic_characters(device_id):
    assert "must not contain '/', '+' or '#'" in the_error(config(device_id=device_id), "device_id")


@pytest.mark.parametrize("device_id", ["-cam", "cam 1", "cam\n", "kamera-ü", "a" * 129])
def test_a_device_id_must_match_the_contract_pattern(device_id):
    assert "not a valid device id" in the_error(config(device_id=device_id), "device_id")


@pytest.mark.parametrize("device_id", ["a", "Cam_0042.lab-1", "a" * 128])
def test_a_device_id_within_the_pattern_is_accepted(device_id):
    assert parse_config(config(device_id=device_id)).device_id == device_id


# --- broker


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker.local", "broker.local", 1883, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("mqtts://broker.local:9883", "broker.local", 9883, True),
        ("mqtt://[::1]:1884/", "::1", 1884, False),
    ],
)
def test_the_broker_url_gives_host_port_and_tls(url, host, port, tls):
    broker = parse_config(config(broker={"url": url})).broker

    assert (broker.host, broker.port, broker.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://broker.local", "must start with mqtt:// or mqtts://"),
        ("tcp://broker.local:1883", "must start with mqtt:// or mqtts://"),
        ("broker.local:1883", "must start with mqtt:// or mqtts://"),
        ("mqtt://", "has no host"),
        ("mqtt://broker.local:0", "bad port"),
        ("mqtt://broker.local:70000", "bad port"),
        ("mqtt://broker.local:mqtt", "bad port"),
        ("mqtt://cam:secret@broker.local", "put credentials in broker.username"),
        ("mqtt://broker.local/fleet", "without a path"),
    ],
)
def test_a_bad_broker_url_is_reported(url, expected):
    assert expected in the_error(config(broker={"url": url}), "broker.url")


@pytest.mark.parametrize(("keepalive", "ok"), [(1, True), (65535, True), (0, False), (65536, False)])
def test_the_keepalive_must_fit_in_mqtt(keepalive, ok):
    data = config(broker={"keepalive_s": keepalive})
    if ok:
        assert parse_config(data).broker.keepalive_s == keepalive
    else:
        assert "must be from 1 to 65535" in the_error(data, "broker.keepalive_s")


def test_a_session_expiry_of_zero_is_allowed_but_not_a_negative_one():
    assert parse_config(config(broker={"session_expiry_s": 0})).broker.session_expiry_s == 0
    the_error(config(broker={"session_expiry_s": -1}), "broker.session_expiry_s")


@pytest.mark.parametrize("prefix", ["fleet/+", "fleet/#", "/fleet", "fleet/", "$SYS", ""])
def test_a_topic_prefix_that_would_break_topics_is_refused(prefix):
    the_error(config(broker={"topic_prefix": prefix}), "broker.topic_prefix")


def test_a_password_without_a_username_is_an_error():
    assert "set broker.username too" in the_error(config(broker={"password": "x"}), "broker.password")


# --- secrets and files


def test_a_password_file_is_read_without_its_trailing_newline(tmp_path):
    write(tmp_path / "mqtt-password", "s3cret pass\n")
    write(
        tmp_path / "agent.toml",
        f'device_id = "cam-0042"\nstate_dir = "state"\n'
        f'[broker]\nurl = "mqtts://b"\nusername = "cam-0042"\npassword_file = "mqtt-password"\n'
        f'[trust]\nroot_keys = ["{KEY}"]\n',
    )

    assert load_config(tmp_path / "agent.toml").broker.password == "s3cret pass"


def test_a_token_file_is_read_and_a_windows_line_ending_is_stripped_too(tmp_path):
    token_file = write(tmp_path / "device-token", "mf_dev_abc\r\n")

    parsed = parse_config(config(control_plane={"token_file": str(token_file)}))

    assert parsed.control_plane.token == "mf_dev_abc"


@pytest.mark.parametrize(("table", "key"), [("broker", "password"), ("control_plane", "token")])
def test_a_secret_and_its_file_together_is_an_error(tmp_path, table, key):
    secret_file = write(tmp_path / "secret", "x\n")
    data = config(broker={"username": "u"})
    data.setdefault(table, {}).update({key: "inline", f"{key}_file": str(secret_file)})

    error = the_error(data, f"{table}.{key}_file")

    assert f"set either {table}.{key} or {table}.{key}_file, not both" in error


@pytest.mark.parametrize(("table", "key"), [("broker", "password"), ("control_plane", "token")])
def test_a_secret_file_that_cannot_be_read_is_an_error(tmp_path, table, key):
    data = config(broker={"username": "u"})
    data.setdefault(table, {})[f"{key}_file"] = "missing"

    errors = errors_of(data, base_dir=tmp_path)

    assert len(errors) == 1
    assert errors[0].startswith(f"{table}.{key}_file: cannot read {tmp_path / 'missing'}")


def test_an_empty_secret_file_is_an_error(tmp_path):
    write(tmp_path / "token", "\n")

    errors = errors_of(config(control_plane={"token_file": "token"}), base_dir=tmp_path)

    assert errors == [f"control_plane.token_file: {tmp_path / 'token'} is empty"]


def test_a_directory_given_as_a_ca_file_is_an_error(tmp_path):
    data = config(broker={"url": "mqtts://b", "ca_file": str(tmp_path)})

    assert "cannot read" in the_error(data, "broker.ca_file")


def test_a_ca_file_is_resolved_and_checked(tmp_path):
    write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")

    parsed = parse_config(config(broker={"url": "mqtts://b", "ca_file": "ca.pem"}), base_dir=tmp_path)

    assert parsed.broker.ca_file == tmp_path / "ca.pem"


def test_a_ca_file_with_plain_mqtt_is_an_error(tmp_path):
    ca = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")

    assert "mqtts://" in the_error(config(broker={"ca_file": str(ca)}), "broker.ca_file")


def test_a_control_plane_ca_file_is_resolved_and_checked(tmp_path):
    write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    https = {"url": "https://fleet.example.com", "ca_file": "ca.pem"}

    parsed = parse_config(config(control_plane=https), base_dir=tmp_path)

    assert parsed.control_plane.ca_file == tmp_path / "ca.pem"
    missing = config(control_plane={**https, "ca_file": str(tmp_path / "missing.pem")})
    assert "cannot read" in the_error(missing, "control_plane.ca_file")


def test_a_control_plane_ca_file_with_plain_http_is_an_error(tmp_path):
    ca = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    data = config(control_plane={"url": "http://fleet.example.com", "ca_file": str(ca)})

    assert "https://" in the_error(data, "control_plane.ca_file")


def test_a_relative_state_dir_resolves_against_the_config_files_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "etc").mkdir()
    path = write(
        tmp_path / "etc" / "agent.toml",
        f'device_id = "cam-0042"\nstate_dir = "../state"\n[broker]\nurl = "mqtt://b"\n'
        f'[trust]\nroot_keys = ["{KEY}"]\n',
    )

    parsed = load_config(path)

    assert parsed.state_dir == tmp_path / "etc" / ".." / "state"
    assert parsed.path == path


# --- trust


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (KEY[:-2], "expected 64 hex characters, got 62"),
        (KEY + "00", "expected 64 hex characters, got 66"),
        ("g" * 64, "with non-hex characters"),
        (KEY[:-1] + " ", "with non-hex characters"),
        ("MCowBQYDK2VwAyEAA6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHd2GZBJVMbg=", "non-hex"),
    ],
)
def test_a_public_key_must_be_64_hex_characters(key, expected):
    error = the_error(config(trust={"root_keys": [KEY, key]}), "trust.root_keys[1]")

    assert expected in error


def test_at_least_one_public_key_is_required():
    assert "at least one key" in the_error(config(trust={"root_keys": []}), "trust.root_keys")


def test_root_keys_are_kept_in_lower_case_and_decode_as_ed25519():
    from agent.protocol import trusted_keys

    parsed = parse_config(config(trust={"root_keys": [KEY.upper()]}))

    assert parsed.trust.root_keys == (KEY,)
    assert parsed.trust.root_threshold == 1
    assert len(trusted_keys(list(parsed.trust.root_keys))) == 1


def test_the_old_public_keys_setting_says_what_replaced_it():
    error = the_error(config(trust={"public_keys": [KEY]}), "trust.public_keys")
    assert "root_keys" in error and "keyring" in error


def test_the_same_root_key_twice_is_refused_whatever_its_case():
    error = the_error(config(trust={"root_keys": [KEY, KEY.upper()]}), "trust.root_keys")
    assert "twice" in error


def test_a_root_threshold_above_the_number_of_root_keys_is_refused():
    error = the_error(config(trust={"root_keys": [KEY], "root_threshold": 2}), "trust.root_threshold")
    assert "1" in error


# --- local API


@pytest.mark.parametrize(
    ("bind", "unix_path", "host", "port"),
    [
        ("127.0.0.1:8787", None, "127.0.0.1", 8787),
        ("localhost:0", None, "localhost", 0),
        ("[::1]:8787", None, "::1", 8787),
        ("unix:/run/modelfleet/agent.sock", Path("/run/modelfleet/agent.sock"), None, None),
    ],
)
def test_the_local_api_binds_to_a_host_and_port_or_a_unix_socket(bind, unix_path, host, port):
    local_api = parse_config(config(local_api={"bind": bind})).local_api

    assert (local_api.unix_path, local_api.host, local_api.port) == (unix_path, host, port)


def test_a_relative_unix_socket_resolves_against_the_config_directory(tmp_path):
    local_api = parse_config(config(local_api={"bind": "unix:agent.sock"}), base_dir=tmp_path).local_api

    assert local_api.bind == f"unix:{tmp_path / 'agent.sock'}"
    assert local_api.unix_path == tmp_path / "agent.sock"


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("8787", 'expected "HOST:PORT"'),
        ("localhost", 'expected "HOST:PORT"'),
        (":8787", "the host is missing"),
        ("127.0.0.1:99999", "from 0 to 65535"),
        ("127.0.0.1:http", "from 0 to 65535"),
        ("127.0.0.1:-1", "from 0 to 65535"),
        ("::1:8787", "IPv6 address in brackets"),
        ("unix:", "needs a path"),
        ("unix:/" + "s" * 120, "longer than 107 bytes"),
    ],
)
def test_a_bad_local_api_bind_is_reported(bind, expected):
    assert expected in the_error(config(local_api={"bind": bind}), "local_api.bind")


# --- numbers


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"telemetry_interval_s": 0}, "telemetry_interval_s"),
        ({"telemetry_interval_s": -5.0}, "telemetry_interval_s"),
        ({"local_api": {"max_body_bytes": 0}}, "local_api.max_body_bytes"),
        ({"limits": {"max_artifact_bytes": 0}}, "limits.max_artifact_bytes"),
        ({"limits": {"offline_queue_messages": -1}}, "limits.offline_queue_messages"),
        ({"limits": {"offline_queue_bytes": 0}}, "limits.offline_queue_bytes"),
        ({"limits": {"download_timeout_s": 0.0}}, "limits.download_timeout_s"),
        ({"limits": {"download_attempts": 0}}, "limits.download_attempts"),
        ({"limits": {"reconnect_initial_s": -1}}, "limits.reconnect_initial_s"),
        ({"limits": {"drain_timeout_s": 0}}, "limits.drain_timeout_s"),
        ({"limits": {"recent_predictions": 0}}, "limits.recent_predictions"),
        ({"limits": {"download_timeout_s": float("nan")}}, "limits.download_timeout_s"),
    ],
)
def test_counts_sizes_and_durations_must_be_positive(data, key):
    the_error(config(**data), key)


@pytest.mark.parametrize("kind", ["backoff", "reconnect"])
def test_a_retry_maximum_below_its_initial_wait_is_an_error(kind):
    data = config(limits={f"{kind}_initial_s": 10, f"{kind}_max_s": 2})

    assert f"less than limits.{kind}_initial_s" in the_error(data, f"limits.{kind}_max_s")


@pytest.mark.parametrize(
    ("tolerance", "ok"), [(0, True), (0.5, True), (1, True), (-0.01, False), (1.5, False)]
)
def test_the_golden_tolerance_is_between_zero_and_one(tolerance, ok):
    data = config(device={"golden_tolerance": tolerance})
    if ok:
        assert parse_config(data).device.golden_tolerance == tolerance
    else:
        assert "must be from 0 to 1" in the_error(data, "device.golden_tolerance")


# --- control plane


@pytest.mark.parametrize("url", ["fleet.example.com", "ftp://fleet.example.com", "https://"])
def test_the_control_plane_url_must_be_http_or_https(url):
    assert "http(s) URL" in the_error(config(control_plane={"url": url}), "control_plane.url")


# --- the file itself


def test_a_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")

    assert caught.value.errors == [
        f"{tmp_path / 'nope.toml'}: cannot read the config file: No such file or directory"
    ]


def test_bad_toml_is_a_config_error(tmp_path):
    path = write(tmp_path / "agent.toml", 'device_id = "cam\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.errors[0].startswith(f"{path}: not valid TOML: ")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b'device_id = "cam-\xff"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.errors[0].startswith(f"{path}: not")


def test_the_status_carries_what_the_device_table_declares():
    from agent.mqtt import MqttLink
    from agent.runtime import runtime

    declared = parse_config(config(device={"hardware": "jetson", "int8": False, "unsupported_ops": ["gelu"]}))
    link = MqttLink(declared, on_desired=lambda envelope: None)
    status = protocol_status(link)
    assert status["capabilities"] == {
        "hardware": "jetson",
        "int8": False,
        "unsupported_ops": ["GELU"],
        "runtime": runtime().name,
        "runtime_version": runtime().version,
    }


def protocol_status(link) -> dict[str, Any]:
    import json

    from agent import protocol

    return protocol.validate("status", json.loads(link._status(True)))
