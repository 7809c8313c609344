"""Offline root-of-trust tool (docs/security.md, "Keys and rotation").

Run it on the machine that holds the fleet's root key(s), which never needs the control
plane, Django or a network:

    python -m agent.trustctl keygen root-a.pem            # prints the public key to pin
    python -m agent.trustctl root --key root-a.pem --out root-1.json
    python -m agent.trustctl sign-keyring draft.json --key root-a.pem --out keyring-2.json
    python -m agent.trustctl root --previous root-1.json --previous-key root-a.pem \\
        --key root-b.pem --out root-2.json                # move the root to a new key
    python -m agent.trustctl show keyring-2.json

`manage.py trust draft-keyring` writes the draft on the control plane; the signed files go
back with `manage.py trust upload FILE`. Private keys are PKCS#8 PEM files (the format
`openssl genpkey -algorithm ed25519` writes), created mode 0600.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.protocol import dsse, schemas, trust

ROOT_EXPIRY_DAYS = 3650
KEYRING_EXPIRY_DAYS = 365


def generate_key_file(path: Path) -> str:
    """A new Ed25519 private key in ``path`` (refuses to overwrite); returns the public hex."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return dsse.public_key_bytes(key.public_key()).hex()


def load_key_file(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def make_root(
    *,
    keys: Sequence[Any],
    threshold: int = 1,
    version: int = 1,
    previous_keys: Sequence[Any] = (),
    expires_at: datetime | None = None,
) -> bytes:
    """A root document signed by its own keys and, for version > 1, by the previous
    root's keys (the chain step devices follow)."""
    payload = trust.build_root(
        version=version,
        public_keys=[dsse.public_key_of(key) for key in keys],
        threshold=threshold,
        expires_at=expires_at or datetime.now(UTC) + timedelta(days=ROOT_EXPIRY_DAYS),
    )
    return trust.sign_document(
        payload, payload_type=dsse.ROOT_PAYLOAD_TYPE, private_keys=[*previous_keys, *keys]
    )


def make_keyring(
    *,
    root_keys: Sequence[Any],
    version: int,
    signing_keys: Sequence[Any],
    revoked: Sequence[str] = (),
    expires_at: datetime | None = None,
) -> bytes:
    """A keyring naming ``signing_keys`` (public keys), signed by ``root_keys``."""
    payload = trust.build_keyring(
        version=version,
        expires_at=expires_at or datetime.now(UTC) + timedelta(days=KEYRING_EXPIRY_DAYS),
        keys=[(key, None) for key in signing_keys],
        revoked=revoked,
    )
    return trust.sign_document(payload, payload_type=dsse.KEYRING_PAYLOAD_TYPE, private_keys=list(root_keys))


def describe(envelope: dict[str, Any]) -> str:
    """A person's summary of a root or keyring file (signatures not checked: use upload)."""
    kind = {dsse.ROOT_PAYLOAD_TYPE: "root", dsse.KEYRING_PAYLOAD_TYPE: "keyring"}.get(
        envelope.get("payloadType")
    )
    if kind is None:
        raise ValueError(f"not a root or keyring envelope (payload type {envelope.get('payloadType')!r})")
    data = json.loads(base64.b64decode(envelope["payload"]))
    lines = [f"{kind} version {data['version']}, expires {data['expires_at']}"]
    if kind == "root":
        lines.append(f"threshold {data['threshold']} of {len(data['keys'])} key(s)")
    lines += [f"  key {entry['keyid'][:16]}…  public {entry['public_key']}" for entry in data["keys"]]
    lines += [f"  revoked {keyid[:16]}…" for keyid in data.get("revoked", [])]
    lines.append(f"signed by: {', '.join(k[:16] + '…' for k in dsse.signature_keyids(envelope))}")
    return "\n".join(lines)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data + b"\n")
    print(f"wrote {path}")


