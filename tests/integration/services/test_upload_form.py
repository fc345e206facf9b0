"""``POST /v1/volumes`` reads its multipart form itself (services/ingest/forms.py): a form as
clients send it is accepted, a malformed or incomplete one is refused with the API's error
shape and stores nothing; against the real S3 and database."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ctloop.bus import EventProducer
from ctloop.db import Volume, session_scope
from ctloop.outbox import OutboxRelay
from services.ingest.app import create_app
from tests.helpers.volumes import nifti, phantom


@pytest.fixture(scope="module")
def api(ingest_api):
    return ingest_api


@pytest.fixture(scope="module")
def ct() -> bytes:
    p = phantom("clinical-a", 41)
    return nifti(p.image.astype(np.int16), p.affine)


def _stored(svc_settings, vid: str) -> bool:
    with session_scope(svc_settings.database_url) as s:
        return s.get(Volume, vid) is not None


def _body(parts: list[tuple[bytes, bytes]], boundary: bytes = b"bNd") -> bytes:
    out = b""
    for disposition, content in parts:
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n"
        out += content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def test_a_hand_written_form_is_read_like_one_from_a_client_library(api, svc_settings, ct, unique):
    vid = f"form-{unique}"
    body = _body(
        [
            (b'form-data; name="ignored"', b"a field this form does not have"),
            (b'form-data; name="site_id"', b"site-a"),
            (b'form-data; name="volume_id"', vid.encode()),
            (b'form-data; name="dataset"', b"clinical"),
            (b'form-data; name="file"; filename="ct.nii.gz"', ct),
        ]
    )
    headers = {"Content-Type": "multipart/form-data; boundary=bNd"}
    r = api.post("/v1/volumes", content=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["volume_id"] == vid and _stored(svc_settings, vid)


@pytest.mark.parametrize(
    ("case", "status", "code", "says"),
    [
        ("not_a_form", 415, "unsupported_media_type", "multipart/form-data"),
        ("no_file", 422, "invalid_request", "body.file: Field required"),
        ("no_site", 422, "invalid_request", "body.site_id: Field required"),
        ("bad_dataset", 422, "invalid_request", "body.dataset"),
        ("file_twice", 422, "invalid_request", "'file' twice"),
        ("cut_off", 422, "invalid_request", "closing boundary"),
        ("empty_file", 422, "empty", "volume is empty"),
        ("nameless_part", 422, "invalid_request", "with a name"),
    ],
)
def test_a_bad_form_is_refused_and_stores_nothing(
    api, svc_settings, ct, unique, case, status, code, says
):
    vid = f"badform-{case}-{unique}"
    fields = [
        (b'form-data; name="site_id"', b"site-a"),
        (b'form-data; name="volume_id"', vid.encode()),
        (b'form-data; name="dataset"', b"clinical"),
    ]
    file = (b'form-data; name="file"; filename="ct.nii.gz"', ct)
    parts = {
        "not_a_form": [*fields, file],
        "no_file": fields,
        "no_site": [*fields[1:], file],
        "bad_dataset": [*fields[:2], (b'form-data; name="dataset"', b"secret"), file],
        "file_twice": [*fields, file, file],
        "cut_off": [*fields, file],
        "empty_file": [*fields, (file[0], b"")],
        "nameless_part": [*fields, (b"form-data", b"x"), file],
    }[case]
    body = _body(parts)
    if case == "cut_off":
        body = body[: -len(b"--bNd--\r\n") - 40]
    kind = "application/json" if case == "not_a_form" else "multipart/form-data; boundary=bNd"
    r = api.post("/v1/volumes", content=body, headers={"Content-Type": kind})
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and says in r.json()["message"], r.text
    assert not _stored(svc_settings, vid)


def test_a_file_over_the_limit_inside_the_form_budget_is_refused(svc_settings, admin_headers):
    # The middleware allows the limit plus 1 MB of form around the files; a file alone over
    # the limit is refused by the form reader.
    small = svc_settings.model_copy(
        update={"services": svc_settings.services.model_copy(update={"max_upload_mb": 1})}
    )
    relay = OutboxRelay(small.database_url, EventProducer(small, client_id="form-small"))
    body = _body(
        [
            (b'form-data; name="site_id"', b"site-a"),
            (b'form-data; name="dataset"', b"clinical"),
            (b'form-data; name="file"; filename="ct.nii.gz"', b"\x1f\x8b" + b"\0" * (1536 << 10)),
        ]
    )
    try:
        with TestClient(create_app(small, relay), headers=admin_headers) as client:
            r = client.post(
                "/v1/volumes",
                content=body,
                headers={"Content-Type": "multipart/form-data; boundary=bNd"},
            )
    finally:
        relay.producer.close()
    assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
    assert "volume exceeds" in r.json()["message"]
