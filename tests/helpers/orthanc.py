"""A real Orthanc PACS with its DICOMweb plugin (Debian's packages, installed by setup), for the
tests that pull studies over DICOMweb."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ctloop.stack.process import ManagedProcess
from tests.helpers.net import free_port

DICOMWEB_ROOT = "/dicom-web"


@contextmanager
def run_orthanc(root: Path, port: int = 18042, dicom_port: int = 14242) -> Iterator[str]:
    """Orthanc with its database under ``root``, until the block ends; yields its base URL."""
    config = {
        "Name": "ctloop-test-pacs",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = ManagedProcess("orthanc", root, root)
    proc.start(["/usr/sbin/Orthanc", str(root / "orthanc.json")])
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        yield base
    finally:
        proc.stop()


def _wait_ready(base: str, proc: ManagedProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/system", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.is_running(), proc.log_tail()
        time.sleep(0.3)
    raise AssertionError(f"Orthanc did not start:\n{proc.log_tail()}")


@contextmanager
def run_orthanc_anywhere(root: Path) -> Iterator[str]:
    """:func:`run_orthanc` on free ports; yields its DICOMweb base URL."""
    with run_orthanc(root, free_port(), free_port()) as base:
        yield base + DICOMWEB_ROOT


def store_instances(dicomweb_url: str, instances: list[bytes]) -> None:
    """Put DICOM Part 10 instances into the Orthanc whose DICOMweb base URL is given (through
    its REST API, as a modality's C-STORE would)."""
    base = dicomweb_url.removesuffix(DICOMWEB_ROOT)
    for data in instances:
        r = httpx.post(f"{base}/instances", content=data, timeout=30)
        assert r.status_code == 200, r.text
