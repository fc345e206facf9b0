"""The ingest API against real S3, Kafka and SQL: what it accepts is stored and announced
exactly once; what it refuses leaves no trace."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ctloop.bus import EventProducer
from ctloop.contracts import keys
from ctloop.contracts.payloads import AnnotationSubmitted, VolumeIngested, payload_for
from ctloop.contracts.topics import Topic
from ctloop.core.organs import ORGAN_IDS
from ctloop.db import (
    AnnotationRevision,
    AuditEntry,
    Lease,
    OutboxEvent,
    Volume,
    session_scope,
)
from ctloop.outbox import OutboxRelay
from ctloop.storage import ObjectStore
from services.ingest import uploads
from services.ingest.app import create_app
from tests.helpers.events import wait_for_events
from tests.helpers.volumes import dicom_zip, nifti, phantom


@pytest.fixture(scope="module")
def relay(svc_settings):
    r = OutboxRelay(svc_settings.database_url, EventProducer(svc_settings, client_id="ingest-test"))
    yield r
    r.producer.close()


@pytest.fixture(scope="module")
def api(svc_settings, relay, admin_headers):
    with TestClient(create_app(svc_settings, relay), headers=admin_headers) as client:
        yield client


def _upload(api, image: bytes, site="site-a", dataset="clinical", label=None, headers=None, **form):
    files = {"file": ("ct.nii.gz", image, "application/gzip")}
    if label is not None:
        files["label"] = ("label.nii.gz", label, "application/gzip")
    return api.post(
        "/v1/volumes",
        data={"site_id": site, "dataset": dataset, **form},
        files=files,
        headers=headers,
    )


def _counts(settings):
    with session_scope(settings.database_url) as s:
        return (
            s.scalar(select(func.count()).select_from(Volume)),
            s.scalar(select(func.count()).select_from(OutboxEvent)),
        )


def test_clinical_volume_is_stored_recorded_and_announced(api, svc_settings, relay, unique):
    p = phantom(seed=1)
    r = _upload(api, nifti(p.image, p.affine), volume_id=f"vol-{unique}")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["volume_id"] == f"vol-{unique}"
    assert body["shape"] == list(p.image.shape)
    assert np.allclose(body["spacing"], p.spacing)
    assert body["status"] == "ingested" and body["labelled"] is False
    # Where the time went, as a Server-Timing header: decode, encode, store, commit (ms).
    laps = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(laps) >= {"decode", "encode", "store", "commit"}
    assert all(float(ms) >= 0 for ms in laps.values())

    store = ObjectStore(svc_settings)
    stored = store.get_bytes(svc_settings.s3.bucket, keys.volume_image("site-a", f"vol-{unique}"))
    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(gzip.decompress(stored))
    assert np.array_equal(np.asarray(img.dataobj), p.image)

    assert relay.flush() >= 1
    (event,) = wait_for_events(
        svc_settings, Topic.VOLUME_INGESTED, lambda e: e.subject == f"vol-{unique}"
    )
    payload = payload_for(event)
    assert isinstance(payload, VolumeIngested)
    assert payload.dataset == "clinical" and payload.site_id == "site-a"
    assert payload.image.key == keys.volume_image("site-a", f"vol-{unique}")
    assert api.get(f"/v1/volumes/{body['volume_id']}").json() == body


def test_same_upload_twice_is_one_volume_and_one_event(api, svc_settings, unique):
    p = phantom(seed=2)
    data = nifti(p.image, p.affine)
    first = _upload(api, data, volume_id=f"vol-{unique}")
    before = _counts(svc_settings)
    again = _upload(api, data, volume_id=f"vol-{unique}")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert _counts(svc_settings) == before
    other = phantom(seed=3)
    clash = _upload(api, nifti(other.image, other.affine), volume_id=f"vol-{unique}")
    assert clash.status_code == 409 and clash.json()["code"] == "exists"


def test_public_volume_with_a_label_in_another_numbering(api, svc_settings, unique):
    p = phantom("public", 4)
    # This dataset numbers the liver 7 and the gallbladder 1.
    label_map = {o: i for i, o in enumerate(ORGAN_IDS) if o != "background"}
    label_map["liver"], label_map["gallbladder"] = 7, 1
    to_dataset = np.zeros(len(ORGAN_IDS), np.uint8)
    for organ, value in label_map.items():
        to_dataset[ORGAN_IDS[organ]] = value
    r = _upload(
        api,
        nifti(p.image, p.affine),
        dataset="public",
        label=nifti(to_dataset[p.label], p.affine),
        label_map=json.dumps(label_map),
        volume_id=f"pub-{unique}",
    )
    assert r.status_code == 201, r.text
    assert r.json()["labelled"] is True
    store = ObjectStore(svc_settings)
    raw = store.get_bytes(svc_settings.s3.bucket, keys.volume_label("site-a", f"pub-{unique}"))
    import nibabel as nib

    stored = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)
    assert np.array_equal(stored, p.label)  # canonical ids in storage


def _stored(settings, key: str) -> bytes:
    return ObjectStore(settings).get_bytes(settings.s3.bucket, key)


def _stored_form(settings, volume_id: str) -> str:
    """What the audit log says ingest did with the upload's bytes."""
    with session_scope(settings.database_url) as s:
        (row,) = s.scalars(
            select(AuditEntry).where(
                AuditEntry.resource == volume_id, AuditEntry.action == "volume.create"
            )
        )
        return str(row.detail["stored"])


