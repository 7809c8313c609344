"""The registry's Ed25519 signing key.

The private key lives in a PEM file (``SIGNING_KEY_FILE``, e.g. a mounted secret), never in
the database. The database keeps the public half (``SigningKey``) so that devices can be
provisioned with it. In development (``SIGNING_KEY_AUTOGENERATE``) a missing file is
created with mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from agent import protocol
from fleet.registry.choices import SigningKeyStatus
from fleet.registry.models import SigningKey


def _generate(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: two processes starting at once must not overwrite each other's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


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
    stay listed, so devices keep verifying what was signed before.
    """
    private_key = load_private_key()
    public_hex = protocol.public_key_bytes(private_key.public_key()).hex()
    keyid = protocol.keyid_for(private_key.public_key())
    row, _ = SigningKey.objects.get_or_create(keyid=keyid, defaults={"public_key": public_hex})
    if row.status != SigningKeyStatus.ACTIVE:
        SigningKey.objects.filter(pk=row.pk).update(status=SigningKeyStatus.ACTIVE, retired_at=None)
        row.refresh_from_db()
    SigningKey.objects.filter(status=SigningKeyStatus.ACTIVE).exclude(pk=row.pk).update(
        status=SigningKeyStatus.RETIRED, retired_at=timezone.now()
    )
    return row, private_key
