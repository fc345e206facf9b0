"""Every inflate an upload causes is bounded by what the file itself declares (issue 18,
finding 2): bombs of every shape are refused with a stable code, and refusing one takes a
small fraction of the memory it would inflate to (tracemalloc's peak)."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest

from ctloop.core.blobs import nifti_gz_bytes
from services.ingest.errors import ApiError
from services.ingest.validation import Limits, read_dicom_zip, read_nifti_upload
from tests.helpers.dicom import deflated_series_zip
from tests.helpers.volumes import (
    dicom_zip,
    encrypted_zip,
    gzip_member,
    many_member_zip,
    nifti_raw,
    nifti_with_vox_offset,
    phantom,
    zip_of,
    zip_with_lying_size,
)

LIMITS = Limits(max_bytes=1 << 30, max_voxels=1 << 26)
BOMB = 96 << 20  # what each bomb would inflate to
PEAK = 24 << 20  # what refusing one may take
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
CT = (np.random.default_rng(3).standard_normal((24, 20, 12)) * 300).astype(np.int16)


def _huge_shape_bomb() -> bytes:
    """A header that claims 4096^3 voxels, followed by a long run of zeros."""
    raw = bytearray(nifti_raw(CT, AFFINE)[:352])
    raw[42:48] = (4096).to_bytes(2, "little") * 3
    return gzip_member(bytes(raw), BOMB)


@cache
def _bombs() -> dict[str, tuple[Callable[[bytes], object], Callable[[], bytes], int, str]]:
    """name -> (reader, upload builder, status, code)."""
    nii, dcm = (lambda d: read_nifti_upload(d, LIMITS)), (lambda d: read_dicom_zip(d, LIMITS))
    small = phantom(seed=5)
    series = {f"{i}.dcm": b for i, b in enumerate(_series_files(small))}
    return {
        "nifti_trailing_data_in_the_member": (
            nii, lambda: gzip_member(nifti_raw(CT, AFFINE), BOMB), 422, "trailing_data"
        ),
        "nifti_second_gzip_member": (
            nii, lambda: nifti_gz_bytes(CT, AFFINE) + gzip_member(b"", BOMB), 422, "trailing_data"
        ),
        "nifti_uncompressed_trailing_bytes": (
            nii, lambda: nifti_raw(CT, AFFINE) + bytes(4096), 422, "trailing_data"
        ),
        "nifti_header_claims_huge_offset": (
            nii, lambda: nifti_with_vox_offset(CT, AFFINE, BOMB), 413, "too_large"
        ),
        "nifti_header_claims_huge_shape": (nii, _huge_shape_bomb, 413, "too_large"),
        "dicom_deflated_bomb": (
            dcm,
            lambda: deflated_series_zip(small.image[:, :, :3], small.affine, BOMB // 3),
            413,
            "dicom_too_large",
        ),
        "zip_member_declares_a_smaller_size": (
            dcm, lambda: zip_with_lying_size(series, 100), 422, "corrupt_zip"
        ),
        "nested_zip_by_content": (
            dcm, lambda: zip_of({"0.dcm": zip_of(series)}), 422, "nested_zip"
        ),
        "nested_zip_by_name": (dcm, lambda: zip_of({"inner.zip": b"x" * 64}), 422, "nested_zip"),
        "many_member_zip": (dcm, lambda: many_member_zip(100_000), 413, "too_many_files"),
        "bzip2_member": (
            dcm, lambda: zip_of(series, zipfile.ZIP_BZIP2), 422, "zip_method"
        ),
        "encrypted_member": (dcm, lambda: encrypted_zip(zip_of(series)), 422, "zip_encrypted"),
    }  # fmt: skip


def _series_files(p) -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(dicom_zip(p))) as zf:
        return [zf.read(n) for n in zf.namelist()]


@pytest.mark.parametrize("name", list(_bombs()))
def test_a_bomb_is_refused_with_a_stable_code_in_bounded_memory(name):
    read, build, status, code = _bombs()[name]
    data = build()
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            read(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (refused.value.status, refused.value.code) == (status, code), refused.value.message
    assert peak < PEAK, f"{name}: {peak >> 20} MiB to refuse it"


def test_a_deflated_dicom_series_within_its_budget_reads_like_the_plain_one():
    p = phantom(seed=5)
    plain = read_dicom_zip(dicom_zip(p), LIMITS)
    deflated = read_dicom_zip(deflated_series_zip(p.image, p.affine), LIMITS)
    np.testing.assert_array_equal(deflated.image, plain.image)
    np.testing.assert_allclose(deflated.affine, plain.affine)


def test_bgzip_style_members_and_its_empty_end_marker_are_one_image():
    """Several members that together hold the image, then an empty member (bgzip's end of
    file marker): read as one file, not kept as it came."""
    raw = nifti_raw(CT, AFFINE)
    data = b"".join(gzip_member(raw[i : i + 1000]) for i in range(0, len(raw), 1000))
    upload = read_nifti_upload(data + gzip_member(b""), LIMITS, dtypes=("int16",))
    np.testing.assert_array_equal(upload.array, CT)
    assert not upload.storable


def test_an_image_shorter_than_its_header_declares_is_truncated():
    with pytest.raises(ApiError) as refused:
        read_nifti_upload(gzip_member(nifti_raw(CT, AFFINE)[:-10]), LIMITS)
    assert refused.value.code == "truncated"