def test_a_clean_nifti_is_kept_as_uploaded_and_anything_else_is_rewritten(
    api, svc_settings, unique
):
    """An upload already in ctloop's stored form (gzipped NIfTI-1, int16/float32 CT or uint8
    canonical label, no scaling, no extensions, no free text) is stored byte for byte: no
    decode/encode round trip. Anything else is re-encoded, which also drops what it carried."""
    p = phantom("public", 6)
    image16, label = nifti(p.image.astype(np.int16), p.affine), nifti(p.label, p.affine)
    r = _upload(api, image16, dataset="public", label=label, volume_id=f"keep-{unique}")
    assert r.status_code == 201, r.text
    assert _stored(svc_settings, keys.volume_image("site-a", f"keep-{unique}")) == image16
    assert _stored(svc_settings, keys.volume_label("site-a", f"keep-{unique}")) == label
    assert _stored_form(svc_settings, f"keep-{unique}") == "as uploaded"

    # A description (scanners put names and dates there) and an extension (dcm2niix puts the
    # DICOM header there): decoded, checked and written afresh without them.
    img = nib.Nifti1Image(p.image.astype(np.int16), p.affine)
    img.header["descrip"] = b"DOE^JANE 1970-01-01"
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=DOE^JANE"))
    tagged = gzip.compress(img.to_bytes())
    # bgzip-style: the same file as several gzip members one after the other.
    body = img.to_bytes()
    members = b"".join(gzip.compress(body[i : i + 4096]) for i in range(0, len(body), 4096))
    for name, data in (("tagged", tagged), ("members", members)):
        r = _upload(api, data, volume_id=f"{name}-{unique}")
        assert r.status_code == 201, (name, r.text)
        blob = _stored(svc_settings, keys.volume_image("site-a", f"{name}-{unique}"))
        stored = nib.Nifti1Image.from_bytes(gzip.decompress(blob))
        assert np.array_equal(np.asarray(stored.dataobj), p.image)
        assert bytes(stored.header["descrip"].item()) == b"" and not stored.header.extensions
        assert _stored_form(svc_settings, f"{name}-{unique}") == "re-encoded"


def _versions(settings, key: str) -> list[tuple[str, bool]]:
    """Every version of ``key`` (delete markers too), newest first."""
    store = ObjectStore(settings)
    return [
        (str(o.version_id), bool(o.is_delete_marker))
        for o in store.client.list_objects(settings.s3.bucket, prefix=key, include_version=True)
        if o.object_name == key
    ]


def test_a_clean_upload_is_written_while_it_is_checked_and_removed_unless_kept(
    api, svc_settings, unique, monkeypatch
):
    """A CT whose header says it would be kept as it came is written to its key while its
    voxels are checked. Refused: that version is removed (no version, no delete marker left);
    rewritten after all (several gzip members): only the rewritten version remains; kept: the
    one version is the row's."""
    started = []

    class Recorded(uploads.EarlyPut):
        def __init__(self, ingest, key, data):
            started.append(key)
            super().__init__(ingest, key, data)

    monkeypatch.setattr(uploads, "EarlyPut", Recorded)
    p = phantom(seed=11)
    clean = nifti(p.image, p.affine)
    nan = p.image.astype(np.float32)
    nan[3, 4, 5] = np.nan
    body = nib.Nifti1Image(p.image, p.affine).to_bytes()
    members = b"".join(gzip.compress(body[i : i + 4096]) for i in range(0, len(body), 4096))
    cases = {
        "nan": (nifti(nan, p.affine), 422),
        "junk": (clean + b"junk" * 16, 422),
        "members": (members, 201),
        "clean": (clean, 201),
    }
    for name, (data, status) in cases.items():
        vid = f"early-{name}-{unique}"
        key = keys.volume_image("site-a", vid)
        r = _upload(api, data, volume_id=vid)
        assert r.status_code == status, (name, r.text)
        assert started[-1] == key, name  # the early write was taken
        versions = _versions(svc_settings, key)
        if status != 201:
            assert versions == [], name
            continue
        assert len(versions) == 1 and not versions[0][1], (name, versions)
        with session_scope(svc_settings.database_url) as s:
            assert s.get(Volume, vid).s3_version_id == versions[0][0]
        assert (_stored(svc_settings, key) == data) == (name == "clean")
    # An id that is taken is never written early: the same bytes again answer 200.
    n = len(started)
    assert _upload(api, clean, volume_id=f"early-clean-{unique}").status_code == 200
    assert len(started) == n
    assert len(_versions(svc_settings, keys.volume_image("site-a", f"early-clean-{unique}"))) == 1


