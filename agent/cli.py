"""`fleet-agent`: run the agent, show its status, verify an envelope, enroll the device."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from agent import __version__, protocol

EXIT_CONFIG = 2
LOG_FORMATS = ("plain", "json")


def _config(path: str):
    from agent.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"fleet-agent: {path} has {len(exc.errors)} problem(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  - {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from exc


def cmd_run(args: argparse.Namespace) -> int:
    from agent.core import Agent
    from agent.metrics import log_setup

    if args.log_format not in LOG_FORMATS:  # from $LOG_FORMAT, which argparse does not check
        print(f"fleet-agent: LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}", file=sys.stderr)
        return EXIT_CONFIG
    config = _config(args.config)
    log_setup(level=args.log_level, log_format=args.log_format, device_id=config.device_id)
    Agent(config).run_forever()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import requests

    from agent.localapi import unix_request
    from agent.store import Store

    config = _config(args.config)
    state = Store(config.state_dir).load_state()
    out: dict = {
        "device_id": config.device_id,
        "state_dir": str(config.state_dir),
        "applied_generation": state.applied_generation,
        "models": {
            name: {
                "active": e.active.key if e.active else None,
                "previous": e.previous.key if e.previous else None,
            }
            for name, e in state.models.items()
        },
    }
    api = config.local_api
    try:
        if api.unix_path is not None:
            status, body = unix_request(str(api.unix_path), "GET", "/v1/health")
            out["running"] = json.loads(body) if status == 200 else {"error": status}
        else:
            response = requests.get(f"http://{api.host}:{api.port}/v1/health", timeout=3)
            out["running"] = response.json()
    except (OSError, requests.RequestException) as exc:
        out["running"] = {"error": f"agent not reachable on its local API: {exc}"}
    print(json.dumps(out, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.trust import TrustStore

    if not args.config and not args.key:
        print("fleet-agent verify: give --config or at least one --key", file=sys.stderr)
        return EXIT_CONFIG
    data = Path(args.envelope).read_bytes()
    payload_type = (
        protocol.MANIFEST_PAYLOAD_TYPE if args.type == "manifest" else protocol.DESIRED_PAYLOAD_TYPE
    )
    try:
        if args.key:  # signing keys named on the command line
            payload = protocol.verify(data, payload_type=payload_type, keys=protocol.trusted_keys(args.key))
        else:  # the keyring this device verified and keeps in its state directory
            config = _config(args.config)
            store = TrustStore(
                root_keys=config.trust.root_keys,
                root_threshold=config.trust.root_threshold,
                state_dir=config.state_dir,
            )
            payload = store.verify(data, payload_type=payload_type)
        document = protocol.parse(args.type, payload)
    except (protocol.EnvelopeError, protocol.SchemaError) as exc:
        print(f"REFUSED ({getattr(exc, 'reason', 'schema')}): {exc}", file=sys.stderr)
        return 1
    print(f"OK: signed {args.type}, payload sha256 {hashlib.sha256(payload).hexdigest()}")
    if args.blob:
        blob = Path(args.blob).read_bytes()
        expected = document["blob"]
        if len(blob) != expected["size"] or hashlib.sha256(blob).hexdigest() != expected["sha256"]:
            print(
                f"REFUSED (hash_mismatch): {args.blob} is not the blob this manifest names", file=sys.stderr
            )
            return 1
        print(f"OK: {args.blob} matches the manifest (sha256 {expected['sha256']}, {expected['size']} bytes)")
    if args.show:
        print(json.dumps(document, indent=2))
    return 0


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def enrollment_config(
    *,
    answer: dict,
    url: str,
    root_keys: list[str],
    state_dir: str,
    local_api: str,
    hardware: str,
    int8: bool,
    telemetry_interval_s: float = 30.0,
    broker_ca_file: str | None = None,
    ca_file: str | None = None,
) -> str:
    """The agent config for an enrolled device. The root keys and CA files come from the
    command line (provisioned out of band), never from the control plane's answer."""
    mqtt = answer["mqtt"]
    keys = ", ".join(_toml_string(key) for key in root_keys)
    broker_ca = f"ca_file = {_toml_string(broker_ca_file)}\n" if broker_ca_file else ""
    control_plane_ca = f"ca_file = {_toml_string(ca_file)}\n" if ca_file else ""
    return (
        "# Written by `fleet-agent enroll`. Holds secrets: keep it mode 0600.\n"
        f"device_id = {_toml_string(answer['device_id'])}\n"
        f"state_dir = {_toml_string(state_dir)}\n"
        f"telemetry_interval_s = {telemetry_interval_s}\n\n"
        f"[broker]\nurl = {_toml_string(mqtt['url'])}\nusername = {_toml_string(mqtt['username'])}\n"
        f"password = {_toml_string(mqtt['password'])}\n"
        f"topic_prefix = {_toml_string(mqtt['topic_prefix'])}\n{broker_ca}\n"
        f"[control_plane]\nurl = {_toml_string(url)}\ntoken = {_toml_string(answer['token'])}\n"
        f"{control_plane_ca}\n"
        f"[trust]\nroot_keys = [{keys}]\n\n"
        f"[local_api]\nbind = {_toml_string(local_api)}\n\n"
        f"[device]\nhardware = {_toml_string(hardware)}\nint8 = {'true' if int8 else 'false'}\n"
    )


