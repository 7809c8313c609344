"""No app writes SQL into another app's tables (issue 11 §4, docs/architecture.md "App
boundaries"): it goes through that app's selectors and services."""

import ast
import re
from pathlib import Path

import pytest
from django.apps import apps

FLEET = Path(__file__).resolve().parents[2] / "fleet"


def tables_by_app() -> dict[str, set[str]]:
    tables: dict[str, set[str]] = {}
    for model in apps.get_models(include_auto_created=True):
        module = model.__module__.split(".")
        if module[0] == "fleet":
            tables.setdefault(module[1], set()).add(model._meta.db_table)
    return tables


def foreign_tables(source: str, tables: set[str]) -> set[str]:
    """The tables of ``tables`` that a string constant of ``source`` names (SQL, by name)."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(tables))) + r")\b")
    return {
        match
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        for match in pattern.findall(node.value)
    }


def app_sources():
    for path in sorted(FLEET.glob("*/**/*.py")):
        if "migrations" not in path.parts:
            yield pytest.param(path, id=str(path.relative_to(FLEET)))


@pytest.mark.parametrize("path", list(app_sources()))
def test_no_app_names_another_apps_table_in_sql(path):
    app = path.relative_to(FLEET).parts[0]
    others = {table for owner, tables in tables_by_app().items() if owner != app for table in tables}
    assert not foreign_tables(path.read_text(), others), (
        f"fleet/{path.relative_to(FLEET)} names another app's table: use that app's selectors or services"
    )


def test_the_check_finds_a_foreign_table_and_not_an_admin_url_name():
    tables = tables_by_app()
    assert {"devices_device", "rollouts_assignment", "devices_telemetrywindow"} <= set().union(
        *tables.values()
    )
    source = (
        'cursor.execute("UPDATE rollouts_assignment AS a SET x = 1 FROM devices_device AS d")\n'
        'reverse("admin:devices_device_changelist")\n'
    )
    assert foreign_tables(source, tables["devices"]) == {"devices_device"}
    assert foreign_tables(source, tables["rollouts"]) == {"rollouts_assignment"}
