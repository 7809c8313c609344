"""The registry's Ed25519 signing key.

The private key lives in a PEM file (``SIGNING_KEY_FILE``, e.g. a mounted secret), never in
the database. The database keeps the public half (``SigningKey``) so that devices can be
provisioned with it. In development (``SIGNING_KEY_AUTOGENERATE``) a missing file is
created with mode 0600.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from agent import protocol, trustctl
from fleet.core.errors import Conflict
from fleet.registry.choices import SigningKeyStatus
from fleet.registry.models import Keyring, SigningKey


def _generate(path: Path) -> None:
    # O_EXCL inside: two processes starting at once must not overwrite each other's key.
    with contextlib.suppress(FileExistsError):
        trustctl.generate_key_file(path)


def load_private_key(path: Path | None = None) -> Ed25519PrivateKey:
    path = Path(path or settings.SIGNING_KEY_FILE)
    if not path.exists():
        if not settings.SIGNING_KEY_AUTOGENERATE:
            raise ImproperlyConfigured(
                f"SIGNING_KEY_FILE: {path} does not exist. Create one with "
                "`manage.py signing_key_generate PATH` (or set SIGNING_KEY_AUTOGENERATE=1 in development)."
            )
        _generate(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise ImproperlyConfigured(
            f"SIGNING_KEY_FILE: cannot read an unencrypted PEM key from {path}: {exc}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ImproperlyConfigured(f"SIGNING_KEY_FILE: {path} is not an Ed25519 key")
    return key


def generate_key_file(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite a signing key")
    _generate(path)


@transaction.atomic
def signing_key_active() -> tuple[SigningKey, Ed25519PrivateKey]:
    """The key to sign with now, registering its public half on first use.

    When the file holds a new key (rotation), the old public keys are marked retired but
    stay listed. Once a keyring exists, only a key it lists may sign (docs/security.md,
    "Keys and rotation"), and a revoked key never signs again.
    """
    private_key = load_private_key()
    public_hex = protocol.public_key_bytes(private_key.public_key()).hex()
    keyid = protocol.keyid_for(private_key.public_key())
    SigningKey.objects.get_or_create(keyid=keyid, defaults={"public_key": public_hex})
    # Locked: a keyring upload revoking this key at the same moment waits for us, or we see it.
    row = SigningKey.objects.select_for_update().get(keyid=keyid)
    if row.status == SigningKeyStatus.REVOKED:
        raise Conflict(
            f"SIGNING_KEY_FILE holds key {keyid[:16]}…, which a keyring revoked; devices refuse it. "
            "Point SIGNING_KEY_FILE at a key the current keyring lists.",
            code="signing_key_revoked",
        )
    keyring = Keyring.objects.order_by("-version").only("version", "keyids").first()
    if keyring is not None and keyid not in keyring.keyids:
        # Signing with it would strand every device: they accept only the keyring's keys.
        raise Conflict(
            f"SIGNING_KEY_FILE holds key {keyid[:16]}…, which keyring version {keyring.version} does not "
            "list; upload a keyring that lists it first (docs/security.md, 'Keys and rotation').",
            code="signing_key_not_in_keyring",
        )
    if row.status != SigningKeyStatus.ACTIVE:
        SigningKey.objects.filter(pk=row.pk).update(status=SigningKeyStatus.ACTIVE, retired_at=None)
        row.refresh_from_db()
    SigningKey.objects.filter(status=SigningKeyStatus.ACTIVE).exclude(pk=row.pk).update(
        status=SigningKeyStatus.RETIRED, retired_at=timezone.now()
    )
    return row, private_key
