from django.conf import settings
from django.db import models


class ApiToken(models.Model):
    """A bearer token for a human or a CI pipeline. Only the sha256 of the key is kept:
    the key itself is shown once, when it is created, and cannot be recovered."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'ci-pipeline'.")
    prefix = models.CharField(max_length=12, help_text="First characters of the key, to recognise it.")
    key_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name}, {self.user})"