def _huge_header() -> bytes:
    """A NIfTI header that claims 4096^3 float64 voxels (a decompression bomb by promise)."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 4096, 4096, 4096, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 64, 64)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352)
    hdr[344:348] = b"n+1\0"
    return gzip.compress(bytes(hdr) + b"\0" * 4 + b"\0" * 1024)


def _bad_uploads():
    p = phantom(seed=5)
    good = nifti(p.image, p.affine)
    nan = p.image.astype(np.float32)
    nan[0, 0, 0] = np.nan
    inf = p.image.astype(np.float32)
    inf[1, 2, 3] = -np.inf
    squashed = p.affine.copy()
    squashed[2, 2] = 1e-4
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("../../etc/passwd", b"x")
    return {
        "corrupt_gzip": (b"\x1f\x8b" + b"garbage" * 20, "corrupt_gzip"),
        "truncated": (good[: len(good) // 2], "truncated"),
        "not_nifti": (b"hello, this is not an image at all" * 20, "not_nifti"),
        "two_d": (nifti(p.image[:, :, 0], p.affine), "not_3d"),
        "four_d": (nifti(np.stack([p.image, p.image], -1), p.affine), "not_3d"),
        "nan": (nifti(nan, p.affine), "not_finite"),
        "infinite": (nifti(inf, p.affine), "not_finite"),
        "trailing_junk": (good + b"junk" * 16, "corrupt_gzip"),
        "absurd_spacing": (nifti(p.image, squashed), "bad_spacing"),
        "bomb": (_huge_header(), "too_large"),
        "traversal_zip": (traversal.getvalue(), "unsafe_path"),
        "empty": (b"", "empty"),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_bad_volume_is_refused_with_a_code_and_nothing_is_stored(api, svc_settings, case, unique):
    data, code = _bad_uploads()[case]
    before = _counts(svc_settings)
    r = _upload(api, data, volume_id=f"bad-{unique}")
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["code"] == code, r.json()
    assert _counts(svc_settings) == before
    store = ObjectStore(svc_settings)
    assert not store.exists(svc_settings.s3.bucket, keys.volume_image("site-a", f"bad-{unique}"))


def test_hostile_ids_and_missing_labels_are_refused(api):
    p = phantom(seed=6)
    data = nifti(p.image, p.affine)
    assert _upload(api, data, site="../other").json()["code"] == "bad_id"
    assert _upload(api, data, volume_id="a/b").json()["code"] == "bad_id"
    assert _upload(api, data, dataset="public").json()["code"] == "label_required"


def test_label_on_another_grid_or_with_unknown_values_is_refused(api, svc_settings, unique):
    p = phantom("public", 7)
    image = nifti(p.image, p.affine)
    cases = {
        "grid_mismatch": nifti(p.label[:-1], p.affine),
        "unknown_label": nifti(np.where(p.label > 0, 42, 0).astype(np.uint8), p.affine),
        "float_mask": nifti(p.label.astype(np.float32) + 0.5, p.affine),
    }
    for code, label in cases.items():
        before = _counts(svc_settings)
        r = _upload(api, image, dataset="public", label=label, volume_id=f"l-{unique}")
        assert r.status_code == 422 and r.json()["code"] == code, (code, r.text)
        assert _counts(svc_settings) == before


def test_oversized_upload_is_refused_before_it_is_read_whole(svc_settings, relay, admin_headers):
    small = svc_settings.model_copy(
        update={"services": svc_settings.services.model_copy(update={"max_upload_mb": 1})}
    )
    with TestClient(create_app(small, relay), headers=admin_headers) as client:
        r = _upload(client, b"\x1f\x8b" + b"\0" * (2 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_a_ct_put_as_the_request_body_is_ingested_like_an_upload(
    api, svc_settings, relay, admin_headers, unique
):
    """``PUT /v1/volumes/{id}``: the file itself as the body (no multipart framing), the same
    checks, storage, event and answers as ``POST``."""
    p = phantom(seed=9)
    data = nifti(p.image, p.affine)
    vid = f"put-{unique}"
    url = f"/v1/volumes/{vid}?site_id=site-a&dataset=clinical"
    gz = {"Content-Type": "application/gzip"}
    r = api.put(url, content=data, headers=gz)
    assert r.status_code == 201, r.text
    assert r.json()["volume_id"] == vid and r.json()["shape"] == list(p.image.shape)
    assert "decode;dur=" in r.headers["server-timing"]
    assert _stored(svc_settings, keys.volume_image("site-a", vid)) == data
    relay.flush()
    (event,) = wait_for_events(svc_settings, Topic.VOLUME_INGESTED, lambda e: e.subject == vid)
    assert payload_for(event).site_id == "site-a"
    # The same bytes again: 200 with the same volume; other bytes under the id: 409.
    again = api.put(url, content=data, headers=gz)
    assert (again.status_code, again.json()) == (200, r.json())
    other = phantom(seed=10)
    clash = api.put(url, content=nifti(other.image, other.affine), headers=gz)
    assert clash.status_code == 409 and clash.json()["code"] == "exists"

    # Refusals change nothing.
    before = _counts(svc_settings)
    bad = f"/v1/volumes/bad-put-{unique}?site_id=site-a"
    cases = [
        (api.put(bad, content=data, headers={"Content-Type": "text/plain"}), 415),
        (api.put(bad, content=b"\x1f\x8b" + b"junk" * 64, headers=gz), 422),
        (api.put(bad, content=b"", headers=gz), 422),
        (api.put(bad + "&dataset=public", content=data, headers=gz), 422),
        (api.put(bad.replace("site-a", "../etc"), content=data, headers=gz), 422),
    ]
    assert [(c.status_code, c.json()["code"]) for c, _ in cases] == [
        (415, "unsupported_media_type"),
        (422, "corrupt_gzip"),
        (422, "empty"),
        (422, "label_required"),
        (422, "bad_id"),
    ]
    small = svc_settings.model_copy(
        update={"services": svc_settings.services.model_copy(update={"max_upload_mb": 1})}
    )
    with TestClient(create_app(small, relay), headers=admin_headers) as client:
        big = client.put(bad, content=b"\x1f\x8b" + b"\0" * (2 * 1024 * 1024), headers=gz)
    assert big.status_code == 413 and big.json()["code"] == "too_large"
    assert _counts(svc_settings) == before
    assert not ObjectStore(svc_settings).exists(
        svc_settings.s3.bucket, keys.volume_image("site-a", f"bad-put-{unique}")
    )


def test_dicom_series_zip_becomes_a_volume(api, unique):
    p = phantom(seed=8)
    r = api.post(
        "/v1/volumes",
        data={"site_id": "site-b", "dataset": "clinical", "volume_id": f"dcm-{unique}"},
        files={"file": ("series.zip", dicom_zip(p), "application/zip")},
    )
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == list(p.image.shape)
    assert np.allclose(r.json()["spacing"], p.spacing, atol=1e-4)
    stored = nib.Nifti1Image.from_bytes(
        gzip.decompress(api.get(f"/v1/volumes/dcm-{unique}/image").content)
    )
    assert np.allclose(stored.affine, p.affine, atol=1e-4)  # geometry round-trips
    assert np.array_equal(np.asarray(stored.dataobj), p.image)
    mixed = api.post(
        "/v1/volumes",
        data={"site_id": "site-b", "dataset": "clinical"},
        files={
            "file": ("s.zip", dicom_zip(phantom(seed=9), ("1.2.3", "1.2.4")), "application/zip")
        },
    )
    assert mixed.status_code == 422 and mixed.json()["code"] == "bad_dicom"


@pytest.mark.parametrize("syntax", ["rle", "jpeg-ls", "jpeg-2000", "jpeg-lossless"])
def test_a_compressed_dicom_series_becomes_the_same_volume(api, unique, syntax):
    """The lossless syntaxes PACS exports use go in through the upload's DICOM budget and
    decode to the very HU of the uncompressed series (issue 20)."""
    p = phantom(seed=8)
    vid = f"dcm-{syntax}-{unique}"
    r = api.post(
        "/v1/volumes",
        data={"site_id": "site-b", "dataset": "clinical", "volume_id": vid},
        files={"file": ("series.zip", dicom_zip(p, syntax=syntax), "application/zip")},
    )
    assert r.status_code == 201, r.text
    stored = nib.Nifti1Image.from_bytes(
        gzip.decompress(api.get(f"/v1/volumes/{vid}/image").content)
    )
    assert np.array_equal(np.asarray(stored.dataobj), p.image)
    assert np.allclose(stored.affine, p.affine, atol=1e-4)


def _annotators(api, unique: str, names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Annotators of site-a, each with a token; returns their request headers by name."""
    headers = {}
    for name in names:
        user = api.post(
            "/v1/users", json={"id": f"{name}-{unique}", "role": "annotator", "sites": ["site-a"]}
        )
        assert user.status_code == 201, user.text
        token = api.post(f"/v1/users/{name}-{unique}/tokens", json={"label": "test"}).json()
        headers[name] = {"Authorization": f"Bearer {token['token']}"}
    return headers


