"""``field = ANY(%s)``: membership in a long list of ids as one array parameter.

Django writes ``IN (%s, %s, …)`` with one parameter per value, and psycopg's client-side
binding parses the query text for each of them: at a rollout's 10,000 devices that costs
more than the query (docs/benchmarks.md, "Gate query at 10,000 devices" and "Rollout
fan-out"). PostgreSQL plans ``= ANY(array)`` as it plans ``IN``. Elsewhere (SQLite) it is
the plain ``__in``.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connection
from django.db.models import F, Lookup, Q


class AnyOf(Lookup):
    """``lhs = ANY(%s::bigint[])`` with the values as one array parameter."""

    lookup_name = "any_of"
    prepare_rhs = False

    def as_sql(self, compiler, connection) -> tuple[str, list]:
        lhs, params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s::bigint[])", [*params, list(self.rhs)]


def any_of(field: str, ids: Iterable[int]) -> Q | Lookup:
    """A filter: ``field`` (an integer or foreign key column) is one of ``ids``."""
    ids = list(ids)
    if connection.vendor != "postgresql":
        return Q(**{f"{field}__in": ids})
    return AnyOf(F(field), ids)
