"""A corpus of malformed and hostile requests against the ingest API on the real stack.

Each one must be answered with a 4xx and a stable error code, store nothing (no volume,
annotation or outbox row, no S3 object), produce no event, and leave the service healthy."""

from __future__ import annotations

import gzip
import io
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import jwt
import nibabel as nib
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ctloop.bus import EventProducer
from ctloop.core.phantom import Phantom
from ctloop.db import AnnotationRevision, Lease, OutboxEvent, Volume, session_scope
from ctloop.outbox import OutboxRelay
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from services.ingest.app import create_app
from tests.helpers.dicom import deflated_series_zip, deflated_zip_with_broken_meta
from tests.helpers.volumes import (
    dicom_zip,
    encrypted_zip,
    gzip_member,
    many_member_zip,
    nifti,
    nifti_raw,
    nifti_with_vox_offset,
    phantom,
    zip_of,
    zip_with_lying_size,
)

SITE, OTHER = "rel-a", "rel-b"


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    status: int
    code: str
    kwargs: Callable[[dict[str, Any]], dict[str, Any]]
    as_user: str = "annotator"  # admin | annotator (site rel-a) | other (site rel-b) | token name


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _upload(data: bytes, **form: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(ctx: dict[str, Any]) -> dict[str, Any]:
        fields = {"site_id": SITE, "dataset": "clinical", "volume_id": ctx["fresh_id"], **form}
        return {"files": {"file": ("ct.nii.gz", data, "application/gzip")}, "data": fields}

    return build


def _labelled(label: bytes, **form: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(ctx: dict[str, Any]) -> dict[str, Any]:
        fields = {"site_id": SITE, "dataset": "public", "volume_id": ctx["fresh_id"], **form}
        files = {
            "file": ("ct.nii.gz", ctx["public_image"], "application/gzip"),
            "label": ("label.nii.gz", label, "application/gzip"),
        }
        return {"files": files, "data": fields}

    return build


def _annotation(mask: bytes | None = None, **form: str) -> Callable[[dict[str, Any]], dict]:
    def build(ctx: dict[str, Any]) -> dict[str, Any]:
        fields = {"minutes": "3", **form}
        body = mask if mask is not None else ctx["good_mask"]
        return {"files": {"mask": ("m.nii.gz", body, "application/gzip")}, "data": fields}

    return build


def _broken_volume_files(p: Phantom) -> dict[str, Case]:
    """Volume uploads that are not a readable, sane 3-D CT."""
    p = phantom(seed=901)
    good = nifti(p.image, p.affine)
    nan, inf = p.image.astype(np.float32), p.image.astype(np.float32)
    nan[1, 1, 1] = np.nan
    inf[2, 2, 2] = np.inf
    squashed = p.affine.copy()
    squashed[2, 2] = 1e-4
    singular_img = nib.Nifti1Image(p.image.astype(np.int16), None)
    singular_img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # no extent along y
    singular = gzip.compress(singular_img.to_bytes())
    header = bytearray(gzip.decompress(good)[:352])
    header[40:42] = (3).to_bytes(2, "little")
    header[42:48] = (4096).to_bytes(2, "little") * 3  # claims 4096^3 voxels
    bomb_header = gzip.compress(bytes(header) + b"\0" * 2048)
    other_series = dicom_zip(p, series_uids=("1.2.3.4.5", "1.2.3.4.6"))
    u: Callable[..., Any] = _upload
    return {
        # volumes: broken files
        "corrupt_gzip": Case("POST", "/v1/volumes", 422, "corrupt_gzip", u(b"\x1f\x8b" + b"x" * 9)),
        "truncated_gzip": Case("POST", "/v1/volumes", 422, "truncated", u(good[: len(good) // 3])),
        "not_an_image": Case("POST", "/v1/volumes", 422, "not_nifti", u(b"<html>no</html>" * 40)),
        "empty_file": Case("POST", "/v1/volumes", 422, "empty", u(b"")),
        "two_d": Case("POST", "/v1/volumes", 422, "not_3d", u(nifti(p.image[:, :, 3], p.affine))),
        "four_d": Case(
            "POST", "/v1/volumes", 422, "not_3d",
            u(nifti(np.stack([p.image, p.image], -1), p.affine)),
        ),
        "nan_voxels": Case("POST", "/v1/volumes", 422, "not_finite", u(nifti(nan, p.affine))),
        "inf_voxels": Case("POST", "/v1/volumes", 422, "not_finite", u(nifti(inf, p.affine))),
        "absurd_spacing": Case(
            "POST", "/v1/volumes", 422, "bad_spacing", u(nifti(p.image, squashed))
        ),
        "singular_affine": Case(
            "POST", "/v1/volumes", 422, "bad_affine", u(singular)
        ),
        "decompression_bomb": Case("POST", "/v1/volumes", 413, "too_large", u(bomb_header)),
        "zip_bomb": Case(
            "POST", "/v1/volumes", 413, "zip_bomb", u(_zip({"a.dcm": b"\0" * (16 << 20)}))
        ),
        "zip_traversal": Case(
            "POST", "/v1/volumes", 422, "unsafe_path", u(_zip({"../../etc/cron.d/x": b"1"}))
        ),
        "zip_absolute": Case(
            "POST", "/v1/volumes", 422, "unsafe_path", u(_zip({"/etc/passwd": b"1"}))
        ),
        "zip_empty": Case("POST", "/v1/volumes", 422, "empty_zip", u(_zip({}))),
        "zip_not_dicom": Case(
            "POST", "/v1/volumes", 422, "bad_dicom", u(_zip({"a.dcm": b"not dicom" * 50}))
        ),
        "zip_mixed_series": Case("POST", "/v1/volumes", 422, "bad_dicom", u(other_series)),
    }  # fmt: skip


def _hostile_volume_fields(good: bytes) -> dict[str, Case]:
    """Volume uploads with hostile or wrong form fields."""
    u: Callable[..., Any] = _upload
    return {
        # volumes: hostile or wrong form fields
        "site_traversal": Case("POST", "/v1/volumes", 422, "bad_id", u(good, site_id="../x")),
        "id_with_slash": Case("POST", "/v1/volumes", 422, "bad_id", u(good, volume_id="a/b")),
        "id_too_long": Case("POST", "/v1/volumes", 422, "bad_id", u(good, volume_id="v" * 300)),
        "unknown_dataset": Case(
            "POST", "/v1/volumes", 422, "invalid_request", u(good, dataset="secret")
        ),
        "public_without_label": Case(
            "POST", "/v1/volumes", 422, "label_required", u(good, dataset="public")
        ),
        "another_sites_upload": Case(
            "POST", "/v1/volumes", 404, "unknown_site", u(good, site_id=OTHER), as_user="uploader"
        ),
    }  # fmt: skip


def _bad_labels(pub: Phantom) -> dict[str, Case]:
    """Labelled uploads whose label does not fit the volume or the organ list."""
    return {
        # labels
        "label_other_grid": Case(
            "POST", "/v1/volumes", 422, "grid_mismatch",
            _labelled(nifti(pub.label[:-2], pub.affine)), as_user="admin",
        ),
        "label_unknown_values": Case(
            "POST", "/v1/volumes", 422, "unknown_label",
            _labelled(nifti(np.where(pub.label > 0, 77, 0).astype(np.uint8), pub.affine)),
            as_user="admin",
        ),
        "label_float": Case(
            "POST", "/v1/volumes", 422, "float_mask",
            _labelled(nifti(pub.label.astype(np.float32) + 0.25, pub.affine)), as_user="admin",
        ),
        "label_map_not_json": Case(
            "POST", "/v1/volumes", 422, "bad_label_map",
            _labelled(nifti(pub.label, pub.affine), label_map="{liver: 1"), as_user="admin",
        ),
        "label_map_unknown_organ": Case(
            "POST", "/v1/volumes", 422, "bad_label_map",
            _labelled(nifti(pub.label, pub.affine), label_map='{"heart": 1}'), as_user="admin",
        ),
    }  # fmt: skip


def _bad_annotations(p: Phantom) -> dict[str, Case]:
    """Annotations with a bad mask, review or model reference, or for a volume not yours."""
    return {
        # annotations
        "mask_other_grid": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "grid_mismatch",
            _annotation(nifti(p.label[:, :-1], p.affine)),
        ),
        "mask_unknown_values": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "unknown_label",
            _annotation(nifti(np.full(p.label.shape, 200, np.uint8), p.affine)),
        ),
        "mask_float": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "float_mask",
            _annotation(nifti(p.label.astype(np.float32) + 0.5, p.affine)),
        ),
        "mask_corrupt": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "corrupt_gzip",
            _annotation(b"\x1f\x8bnope" * 10),
        ),
        "organs_not_json": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_review",
            _annotation(organs="{'liver': accepted"),
        ),
        "organs_unknown_status": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_review",
            _annotation(organs='{"liver": "maybe"}'),
        ),
        "organs_unknown_organ": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_review",
            _annotation(organs='{"heart": "accepted"}'),
        ),
        "slices_backwards": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_review",
            _annotation(reviewed_slices="[[9, 3]]"),
        ),
        "bad_model_ref": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_model_ref",
            _annotation(from_model="igniter:latest"),
        ),
        "model_version_overflows_sql": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_model_ref",
            _annotation(from_model="igniter:99999999999999999999"),
        ),
        "slices_deeply_nested": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_review",
            _annotation(reviewed_slices="[" * 5000 + "]" * 5000),
        ),
        "slice_index_absurd": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_review",
            _annotation(reviewed_slices="[[0, 99999999999999999999]]"),
        ),
        "negative_minutes": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "invalid_request",
            _annotation(minutes="-4"),
        ),
        "annotate_unknown_volume": Case(
            "POST", "/v1/volumes/no-such-volume/annotations", 404, "not_found", _annotation()
        ),
        "annotate_another_sites_volume": Case(
            "POST", "/v1/volumes/{vid}/annotations", 404, "not_found", _annotation(),
            as_user="other",
        ),
    }  # fmt: skip


