"""The Grafana dashboard of docs/grafana/modelfleet.json, read for the tests of both sides:
each panel's PromQL expressions must name only series that a real scrape shows."""

from __future__ import annotations

import json
import re

from tests.conftest import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "modelfleet.json"
AGENT_PREFIX = "modelfleet_agent_"
_METRIC = re.compile(r"\bmodelfleet_[a-z0-9_]+")


def metric_names_by_panel() -> dict[str, set[str]]:
    """Panel title -> the metric names its expressions read (sample names: ``_total``,
    ``_bucket`` and the like included)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        panel["title"]: {name for target in panel["targets"] for name in _METRIC.findall(target["expr"])}
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }


def missing(names_scraped: set[str], *, agent: bool) -> dict[str, set[str]]:
    """Per panel of one side (the agent's, or the control plane's), the names it reads that
    the scrape did not show."""
    gaps = {}
    for title, names in metric_names_by_panel().items():
        side = {name for name in names if name.startswith(AGENT_PREFIX) == agent}
        if side - names_scraped:
            gaps[title] = side - names_scraped
    return gaps
