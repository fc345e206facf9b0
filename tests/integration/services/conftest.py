"""Service tests: each test module gets its own SQLite workflow database; S3 and Kafka are the
session's real servers."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable

import numpy as np
import pytest

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.topics import Topic
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.phantom import Phantom, generate_phantom
from ctloop.settings import Settings


def nifti(array: np.ndarray, affine: np.ndarray) -> bytes:
    return nifti_gz_bytes(array, affine)


def phantom(site: str = "clinical-a", seed: int = 0) -> Phantom:
    return generate_phantom(site, seed, "tiny")


def wait_for_events(
    settings: Settings,
    topic: Topic,
    match: Callable[[CloudEvent], bool],
    count: int = 1,
    timeout_s: float = 60.0,
    group: str | None = None,
) -> list[CloudEvent]:
    """Consume ``topic`` from the start until ``count`` events match (or fail)."""
    seen: list[CloudEvent] = []
    producer = EventProducer(settings, client_id="test-dlq")
    consumer = EventConsumer(
        settings,
        group or f"test-{time.monotonic_ns()}",
        [topic],
        lambda e: seen.append(e) if match(e) else None,
        producer,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < count and time.monotonic() < deadline:
            consumer.poll_once(500)
    finally:
        consumer.close()
        producer.close()
    assert len(seen) >= count, f"{len(seen)} of {count} matching events on {topic}"
    return seen


def dicom_zip(p: Phantom, series_uids: tuple[str, ...] = ()) -> bytes:
    """The phantom as a zip of one (or, with several uids, a mix of) CT series."""
    from tests.unit.core.test_dicom import _write_series

    buf = io.BytesIO()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buf, "w") as zf:
        uids = series_uids or (None,)
        for n, uid in enumerate(uids):
            files = _write_series(Path(tmp) / str(n), p.image, p.affine, series_uid=uid)
            for f in files:
                zf.write(f, f"series{n}/{f.name}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS with its DICOMweb plugin (Debian's packages, installed by setup)."""
    import json as _json

    import httpx

    from ctloop.stack.process import ManagedProcess

    root = tmp_path_factory.mktemp("orthanc")
    port = 18042
    config = {
        "Name": "ctloop-test-pacs",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomPort": 14242,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(_json.dumps(config))
    proc = ManagedProcess("orthanc", root, root)
    proc.start(["/usr/sbin/Orthanc", str(root / "orthanc.json")])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/system", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.is_running(), proc.log_tail()
        time.sleep(0.3)
    else:
        raise AssertionError(f"Orthanc did not start:\n{proc.log_tail()}")
    yield base
    proc.stop()
