"""The fleet simulator (issue 13, section 1): ``python -m agent.sim`` runs thousands of
virtual devices speaking the real wire contract against a real control plane and broker.

Each virtual device enrolls through the enrollment API, connects to the broker with its own
login, client id and last will, verifies every trust bundle, desired state and manifest
with the agent's own code (agent/apply.py, agent/trust.py), downloads through a shared
on-disk cache keyed by sha256 but hashes every blob itself, "installs" without LiteRT and
reports like the agent; then it sends synthetic telemetry windows. See docs/operations.md,
"Fleet simulator", and ``python -m agent.sim --help``.

Layout: ``device.py`` is one virtual device; ``fleet.py`` runs many of them in one
process on one asyncio loop (paho-mqtt's external-loop API, no thread per device);
``cli.py`` parses the knobs, starts the processes and prints the figures.
"""
