"""The apps' dependency graph (issue 11, section 4; docs/architecture.md, "App dependencies").

Every ``import`` and ``from … import`` in fleet/<app>/**/*.py, at module level and inside
functions, is an edge from its app to the app it names. The apps are layered, lowest first,
and an app may import only the apps below it:

    core  <  mqtt  <  registry  <  devices  <  rollouts

so no cycle can form, and fleet.mqtt (the broker adapter) imports nothing but fleet.core.
The upward imports that exist today are listed in KNOWN_UPWARD with where they are and why:
a new upward import fails here, and so does a listed one that is gone (shrink the list).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "mqtt", "registry", "devices", "rollouts")

# Upward imports that exist today, each a known debt rather than a design (docs/architecture.md).
KNOWN_UPWARD = {
    ("core", "devices"): "the dashboard and the metrics collectors read devices",
    ("core", "registry"): "the API root lists the registry's endpoints",
    ("core", "rollouts"): "the dashboard and the metrics collectors read rollouts",
    ("registry", "devices"): "admin and selectors show which devices run a version; key rotation re-signs",
    ("registry", "rollouts"): "selectors show a version's rollouts",
    ("devices", "rollouts"): "selectors show a device's rollouts",
}

Edges = dict[tuple[str, str], list[str]]
FACTORY = Path("fleet/mqtt/broker.py")  # the one place a paho client is made
PAHO_CLIENT = "paho.mqtt.client"


def _imported_modules(node: ast.AST, module: str) -> list[str]:
    """The dotted modules an import statement names, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".")[: -node.level]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def app_edges(root: Path) -> Edges:
    """(from app, to app) -> "path:line" of every import between two apps of ``root``/fleet
    (an app is a package with an apps.py; the project modules beside them are not apps)."""
    apps = {path.parent.name for path in (root / "fleet").glob("*/apps.py")}
    edges: Edges = defaultdict(list)
    for path in sorted((root / "fleet").rglob("*.py")):
        relative = path.relative_to(root)
        if len(relative.parts) < 3 or relative.parts[1] not in apps:
            continue
        source = relative.parts[1]
        module = ".".join(relative.with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = set()
            for name in _imported_modules(node, module):
                parts = name.split(".")
                if parts[0] == "fleet" and len(parts) > 1 and parts[1] in apps and parts[1] != source:
                    targets.add(parts[1])
            for target in targets:
                edges[(source, target)].append(f"{relative}:{node.lineno}")
    return dict(edges)


def upward(edges: Edges) -> Edges:
    """The edges that go from an app to one above it (or to an app missing from LAYERS)."""
    rank = {app: number for number, app in enumerate(LAYERS)}
    return {(a, b): where for (a, b), where in edges.items() if rank.get(b, len(LAYERS)) >= rank.get(a, -1)}


def cycles(edges: Edges) -> list[list[str]]:
    """One cycle per strongly connected group of apps (Tarjan), each as the apps in it."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph[b]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(app: str) -> None:
        index[app] = low[app] = len(index)
        stack.append(app)
        for other in sorted(graph[app]):
            if other not in index:
                visit(other)
                low[app] = min(low[app], low[other])
            elif other in stack:
                low[app] = min(low[app], index[other])
        if low[app] == index[app]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == app:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for app in sorted(graph):
        if app not in index:
            visit(app)
    return found


def mqtt_outward(edges: Edges) -> Edges:
    """fleet.mqtt's imports of any app but fleet.core."""
    return {(a, b): where for (a, b), where in edges.items() if a == "mqtt" and b != "core"}


def new_upward(edges: Edges) -> Edges:
    return {edge: where for edge, where in upward(edges).items() if edge not in KNOWN_UPWARD}


def paho_clients_made(root: Path) -> list[str]:
    """ "path:line" of every paho ``Client(…)`` made in ``root``/fleet outside the one factory
    (fleet/mqtt/broker.py), however paho's client module or class was imported."""
    made = []
    for path in sorted((root / "fleet").rglob("*.py")):
        relative = path.relative_to(root)
        if relative == FACTORY:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        modules, classes = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {alias.asname or alias.name for alias in node.names if alias.name == PAHO_CLIENT}
            elif isinstance(node, ast.ImportFrom) and node.module == "paho.mqtt":
                modules |= {alias.asname or alias.name for alias in node.names if alias.name == "client"}
            elif isinstance(node, ast.ImportFrom) and node.module == PAHO_CLIENT:
                classes |= {alias.asname or alias.name for alias in node.names if alias.name == "Client"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Name) and func.id in classes) or (
                isinstance(func, ast.Attribute)
                and func.attr == "Client"
                and ast.unparse(func.value) in modules
            ):
                made.append(f"{relative}:{node.lineno}")
    return made


def _report(edges: Edges) -> str:
    return "; ".join(f"{a} -> {b} ({', '.join(where[:3])})" for (a, b), where in sorted(edges.items()))


