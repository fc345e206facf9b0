"""Schemathesis against ingest's own OpenAPI document, authenticated as an admin, bounded: every
operation gets generated requests (valid and invalid); no answer may be a 5xx, and every answer
must match the schema the document declares for it. The real stack stands behind it (S3, SQL,
Kafka); the MONAI Label routes that call the inference and training services over gRPC (infer,
train, model) are left out (those services are not running here; test_monailabel_client.py
covers them)."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from ctloop.bus import EventProducer
from ctloop.outbox import OutboxRelay
from services.ingest.app import create_app


@pytest.fixture(scope="module")
def fuzz_app(svc_settings):
    relay = OutboxRelay(svc_settings.database_url, EventProducer(svc_settings, client_id="fuzz"))
    app = create_app(svc_settings, relay)
    yield app
    relay.producer.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    return schema.exclude(path_regex=r"^/(infer|train|model)/")


@pytest.fixture(scope="module")
def client(fuzz_app, admin_headers):
    with TestClient(fuzz_app, raise_server_exceptions=False) as c:
        c.headers.update(admin_headers)
        yield c


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_answers_match_the_schema(api_schema, client, admin_headers, mode):
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.response_schema_conformance,
    ]
    failures: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=6,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            response = case.call(session=client, headers=admin_headers)
            statuses.append(response.status_code)
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # collect them all, then fail once with every one
                failures.append(f"{case.method} {case.formatted_path}: {exc}"[:600])

        try:
            exercise()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing invalid to send (no parameters)
    assert operations >= 20 and len(statuses) >= 2 * operations
    print(
        f"{mode.value}: {operations} operations, {len(statuses)} requests, statuses "
        f"{sorted(set(statuses))}"
    )
    assert not failures, "\n".join(failures)