def cmd_keygen(args: argparse.Namespace) -> int:
    public = generate_key_file(Path(args.out))
    print(f"wrote private key {args.out} (mode 0600; keep it offline)")
    print(f"public key (pin it in the agents' trust.root_keys): {public}")
    return 0


def cmd_root(args: argparse.Namespace) -> int:
    keys = [load_key_file(Path(path)) for path in args.key]
    previous_keys = [load_key_file(Path(path)) for path in args.previous_key or []]
    version = 1
    if args.previous:
        previous = json.loads(Path(args.previous).read_text())
        previous_root = trust.Root.verified(
            previous, keys=_own_keys(previous), threshold=_payload(previous)["threshold"]
        )
        version = previous_root.version + 1
        signed = {dsse.keyid_for(dsse.public_key_of(k)) for k in previous_keys}
        if len(signed & previous_root.keys.keys()) < previous_root.threshold:
            print(
                f"trustctl: root version {version} needs --previous-key files holding "
                f"{previous_root.threshold} of version {previous_root.version}'s keys",
                file=sys.stderr,
            )
            return 2
    elif previous_keys:
        print("trustctl: --previous-key needs --previous ROOT.json", file=sys.stderr)
        return 2
    envelope = make_root(
        keys=keys,
        threshold=args.threshold,
        version=version,
        previous_keys=previous_keys,
        expires_at=datetime.now(UTC) + timedelta(days=args.expires_days),
    )
    _write(Path(args.out), envelope)
    print(describe(json.loads(envelope)))
    return 0


def _payload(envelope: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(envelope["payload"]))


def _own_keys(envelope: dict[str, Any]) -> dict[str, Any]:
    return {
        entry["keyid"]: dsse.public_key_from_hex(entry["public_key"]) for entry in _payload(envelope)["keys"]
    }


def cmd_sign_keyring(args: argparse.Namespace) -> int:
    payload = json.loads(Path(args.draft).read_text())
    try:
        trust.check_keyring_payload(payload)
    except trust.TrustError as exc:
        print(f"trustctl: {args.draft} is not a keyring draft: {exc}", file=sys.stderr)
        return 2
    keys = [load_key_file(Path(path)) for path in args.key]
    envelope = trust.sign_document(payload, payload_type=dsse.KEYRING_PAYLOAD_TYPE, private_keys=keys)
    _write(Path(args.out), envelope)
    print(describe(json.loads(envelope)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(describe(json.loads(Path(args.file).read_text())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent.trustctl",
        description="Offline root-of-trust tool: root keys, root documents and keyring signatures "
        "(docs/security.md, 'Keys and rotation').",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="create a root private key file and print its public key")
    keygen.add_argument("out", help="where to write the private key (refuses to overwrite)")
    keygen.set_defaults(func=cmd_keygen)

    root = commands.add_parser("root", help="write a root document (version 1, or the next after --previous)")
    root.add_argument("--key", action="append", required=True, help="a root private key file; repeatable")
    root.add_argument("--threshold", type=int, default=1, help="signatures a root document needs (default 1)")
    root.add_argument("--previous", help="the current root document, to chain the new one from it")
    root.add_argument(
        "--previous-key",
        action="append",
        help="a private key of the current root, to sign the step; repeatable",
    )
    root.add_argument("--expires-days", type=int, default=ROOT_EXPIRY_DAYS)
    root.add_argument("--out", required=True)
    root.set_defaults(func=cmd_root)

    sign = commands.add_parser(
        "sign-keyring", help="sign a keyring draft written by `manage.py trust draft-keyring`"
    )
    sign.add_argument("draft", help="the draft (unsigned keyring JSON)")
    sign.add_argument("--key", action="append", required=True, help="a root private key file; repeatable")
    sign.add_argument("--out", required=True)
    sign.set_defaults(func=cmd_sign_keyring)

    show = commands.add_parser("show", help="summarise a root or keyring file")
    show.add_argument("file")
    show.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, KeyError, dsse.EnvelopeError, schemas.SchemaError) as exc:
        print(f"trustctl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
