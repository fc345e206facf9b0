"""The Grafana dashboard plots only metrics the services export."""

from __future__ import annotations

import json
import re

from ctloop.settings import REPO_ROOT
from tests.helm.conftest import CHART, of_kind, render

DEFINED = re.compile(r'(?:Gauge|Counter|Histogram|Summary)\(\s*"(ctloop_[a-z_]+)"')


def exported_metrics() -> set[str]:
    names: set[str] = set()
    for path in (REPO_ROOT / "services").rglob("*.py"):
        names |= set(DEFINED.findall(path.read_text()))
    return names


def test_the_dashboard_uses_only_exported_metrics_and_shows_the_round_numbers():
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ctloop_\w+", e)
    }
    assert used <= exported_metrics(), used - exported_metrics()
    assert {"ctloop_round_mean_dice", "ctloop_round_minutes_per_ct"} <= used


def test_the_dashboard_configmap_is_labelled_for_grafana():
    docs = render(set_values=("grafanaDashboard.enabled=true",))
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(cm["data"]["ctloop-rounds.json"])
