"""Accounts and API tokens (writes)."""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission, User
from django.db import transaction

from fleet.core.auth import new_token_key, token_sha256
from fleet.core.choices import Role
from fleet.core.models import ApiToken
from fleet.core.roles import role_permission_query


@transaction.atomic
def user_ensure(*, username: str, role: Role, password: str | None = None, email: str = "") -> User:
    """Create the user if missing and give them exactly ``role``. Every role may log in to
    the admin site, where the role's permissions decide what it shows (fleet/core/roles.py)."""
    user, _ = User.objects.get_or_create(username=username, defaults={"email": email})
    user.is_staff = True
    user.is_superuser = role == Role.ADMIN
    if password is not None:
        user.set_password(password)
    user.save()
    user.groups.remove(*Group.objects.filter(name__in=Role.values))
    user.groups.add(Group.objects.get_or_create(name=role.value)[0])
    return user


def api_token_create(*, user: User, name: str) -> tuple[ApiToken, str]:
    """Return the token row and its key; the key is not stored and cannot be shown again."""
    key = new_token_key()
    token = ApiToken.objects.create(user=user, name=name, prefix=key[:10], key_sha256=token_sha256(key))
    return token, key


def roles_sync(**kwargs) -> None:
    """Give each role's group exactly its permissions; runs after every ``migrate``, once
    the permissions of every app exist."""
    for role in Role:
        group, _ = Group.objects.get_or_create(name=role.value)
        group.permissions.set(Permission.objects.filter(role_permission_query(role)))
