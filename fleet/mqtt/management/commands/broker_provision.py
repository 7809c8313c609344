from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agent.protocol import Topics
from fleet.mqtt.broker import BrokerError, DynSec
from fleet.mqtt.provisioning import broker_provision

# Exit status for a missing or unreadable password, or credentials the broker refuses:
# the operator's input is wrong and nothing was changed (argparse's usage errors use 2 too).
BAD_INPUT = 2
# The accounts whose passwords the command needs, and the setting each is read from.
ACCOUNTS = {
    "admin": "MQTT_ADMIN_PASSWORD",
    "publisher": "MQTT_PUBLISHER_PASSWORD",
    "ingest": "MQTT_INGEST_PASSWORD",
}


def read_password(path: str, option: str) -> str:
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise CommandError(f"{option}: cannot read {path}: {exc.strerror}", returncode=BAD_INPUT) from exc
    if not password:
        raise CommandError(f"{option}: {path} is empty", returncode=BAD_INPUT)
    return password


class Command(BaseCommand):
    help = (
        "Provision the MQTT broker for the control plane (docs/mqtt.md, 'Provisioning'): default "
        "deny, the publisher and ingest roles and service accounts. Idempotent: a second run "
        "changes nothing. Passwords come from MQTT_*_PASSWORD or MQTT_*_PASSWORD_FILE, or the "
        "--*-password-file options; they are never printed. Exits with 2, having changed "
        "nothing, when a password is missing or unreadable or the broker refuses the admin."
    )

    def add_arguments(self, parser):
        for name, password_setting in ACCOUNTS.items():
            parser.add_argument(
                f"--{name}-password-file",
                metavar="PATH",
                help=f"read the {name} account's password from PATH (default: {password_setting}[_FILE])",
            )

    def _passwords(self, options) -> dict[str, str]:
        """Every password, checked before the broker is touched."""
        passwords = {}
        for name, password_setting in ACCOUNTS.items():
            option = f"--{name}-password-file"
            path = options[f"{name}_password_file"]
            passwords[name] = read_password(path, option) if path else getattr(settings, password_setting)
            if not passwords[name]:
                raise CommandError(
                    f"no password for the {name} account: set {password_setting} or "
                    f"{password_setting}_FILE, or pass {option}",
                    returncode=BAD_INPUT,
                )
        return passwords

    def handle(self, *args, **options):
        passwords = self._passwords(options)
        admin = DynSec(
            settings.MQTT_URL,
            settings.MQTT_ADMIN_USERNAME,
            passwords["admin"],
            topics=Topics(settings.MQTT_TOPIC_PREFIX),
            ca_file=settings.MQTT_CA_FILE or None,
        )
        try:
            if not admin.login_works(admin.username, admin.password):
                raise CommandError(
                    f"the broker at {settings.MQTT_URL} refused {admin.username!r} with the admin password "
                    "given; nothing was changed",
                    returncode=BAD_INPUT,
                )
            changes = broker_provision(
                admin,
                topics=admin.topics,
                publisher_password=passwords["publisher"],
                ingest_password=passwords["ingest"],
                publisher_username=settings.MQTT_PUBLISHER_USERNAME,
                ingest_username=settings.MQTT_INGEST_USERNAME,
            )
        except (BrokerError, OSError) as exc:
            raise CommandError(f"broker {settings.MQTT_URL}: {exc}") from exc
        if not changes:
            self.stdout.write("The broker is already provisioned: nothing changed.")
        for change in changes:
            self.stdout.write(change)
