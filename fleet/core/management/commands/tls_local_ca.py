from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from fleet.core.tls import DEFAULT_DAYS, LocalCA, local_ca_create, subject_names


class Command(BaseCommand):
    help = (
        "Make a local CA and a server certificate it signs, for the broker's TLS listener or an "
        "HTTPS proxy on a lab network (docs/security.md, 'TLS'). The certificate names localhost, "
        "127.0.0.1, ::1 and every --name. Private keys are written mode 0600."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, help="directory for ca.pem, server.pem and their keys")
        parser.add_argument(
            "--name",
            action="append",
            default=[],
            metavar="HOST",
            help="a DNS name or IP address devices use to reach the server; repeatable",
        )
        parser.add_argument(
            "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
        )
        parser.add_argument("--force", action="store_true", help="replace the files already in --out")

    def handle(self, *args, out, name, days, force, **options):
        if days < 1:
            raise CommandError("--days must be at least 1")
        if LocalCA.at(out).ca_file.exists() and not force:
            raise CommandError(f"{out} already holds a CA; pass --force to replace it")
        files = local_ca_create(Path(out), names=name, days=days)
        self.stdout.write(
            f"CA certificate (pin it on devices: broker.ca_file, control_plane.ca_file): {files.ca_file}\n"
            f"CA key (keep it offline; it signs certificates every device trusts): {files.ca_key_file}\n"
            f"server certificate for {', '.join(subject_names(name))}: {files.cert_file}\n"
            f"server key: {files.key_file}"
        )
