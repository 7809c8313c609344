"""The local CA (`manage.py tls_local_ca`, fleet.core.tls) and the control plane's own MQTT
accounts over TLS (MQTT_URL=mqtts://…, MQTT_CA_FILE); docs/security.md, "TLS"."""

import ssl
import uuid

import pytest
from cryptography import x509
from django.core.management import CommandError, call_command

from fleet.core.tls import LocalCA
from fleet.mqtt.publisher import publish_desired
from fleet.mqtt.services import broker_admin
from tests.server.test_settings import error_message, start


def names_in(certificate: x509.Certificate) -> set[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))}


def test_tls_local_ca_makes_a_ca_and_a_server_certificate_for_the_names_given(tmp_path):
    call_command("tls_local_ca", "--out", str(tmp_path), "--name", "fleet.lan", "--name", "10.0.0.5")
    files = LocalCA.at(tmp_path)
    for key in (files.key_file, files.ca_key_file):
        assert oct(key.stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    server = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    server.verify_directly_issued_by(ca)
    assert names_in(server) == {"localhost", "127.0.0.1", "::1", "fleet.lan", "10.0.0.5"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # What clients load: Python's own TLS stack accepts the pair and the CA.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert_file, files.key_file)
    ssl.create_default_context(cafile=files.ca_file)


def test_tls_local_ca_does_not_replace_a_ca_without_force(tmp_path):
    call_command("tls_local_ca", "--out", str(tmp_path))
    first = LocalCA.at(tmp_path).ca_file.read_bytes()
    with pytest.raises(CommandError, match="already holds a CA"):
        call_command("tls_local_ca", "--out", str(tmp_path))
    assert LocalCA.at(tmp_path).ca_file.read_bytes() == first
    call_command("tls_local_ca", "--out", str(tmp_path), "--force")
    assert LocalCA.at(tmp_path).ca_file.read_bytes() != first


def test_the_control_plane_reaches_the_tls_listener_with_mqtt_ca_file(settings, broker):
    settings.MQTT_URL = broker.tls_url
    settings.MQTT_ADMIN_PASSWORD = broker.admin_password
    settings.MQTT_PUBLISHER_PASSWORD = broker.publisher_password
    settings.MQTT_CA_FILE = str(broker.ca_file)
    assert broker_admin().get_client("fleet-ingest") is not None
    assert publish_desired([(f"tls-{uuid.uuid4().hex[:6]}", b"{}")]) == 1
    settings.MQTT_CA_FILE = ""  # the system's CAs do not know the run's CA
    with pytest.raises(ssl.SSLCertVerificationError):
        broker_admin().get_client("fleet-ingest")


def test_an_unreadable_mqtt_ca_file_stops_the_process_at_start(tmp_path):
    result = start(tmp_path, DEBUG="1", MQTT_CA_FILE=str(tmp_path / "missing.pem"))
    assert result.returncode != 0
    assert "MQTT_CA_FILE" in error_message(result)
