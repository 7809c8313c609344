from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone

from fleet.devices.services import enrollment_token_create


class Command(BaseCommand):
    help = "Create a fleet enrollment token and print it (shown once). Devices enroll with it."

    def add_arguments(self, parser):
        parser.add_argument("name", help="what it is for, e.g. 'factory line 2'")
        parser.add_argument("--auto-approve", action="store_true", help="devices are active at once")
        parser.add_argument(
            "--max-uses",
            type=int,
            help="how many devices may enroll with it (default: ENROLLMENT_TOKEN_DEFAULT_MAX_USES, 100)",
        )
        parser.add_argument(
            "--expires-in-days",
            type=float,
            help="it stops working after this many days (default: ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS, 30)",
        )
        parser.add_argument("--tag", action="append", default=[], help="tag for the devices it enrolls")

    def handle(self, *args, name, auto_approve, max_uses, expires_in_days, tag, **options):
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        _, key = enrollment_token_create(
            name=name, auto_approve=auto_approve, max_uses=max_uses, expires_at=expires_at, tags=tag
        )
        self.stdout.write(key)
