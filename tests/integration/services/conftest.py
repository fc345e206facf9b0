"""Service tests: each test module gets its own SQLite workflow database; S3 and Kafka are the
session's real servers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ctloop.bus import EventProducer
from ctloop.outbox import OutboxRelay
from services.ingest.app import create_app
from tests.helpers.orthanc import run_orthanc


@pytest.fixture(scope="module")
def ingest_api(svc_settings, admin_headers):
    """The ingest app as an admin calls it, with its outbox relay on the session's Kafka."""
    relay = OutboxRelay(svc_settings.database_url, EventProducer(svc_settings, client_id="api"))
    with TestClient(create_app(svc_settings, relay), headers=admin_headers) as client:
        yield client
    relay.producer.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS with its DICOMweb plugin (Debian's packages, installed by setup)."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as base:
        yield base