def _annotation_form() -> dict[str, str]:
    return {
        "minutes": "7.5",
        "organs": json.dumps({"liver": "accepted", "spleen": "skipped"}),
        "reviewed_slices": json.dumps([[0, 10]]),
        "from_model": "igniter:1",
    }


def _two_submissions_are_two_revisions(api, svc_settings, vid: str, p, headers, unique) -> None:
    """Two annotators' submissions are revisions 1 and 2, each kept with its author."""
    form = _annotation_form()
    files = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
    first = api.post(
        f"/v1/volumes/{vid}/annotations", data=form, files=files, headers=headers["ann-1"]
    )
    assert first.status_code == 201, first.text
    assert first.json()["revision"] == 1
    second = api.post(
        f"/v1/volumes/{vid}/annotations",
        data=form,
        headers=headers["ann-2"],
        files={"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")},
    )
    assert second.json()["revision"] == 2
    assert api.get(f"/v1/volumes/{vid}").json()["status"] == "annotated"
    with session_scope(svc_settings.database_url) as s:
        revs = s.scalars(
            select(AnnotationRevision).where(AnnotationRevision.volume_id == vid)
        ).all()
        assert sorted((r.revision, r.author) for r in revs) == [
            (1, f"ann-1-{unique}"),
            (2, f"ann-2-{unique}"),
        ]


def _each_revision_is_announced(svc_settings, relay, vid: str) -> None:
    relay.flush()
    events = wait_for_events(
        svc_settings, Topic.ANNOTATION_SUBMITTED, lambda e: e.subject == vid, count=2
    )
    payloads = sorted((payload_for(e) for e in events), key=lambda x: x.revision)
    assert all(isinstance(x, AnnotationSubmitted) for x in payloads)
    assert payloads[0].organs == {"liver": "accepted", "spleen": "skipped"}
    assert payloads[0].from_model is not None and payloads[0].from_model.version == 1


def _bad_annotations_are_refused(api, vid: str, p) -> None:
    """A mask on another grid, an unknown organ, or a volume that does not exist."""
    form = _annotation_form()
    files = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
    wrong = api.post(
        f"/v1/volumes/{vid}/annotations",
        data=form,
        files={"mask": ("m.nii.gz", nifti(p.label[1:], p.affine), "application/gzip")},
    )
    assert wrong.status_code == 422 and wrong.json()["code"] == "grid_mismatch"
    unknown = api.post(
        f"/v1/volumes/{vid}/annotations",
        data={**form, "organs": '{"brain": "accepted"}'},
        files=files,
    )
    assert unknown.status_code == 422 and unknown.json()["code"] == "bad_review"
    missing = api.post("/v1/volumes/nope/annotations", data=form, files=files)
    assert missing.status_code == 404


def test_annotations_are_immutable_revisions_and_announced(api, svc_settings, relay, unique):
    p = phantom(seed=10)
    vid = f"ann-{unique}"
    assert _upload(api, nifti(p.image, p.affine), volume_id=vid).status_code == 201
    headers = _annotators(api, unique, ("ann-1", "ann-2"))
    _two_submissions_are_two_revisions(api, svc_settings, vid, p, headers, unique)
    _each_revision_is_announced(svc_settings, relay, vid)
    _bad_annotations_are_refused(api, vid, p)


