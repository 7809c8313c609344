"""Editing an enrollment token (issue 11, section 4): `enrollment_token_update` checks what
creation checks, writes only the edited fields, and the admin's edit page goes through it
with bad input shown as form errors. Real PostgreSQL; ada is an admin."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import F
from django.utils import timezone

from fleet.core.errors import InvalidInput
from fleet.devices import services
from fleet.devices.models import EnrollmentToken
from tests.server.test_admin_forms import TOKENS, first_error
from tests.server.test_admin_policy_editor import web

pytestmark = pytest.mark.django_db
LONG_AGO = datetime(2001, 1, 1, tzinfo=UTC)


@pytest.fixture
def token(db):
    token, _ = services.enrollment_token_create(name="factory", max_uses=10, tags=["fleet"])
    return token


def edit_form(token: EnrollmentToken, **changes) -> dict:
    """The change page as a browser posts it, with the token's values unless changed."""
    form = {
        "name": token.name,
        "expires_at_0": token.expires_at.strftime("%Y-%m-%d"),
        "expires_at_1": token.expires_at.strftime("%H:%M:%S"),
        "max_uses": str(token.max_uses),
        "tags": ", ".join(token.tags),
    }
    return {**form, **changes}


# --- the service


def test_it_changes_the_fields_given_and_leaves_the_others(token):
    later = timezone.now() + timedelta(days=90)
    updated = services.enrollment_token_update(
        token=token, name="line-2", expires_at=later, tags=[" roof ", "cam", "roof"]
    )
    assert (updated.name, updated.expires_at, updated.tags) == ("line-2", later, ["roof", "cam"])
    assert (updated.max_uses, updated.auto_approve) == (10, False)
    assert EnrollmentToken.objects.get(pk=token.pk).name == "line-2"


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"expires_at": LONG_AGO}, "invalid_expiry", "expires_at"),
        ({"max_uses": 0}, "invalid_max_uses", "max_uses"),
        ({"tags": ["fleet, cam"]}, "invalid_tags", "tags"),
        ({"tags": ["x" * 65]}, "invalid_tags", "tags"),
        ({"tags": [""]}, "invalid_tags", "tags"),
        ({"tags": [7]}, "invalid_tags", "tags"),
        ({"tags": "fleet"}, "invalid_tags", "tags"),
    ],
)
def test_it_refuses_what_creation_refuses_and_changes_nothing(token, changes, code, field):
    with pytest.raises(InvalidInput) as refused:
        services.enrollment_token_update(token=token, name="renamed", **changes)
    assert (refused.value.code, refused.value.field) == (code, field)
    with pytest.raises(InvalidInput) as at_birth:
        services.enrollment_token_create(name="new", **changes)
    assert at_birth.value.code == code
    assert list(EnrollmentToken.objects.values_list("name", flat=True)) == ["factory"]


def test_an_expired_token_can_be_renamed_and_stays_expired(token):
    EnrollmentToken.objects.filter(pk=token.pk).update(expires_at=LONG_AGO)
    token.refresh_from_db()
    updated = services.enrollment_token_update(token=token, name="old-line", expires_at=LONG_AGO)
    assert (updated.name, updated.expires_at) == ("old-line", LONG_AGO)


def test_an_edit_from_an_old_copy_keeps_the_uses_and_the_revocation_made_meanwhile(token):
    stale, also_stale = EnrollmentToken.objects.get(pk=token.pk), EnrollmentToken.objects.get(pk=token.pk)
    EnrollmentToken.objects.filter(pk=token.pk).update(uses=F("uses") + 3, revoked_at=timezone.now())
    updated = services.enrollment_token_update(token=stale, name="renamed")
    assert updated.uses == 3 and updated.revoked_at is not None and updated.name == "renamed"
    # Positive control: saving an old copy whole, as the admin's edit used to, loses both.
    also_stale.save()
    also_stale.refresh_from_db()
    assert also_stale.uses == 0 and also_stale.revoked_at is None


# --- the admin's edit page


def test_the_admin_edit_saves_through_the_service(ada, token):
    EnrollmentToken.objects.filter(pk=token.pk).update(uses=4)
    response = web(ada).post(f"{TOKENS}{token.pk}/change/", edit_form(token, name="line-2", tags="roof, cam"))
    assert response.status_code == 302, response.content.decode()[:2000]
    token.refresh_from_db()
    assert (token.name, token.tags, token.uses) == ("line-2", ["roof", "cam"], 4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"expires_at_0": "2001-01-01", "expires_at_1": "00:00:00"}, "Choose a time in the future"),
        ({"max_uses": "0"}, "Allow at least 1 use."),
    ],
)
def test_bad_input_on_the_admin_edit_is_a_form_error_that_changes_nothing(ada, token, changes, message):
    response = web(ada).post(f"{TOKENS}{token.pk}/change/", edit_form(token, name="renamed", **changes))
    assert response.status_code == 200
    assert first_error(response.content.decode()).startswith(message)
    assert EnrollmentToken.objects.get(pk=token.pk).name == "factory"


def test_the_admin_renames_an_expired_token_without_touching_its_expiry(ada, token):
    EnrollmentToken.objects.filter(pk=token.pk).update(expires_at=LONG_AGO)
    token.refresh_from_db()
    response = web(ada).post(f"{TOKENS}{token.pk}/change/", edit_form(token, name="old-line"))
    assert response.status_code == 302, response.content.decode()[:2000]
    token.refresh_from_db()
    assert (token.name, token.expires_at) == ("old-line", LONG_AGO)


def test_the_api_refuses_tags_that_are_not_words(ada):
    response = ada.client().post(
        "/api/v1/enrollment-tokens/", {"name": "x", "tags": {"not": "a list"}}, format="json"
    )
    assert response.status_code == 400 and response.json()["error"]["field"] == "tags"
    assert not EnrollmentToken.objects.exists()
