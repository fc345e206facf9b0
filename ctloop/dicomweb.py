"""A DICOMweb client (QIDO-RS / WADO-RS) for ingesting a series from a PACS such as Orthanc."""

from __future__ import annotations

import email.parser
import email.policy

import httpx


class DicomWebError(RuntimeError):
    pass


def series_instances(
    base_url: str, study_uid: str, series_uid: str, timeout_s: float = 60.0
) -> int:
    """How many instances the PACS lists for the series (QIDO-RS)."""
    url = f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances"
    r = httpx.get(url, headers={"Accept": "application/dicom+json"}, timeout=timeout_s)
    if r.status_code == 404 or (r.status_code == 200 and not r.json()):
        raise DicomWebError(f"the PACS has no series {series_uid} in study {study_uid}")
    if r.status_code != 200:
        raise DicomWebError(f"QIDO-RS answered {r.status_code}")
    return len(r.json())


def retrieve_series(
    base_url: str, study_uid: str, series_uid: str, max_bytes: int, timeout_s: float = 300.0
) -> list[bytes]:
    """Every instance of the series as DICOM Part 10 bytes (WADO-RS), at most ``max_bytes``."""
    url = f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
    accept = 'multipart/related; type="application/dicom"'
    body = bytearray()
    with httpx.stream("GET", url, headers={"Accept": accept}, timeout=timeout_s) as r:
        if r.status_code != 200:
            raise DicomWebError(f"WADO-RS answered {r.status_code}")
        content_type = r.headers.get("content-type", "")
        for chunk in r.iter_bytes():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise DicomWebError(f"the series is larger than {max_bytes} bytes")
    if "multipart/related" not in content_type:
        raise DicomWebError(f"WADO-RS answered {content_type!r}, not multipart/related")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + bytes(body)
    )
    parts = [p.get_payload(decode=True) for p in message.iter_parts()]
    return [bytes(p) for p in parts if p]