def test_health_endpoints(api):
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert "python_info" in api.get("/metrics").text


def test_workflow_grpc_lists_ground_truth_for_training(api, svc_settings, unique):
    from concurrent import futures

    import grpc

    from ctloop.v1 import ingest_pb2_grpc
    from services.ingest.grpc_api import WorkflowService
    from services.training.workflow import WorkflowClient

    p = phantom(seed=30)
    vid = f"wf-{unique}"
    assert _upload(api, nifti(p.image, p.affine), volume_id=vid).status_code == 201
    form = {
        "minutes": "3",
        "organs": json.dumps({"spleen": "skipped"}),
        "reviewed_slices": json.dumps([[2, 9]]),
    }
    for _ in range(2):
        files = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
        assert api.post(f"/v1/volumes/{vid}/annotations", data=form, files=files).status_code == 201

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ingest_pb2_grpc.add_WorkflowServicer_to_server(
        WorkflowService(svc_settings.database_url, svc_settings.s3.bucket), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = WorkflowClient(f"127.0.0.1:{port}")
    try:
        clinical = {v.volume_id: v for v in client.training_volumes("clinical")}
        assert vid in clinical
        entry = clinical[vid]
        assert entry.label.key == keys.annotation_mask("site-a", vid, 2)  # the latest revision
        assert entry.review == {"organs": {"spleen": "skipped"}, "reviewed_slices": [[2, 9]]}
        assert entry.since <= entry.updated
        public = client.training_volumes("public")
        assert all(v.label.key.endswith("label.nii.gz") for v in public)
        with pytest.raises(grpc.RpcError) as bad:
            client.training_volumes("other")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.close()
        server.stop(0)


def test_the_training_service_s_call_waits_for_an_ingest_that_is_restarting(svc_settings):
    """A round asks ingest for its volumes; while ingest is down (a pod rolled or deleted) the
    call waits for it within its deadline instead of failing the round's attempt at once."""
    import socket
    import threading
    from concurrent import futures

    import grpc

    from ctloop.v1 import ingest_pb2_grpc
    from services.ingest.grpc_api import WorkflowService
    from services.training.workflow import WorkflowClient

    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ingest_pb2_grpc.add_WorkflowServicer_to_server(
        WorkflowService(svc_settings.database_url, svc_settings.s3.bucket), server
    )

    def ingest_back() -> None:  # until now the port refuses connections
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()

    later = threading.Timer(2.0, ingest_back)  # ingest back 2 s after the call was made
    client = WorkflowClient(f"127.0.0.1:{port}", timeout_s=30)
    later.start()
    try:
        assert isinstance(client.training_volumes("public"), list)
    finally:
        later.join()
        client.close()
        server.stop(0)
    down = WorkflowClient(f"127.0.0.1:{port}", timeout_s=1)  # and a deadline still bounds it
    try:
        with pytest.raises(grpc.RpcError) as late:
            down.training_volumes("public")
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The policy's tick does not wait: UNAVAILABLE (a wait would end in DEADLINE_EXCEEDED).
        tick = WorkflowClient(f"127.0.0.1:{port}", timeout_s=30)
        with pytest.raises(grpc.RpcError) as unavailable:
            tick.training_volumes("public", wait=False)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        tick.close()
    finally:
        down.close()


def test_every_endpoint_needs_a_valid_token(svc_settings, relay):
    with TestClient(create_app(svc_settings, relay)) as anonymous:
        assert anonymous.get("/v1/volumes").json()["code"] == "unauthenticated"
        forged = {"Authorization": "Bearer ctl_forged-token-value"}
        r = anonymous.get("/v1/volumes", headers=forged)
        assert r.status_code == 401 and r.json()["code"] == "bad_token"
        p = phantom(seed=50)
        r = _upload(anonymous, nifti(p.image, p.affine))
        assert r.status_code == 401
        assert anonymous.get("/healthz").status_code == 200  # probes stay open


def _site_user(api, name: str, role: str, sites: list[str]) -> dict[str, str]:
    """A user of these sites with a token; returns its request headers."""
    assert api.post("/v1/users", json={"id": name, "role": role, "sites": sites}).status_code == 201
    token = api.post(f"/v1/users/{name}/tokens", json={}).json()
    return {"Authorization": f"Bearer {token['token']}"}


def _a_volume_in_each_site(api, machine_a, site_a: str, site_b: str, image, p, unique) -> None:
    """Site A's machine client uploads va-; the admin uploads vb- into site B."""
    in_a = api.post(
        "/v1/volumes",
        headers=machine_a,
        data={"site_id": site_a, "dataset": "clinical", "volume_id": f"va-{unique}"},
        files={"file": ("ct.nii.gz", image, "application/gzip")},
    )
    assert in_a.status_code == 201, in_a.text
    in_b = _upload(
        api, nifti(phantom(seed=52).image, p.affine), site=site_b, volume_id=f"vb-{unique}"
    )
    assert in_b.status_code == 201


def _the_other_sites_volume_does_not_exist(c, annotator_a, mask, site_a: str, unique) -> None:
    """The other site's volume does not exist for them, on every endpoint."""
    for path in (
        f"/v1/volumes/vb-{unique}",
        f"/v1/volumes/vb-{unique}/image",
        f"/v1/volumes/vb-{unique}/prediction",
        f"/v1/volumes/vb-{unique}/prediction/mask",
    ):
        r = c.get(path, headers=annotator_a)
        assert r.status_code == 404, (path, r.text)
    r = c.post(
        f"/v1/volumes/vb-{unique}/annotations",
        headers=annotator_a,
        files=mask,
        data={"minutes": "1"},
    )
    assert r.status_code == 404
    listed = {v["volume_id"] for v in c.get("/v1/volumes", headers=annotator_a).json()}
    assert listed == {f"va-{unique}"}
    assert {s["id"] for s in c.get("/v1/sites", headers=annotator_a).json()} == {site_a}


def _own_sites_volume_is_read_and_annotated(c, annotator_a, mask, image, site_a, unique) -> None:
    """Their own site's volume they can read and annotate; an annotator cannot upload."""
    assert c.get(f"/v1/volumes/va-{unique}/image", headers=annotator_a).status_code == 200
    r = c.post(
        f"/v1/volumes/va-{unique}/annotations",
        headers=annotator_a,
        files=mask,
        data={"minutes": "2"},
    )
    assert r.status_code == 201 and r.json()["author"] == f"ann-a-{unique}"
    assert _upload(c, image, site=site_a, headers=annotator_a).status_code == 403


def _nobody_crosses_sites_or_administers(c, machine_a, annotator_a, image, site_b) -> None:
    """A machine client of site A cannot put data into site B; nor can anyone administer."""
    r = c.post(
        "/v1/volumes",
        headers=machine_a,
        data={"site_id": site_b, "dataset": "clinical"},
        files={"file": ("ct.nii.gz", image, "application/gzip")},
    )
    assert r.status_code == 404 and r.json()["code"] == "unknown_site"
    assert c.post("/v1/sites", json={"id": "x"}, headers=machine_a).status_code == 403
    assert c.get("/v1/audit", headers=annotator_a).status_code == 403


def _patient_data_access_is_audited(api, unique: str) -> None:
    """Reads and writes of patient data are in the audit log, with who did them."""
    trail = api.get("/v1/audit", params={"resource": f"va-{unique}"}).json()
    assert {(e["actor"], e["action"]) for e in trail} >= {
        (f"pacs-a-{unique}", "volume.create"),
        (f"ann-a-{unique}", "volume.read"),
        (f"ann-a-{unique}", "annotation.create"),
    }


def test_users_see_and_change_only_their_sites(api, svc_settings, relay, unique):
    site_a, site_b = f"sa-{unique}", f"sb-{unique}"
    for site in (site_a, site_b):
        assert api.post("/v1/sites", json={"id": site}).status_code == 201
    annotator_a = _site_user(api, f"ann-a-{unique}", "annotator", [site_a])
    machine_a = _site_user(api, f"pacs-a-{unique}", "integration", [site_a])
    p = phantom(seed=51)
    image = nifti(p.image, p.affine)
    _a_volume_in_each_site(api, machine_a, site_a, site_b, image, p, unique)
    with TestClient(create_app(svc_settings, relay)) as c:
        mask = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
        _the_other_sites_volume_does_not_exist(c, annotator_a, mask, site_a, unique)
        _own_sites_volume_is_read_and_annotated(c, annotator_a, mask, image, site_a, unique)
        _nobody_crosses_sites_or_administers(c, machine_a, annotator_a, image, site_b)
    _patient_data_access_is_audited(api, unique)


def test_a_revoked_token_stops_working(api, svc_settings, relay, unique):
    assert (
        api.post("/v1/users", json={"id": f"gone-{unique}", "role": "annotator"}).status_code == 201
    )
    issued = api.post(f"/v1/users/gone-{unique}/tokens", json={"label": "laptop"}).json()
    headers = {"Authorization": f"Bearer {issued['token']}"}
    with TestClient(create_app(svc_settings, relay)) as c:
        assert c.get("/v1/volumes", headers=headers).status_code == 200
        assert api.delete(f"/v1/tokens/{issued['sha256']}").status_code == 204
        assert c.get("/v1/volumes", headers=headers).json()["code"] == "bad_token"


def _team(api, unique: str, n_volumes: int, names=("q1", "q2")):
    site = f"q-{unique}"
    assert api.post("/v1/sites", json={"id": site}).status_code == 201
    headers = {}
    for name in names:
        user = f"{name}-{unique}"
        assert (
            api.post(
                "/v1/users", json={"id": user, "role": "annotator", "sites": [site]}
            ).status_code
            == 201
        )
        token = api.post(f"/v1/users/{user}/tokens", json={}).json()["token"]
        headers[name] = {"Authorization": f"Bearer {token}"}
    vids = []
    for i in range(n_volumes):
        p = phantom(seed=60 + i)
        vid = f"q{i}-{unique}"
        assert _upload(api, nifti(p.image, p.affine), site=site, volume_id=vid).status_code == 201
        vids.append(vid)
    return site, headers, vids


def test_two_annotators_never_hold_the_same_volume(api, svc_settings, relay, unique):
    from concurrent.futures import ThreadPoolExecutor

    _, headers, vids = _team(api, unique, 3)
    app = create_app(svc_settings, relay)

    def claim(name: str) -> tuple[int, str | None]:
        with TestClient(app) as c:
            r = c.post("/v1/tasks/next", json={}, headers=headers[name])
            return r.status_code, r.json().get("volume_id")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(claim, ["q1", "q2", "q1", "q2"]))
    claimed = [vid for status, vid in results if status == 200]
    assert sorted(claimed) == sorted(vids)  # each volume once
    assert [status for status, _ in results].count(404) == 1  # the queue ran dry


