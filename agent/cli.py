"""`fleet-agent`: run the agent, show its status, verify an envelope, enroll the device."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from agent import __version__, protocol

EXIT_CONFIG = 2


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

    config = _config(args.config)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
    keys_hex = list(args.key or [])
    if args.config:
        keys_hex += list(_config(args.config).trusted_keys)
    if not keys_hex:
        print("fleet-agent verify: give --config or at least one --key", file=sys.stderr)
        return EXIT_CONFIG
    data = Path(args.envelope).read_bytes()
    payload_type = (
        protocol.MANIFEST_PAYLOAD_TYPE if args.type == "manifest" else protocol.DESIRED_PAYLOAD_TYPE
    )
    try:
        payload = protocol.verify(data, payload_type=payload_type, keys=protocol.trusted_keys(keys_hex))
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


def cmd_enroll(args: argparse.Namespace) -> int:
    print(
        "fleet-agent enroll: enrollment needs the control plane's enrollment API, which lands "
        "with the devices issue. Until then put broker credentials and the device token in the "
        "config file by hand (docs/agent.md).",
        file=sys.stderr,
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-agent", description="Modelfleet device agent.")
    parser.add_argument("--version", action="version", version=f"fleet-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent in the foreground (systemd Type=notify)")
    run.add_argument("--config", required=True, help="TOML config file, e.g. /etc/modelfleet/agent.toml")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="show the applied state and, if running, live health")
    status.add_argument("--config", required=True)
    status.set_defaults(func=cmd_status)

    verify = commands.add_parser("verify", help="verify a signed manifest or desired-state envelope")
    verify.add_argument("envelope", help="file holding the DSSE envelope (JSON)")
    verify.add_argument("--config", help="take trusted keys from this agent config")
    verify.add_argument("--key", action="append", help="a trusted public key (64 hex chars); repeatable")
    verify.add_argument("--type", choices=["manifest", "desired"], default="manifest")
    verify.add_argument("--blob", help="also check that this .zst blob is the one the manifest names")
    verify.add_argument("--show", action="store_true", help="print the verified document")
    verify.set_defaults(func=cmd_verify)

    enroll = commands.add_parser("enroll", help="enroll this device with the control plane")
    enroll.add_argument("--config", required=False)
    enroll.set_defaults(func=cmd_enroll)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
