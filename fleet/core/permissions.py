"""Role checks shared by every API endpoint (roles are Django groups, see choices.Role)."""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission

from fleet.core.choices import ROLE_RANK, Role


def role_rank(user) -> int:
    if not user or not user.is_authenticated or not user.is_active or getattr(user, "is_device", False):
        return 0  # devices have no role: only endpoints made for them let them in
    if user.is_superuser:
        return ROLE_RANK[Role.ADMIN]
    cached = getattr(user, "_modelfleet_role_rank", None)
    if cached is None:
        names = set(user.groups.values_list("name", flat=True))
        cached = max((rank for role, rank in ROLE_RANK.items() if role.value in names), default=0)
        user._modelfleet_role_rank = cached
    return cached


def has_role(user, role: Role) -> bool:
    return role_rank(user) >= ROLE_RANK[role]


class _RolePermission(BasePermission):
    role = Role.VIEWER
    message = "This needs the viewer role."

    def has_permission(self, request, view) -> bool:
        return has_role(request.user, self.role)


class IsViewer(_RolePermission):
    role = Role.VIEWER
    message = "This needs the viewer role (or operator or admin)."


class IsOperator(_RolePermission):
    role = Role.OPERATOR
    message = "This needs the operator role (or admin)."


class IsAdmin(_RolePermission):
    role = Role.ADMIN
    message = "This needs the admin role."


class ViewerReadsOperatorWrites(BasePermission):
    message = "Reading needs the viewer role; changing needs the operator role."

    def has_permission(self, request, view) -> bool:
        needed = Role.VIEWER if request.method in SAFE_METHODS else Role.OPERATOR
        return has_role(request.user, needed)
