from django.db import models


class Role(models.TextChoices):
    """API roles, stored as Django groups of the same name. Each includes the ones above it."""

    VIEWER = "viewer", "Viewer"
    OPERATOR = "operator", "Operator"
    ADMIN = "admin", "Admin"


# Rank of each role: a user has every role whose rank is at most their highest one.
ROLE_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}
