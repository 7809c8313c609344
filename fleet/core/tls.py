"""A local certificate authority for TLS on one machine or one run (docs/security.md, "TLS").

Tests, ``make demo`` and ``manage.py tls_local_ca`` make a CA of their own and a server
certificate signed by it, so that the broker's TLS listener (and an HTTPS server in the
tests) has a certificate that clients verify against a CA file they pin, with the host
name checked as in production. A real deployment uses its own PKI or a public CA; this is
what a laptop, a lab or CI has when it has neither.

ECDSA P-256 keys: quick to generate (a test run makes several), and every TLS stack on the
devices we support (OpenSSL 1.1 and newer, through Python's ``ssl``) speaks it. Private
keys are written mode 0600 from the first byte (opened with that mode, never chmod-ed after
the fact). Imports no Django: the broker helper and the demo use it too.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Every server certificate names these, so that a client on the same machine may connect
# by whichever loopback name it uses.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
DEFAULT_DAYS = 365
# Certificates start being valid a little before they were made, so that a client whose
# clock is a few minutes behind does not refuse a certificate made a moment ago.
CLOCK_SKEW = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class LocalCA:
    """The files of a local CA and of the server certificate it signed (PEM)."""

    ca_file: Path  # what clients pin (broker.ca_file, control_plane.ca_file, MQTT_CA_FILE)
    ca_key_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def at(cls, directory: Path) -> LocalCA:
        directory = Path(directory)
        return cls(*(directory / name for name in (CA_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)))

    @property
    def directory(self) -> Path:
        return self.ca_file.parent


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address literal (brackets allowed), a DNS SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def subject_names(names: Iterable[str] = ()) -> list[str]:
    """The loopback names and ``names``, each once, in order."""
    return list(dict.fromkeys([*LOOPBACK_NAMES, *(name.strip().lower() for name in names if name.strip())]))


def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate_builder(
    *, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, ca: bool, days: int
) -> x509.CertificateBuilder:
    """What a CA and a server certificate share. A CA signs certificates (and CRLs), and only
    end certificates below it (path length 0); a server certificate signs its handshakes
    (ECDHE key exchange) and nothing else."""
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def ca_create(
    *, common_name: str = "Modelfleet local CA", days: int = DEFAULT_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates and nothing below them."""
    key = _private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _certificate_builder(subject=name, issuer=name, public_key=key.public_key(), ca=True, days=days)
    return key, builder.sign(key, hashes.SHA256())


def server_certificate_issue(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Iterable[str],
    days: int = DEFAULT_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for exactly ``names`` (DNS names and IP addresses, all in
    the subject alternative names, which is what clients check), signed by the CA."""
    names = list(names)
    if not names:
        raise ValueError("a server certificate needs at least one name")
    key = _private_key()
    builder = (
        _certificate_builder(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            issuer=ca_cert.subject,
            public_key=key.public_key(),
            ca=False,
            days=days,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
    )
    return key, builder.sign(ca_key, hashes.SHA256())


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PEM, unencrypted, mode 0600 from creation (a key left readable by others for even a
    moment may have been read)."""
    path.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def local_ca_create(
    directory: Path, *, names: Iterable[str] = (), days: int = DEFAULT_DAYS, loopback: bool = True
) -> LocalCA:
    """Make a CA and a server certificate for the loopback names plus ``names`` (only
    ``names`` without ``loopback``) in ``directory`` (created if needed; files already
    there are replaced)."""
    files = LocalCA.at(directory)
    files.directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = ca_create(days=days)
    key, cert = server_certificate_issue(
        ca_key=ca_key, ca_cert=ca_cert, names=subject_names(names) if loopback else list(names), days=days
    )
    write_private_key(files.ca_key_file, ca_key)
    write_certificate(files.ca_file, ca_cert)
    write_private_key(files.key_file, key)
    write_certificate(files.cert_file, cert)
    return files
