"""`make up`: Modelfleet's production processes (the Procfile) on this machine, with
production settings, until Ctrl-C (docs/operations.md, "make up").

``UP_VAR_DIR`` (default ``var/up``) keeps what a production host keeps, made on the first
run and reused after: ``secret-key``, ``secrets/mqtt-{admin,publisher,ingest}`` and
``secrets/admin-login`` (the password of the ``admin`` login made on the first run), all
random and mode 0600; ``tls/`` (``manage.py tls_local_ca``: the CA devices pin, and the
certificate of the broker's TLS listener and of gunicorn); ``signing-key.pem``;
``mosquitto/`` (config and data); ``static/`` and ``artifacts/``. The database
(``UP_DATABASE_URL``, default ``modelfleet_up``) is created when missing and kept.

Then: ``migrate``, ``collectstatic``, the broker started alone from its Procfile line for
``broker_provision`` and stopped, and ``honcho start`` on the Procfile, which this process
becomes: Ctrl-C (or SIGTERM) stops every process it started.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.mqtt.broker import PLAIN_HOST, BrokerError, broker_prepare  # noqa: E402

VAR = Path(os.environ.get("UP_VAR_DIR", ROOT / "var" / "up")).resolve()
DATABASE = os.environ.get("UP_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/modelfleet_up")
WEB_PORT = int(os.environ.get("UP_WEB_PORT", "8443"))
MQTT_PORT = int(os.environ.get("UP_MQTT_PORT", "1883"))
MQTTS_PORT = int(os.environ.get("UP_MQTTS_PORT", "8883"))
# Where devices reach the broker's TLS listener and gunicorn; the certificate names it.
HOST = os.environ.get("UP_HOST", "127.0.0.1")
ACCOUNTS = ("admin", "publisher", "ingest")


def fail(message: str) -> None:
    print(f"make up: {message}", file=sys.stderr)
    raise SystemExit(1)


def secret_file(path: Path) -> Path:
    """A random secret in ``path`` (mode 0600 from the first byte), made once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(48))
    return path


def port_free(port: int, variable: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((PLAIN_HOST, port))
        except OSError:
            fail(f"port {port} is in use on {PLAIN_HOST}: set {variable} to another port")


def database_ensure(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        if not connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            connection.execute(f'CREATE DATABASE "{name}"')


def production_env() -> dict[str, str]:
    tls = VAR / "tls"
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "DEBUG": "0",
        "VAR_DIR": str(VAR),
        "SECRET_KEY_FILE": str(secret_file(VAR / "secret-key")),
        "SIGNING_KEY_FILE": str(VAR / "signing-key.pem"),
        "DATABASE_URL": DATABASE,
        "REDIS_URL": os.environ.get("UP_REDIS_URL", "redis://127.0.0.1:6379/13"),
        **({"CACHE_URL": os.environ["UP_CACHE_URL"]} if "UP_CACHE_URL" in os.environ else {}),
        # The control plane's accounts on the loopback listener; devices on the TLS one.
        "MQTT_URL": f"mqtt://{PLAIN_HOST}:{MQTT_PORT}",
        "MQTT_PUBLIC_URL": f"mqtts://{HOST}:{MQTTS_PORT}",
        **{
            f"MQTT_{account.upper()}_PASSWORD_FILE": str(secret_file(VAR / "secrets" / f"mqtt-{account}"))
            for account in ACCOUNTS
        },
        # gunicorn terminates TLS itself here, with the local CA's certificate; behind a
        # proxy in production it would not (docs/operations.md, "HTTPS").
        "PUBLIC_BASE_URL": f"https://{HOST}:{WEB_PORT}",
        "WEB_BIND": f"{HOST}:{WEB_PORT}",
        "GUNICORN_CMD_ARGS": f"--certfile={tls / 'server.pem'} --keyfile={tls / 'server-key.pem'}",
        "MOSQUITTO_CONFIG": str(VAR / "mosquitto" / "mosquitto.conf"),
        # /metrics (Bearer token) adds up the web and worker processes (gunicorn.conf.py).
        "METRICS_TOKEN_FILE": str(secret_file(VAR / "secrets" / "metrics-token")),
        "PROMETHEUS_MULTIPROC_DIR": str(VAR / "metrics"),
    }


def metrics_dir_empty(env: dict[str, str]) -> None:
    """Every process writes its metrics there, from its first import: it must exist, and
    an earlier run's files would count as this run's."""
    shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True)


def manage(env: dict[str, str], *args: str) -> None:
    shown = [arg.split("=", 1)[0] + "=…" if arg.startswith("--password=") else arg for arg in args]
    print(f"make up: manage.py {' '.join(shown)}", flush=True)
    if subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env).returncode:
        fail(f"manage.py {args[0]} failed (above)")


def main() -> None:
    try:
        import honcho  # noqa: F401
    except ImportError:
        fail("honcho is not installed: run make setup")
    for port, variable in (
        (WEB_PORT, "UP_WEB_PORT"),
        (MQTT_PORT, "UP_MQTT_PORT"),
        (MQTTS_PORT, "UP_MQTTS_PORT"),
    ):
        port_free(port, variable)
    VAR.mkdir(parents=True, exist_ok=True)
    env = production_env()
    metrics_dir_empty(env)
    database_ensure(DATABASE)
    tls = VAR / "tls"
    if not (tls / "ca.pem").exists():
        manage(env, "tls_local_ca", f"--out={tls}", f"--name={HOST}")
    if not Path(env["SIGNING_KEY_FILE"]).exists():
        manage(env, "signing_key_generate", env["SIGNING_KEY_FILE"])
    manage(env, "migrate", "--noinput")
    manage(env, "collectstatic", "--noinput", "--verbosity=0")
    admin_password = VAR / "secrets" / "admin-login"
    if not admin_password.exists():  # the first run: an admin login, its password kept here
        secret_file(admin_password)
        manage(env, "ensure_user", "admin", "--role=admin", f"--password={admin_password.read_text()}")
    try:
        broker = broker_prepare(
            VAR / "mosquitto",
            admin_password_file=Path(env["MQTT_ADMIN_PASSWORD_FILE"]),
            port=MQTT_PORT,
            tls_port=MQTTS_PORT,
            tls_bind=HOST,
            tls_dir=tls,
        )
        broker.start()  # the Procfile's command: mosquitto -c $MOSQUITTO_CONFIG
    except BrokerError as exc:
        fail(str(exc))
    try:
        manage(env, "broker_provision")
    finally:
        broker.stop()
    print(
        f"make up: admin and API at {env['PUBLIC_BASE_URL']}/admin/ (user admin, password in "
        f"{admin_password}; the certificate is signed by {tls / 'ca.pem'}); devices: "
        f"{env['MQTT_PUBLIC_URL']}, pinning the same CA; metrics at {env['PUBLIC_BASE_URL']}/metrics "
        f"with the bearer token in {env['METRICS_TOKEN_FILE']}. Ctrl-C stops it all.",
        flush=True,
    )
    metrics_dir_empty(env)  # the set-up commands' counts are not the processes'
    argv = [sys.executable, "-m", "honcho", "start", "-f", str(ROOT / "Procfile"), "-d", str(ROOT)]
    print(f"make up: {shlex.join(argv[1:])}", flush=True)
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