def test_leases_expire_renew_release_and_guard_submission(api, svc_settings, relay, unique):
    import time

    _, headers, (vid,) = _team(api, unique, 1)
    with TestClient(create_app(svc_settings, relay)) as c:
        # long enough for the two refusals below on a loaded machine (0.5 s ran out once)
        first = c.post("/v1/tasks/next", json={"lease_seconds": 5}, headers=headers["q1"])
        assert first.status_code == 200 and first.json()["volume_id"] == vid
        assert (
            c.post("/v1/tasks/next", json={}, headers=headers["q2"]).json()["code"] == "queue_empty"
        )
        p = phantom(seed=60)
        mask = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
        blocked = c.post(
            f"/v1/volumes/{vid}/annotations",
            headers=headers["q2"],
            files=mask,
            data={"minutes": "1"},
        )
        assert blocked.status_code == 409 and blocked.json()["code"] == "leased"

        deadline = time.monotonic() + 30
        taken = None
        while time.monotonic() < deadline:  # the lease runs out and the task comes back
            r = c.post("/v1/tasks/next", json={}, headers=headers["q2"])
            if r.status_code == 200:
                taken = r.json()
                break
            time.sleep(0.2)
        assert taken is not None and taken["volume_id"] == vid
        assert c.post(f"/v1/tasks/{vid}/renew", json={}, headers=headers["q1"]).status_code == 409
        renewed = c.post(
            f"/v1/tasks/{vid}/renew", json={"lease_seconds": 3600}, headers=headers["q2"]
        )
        assert renewed.status_code == 200 and renewed.json()["expires_at"] > taken["expires_at"]
        assert c.delete(f"/v1/tasks/{vid}", headers=headers["q2"]).status_code == 204
        again = c.post("/v1/tasks/next", json={}, headers=headers["q1"])
        assert again.json()["volume_id"] == vid

        done = c.post(
            f"/v1/volumes/{vid}/annotations",
            headers=headers["q1"],
            files=mask,
            data={"minutes": "4"},
        )
        assert done.status_code == 201
        # Annotated: it leaves the queue, and its lease is gone.
        assert (
            c.post("/v1/tasks/next", json={}, headers=headers["q2"]).json()["code"] == "queue_empty"
        )


