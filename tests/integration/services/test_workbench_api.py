"""The workbench's data endpoints against real S3 and SQL: planes and label volumes come back
exactly, compressed, only to users of the volume's site, audited; the page is served with a
strict content policy; a CT of clinical size scrolls plane by plane without a full download."""

from __future__ import annotations

import gzip
import json
import struct
import time

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from ctloop.db import Prediction, session_scope
from ctloop.storage import ObjectStore
from services.ingest.app import create_app
from services.ingest.viewer import display_views
from tests.helpers.volumes import nifti, phantom


@pytest.fixture(scope="module")
def api(svc_settings, admin_headers):
    with TestClient(create_app(svc_settings), headers=admin_headers) as client:
        yield client


def _user(api, name: str, site: str) -> dict[str, str]:
    if api.post("/v1/sites", json={"id": site}).status_code not in (201, 409):
        raise AssertionError("site")
    r = api.post("/v1/users", json={"id": name, "role": "annotator", "sites": [site]})
    assert r.status_code == 201, r.text
    token = api.post(f"/v1/users/{name}/tokens", json={}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def _plane(r, dtype) -> np.ndarray:
    shape = tuple(int(n) for n in r.headers["x-shape"].split(","))
    return np.frombuffer(r.content, dtype=dtype).reshape(shape, order="F")


def test_planes_and_labels_round_trip_only_for_the_site(api, svc_settings, unique):
    site = f"wb-{unique}"
    me = _user(api, f"ann-{unique}", site)
    other = _user(api, f"other-{unique}", f"elsewhere-{unique}")
    p = phantom(seed=3)
    vid = f"wb-{unique}"
    r = api.post(
        "/v1/volumes",
        data={"site_id": site, "dataset": "clinical", "volume_id": vid},
        files={"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")},
    )
    assert r.status_code == 201, r.text

    meta = api.get(f"/v1/volumes/{vid}/viewer", headers=me).json()
    assert meta["shape"] == list(p.image.shape) and meta["labels"]["kind"] == "none"
    assert {v["axis"] for v in meta["views"].values()} == {0, 1, 2}
    for axis in range(3):
        index = p.image.shape[axis] // 2
        r = api.get(f"/v1/volumes/{vid}/slices/{axis}/{index}", headers=me)
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert r.headers["cache-control"] == "no-store"
        assert np.array_equal(_plane(r, "<i2"), np.take(p.image, index, axis=axis))
    assert api.get(f"/v1/volumes/{vid}/slices/2/999", headers=me).status_code == 404
    assert api.get(f"/v1/volumes/{vid}/labels", headers=me).json()["code"] == "no_prediction"

    # Another site's user learns nothing, not even that the volume exists.
    for path in ("viewer", "slices/2/0", "labels"):
        r = api.get(f"/v1/volumes/{vid}/{path}", headers=other)
        assert r.status_code == 404 and r.json()["code"] == "not_found"

    # A pre-annotation (as inference stores it) comes back as the label volume, exactly.
    store = ObjectStore(svc_settings)
    key = f"predictions/{site}/{vid}/test-1.nii.gz"
    store.put_bytes(svc_settings.s3.bucket, key, nifti(p.label, p.affine))
    with session_scope(svc_settings.database_url) as s:
        s.add(
            Prediction(
                volume_id=vid, model="igniter", version=1, s3_key=key, uncertainty=0.1, seconds=1
            )
        )
    r = api.get(f"/v1/volumes/{vid}/labels", headers=me)
    assert r.status_code == 200 and r.headers["x-from-model"] == "igniter:1"
    assert np.array_equal(_plane(r, np.uint8), p.label)

    audit = api.get("/v1/audit", params={"resource": vid}).json()
    actions = [(e["action"], e["detail"]) for e in audit if e["actor"] == f"ann-{unique}"]
    assert all(e["site_id"] == site for e in audit)
    # Three planes read, one entry for them (per user and volume and period).
    assert sum(a == "volume.read" and d.get("form") == "slices" for a, d in actions) == 1
    assert ("volume.read", {"via": "workbench"}) in actions
    assert any(a == "prediction.read" for a, _ in actions)


