"""`make demo`'s script, run for real: web app, Celery worker, broker, agents, uploads over
HTTP and the rollout story; and its simulated fleet (DEMO_DEVICES)."""

import os
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import ROOT


def run_demo(tmp_path, **extra: str) -> subprocess.CompletedProcess:
    """`make demo`'s command with DEMO_EXIT=1, in a var dir and database of the test's own;
    checks that it ended well and dropped its database."""
    env = {
        **os.environ,
        "DEMO_EXIT": "1",
        "DEMO_VAR_DIR": str(tmp_path / "demo"),
        "VAR_DIR": str(tmp_path / "demo"),
        "DEMO_PORT": "0",
        "COLUMNS": "200",
        **extra,
    }
    server = env["DATABASE_URL"].rsplit("/", 1)[0]
    env["DEMO_DATABASE_URL"] = f"{server}/modelfleet_demo_test"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with psycopg.connect(f"{server}/postgres") as connection:
        left = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = 'modelfleet_demo_test'"
        ).fetchall()
    assert not left, "the demo left its database behind"
    return result


@pytest.mark.slow
def test_the_demo_tells_the_whole_story(tmp_path):
    result = run_demo(tmp_path)
    assert "simulated" not in result.stdout.lower()  # DEMO_DEVICES defaults to 0: no simulator
    rows = [line for line in result.stdout.splitlines() if "ready" in line]
    assert any("float32" in row and "% of 200" in row for row in rows), result.stdout
    assert any("int8" in row and "% of 200" in row for row in rows), result.stdout
    assert "/admin/" in result.stdout and "API token" in result.stdout
    # Twelve real agents picked up digits 1.0.0 over MQTT and answered predict.
    agent_rows = [line for line in result.stdout.split("Rollouts")[0].splitlines() if "demo-cam-" in line]
    assert len(agent_rows) == 12, result.stdout
    assert all("1.0.0" in row for row in agent_rows)
    assert sum("int8" in row for row in agent_rows) == 10 and sum("float32" in row for row in agent_rows) == 2
    # …and the control plane saw them online through the ingest bridge.
    assert all("online, reports 1.0.0" in row for row in agent_rows), result.stdout
    # The rollout story: v2 promoted through its stages, v3 rolled back by the accuracy gate,
    # v4 stopped in shadow before it served anyone; each decision said in one sentence.
    assert "v2 canary: completed, stage 3 of 3 (12 active)" in result.stdout
    # v2 (1.0.0 with its head retrained) went to every agent as a tensor-level delta.
    words = " ".join(result.stdout.split())  # the console wraps long lines
    assert "Delivery: 12 devices got it as a delta and 0 devices as the full blob" in words, result.stdout
    assert "v3 canary: rolled_back" in result.stdout
    assert "Rolled back at stage 1 by the accuracy gate" in result.stdout
    assert "v4 in shadow: rolled_back, stage 1 of 2" in result.stdout
    assert "Rolled back at stage 1 by the shadow agreement gate" in result.stdout
    final = [line for line in result.stdout.split("After the story")[1].splitlines() if "demo-cam-" in line]
    assert len(final) == 12 and all("2.0.0" in line for line in final), result.stdout


@pytest.mark.slow
def test_the_demo_with_a_simulated_fleet_rolls_v2_out_to_it_too(tmp_path):
    """DEMO_DEVICES=20: the simulator's devices enroll, go active on 1.0.0 and are part of
    v2's staged rollout beside the twelve agents (the story stops there: DEMO_UNTIL)."""
    result = run_demo(tmp_path, DEMO_DEVICES="20", DEMO_UNTIL="rollout_v2")
    assert "Simulated fleet: 20 of 20 devices enrolled" in result.stdout, result.stdout
    assert "20 went active on digits 1.0.0" in result.stdout, result.stdout
    assert "v2 canary: completed, stage 3 of 3 (32 active)" in result.stdout, result.stdout
    assert "v3 canary" not in result.stdout
