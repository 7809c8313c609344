"""Bearer-token authentication for humans and CI (`Authorization: Bearer mf_…`)."""

from __future__ import annotations

import hashlib
import secrets

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

TOKEN_PREFIX = "mf_"


def new_token_key() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(key: str) -> str:
    # Keys are 256 random bits, so a plain hash is as good as a slow KDF here.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_key(request) -> str | None:
    """The key of an `Authorization: Bearer <key>` (or `Token <key>`) header, if any."""
    header = authentication.get_authorization_header(request).split()
    if not header or header[0].lower() not in (b"bearer", b"token"):
        return None
    if len(header) != 2:
        raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
    try:
        return header[1].decode("ascii")
    except UnicodeDecodeError as exc:
        raise exceptions.AuthenticationFailed("Token contains invalid characters.") from exc


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        key = bearer_key(request)
        if key is None or not key.startswith(TOKEN_PREFIX):
            return None  # not ours: another authenticator (devices) may know it
        from fleet.core.models import ApiToken

        token = (
            ApiToken.objects.select_related("user")
            .filter(key_sha256=token_sha256(key), revoked_at=None)
            .first()
        )
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API token.")
        # Touch last_used_at at most once a minute to keep reads cheap.
        now = timezone.now()
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return self.keyword


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema that the API takes bearer tokens."""

    target_class = ApiTokenAuthentication
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "mf_<key>"}