def cmd_enroll(args: argparse.Namespace) -> int:
    import os
    import tomllib

    import requests

    from agent.config import ConfigError, parse_config
    from agent.runtime import runtime

    out = Path(args.config_out)
    if out.exists() and not args.force:
        print(f"fleet-agent enroll: {out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_CONFIG
    rt = runtime()
    body = {
        "device_id": args.device_id,
        "identity": {
            "display_name": args.display_name or args.device_id,
            "hardware": args.hardware,
            "runtime": rt.name,
            "runtime_version": rt.version,
            "agent_version": __version__,
            "supports_int8": not args.no_int8,
        },
        **({"enrollment_token": args.token} if args.token else {"enrollment_code": args.code}),
    }
    try:
        response = requests.post(
            f"{args.url.rstrip('/')}/api/v1/enroll", json=body, timeout=30, verify=args.ca_file or True
        )
    except requests.RequestException as exc:
        print(f"fleet-agent enroll: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 201:
        try:
            error = response.json()["error"]
            print(f"fleet-agent enroll: refused ({error['code']}): {error['message']}", file=sys.stderr)
        except (ValueError, KeyError):
            print(f"fleet-agent enroll: HTTP {response.status_code}: {response.text[:500]}", file=sys.stderr)
        return 1
    answer = response.json()
    text = enrollment_config(
        answer=answer,
        url=args.url,
        root_keys=args.root_key,
        state_dir=args.state_dir,
        local_api=args.local_api,
        hardware=args.hardware,
        int8=not args.no_int8,
        telemetry_interval_s=args.telemetry_interval,
        broker_ca_file=args.broker_ca_file and str(Path(args.broker_ca_file).absolute()),
        ca_file=args.ca_file and str(Path(args.ca_file).absolute()),
    )
    try:
        parse_config(tomllib.loads(text), base_dir=out.parent)
    except ConfigError as exc:  # e.g. a malformed --root-key: say so before writing
        print(f"fleet-agent enroll: the resulting config is invalid:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    state = answer["status"]
    print(f"enrolled {answer['device_id']} ({state}); config written to {out}")
    if state != "active":
        print("an operator must approve this device before it can connect to the broker")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-agent", description="Modelfleet device agent.")
    parser.add_argument("--version", action="version", version=f"fleet-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent in the foreground (systemd Type=notify)")
    run.add_argument("--config", required=True, help="TOML config file, e.g. /etc/modelfleet/agent.toml")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument(
        "--log-format",
        default=os.environ.get("LOG_FORMAT", "plain"),
        choices=LOG_FORMATS,
        help="plain text or one JSON object a line (default: $LOG_FORMAT, else plain)",
    )
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="show the applied state and, if running, live health")
    status.add_argument("--config", required=True)
    status.set_defaults(func=cmd_status)

    verify = commands.add_parser("verify", help="verify a signed manifest or desired-state envelope")
    verify.add_argument("envelope", help="file holding the DSSE envelope (JSON)")
    verify.add_argument(
        "--config", help="verify with the keyring this device holds (its config and state directory)"
    )
    verify.add_argument(
        "--key", action="append", help="verify with this signing public key (64 hex chars); repeatable"
    )
    verify.add_argument("--type", choices=["manifest", "desired"], default="manifest")
    verify.add_argument("--blob", help="also check that this .zst blob is the one the manifest names")
    verify.add_argument("--show", action="store_true", help="print the verified document")
    verify.set_defaults(func=cmd_verify)

    enroll = commands.add_parser(
        "enroll", help="enroll this device with the control plane and write its config (docs/enrollment.md)"
    )
    enroll.add_argument("--url", required=True, help="the control plane, e.g. https://fleet.example.com")
    enroll.add_argument("--device-id", required=True)
    secret = enroll.add_mutually_exclusive_group(required=True)
    secret.add_argument("--token", help="a fleet enrollment token (me_…)")
    secret.add_argument("--code", help="this device's pre-authorization code (mc_…)")
    enroll.add_argument(
        "--root-key",
        action="append",
        required=True,
        help="the fleet's root public key (64 hex chars), from your operators' offline root "
        "(`manage.py trust status` prints it); repeatable",
    )
    enroll.add_argument("--config-out", default="/etc/modelfleet/agent.toml")
    enroll.add_argument("--state-dir", default="/var/lib/modelfleet")
    enroll.add_argument(
        "--local-api", default="127.0.0.1:8787", help="local API bind, HOST:PORT or unix:PATH"
    )
    enroll.add_argument("--hardware", default="any", help="hardware class, e.g. rpi4")
    enroll.add_argument("--display-name")
    enroll.add_argument("--no-int8", action="store_true", help="this device cannot run int8 models")
    enroll.add_argument(
        "--telemetry-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="telemetry window length in the written config (default 30)",
    )
    enroll.add_argument(
        "--broker-ca-file",
        metavar="PATH",
        help="CA that signed the broker's TLS certificate (broker.ca_file); default: the system's CAs",
    )
    enroll.add_argument(
        "--ca-file",
        metavar="PATH",
        help="CA that signed the control plane's HTTPS certificate, for enrolling and downloads "
        "(control_plane.ca_file); default: the system's CAs",
    )
    enroll.add_argument("--force", action="store_true", help="replace an existing config file")
    enroll.set_defaults(func=cmd_enroll)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
