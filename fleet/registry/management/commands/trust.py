import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count

from agent import protocol
from fleet.core.errors import ServiceError
from fleet.registry import trust


class Command(BaseCommand):
    help = (
        "Root of trust and keyring (docs/security.md, 'Keys and rotation'). Root keys stay "
        "offline: draft a keyring here, sign it with `python -m agent.trustctl sign-keyring` on "
        "the offline machine, upload the signed file here. Subcommands: status, draft-keyring, "
        "upload, publish, resign, dev-bootstrap."
    )

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="subcommand", required=True)
        commands.add_parser("status", help="the root chain, the keyring and the devices per keyring version")
        draft = commands.add_parser(
            "draft-keyring", help="write the next keyring, unsigned, for the offline signer"
        )
        draft.add_argument("--add-key", action="append", default=[], metavar="PUBLIC_HEX")
        draft.add_argument("--remove", action="append", default=[], metavar="KEYID", help="revoke this key")
        draft.add_argument("--expires-days", type=int, default=365)
        draft.add_argument("--out", type=Path, required=True)
        upload = commands.add_parser("upload", help="upload a root document or keyring signed offline")
        upload.add_argument("file", type=Path)
        commands.add_parser("publish", help="publish the trust bundle again (retained)")
        commands.add_parser(
            "resign",
            help="re-sign every manifest and desired state with the active signing key "
            "(after activating a new key, before revoking the old one)",
        )
        dev = commands.add_parser(
            "dev-bootstrap", help="development only: a local root key, root version 1 and a keyring"
        )
        dev.add_argument("--root-key", type=Path, required=True, help="where the dev root key lives")

    def handle(self, *args, subcommand: str, **options):
        try:
            getattr(self, "do_" + subcommand.replace("-", "_"))(**options)
        except ServiceError as exc:
            raise CommandError(f"{exc} ({exc.code})") from exc

    def do_status(self, **options):
        from fleet.devices.models import Device

        for root in trust.trust_roots():
            self.stdout.write(
                f"root version {root.version}: {root.threshold} of {len(root.keyids)} key(s), "
                f"expires {root.expires_at:%Y-%m-%d}"
            )
        state = trust.trust_state()
        if state is None:
            self.stdout.write("no root uploaded yet")
            return
        for keyid, key in state.root.keys.items():
            self.stdout.write(f"  root key {keyid[:16]}…  public {protocol.public_key_bytes(key).hex()}")
        waiting = trust.root_awaiting_keyring()
        if waiting is not None:
            self.stdout.write(
                f"{waiting} is stored but not yet published: devices get it with the first keyring it signs"
            )
        keyring = state.keyring
        if keyring is None:
            self.stdout.write("no keyring uploaded yet")
        else:
            self.stdout.write(
                f"keyring version {keyring.version}, expires {keyring.expires_at:%Y-%m-%d %H:%M} UTC"
            )
            for keyid in keyring.keys:
                self.stdout.write(f"  signing key {keyid[:16]}…")
            for keyid in sorted(state.revoked):
                self.stdout.write(f"  revoked     {keyid[:16]}…")
        counts = (
            Device.objects.values("keyring_version").annotate(devices=Count("id")).order_by("keyring_version")
        )
        for row in counts:
            version = row["keyring_version"] if row["keyring_version"] is not None else "not reported"
            self.stdout.write(f"devices on keyring {version}: {row['devices']}")

    def do_draft_keyring(self, *, add_key, remove, expires_days, out, **options):
        draft = trust.keyring_draft(add_public_keys=add_key, remove_keyids=remove, expires_days=expires_days)
        out.write_text(json.dumps(draft, indent=2) + "\n")
        self.stdout.write(f"wrote {out}: keyring version {draft['version']} with {len(draft['keys'])} key(s)")
        self.stdout.write(
            f"sign it offline: python -m agent.trustctl sign-keyring {out} --key ROOT.pem --out SIGNED.json"
        )

    def do_upload(self, *, file, **options):
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc}") from exc
        row = trust.trust_upload(envelope=data, publish="now")
        self.stdout.write(f"stored and published {row} (expires {row.expires_at:%Y-%m-%d})")

    def do_publish(self, **options):
        trust.trust_publish(now=True)
        self.stdout.write("published the trust bundle")

    def do_resign(self, **options):
        counts = trust.signing_resign_all(publish="now")
        self.stdout.write(
            f"re-signed {counts['manifests']} manifest(s) and {counts['devices']} device desired state(s)"
        )

    def do_dev_bootstrap(self, *, root_key, **options):
        root_hex = trust.trust_bootstrap_dev(root_key_path=root_key, publish="now")
        self.stdout.write(f"root public key (pin it in trust.root_keys): {root_hex}")
