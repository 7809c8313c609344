from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from agent import protocol
from fleet.registry.signing import generate_key_file, load_private_key


class Command(BaseCommand):
    help = (
        "Generate an Ed25519 signing key as a PEM file with mode 0600 and print its public key "
        "(hex) and keyid. Devices accept it once a root-signed keyring lists it: "
        "`manage.py trust draft-keyring --add-key PUBLIC_HEX` (docs/security.md, 'Keys and rotation'). "
        "Then point SIGNING_KEY_FILE at the file."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path)

    def handle(self, *args, path: Path, **options):
        try:
            generate_key_file(path)
        except FileExistsError as exc:
            raise CommandError(str(exc)) from exc
        public_key = load_private_key(path).public_key()
        self.stdout.write(f"public_key {protocol.public_key_bytes(public_key).hex()}")
        self.stdout.write(f"keyid      {protocol.keyid_for(public_key)}")
