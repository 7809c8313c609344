from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from fleet.core.choices import Role
from fleet.core.services import api_token_create, user_ensure


class Command(BaseCommand):
    help = (
        "Create an API token for USERNAME and print it (shown once). With --role the user is "
        "created if missing and given that role (viewer, operator or admin)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", choices=Role.values, help="create/update the user with this role")
        parser.add_argument("--name", default="cli", help="what the token is for (default: cli)")

    def handle(self, *args, username, role, name, **options):
        if role:
            user = user_ensure(username=username, role=Role(role))
        else:
            user = User.objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"No user {username!r}. Pass --role viewer|operator|admin to create one.")
        _, key = api_token_create(user=user, name=name)
        self.stdout.write(key)
