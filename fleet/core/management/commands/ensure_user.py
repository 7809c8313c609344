from django.core.management.base import BaseCommand

from fleet.core.choices import Role
from fleet.core.services import user_ensure


class Command(BaseCommand):
    help = "Create or update a user with a role and a password (for the admin web UI)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", choices=Role.values, required=True)
        parser.add_argument("--password", required=True)

    def handle(self, *args, username, role, password, **options):
        user_ensure(username=username, role=Role(role), password=password)
        self.stdout.write(f"user {username} has role {role}")