def _access_and_tokens() -> dict[str, Case]:
    """Reads across sites, hostile paths, malformed JSON bodies, bad tokens, a wrong role."""
    return {
        # reads across sites and hostile paths
        "read_another_sites_image": Case(
            "GET", "/v1/volumes/{vid}/image", 404, "not_found", lambda c: {}, as_user="other"
        ),
        "read_another_sites_prediction": Case(
            "GET", "/v1/volumes/{vid}/prediction/mask", 404, "not_found", lambda c: {},
            as_user="other",
        ),
        "path_traversal_id": Case(
            "GET", "/v1/volumes/..%2F..%2Fetc/image", 404, "not_found", lambda c: {}
        ),
        # JSON bodies
        "malformed_json": Case(
            "POST", "/v1/sites", 422, "invalid_request",
            lambda c: {"content": b'{"id": ', "headers": {"content-type": "application/json"}},
            as_user="admin",
        ),
        "json_wrong_types": Case(
            "POST", "/v1/tasks/next", 422, "invalid_request",
            lambda c: {"json": {"strategy": "loudest", "lease_seconds": -5}},
        ),
        # tokens
        "no_token": Case("GET", "/v1/volumes", 401, "unauthenticated", lambda c: {}, "none"),
        "basic_auth": Case("GET", "/v1/volumes", 401, "unauthenticated", lambda c: {}, "basic"),
        "unknown_token": Case("GET", "/v1/volumes", 401, "bad_token", lambda c: {}, "unknown"),
        "expired_jwt": Case("GET", "/v1/volumes", 401, "bad_token", lambda c: {}, "expired"),
        "forged_jwt": Case("GET", "/v1/volumes", 401, "bad_token", lambda c: {}, "forged"),
        "wrong_audience_jwt": Case("GET", "/v1/volumes", 401, "bad_token", lambda c: {}, "aud"),
        "annotator_creates_site": Case(
            "POST", "/v1/sites", 403, "forbidden", lambda c: {"json": {"id": "mine"}}
        ),
    }  # fmt: skip


