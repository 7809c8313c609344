"""Render the project's Mosquitto config for a real server, and initialise dynamic security.

The tests and `make demo` start their own broker (``fleet.mqtt.broker.start_broker``); a
server (compose's ``broker-init`` service, or bare Debian with the systemd drop-in under
docker/systemd/) needs the same ``docker/mosquitto/mosquitto.conf`` with fixed ports and
paths instead. This script fills in the template with ``fleet.mqtt.broker.render_config``
(the one renderer) and, on the first run only, creates the dynamic-security file with the
admin account ``broker_provision`` then logs in with (docs/operations.md).

    python docker/mosquitto/render.py --out /var/lib/mosquitto/mosquitto.conf \\
        --data-dir /var/lib/mosquitto --tls-dir /etc/modelfleet/tls --user mosquitto

The TLS directory holds ``ca.pem``, ``server.pem`` and ``server-key.pem`` (the names of
``manage.py tls_local_ca``; use your own CA's files under these names). The admin password
comes from MQTT_ADMIN_PASSWORD or the file named by MQTT_ADMIN_PASSWORD_FILE, as for the
control plane. Exit status 2 with one line on stderr when something is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from fleet.core.tls import LocalCA  # noqa: E402
from fleet.mqtt.broker import ADMIN_USER, MQTT_PORT, MQTTS_PORT, render_config  # noqa: E402

DYNSEC_FILE = "dynamic-security.json"  # what render_config names in the data directory


class RenderError(Exception):
    pass


def admin_password() -> str:
    path = os.environ.get("MQTT_ADMIN_PASSWORD_FILE", "")
    if path:
        try:
            password = Path(path).read_text().strip()
        except OSError as exc:
            raise RenderError(f"MQTT_ADMIN_PASSWORD_FILE: cannot read {path}: {exc}") from exc
    else:
        password = os.environ.get("MQTT_ADMIN_PASSWORD", "")
    if not password:
        raise RenderError("MQTT_ADMIN_PASSWORD or MQTT_ADMIN_PASSWORD_FILE: required for the broker admin")
    return password


def dynsec_init(data_dir: Path, *, user: str) -> bool:
    """Create the dynamic-security file with the admin account, unless it exists: later
    runs must keep every device credential the control plane has made since."""
    dynsec_file = data_dir / DYNSEC_FILE
    if dynsec_file.exists():
        return False
    # mosquitto_ctrl takes the password on its command line; this runs once, in a one-off
    # process, before the broker listens.
    result = subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(dynsec_file), ADMIN_USER, admin_password()],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RenderError(
            f"mosquitto_ctrl dynsec init failed: {result.stderr.strip() or result.stdout.strip()}"
        )
    if os.geteuid() == 0:  # systemd's ExecStartPre runs as root; the broker saves as --user
        shutil.chown(dynsec_file, user=user)
    return True


def render(args: argparse.Namespace) -> str:
    tls = LocalCA.at(args.tls_dir)
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        if not path.is_file():
            raise RenderError(f"--tls-dir: {path} is missing (make it with manage.py tls_local_ca)")
    # render_config names the user that runs it (getpass reads LOGNAME first); a broker
    # started as root drops to this account, one started unprivileged ignores the line.
    os.environ["LOGNAME"] = args.user
    return render_config(
        port=args.port, tls_port=args.tls_port, tls_bind=args.tls_bind, tls=tls, data_dir=args.data_dir
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="the config file to write")
    parser.add_argument("--data-dir", type=Path, required=True, help="persistence, dynsec file, log")
    parser.add_argument("--tls-dir", type=Path, required=True, help="ca.pem, server.pem, server-key.pem")
    parser.add_argument("--user", default="mosquitto", help="account a broker started as root drops to")
    parser.add_argument("--port", type=int, default=MQTT_PORT, help="plain listener, on loopback only")
    parser.add_argument("--tls-port", type=int, default=MQTTS_PORT)
    parser.add_argument("--tls-bind", default="0.0.0.0", help="address of the TLS listener")
    parser.add_argument("--no-dynsec-init", action="store_true", help="never create the dynsec file")
    args = parser.parse_args(argv)
    try:
        text = render(args)
        args.data_dir.mkdir(parents=True, exist_ok=True)
        created = False if args.no_dynsec_init else dynsec_init(args.data_dir, user=args.user)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}" + (f"; created {args.data_dir / DYNSEC_FILE}" if created else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
