"""In a release the metrics service takes report writes with the operator's token from the
release's gRPC-token Secret (issue 18, finding 8): the chart and services/metrics agree."""

from __future__ import annotations

import base64
import os
from unittest import mock

import pytest
from fastapi import HTTPException

from ctloop.settings import Settings
from services.metrics.__main__ import operator_only
from tests.helm.conftest import Doc, render
from tests.helm.test_settings_and_secrets import service_container


def _secret_data(docs: list[Doc]) -> dict[tuple[str, str], str]:
    return {
        (d["metadata"]["name"], k): base64.b64decode(v).decode()
        for d in docs
        if d.get("kind") == "Secret"
        for k, v in (d.get("data") or {}).items()
    }


def test_the_metrics_service_of_a_release_takes_writes_with_the_operators_token_only():
    docs = render()
    secrets = _secret_data(docs)
    env = {}
    for e in service_container(docs, "metrics")["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = secrets[(ref["name"], ref["key"])] if ref else str(e["value"])
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
    check = operator_only(settings)
    (tokens,) = [
        d for d in docs if d.get("kind") == "Secret" and "grpc-tokens" in d["metadata"]["name"]
    ]
    operator = base64.b64decode(tokens["data"]["operator-token"]).decode()
    check(f"Bearer {operator}")  # accepted: no exception
    for wrong in (
        "",
        f"Bearer {operator[:-1]}",
        f"Bearer {secrets[(tokens['metadata']['name'], 'ingest-token')]}",
    ):
        with pytest.raises(HTTPException) as refused:
            check(wrong)
        assert refused.value.status_code == 401
