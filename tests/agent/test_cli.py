"""`fleet-agent verify` and `status`, run as the real command."""

import subprocess
import sys

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_verify_accepts_a_signed_manifest_and_its_blob(artifacts, public_key_hex, tmp_path):
    artifact = artifacts[("1.0.0", "int8")]
    (tmp_path / "manifest.json").write_bytes(artifact.manifest_envelope)
    (tmp_path / "blob.zst").write_bytes(artifact.blob)
    result = run(
        "verify",
        str(tmp_path / "manifest.json"),
        "--key",
        public_key_hex,
        "--blob",
        str(tmp_path / "blob.zst"),
    )
    assert result.returncode == 0, result.stderr
    assert "matches the manifest" in result.stdout


def test_verify_refuses_a_blob_that_is_not_the_one_named(artifacts, public_key_hex, tmp_path):
    (tmp_path / "manifest.json").write_bytes(artifacts[("1.0.0", "int8")].manifest_envelope)
    (tmp_path / "blob.zst").write_bytes(artifacts[("2.0.0", "int8")].blob)
    result = run(
        "verify",
        str(tmp_path / "manifest.json"),
        "--key",
        public_key_hex,
        "--blob",
        str(tmp_path / "blob.zst"),
    )
    assert result.returncode == 1
    assert "hash_mismatch" in result.stderr


def test_verify_refuses_an_untrusted_key_and_the_wrong_type(artifacts, tmp_path, public_key_hex):
    (tmp_path / "manifest.json").write_bytes(artifacts[("1.0.0", "int8")].manifest_envelope)
    other = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    untrusted = run("verify", str(tmp_path / "manifest.json"), "--key", other)
    assert untrusted.returncode == 1 and "signature_invalid" in untrusted.stderr
    wrong_type = run("verify", str(tmp_path / "manifest.json"), "--key", public_key_hex, "--type", "desired")
    assert wrong_type.returncode == 1 and "payload_type" in wrong_type.stderr


def test_status_reads_the_state_without_a_running_agent(tmp_path, root_key_hex):
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "cam-1"\nstate_dir = "{tmp_path / "state"}"\n[broker]\nurl = "mqtt://127.0.0.1:1"\n'
        f'[trust]\nroot_keys = ["{root_key_hex}"]\n[local_api]\nbind = "127.0.0.1:1"\n'
    )
    result = run("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert '"applied_generation": 0' in result.stdout
    assert "not reachable" in result.stdout