# --- the project


def test_fleet_mqtt_imports_no_app_but_core():
    outward = mqtt_outward(app_edges(ROOT))
    assert not outward, f"fleet.mqtt is the broker adapter and imports only fleet.core: {_report(outward)}"


def test_devices_and_mqtt_do_not_import_each_other_both_ways():
    edges = app_edges(ROOT)
    assert not (("devices", "mqtt") in edges and ("mqtt", "devices") in edges)


def test_every_import_between_apps_goes_down_the_layers_or_is_a_known_debt():
    new = new_upward(app_edges(ROOT))
    assert not new, f"imports against the layers {' < '.join(LAYERS)}: {_report(new)}"


def test_without_the_known_debts_the_app_graph_has_no_cycle():
    edges = {edge: where for edge, where in app_edges(ROOT).items() if edge not in KNOWN_UPWARD}
    assert cycles(edges) == []


def test_every_known_debt_still_exists():
    """A debt paid off leaves the list, so that it cannot come back unnoticed."""
    gone = sorted(set(KNOWN_UPWARD) - set(app_edges(ROOT)))
    assert not gone, f"no longer imported, remove from KNOWN_UPWARD: {gone}"


def test_only_the_broker_adapter_makes_paho_clients():
    assert paho_clients_made(ROOT) == []


def test_every_app_has_a_layer():
    apps = {path.parent.name for path in (ROOT / "fleet").glob("*/apps.py")}
    assert apps == set(LAYERS)


# --- positive controls: the same checks on a planted tree


def _plant(root: Path, files: dict[str, str]) -> Path:
    for app in ("core", "mqtt", "registry", "devices", "rollouts"):
        (root / "fleet" / app).mkdir(parents=True, exist_ok=True)
        (root / "fleet" / app / "apps.py").write_text("")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_an_import_inside_a_function_of_fleet_mqtt_is_reported(tmp_path):
    root = _plant(
        tmp_path,
        {
            "fleet/mqtt/planted.py": "def later():\n    from fleet.devices.services import devices_assign\n",
            "fleet/mqtt/fine.py": "from fleet.core import metrics\nfrom . import broker\n",
        },
    )
    edges = app_edges(root)
    assert edges == {
        ("mqtt", "devices"): ["fleet/mqtt/planted.py:2"],
        ("mqtt", "core"): ["fleet/mqtt/fine.py:1"],
    }
    assert upward(edges) == {("mqtt", "devices"): ["fleet/mqtt/planted.py:2"]}


def test_a_relative_import_into_another_app_and_a_plain_import_are_reported(tmp_path):
    root = _plant(
        tmp_path,
        {
            "fleet/registry/sub/planted.py": "from ...rollouts import models\n",
            "fleet/core/planted.py": "import fleet.registry.models\n",
        },
    )
    assert set(app_edges(root)) == {("registry", "rollouts"), ("core", "registry")}


def test_a_planted_cycle_between_apps_is_found(tmp_path):
    root = _plant(
        tmp_path,
        {
            "fleet/devices/planted.py": "from fleet.registry.models import Artifact\n",
            "fleet/registry/planted.py": "def f():\n    import fleet.rollouts.services\n",
            "fleet/rollouts/planted.py": "from fleet.devices import models\n",
        },
    )
    edges = app_edges(root)
    assert cycles(edges) == [["devices", "registry", "rollouts"]]
    assert cycles({edge: where for edge, where in edges.items() if edge != ("rollouts", "devices")}) == []


def test_a_paho_client_made_outside_the_factory_is_reported(tmp_path):
    root = _plant(
        tmp_path,
        {
            "fleet/devices/planted.py": (
                "import paho.mqtt.client as mqtt\n"
                "from paho.mqtt.client import Client as Made\n"
                "def a() -> mqtt.Client:\n    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)\n"
                "def b():\n    return Made()\n"
            ),
            "fleet/mqtt/broker.py": "import paho.mqtt.client as mqtt\nclient = mqtt.Client()\n",
        },
    )
    assert paho_clients_made(root) == ["fleet/devices/planted.py:4", "fleet/devices/planted.py:6"]


def test_the_publishing_tasks_kept_the_names_queued_tasks_use():
    """They moved out of fleet.mqtt (issue 11); tasks queued by an older release name them so."""
    from fleet.celery import app
    from fleet.devices.tasks import publish_desired_task
    from fleet.registry.tasks import publish_trust_task

    assert publish_desired_task.name == "fleet.mqtt.tasks.publish_desired_task"
    assert publish_trust_task.name == "fleet.mqtt.tasks.publish_trust_task"
    assert app.tasks[publish_desired_task.name].run.__module__ == "fleet.devices.tasks"
    assert app.tasks[publish_trust_task.name].run.__module__ == "fleet.registry.tasks"