def test_a_mask_written_like_the_page_writes_it_is_accepted(api, svc_settings, unique):
    """The page's NIfTI-1 writer (sform only, uint8, first axis fastest) in Python: the same
    bytes, read by the API's own validation, give back the same mask on the volume's grid."""
    site = f"wbn-{unique}"
    p = phantom(seed=4)
    vid = f"wbn-{unique}"
    api.post(
        "/v1/volumes",
        data={"site_id": site, "dataset": "clinical", "volume_id": vid},
        files={"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")},
    )
    hdr = bytearray(352)

    def put(offset: int, fmt: str, *values: float) -> None:
        struct.pack_into("<" + fmt, hdr, offset, *values)

    put(0, "i", 348)
    put(40, "8h", 3, *p.label.shape, 1, 1, 1, 1)
    put(70, "hh", 2, 8)
    put(76, "8f", 1, *p.spacing, 0, 0, 0, 0)
    put(108, "ff", 352, 1)
    hdr[123] = 2
    put(252, "hh", 0, 2)
    put(280, "12f", *np.asarray(p.affine)[:3].ravel())
    hdr[344:348] = b"n+1\0"
    body = gzip.compress(bytes(hdr) + p.label.astype(np.uint8).tobytes(order="F"))
    r = api.post(
        f"/v1/volumes/{vid}/annotations",
        files={"mask": ("mask.nii.gz", body, "application/gzip")},
        data={"minutes": "1.5", "organs": json.dumps({"liver": "accepted"})},
    )
    assert r.status_code == 201, r.text
    back = api.get(f"/v1/volumes/{vid}/labels", params={"revision": 1})
    assert np.array_equal(_plane(back, np.uint8), p.label)


def test_a_clinical_size_ct_scrolls_plane_by_plane(api, unique):
    """512x512x300: the first plane decodes the volume once (cached); every further plane is a
    slice of it, small on the wire, in milliseconds."""
    shape = (512, 512, 300)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = np.where((x - 256) ** 2 + (y - 256) ** 2 < 200**2, 40, -1000).astype(np.int16)
    image = np.repeat(body[:, :, None], shape[2], axis=2)
    image[:, :, ::7] += 200  # some structure along the third axis
    affine = np.diag([0.78, 0.78, 1.0, 1.0])
    vid = f"big-{unique}"
    r = api.post(
        "/v1/volumes",
        data={"site_id": f"big-{unique}", "dataset": "clinical", "volume_id": vid},
        files={"file": ("ct.nii.gz", nifti(image, affine), "application/gzip")},
    )
    assert r.status_code == 201, r.text
    assert api.get(f"/v1/volumes/{vid}/viewer").status_code == 200  # decodes and caches
    timings, sizes = [], []
    for axis, index in [(2, 150), (2, 151), (2, 152), (1, 256), (0, 256)]:
        t0 = time.perf_counter()
        r = api.get(f"/v1/volumes/{vid}/slices/{axis}/{index}")
        timings.append(time.perf_counter() - t0)
        sizes.append(int(r.headers.get("content-length", len(r.content))))
        assert np.array_equal(_plane(r, "<i2"), np.take(image, index, axis=axis))
    assert max(timings) < 0.5, timings  # generous: 2 shared cores; ~10 ms alone
    assert max(sizes) < 512 * 512 * 2, sizes  # compressed on the wire


def test_views_follow_the_radiological_convention_for_any_axis_order():
    ras = display_views(np.diag([1.0, 1.0, 2.0, 1.0]), (10, 20, 30))
    assert ras["axial"].axis == 2 and ras["axial"].size == 30
    # RAS: index grows towards R and A, so both screen axes run against the index.
    assert (ras["axial"].rows, ras["axial"].cols) == (1, 0)
    assert ras["axial"].flip_rows and ras["axial"].flip_cols
    assert ras["coronal"].row_mm == 2.0 and ras["coronal"].flip_rows
    # LPS stored with the slice axis first: axial is axis 0; nothing needs flipping in-plane.
    lps = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    views = display_views(lps, (30, 20, 10))
    assert views["axial"].axis == 0 and views["axial"].size == 30
    assert not views["axial"].flip_rows and not views["axial"].flip_cols
    assert nib.aff2axcodes(lps) == ("S", "P", "L")


def test_the_page_learns_its_sign_in_from_the_config_and_may_reach_only_that_issuer(svc_settings):
    with TestClient(create_app(svc_settings)) as anonymous:
        assert anonymous.get("/v1/workbench/config").json() == {"oidc": None}
        csp = anonymous.get("/ui/").headers["content-security-policy"]
        assert "connect-src 'self';" in csp
    issuer = "https://sso.hospital.example:8443/realms/radiology"
    auth = svc_settings.auth.model_copy(
        update={"oidc_issuer": issuer, "oidc_client_id": "ctloop-workbench"}
    )
    with TestClient(create_app(svc_settings.model_copy(update={"auth": auth}))) as anonymous:
        config = anonymous.get("/v1/workbench/config").json()  # before anyone signs in
        assert config == {
            "oidc": {"issuer": issuer, "client_id": "ctloop-workbench", "scope": "openid"}
        }
        csp = anonymous.get("/ui/").headers["content-security-policy"]
        assert "connect-src 'self' https://sso.hospital.example:8443;" in csp
        assert "script-src" not in csp and "default-src 'self'" in csp
        assert anonymous.get("/v1/volumes").status_code == 401  # the rest still needs a token