def test_a_claim_from_a_list_read_before_the_annotation_landed_is_refused(
    api, svc_settings, relay, unique
):
    """The queue lists candidates, then leases one: an annotation that lands in between (and
    releases its lease) must make that lease fail, not hand out an annotated volume."""
    from datetime import UTC, datetime, timedelta

    from services.ingest.queue import WorkQueue

    _, headers, (vid,) = _team(api, unique, 1)
    queue = WorkQueue(svc_settings.database_url, "sequential", 60.0)
    with TestClient(create_app(svc_settings, relay)) as c:
        assert c.post("/v1/tasks/next", json={}, headers=headers["q1"]).json()["volume_id"] == vid
        p = phantom(seed=60)
        done = c.post(
            f"/v1/volumes/{vid}/annotations",
            headers=headers["q1"],
            files={"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")},
            data={"minutes": "1"},
        )
        assert done.status_code == 201
    # The stale candidate (listed while q1 still held it): its lease is gone, the claim fails.
    until = datetime.now(UTC) + timedelta(seconds=60)
    assert not queue._try_claim(vid, f"q2-{unique}", until)
    with session_scope(svc_settings.database_url) as s:
        assert s.get(Lease, vid) is None


def test_oidc_bearer_tokens_are_verified_and_scoped(svc_settings, relay, oidc_issuer, api, unique):
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    issuer, key = oidc_issuer
    settings = svc_settings.model_copy(
        update={"auth": svc_settings.auth.model_copy(update={"oidc_issuer": issuer})}
    )
    p = phantom(seed=70)
    site = f"oidc-{unique}"
    assert (
        _upload(api, nifti(p.image, p.affine), site=site, volume_id=f"o-{unique}").status_code
        == 201
    )
    assert (
        _upload(api, nifti(p.image, p.affine), site="site-a", volume_id=f"o2-{unique}").status_code
        == 201
    )

    def token(signer=key, **over):
        claims = {
            "iss": issuer,
            "aud": "ctloop",
            "exp": int(time.time()) + 300,
            "sub": "u-1",
            "preferred_username": f"kc-{unique}",
            "resource_access": {"ctloop": {"roles": ["annotator"]}},
            "ctloop_sites": [site],
            **over,
        }
        return {
            "Authorization": "Bearer " + jwt.encode(claims, signer, "RS256", headers={"kid": "k1"})
        }

    with TestClient(create_app(settings, relay)) as c:
        good = c.get("/v1/volumes", headers=token())
        assert good.status_code == 200, good.text
        assert {v["volume_id"] for v in good.json()} == {f"o-{unique}"}
        assert c.get(f"/v1/volumes/o2-{unique}", headers=token()).status_code == 404
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for bad in (
            token(exp=int(time.time()) - 10),
            token(aud="someone-else"),
            token(iss="http://evil/realms/x"),
            token(signer=other_key),
            token(resource_access={"ctloop": {"roles": ["offline_access"]}}),
            token(realm_access={"roles": ["admin"]}, resource_access={}),
        ):
            r = c.get("/v1/volumes", headers=bad)
            assert r.status_code == 401 and r.json()["code"] == "bad_token"
        # Static tokens keep working beside OIDC.
        assert c.get("/v1/volumes", headers=dict(api.headers)).status_code == 200


def _reviewer(api, unique: str, site: str) -> dict[str, str]:
    """boss-<unique>, a reviewer of the site, with a token; returns its request headers."""
    assert (
        api.post(
            "/v1/users", json={"id": f"boss-{unique}", "role": "reviewer", "sites": [site]}
        ).status_code
        == 201
    )
    return {
        "Authorization": "Bearer "
        + api.post(f"/v1/users/boss-{unique}/tokens", json={}).json()["token"]
    }