def _lazy(build: Callable[[], bytes], **form: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """An upload whose bytes are built when the case runs (bombs are cheap to send, not free
    to build: no cost at collection)."""
    return lambda ctx: _upload(build(), **form)(ctx)


def _patched_nifti(p: Phantom, at: int, fmt: str, *values: Any) -> bytes:
    """The phantom as gzipped NIfTI with header bytes at ``at`` overwritten (struct ``fmt``)."""
    raw = bytearray(nifti_raw(p.image.astype(np.int16), p.affine))
    struct.pack_into(fmt, raw, at, *values)
    return gzip.compress(bytes(raw))


def _dicom_files(p: Phantom) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(dicom_zip(p))) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _bombs(p: Phantom) -> dict[str, Case]:
    """Decompression bombs of every shape (issue 18, finding 2): refused before they inflate."""
    raw, gz = nifti_raw(p.image, p.affine), nifti(p.image, p.affine)
    series = _dicom_files(p)
    bomb = 256 << 20
    u: Callable[..., Any] = _lazy
    return {
        "bomb_trailing_data_in_member": Case(
            "POST", "/v1/volumes", 422, "trailing_data", u(lambda: gzip_member(raw, bomb))
        ),
        "bomb_second_gzip_member": Case(
            "POST", "/v1/volumes", 422, "trailing_data", u(lambda: gz + gzip_member(b"", bomb))
        ),
        "bomb_header_claims_huge_offset": Case(
            "POST", "/v1/volumes", 413, "too_large",
            u(lambda: nifti_with_vox_offset(p.image, p.affine, bomb)),
        ),
        "bomb_deflated_dicom": Case(
            "POST", "/v1/volumes", 413, "dicom_too_large",
            u(lambda: deflated_series_zip(p.image[:, :, :3], p.affine, bomb // 3)),
        ),
        "bomb_zip_size_lies": Case(
            "POST", "/v1/volumes", 422, "corrupt_zip", u(lambda: zip_with_lying_size(series, 100))
        ),
        "bomb_nested_zip": Case(
            "POST", "/v1/volumes", 422, "nested_zip", u(lambda: zip_of({"a.dcm": zip_of(series)}))
        ),
        "bomb_nested_zip_by_name": Case(
            "POST", "/v1/volumes", 422, "nested_zip", u(lambda: zip_of({"in.zip": b"PK" * 9}))
        ),
        "bomb_many_member_zip": Case(
            "POST", "/v1/volumes", 413, "too_many_files", u(lambda: many_member_zip(100_000))
        ),
    }  # fmt: skip


def _malformed_files(p: Phantom, pub: Phantom) -> dict[str, Case]:
    """Malformed files and fields that once got a 500 or were taken (issue 18, finding 9)."""
    raw = nifti_raw(p.image, p.affine)
    series = _dicom_files(p)
    twelve_bits = {**series}
    first = sorted(series)[0]
    bits = b"\x28\x00\x00\x01US\x02\x00"  # (0028,0100) Bits Allocated, US, 2 bytes
    twelve_bits[first] = series[first].replace(bits + b"\x10\x00", bits + b"\x0c\x00", 1)
    rgb = _patched_nifti(p, 70, "<hh", 128, 24)  # datatype RGB24
    return {
        "nifti_trailing_raw_bytes": Case(
            "POST", "/v1/volumes", 422, "trailing_data", _upload(raw + bytes(4096))
        ),
        "nifti_rgb_voxels": Case("POST", "/v1/volumes", 422, "bad_dtype", _upload(rgb)),
        "nifti_nan_data_offset": Case(
            "POST", "/v1/volumes", 422, "not_nifti",
            _upload(_patched_nifti(p, 108, "<f", float("nan"))),
        ),
        "nifti_pair_header": Case(
            "POST", "/v1/volumes", 422, "not_nifti", _upload(_patched_nifti(p, 344, "4s", b"ni1"))
        ),
        "zip_bzip2_member": Case(
            "POST", "/v1/volumes", 422, "zip_method", _upload(zip_of(series, zipfile.ZIP_BZIP2))
        ),
        "zip_encrypted_member": Case(
            "POST", "/v1/volumes", 422, "zip_encrypted", _upload(encrypted_zip(zip_of(series)))
        ),
        "zip_needs_newer_version": Case(
            "POST", "/v1/volumes", 422, "not_zip", _upload(_newer_version(zip_of(series)))
        ),
        "dicom_deflated_broken_meta": Case(
            "POST", "/v1/volumes", 422, "bad_dicom",
            _upload(deflated_zip_with_broken_meta(p.image[:, :, :3], p.affine)),
        ),
        "dicom_twelve_bits_allocated": Case(
            "POST", "/v1/volumes", 422, "bad_dicom", _upload(zip_of(twelve_bits))
        ),
        "label_trailing_data": Case(
            "POST", "/v1/volumes", 422, "trailing_data",
            _labelled(nifti(pub.label, pub.affine) + gzip_member(b"\1" * 64)), as_user="admin",
        ),
        "label_rgb_voxels": Case("POST", "/v1/volumes", 422, "bad_dtype", _labelled(rgb), "admin"),
        "label_map_overflowing_id": Case(
            "POST", "/v1/volumes", 422, "bad_label_map",
            _labelled(nifti(pub.label, pub.affine), label_map='{"liver": 1e999}'), as_user="admin",
        ),
        "label_map_huge_id": Case(
            "POST", "/v1/volumes", 422, "bad_label_map",
            _labelled(nifti(pub.label, pub.affine), label_map='{"liver": 1000000000}'),
            as_user="admin",
        ),
        "mask_trailing_data": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "trailing_data",
            _annotation(nifti(p.label, p.affine) + gzip_member(b"\1" * 64)),
        ),
        "mask_label_map_overflowing_id": Case(
            "POST", "/v1/volumes/{vid}/annotations", 422, "bad_label_map",
            _annotation(label_map='{"liver": 1e999}'),
        ),
    }  # fmt: skip


def _newer_version(data: bytes) -> bytes:
    """The zip with its first member needing zip version 25.5 (zipfile: NotImplementedError)."""
    out = bytearray(data)
    out[out.index(b"PK\x01\x02") + 6] = 0xFF
    return bytes(out)


# Malformed and foreign files the DICOM libraries test themselves with (pydicom's and
# pynetdicom's packages ship them): truncated pixel data, a missing preamble and meta, a bad
# VR, broken sequences, a bad meta header, big endian, deflated, another modality. Each goes
# in as one more member of a valid CT series.
LIBRARY_FILES = {
    "pydicom": (
        "MR_truncated.dcm", "rtplan_truncated.dcm", "no_meta.dcm", "badVR.dcm",
        "meta_missing_tsyntax.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
        "J2K_pixelrep_mismatch.dcm", "UN_sequence.dcm", "nested_priv_SQ.dcm",
        "ExplVR_BigEndNoMeta.dcm", "image_dfl.dcm", "CT_small.dcm", "rtstruct.dcm",
    ),
    "pynetdicom": (
        "CTImageStorage_bad_meta.dcm", "SCImageStorage_Deflated.dcm",
        "MRImageStorage_ExplicitVRBigEndian.dcm",
    ),
}  # fmt: skip


def _library_file(package: str, name: str) -> bytes:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin, f"{package} is not installed (make dev)"
    root = Path(spec.origin).parent
    folder = (
        root / "data" / "test_files" if package == "pydicom" else root / "tests" / "dicom_files"
    )
    return (folder / name).read_bytes()


def _library_files(p: Phantom) -> dict[str, Case]:
    series = _dicom_files(p)
    return {
        f"dicom_{package}_{name.removesuffix('.dcm')}": Case(
            "POST", "/v1/volumes", 422, "bad_dicom",
            _lazy(lambda package=package, name=name: zip_of(
                {**series, "extra.dcm": _library_file(package, name)}
            )),
        )
        for package, names in LIBRARY_FILES.items()
        for name in names
    } | {
        "dicom_real_ct_truncated_pixel_data": Case(
            "POST", "/v1/volumes", 422, "bad_dicom", _lazy(_real_ct_with_a_truncated_slice)
        ),
    }  # fmt: skip


def _real_ct_with_a_truncated_slice() -> bytes:
    """The real CT (tests/helpers/real_ct.py) with one slice's JPEG 2000 data cut short."""
    from tests.helpers import real_ct

    members = {f"{i:02d}.dcm": f.read_bytes() for i, f in enumerate(real_ct.series_files())}
    members["07.dcm"] = members["07.dcm"][:-2000]
    return zip_of(members)


def _corpus() -> dict[str, Case]:
    p = phantom(seed=901)
    cases = {
        **_broken_volume_files(p),
        **_hostile_volume_fields(nifti(p.image, p.affine)),
        **_bad_labels(phantom("public", 902)),
        **_bad_annotations(p),
        **_access_and_tokens(),
        **_bombs(p),
        **_malformed_files(p, phantom("public", 902)),
        **_library_files(p),
    }
    # Uploads come from machine clients (role integration) unless a case says otherwise.
    return {
        name: replace(c, as_user="uploader")
        if c.path == "/v1/volumes" and c.as_user == "annotator"
        else c
        for name, c in cases.items()
    }


CORPUS = _corpus()


@pytest.fixture(scope="module")
def world(svc_settings: Settings, admin_headers, oidc_issuer) -> Iterator[dict[str, Any]]:
    issuer, key = oidc_issuer
    settings = svc_settings.model_copy(
        update={"auth": svc_settings.auth.model_copy(update={"oidc_issuer": issuer})}
    )
    relay = OutboxRelay(settings.database_url, EventProducer(settings, client_id="rel-test"))
    with TestClient(create_app(settings, relay), headers=admin_headers) as admin:
        for site in (SITE, OTHER):
            assert admin.post("/v1/sites", json={"id": site}).status_code == 201
        tokens = {}
        for user, role, site in (
            ("rel-ann", "annotator", SITE),
            ("rel-other", "annotator", OTHER),
            ("rel-up", "integration", SITE),
        ):
            r = admin.post("/v1/users", json={"id": user, "role": role, "sites": [site]})
            assert r.status_code == 201, r.text
            tokens[user] = admin.post(f"/v1/users/{user}/tokens", json={}).json()["token"]
        p = phantom(seed=901)
        r = admin.post(
            "/v1/volumes",
            files={"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")},
            data={"site_id": SITE, "dataset": "clinical", "volume_id": "rel-vol"},
        )
        assert r.status_code == 201, r.text
        pub = phantom("public", 902)
        now = int(time.time())
        claims = {
            "sub": "jo",
            "iss": issuer,
            "aud": "ctloop",
            "resource_access": {"ctloop": {"roles": ["admin"]}},
        }

        def signed(extra: dict[str, Any], signer: Any = key) -> str:
            return jwt.encode({**claims, **extra}, signer, "RS256", headers={"kid": "k1"})

        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        headers = {
            "admin": admin_headers,
            "annotator": {"Authorization": f"Bearer {tokens['rel-ann']}"},
            "other": {"Authorization": f"Bearer {tokens['rel-other']}"},
            "uploader": {"Authorization": f"Bearer {tokens['rel-up']}"},
            "none": {"Authorization": ""},
            "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
            "unknown": {"Authorization": "Bearer ctl_" + "0" * 40},
            "expired": {"Authorization": f"Bearer {signed({'exp': now - 60})}"},
            "forged": {"Authorization": f"Bearer {signed({'exp': now + 600}, stranger)}"},
            "aud": {"Authorization": f"Bearer {signed({'exp': now + 600, 'aud': 'pacs'})}"},
        }
        yield {
            "client": admin,
            "settings": settings,
            "headers": headers,
            "public_image": nifti(pub.image, pub.affine),
            "good_mask": nifti(p.label, p.affine),
        }
    relay.producer.close()


