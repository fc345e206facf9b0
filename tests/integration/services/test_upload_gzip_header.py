"""An upload kept "as uploaded" loses its gzip header's file name, comment and extra field
(issue 18, finding 9: tools write the patient's name there) and keeps its compressed data byte
for byte; against the real S3 and database."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from ctloop.contracts import keys
from ctloop.storage import ObjectStore
from tests.helpers.volumes import gzip_with_header_text, nifti_raw, phantom

NAME, COMMENT, EXTRA = b"DOE_JANE_19700101.nii", b"CT of Jane Doe, MRN 123456", b"PN\x04\x00Jane"


@pytest.fixture(scope="module")
def api(ingest_api):
    return ingest_api


def _assert_bare(blob: bytes, upload: bytes, raw: bytes) -> None:
    for text in (NAME, COMMENT, b"Jane"):
        assert text not in blob
    assert blob[:4] == b"\x1f\x8b\x08\x00" and blob[4:8] == b"\0\0\0\0"  # no flags, mtime 0
    assert blob[10:] == upload[len(upload) - len(blob) + 10 :]  # not re-compressed
    assert gzip.decompress(blob) == raw


def test_a_kept_upload_and_label_are_stored_without_gzip_header_text(api, svc_settings, unique):
    p = phantom("public", 31)
    image_raw = nifti_raw(p.image.astype(np.int16), p.affine)
    label_raw = nifti_raw(p.label, p.affine)
    image = gzip_with_header_text(image_raw, NAME, COMMENT, EXTRA)
    label = gzip_with_header_text(label_raw, NAME, COMMENT, EXTRA)
    vid = f"gzh-{unique}"
    r = api.post(
        "/v1/volumes",
        data={"site_id": "site-a", "dataset": "public", "volume_id": vid},
        files={
            "file": ("ct.nii.gz", image, "application/gzip"),
            "label": ("label.nii.gz", label, "application/gzip"),
        },
    )
    assert r.status_code == 201, r.text
    store = ObjectStore(svc_settings)
    bucket = svc_settings.s3.bucket
    _assert_bare(store.get_bytes(bucket, keys.volume_image("site-a", vid)), image, image_raw)
    _assert_bare(store.get_bytes(bucket, keys.volume_label("site-a", vid)), label, label_raw)