def _workflow_server_requiring_review(svc_settings):
    """A workflow gRPC server that requires review, and a client of it (what training reads).
    Returns (server, client); the caller stops both."""
    from concurrent import futures

    import grpc

    from ctloop.v1 import ingest_pb2_grpc
    from services.ingest.grpc_api import WorkflowService
    from services.training.workflow import WorkflowClient

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ingest_pb2_grpc.add_WorkflowServicer_to_server(
        WorkflowService(svc_settings.database_url, svc_settings.s3.bucket, review_required=True),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, WorkflowClient(f"127.0.0.1:{port}")


def _in_training(approved_only, vid: str) -> list[str]:
    return [v.label.key for v in approved_only.training_volumes("clinical") if v.volume_id == vid]


def _submit(c, vid: str, annotator, mask, minutes: str):
    """An annotator's corrected mask, submitted as the volume's next revision."""
    return c.post(
        f"/v1/volumes/{vid}/annotations", headers=annotator, files=mask, data={"minutes": minutes}
    )


def _a_sent_back_revision_makes_a_task_again(c, vid: str, annotator, boss, mask) -> None:
    """Only a reviewer reviews, once; a revision sent back makes the volume a task again."""
    assert _submit(c, vid, annotator, mask, "6").status_code == 201
    review = f"/v1/volumes/{vid}/annotations/1/review"
    assert c.post(review, json={"decision": "approve"}, headers=annotator).status_code == 403
    back = c.post(review, json={"decision": "send_back", "comment": "spleen too big"}, headers=boss)
    assert back.status_code == 200 and back.json()["review_status"] == "sent_back"
    assert c.post(review, json={"decision": "approve"}, headers=boss).json()["code"] == "reviewed"
    # Sent back: the volume is a task again.
    assert c.post("/v1/tasks/next", json={}, headers=annotator).json()["volume_id"] == vid


def _only_an_approved_revision_is_ground_truth(
    c, approved_only, site: str, vid: str, annotator, boss, mask, unique
) -> None:
    """A pending revision is not ground truth while review is required; an approved one is."""
    assert _submit(c, vid, annotator, mask, "3").status_code == 201
    # Pending: not ground truth while review is required.
    assert _in_training(approved_only, vid) == []
    ok = c.post(
        f"/v1/volumes/{vid}/annotations/2/review", json={"decision": "approve"}, headers=boss
    )
    assert ok.status_code == 200 and ok.json()["reviewer"] == f"boss-{unique}"
    assert _in_training(approved_only, vid) == [keys.annotation_mask(site, vid, 2)]
    listed = c.get(f"/v1/volumes/{vid}/annotations", headers=annotator).json()
    assert [(a["revision"], a["review_status"]) for a in listed] == [
        (1, "sent_back"),
        (2, "approved"),
    ]
    assert listed[0]["review_comment"] == "spleen too big"


def test_review_step_approves_or_sends_back(api, svc_settings, relay, unique):
    site, headers, (vid,) = _team(api, unique, 1, names=("ann", "rev"))
    boss = _reviewer(api, unique, site)
    p = phantom(seed=60)
    mask = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
    server, approved_only = _workflow_server_requiring_review(svc_settings)
    with TestClient(create_app(svc_settings, relay)) as c:
        _a_sent_back_revision_makes_a_task_again(c, vid, headers["ann"], boss, mask)
        _only_an_approved_revision_is_ground_truth(
            c, approved_only, site, vid, headers["ann"], boss, mask, unique
        )
    approved_only.close()
    server.stop(0)


def test_series_pulled_from_a_pacs_over_dicomweb(
    api, svc_settings, relay, orthanc, admin_headers, unique
):
    import httpx

    from ctloop.core.dicom import ct_series, to_bytes

    p = phantom(seed=90)
    series = ct_series(p.image, p.affine, f"pacs-{unique}")
    for ds in series:
        assert httpx.post(f"{orthanc}/instances", content=to_bytes(ds)).status_code == 200
    dicomweb = f"{orthanc}/dicom-web"
    allowed = svc_settings.model_copy(
        update={
            "services": svc_settings.services.model_copy(update={"dicomweb_sources": [dicomweb]})
        }
    )
    request = {
        "url": dicomweb,
        "study_uid": series[0].StudyInstanceUID,
        "series_uid": series[0].SeriesInstanceUID,
        "site_id": "site-a",
        "volume_id": f"pacs-{unique}",
    }
    with TestClient(create_app(allowed, relay), headers=admin_headers) as c:
        r = c.post("/v1/volumes/dicomweb", json=request)
        assert r.status_code == 201, r.text
        assert r.json()["shape"] == list(p.image.shape)
        image = c.get(f"/v1/volumes/pacs-{unique}/image")
        stored = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(image.content)).dataobj)
        assert np.array_equal(stored, p.image)
        trail = c.get("/v1/audit", params={"resource": f"pacs-{unique}"}).json()
        (created,) = [e for e in trail if e["action"] == "volume.create"]
        assert created["detail"]["source"] == "dicomweb"
        assert "dropped" in created["detail"]["deidentified"]
        missing = c.post(
            "/v1/volumes/dicomweb", json={**request, "series_uid": "1.2.3.4", "volume_id": None}
        )
        assert missing.status_code == 422 and missing.json()["code"] == "dicomweb"
    # A service that is not configured is never contacted.
    with TestClient(create_app(svc_settings, relay), headers=admin_headers) as c:
        r = c.post("/v1/volumes/dicomweb", json=request)
        assert r.status_code == 403 and r.json()["code"] == "source_not_allowed"
