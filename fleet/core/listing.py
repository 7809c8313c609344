"""How every list endpoint pages, filters and orders (docs/api.md, "Lists").

One pagination class (``?limit=&offset=``, the envelope ``{count, next, previous,
results}``), one FilterSet base for filters and ``ordering`` (an allow-list per endpoint),
used through django-filter's backend (settings.REST_FRAMEWORK). A bad value anywhere — a
limit that is not a number, an ordering the endpoint does not offer, a status that does
not exist, a parameter the list does not know — is a JSON 400 that names the parameter,
never a list that silently ignored it.
"""

from __future__ import annotations

from django import forms
from django.db.models import QuerySet
from django_filters import rest_framework as filters
from django_filters.widgets import BooleanWidget, CSVWidget
from rest_framework import pagination

from fleet.core.errors import InvalidInput

# The largest page a client may ask for; a list is never unbounded.
MAX_PAGE_SIZE = 1000
# Query parameters every list accepts besides its filters: paging, and DRF's ?format=.
LIST_PARAMETERS = frozenset({"limit", "offset", "format"})


def _integer_parameter(request, name: str, *, default: int, minimum: int, maximum: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    within = f"between {minimum} and {maximum}" if maximum is not None else f"{minimum} or more"
    value = int(raw) if raw.isascii() and raw.isdigit() else None  # no sign, space or 1_000
    if value is None or value < minimum or (maximum is not None and value > maximum):
        raise InvalidInput(f"{name} must be a whole number {within}, got {raw!r}.", field=name)
    return value


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    """DRF's limit/offset paging, strict about its two numbers (DRF ignores bad ones)."""

    max_limit = MAX_PAGE_SIZE

    def get_limit(self, request) -> int:
        return _integer_parameter(
            request, self.limit_query_param, default=self.default_limit, minimum=1, maximum=self.max_limit
        )

    def get_offset(self, request) -> int:
        return _integer_parameter(request, self.offset_query_param, default=0, minimum=0, maximum=None)

    def paginate_queryset(self, queryset, request, view=None):
        if isinstance(queryset, QuerySet) and not queryset.ordered:
            queryset = queryset.order_by("pk")  # pages of an unordered query may overlap
        return super().paginate_queryset(queryset, request, view)

    def get_schema_operation_parameters(self, view) -> list[dict]:
        parameters = super().get_schema_operation_parameters(view)
        bounds = {
            self.limit_query_param: {"minimum": 1, "maximum": self.max_limit, "default": self.default_limit},
            self.offset_query_param: {"minimum": 0, "default": 0},
        }
        for parameter in parameters:
            parameter["schema"].update(bounds.get(parameter["name"], {}))
        return parameters


class _RepeatableCSVWidget(CSVWidget):
    """``?ordering=a,b`` and ``?ordering=a&ordering=b`` alike: generated clients send an
    array parameter the second way, and django-filter would keep only its last value."""

    def value_from_datadict(self, data, files, name):
        values = data.getlist(name) if hasattr(data, "getlist") else []
        if len(values) > 1:
            return [part for value in values for part in value.split(",")]
        return super().value_from_datadict(data, files, name)


class OrderingFilter(filters.OrderingFilter):
    """``?ordering=field,-other`` over the endpoint's allow-list; the primary key breaks
    ties so that pages of a list ordered by a repeated value neither overlap nor skip."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("widget", _RepeatableCSVWidget)
        super().__init__(*args, **kwargs)

    def filter(self, qs, value):
        value = [param for param in value or () if param]  # "?ordering=,," says nothing
        if not value:
            return qs
        fields = [self.get_ordering_value(param) for param in value]
        if not {"pk", "-pk", "id", "-id"} & set(fields):
            fields.append("pk")
        return qs.order_by(*fields)


class _StrictBooleanWidget(BooleanWidget):
    """django-filter's widget maps anything but true/false/1/0 to None ("no filter"); this
    one hands the unknown value on, for the field to refuse."""

    def value_from_datadict(self, data, files, name):
        value = super().value_from_datadict(data, files, name)
        return data.get(name) if value is None else value


class _StrictBooleanField(forms.Field):
    def to_python(self, value):
        if value in (None, "") or isinstance(value, bool):
            return None if value == "" else value
        raise forms.ValidationError(
            "Must be true or false (or 1 or 0), got %(value)r.", code="invalid", params={"value": value}
        )


class BooleanFilter(filters.BooleanFilter):
    """``true``/``false`` (or 1/0, any case); anything else is a 400."""

    field_class = _StrictBooleanField

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("widget", _StrictBooleanWidget)
        super().__init__(*args, **kwargs)


class FilterSet(filters.FilterSet):
    """The base of every list endpoint's filters; refuses parameters it does not know, so a
    typo (``?stauts=failed``) is a 400 instead of the whole unfiltered list."""

    def is_valid(self) -> bool:
        known = set(self.filters) | LIST_PARAMETERS
        unknown = sorted(set(self.data) - known)
        if unknown:
            offered = ", ".join(sorted(known - {"format"}))
            raise InvalidInput(
                f"Unknown query parameter {unknown[0]!r}; this list takes {offered}.",
                code="unknown_parameter",
                field=unknown[0],
            )
        return super().is_valid()
