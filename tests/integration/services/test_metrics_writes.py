"""The metrics service's HTTP API takes writes only from the operator (issue 18, finding 8):
a transfer run's report needs the operator's service token (the one its gRPC API takes);
reads stay open, and the run list pages like every list."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ctloop.paging import NEXT_CURSOR
from ctloop.rpc_auth import own_token
from ctloop.storage import ObjectStore
from services.metrics.__main__ import add_report_routes
from services.metrics.state import MetricsState

INFO = {"preset": "tiny", "igniter": "igniter-x", "sustainer": "sustainer-x"}


@pytest.fixture(scope="module")
def metrics(settings, tmp_path_factory):
    """The metrics service's HTTP routes on the session's S3, with a run folder of their own
    (where a local platform keeps its service tokens)."""
    root = tmp_path_factory.mktemp("metrics")
    local = settings.model_copy(update={"run_dir": root, "runs_dir": root / "runs"})
    app = FastAPI()
    add_report_routes(app, local, MetricsState(ObjectStore(local), local.s3.bucket))
    with TestClient(app) as client:
        yield client, own_token(local, "operator")


def test_a_report_is_written_only_with_the_operators_token(metrics, unique):
    client, operator = metrics
    path = f"/v1/runs/w-{unique}/report"
    assert client.post(path, json=INFO).status_code == 401
    for wrong in ("Bearer ctg_forged", "Basic b3BlcmF0b3I6eA==", f"Bearer {operator}x"):
        r = client.post(path, json=INFO, headers={"Authorization": wrong})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", wrong
    assert client.get(f"/v1/runs/w-{unique}/report.json").status_code == 404  # nothing written
    ok = client.post(path, json=INFO, headers={"Authorization": f"Bearer {operator}"})
    assert ok.status_code == 200 and ok.json()["run_id"] == f"w-{unique}"
    assert client.get(f"/v1/runs/w-{unique}/report.json").json()["run_id"] == f"w-{unique}"
    assert client.get("/v1/report").status_code == 200  # reads need nothing


def test_the_run_list_pages_with_every_run_once(metrics, unique):
    client, operator = metrics
    ours = [f"p-{unique}-{n}" for n in range(3)]
    for rid in ours:
        r = client.post(
            f"/v1/runs/{rid}/report", json=INFO, headers={"Authorization": f"Bearer {operator}"}
        )
        assert r.status_code == 200
    runs, cursor = [], None
    while True:
        page = client.get("/v1/runs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200 and len(page.json()) <= 2
        runs += page.json()
        cursor = page.headers.get(NEXT_CURSOR)
        if cursor is None:
            break
    assert len(runs) == len(set(runs)) and runs == sorted(runs)
    assert [r for r in runs if r.startswith(f"p-{unique}")] == ours
    assert client.get("/v1/runs", params={"limit": 5000}).status_code == 422
