"""Service tests: each test module gets its own SQLite workflow database; S3 and Kafka are the
session's real servers."""

from __future__ import annotations

import pytest

from tests.helpers.orthanc import run_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS with its DICOMweb plugin (Debian's packages, installed by setup)."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as base:
        yield base
