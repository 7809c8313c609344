"""The account commands: `create_api_token` prints a key once and keeps only its sha256;
`ensure_user` gives a user exactly one role and a password for the admin site."""

from __future__ import annotations

import hashlib
import io

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from rest_framework.test import APIClient

from fleet.core.auth import TOKEN_PREFIX
from fleet.core.choices import Role
from fleet.core.models import ApiToken
from fleet.core.permissions import has_role, role_rank
from fleet.registry.models import MLModel

pytestmark = pytest.mark.django_db


def create_api_token(*args: str) -> str:
    out = io.StringIO()
    call_command("create_api_token", *args, stdout=out)
    return out.getvalue().strip()


def client_for(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def roles_of(user: User) -> set[str]:
    return set(user.groups.values_list("name", flat=True))


def test_it_prints_a_key_that_authenticates_as_an_operator():
    key = create_api_token("ci", "--role", "operator", "--name", "ci-pipeline")
    assert key.startswith(TOKEN_PREFIX)
    assert "\n" not in key
    client = client_for(key)
    assert client.get("/api/v1/models/").status_code == 200
    response = client.post("/api/v1/models/", {"name": "digits"}, format="json")
    assert response.status_code == 201, response.json()
    assert MLModel.objects.get(name="digits").created_by.username == "ci"
    token = ApiToken.objects.get(user__username="ci")
    assert token.name == "ci-pipeline"
    assert token.last_used_at is not None


def test_a_viewer_key_may_read_but_not_write():
    client = client_for(create_api_token("dashboard", "--role", "viewer"))
    assert client.get("/api/v1/models/").status_code == 200
    assert client.post("/api/v1/models/", {"name": "digits"}, format="json").status_code == 403


def test_it_creates_the_user_with_the_role():
    create_api_token("ci", "--role", "admin")
    user = User.objects.get(username="ci")
    assert roles_of(user) == {"admin"}
    assert has_role(user, Role.ADMIN)


def test_it_makes_a_token_for_an_existing_user_without_role(bob):
    key = create_api_token("bob")
    user = ApiToken.objects.get(key_sha256=hashlib.sha256(key.encode()).hexdigest()).user
    assert user == bob.user
    assert roles_of(user) == {"viewer"}
    assert client_for(key).get("/api/v1/models/").status_code == 200


def test_it_refuses_an_unknown_user_without_role():
    with pytest.raises(CommandError) as excinfo:
        create_api_token("nobody")
    assert "--role" in str(excinfo.value)
    assert not User.objects.filter(username="nobody").exists()
    assert not ApiToken.objects.exists()


def test_it_refuses_an_unknown_role():
    with pytest.raises(CommandError):
        create_api_token("ci", "--role", "superhero")
    assert not User.objects.filter(username="ci").exists()


def test_it_stores_only_the_sha256_of_the_key():
    key = create_api_token("ci", "--role", "operator")
    token = ApiToken.objects.get(user__username="ci")
    assert token.key_sha256 == hashlib.sha256(key.encode("utf-8")).hexdigest()
    assert key.startswith(token.prefix)
    assert len(token.prefix) < len(key) // 2
    # Search the whole row as PostgreSQL stores it, not only the fields we know about.
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {ApiToken._meta.db_table} AS t WHERE strpos(t::text, %s) > 0", [key]
        )
        assert cursor.fetchone()[0] == 0


def test_each_call_prints_a_new_key():
    first = create_api_token("ci", "--role", "operator")
    second = create_api_token("ci", "--role", "operator")
    assert first != second
    assert ApiToken.objects.filter(user__username="ci").count() == 2
    assert client_for(first).get("/api/v1/models/").status_code == 200
    assert client_for(second).get("/api/v1/models/").status_code == 200


def test_ensure_user_sets_password_and_role():
    out = io.StringIO()
    call_command("ensure_user", "eve", "--role", "operator", "--password", "correct horse", stdout=out)
    assert "eve" in out.getvalue()
    eve = User.objects.get(username="eve")
    assert eve.check_password("correct horse")
    assert roles_of(eve) == {"operator"}
    assert eve.is_staff
    assert not eve.is_superuser
    assert APIClient().login(username="eve", password="correct horse")


def test_ensure_user_replaces_the_role_and_password_of_an_existing_user():
    call_command("ensure_user", "eve", "--role", "admin", "--password", "first one", stdout=io.StringIO())
    call_command("ensure_user", "eve", "--role", "viewer", "--password", "second one", stdout=io.StringIO())
    eve = User.objects.get(username="eve")
    assert roles_of(eve) == {"viewer"}
    assert (eve.is_staff, eve.is_superuser) == (True, False)  # viewers read the admin site
    assert role_rank(eve) == 1
    assert eve.check_password("second one")
    assert not eve.check_password("first one")
    assert User.objects.filter(username="eve").count() == 1


def test_ensure_user_makes_an_admin_a_superuser():
    call_command("ensure_user", "root", "--role", "admin", "--password", "long enough", stdout=io.StringIO())
    root = User.objects.get(username="root")
    assert (root.is_staff, root.is_superuser) == (True, True)


@pytest.mark.parametrize("missing", ["--role", "--password"])
def test_ensure_user_requires_role_and_password(missing):
    args = {"--role": "viewer", "--password": "long enough"}
    del args[missing]
    with pytest.raises(CommandError):
        call_command("ensure_user", "eve", *[part for pair in args.items() for part in pair])
    assert not User.objects.filter(username="eve").exists()