def _state(settings: Settings) -> tuple[Any, ...]:
    with session_scope(settings.database_url) as s:
        rows = tuple(
            s.scalar(select(func.count()).select_from(t))
            for t in (Volume, AnnotationRevision, OutboxEvent, Lease)
        )
    store = ObjectStore(settings)
    objects = tuple(
        len(store.list_keys(settings.s3.bucket, f"{prefix}/{site}/"))
        for prefix in ("volumes", "annotations")
        for site in (SITE, OTHER)
    )
    return rows + objects


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_is_refused_with_a_stable_code_and_changes_nothing(world, name, unique):
    case = CORPUS[name]
    ctx = {**world, "fresh_id": f"bad-{unique}"}
    before = _state(world["settings"])
    kwargs = case.kwargs(ctx)
    headers = {**world["headers"][case.as_user], **kwargs.pop("headers", {})}
    r = world["client"].request(
        case.method, case.path.format(vid="rel-vol"), headers=headers, **kwargs
    )
    assert r.status_code == case.status, (name, r.status_code, r.text)
    body = r.json()
    assert body["code"] == case.code, (name, body)
    assert isinstance(body["message"], str) and body["message"], body
    leaks = ("Traceback", "validation error for", "[type=", "invalid literal", "Errno")
    assert not any(x in body["message"] for x in leaks), (name, body)  # no parser internals
    assert _state(world["settings"]) == before, name  # nothing stored, no event staged
    assert world["client"].get("/readyz").status_code == 200
