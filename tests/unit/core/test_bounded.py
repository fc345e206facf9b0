"""The bounded readers: a gzip stream inflated a step at a time, never past what is asked; a
DICOM instance read no further than its header allows; a gzip header stripped bare."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest

from ctloop.core.blobs import bare_gzip, gzip_bytes
from ctloop.core.bounded import GzipReader, InflateRefused, read_at_most
from ctloop.core.dicom_budget import SeriesBudget, bounded_instance
from tests.helpers.dicom import ct_slice, deflated_instance, with_broken_meta
from tests.helpers.volumes import gzip_member, gzip_with_header_text

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
IMAGE = np.arange(16 * 12 * 2, dtype=np.int16).reshape(16, 12, 2)


def test_gzip_reader_inflates_no_more_than_asked_across_members():
    data = gzip_member(b"a" * 1000) + gzip_member(b"b" * 1000)
    reader = GzipReader(data)
    assert reader.read(10) == b"a" * 10
    assert reader.read(1500) == b"a" * 990 + b"b" * 510
    assert reader.members == 2
    with pytest.raises(InflateRefused) as more:
        reader.expect_end()
    assert more.value.code == "trailing_data"


def test_gzip_reader_allows_empty_members_after_the_data_and_refuses_junk():
    reader = GzipReader(gzip_member(b"x" * 100) + gzip_member(b"") + gzip_member(b""))
    assert reader.read(100) == b"x" * 100
    reader.expect_end()
    junk = GzipReader(gzip_member(b"x" * 100) + b"PK\x03\x04 not gzip")
    junk.read(100)
    with pytest.raises(InflateRefused) as refused:
        junk.expect_end()
    assert refused.value.code == "corrupt_gzip"


def test_gzip_reader_says_truncated_when_the_member_is_cut():
    data = gzip_member(b"y" * 5000)
    with pytest.raises(InflateRefused) as refused:
        GzipReader(data[: len(data) // 2]).read(5000)
    assert refused.value.code == "truncated"


def test_read_at_most_stops_one_byte_past_the_limit():
    stream = io.BytesIO(b"z" * 10_000)
    assert len(read_at_most(stream.read, 100)) == 101
    assert read_at_most(io.BytesIO(b"abc").read, 100) == b"abc"


def test_a_bare_gzip_header_has_no_name_comment_or_extra_and_the_same_payload():
    data = b"voxels" * 1000
    named = gzip_with_header_text(data, b"DOE_JANE_1970.nii", b"scan of Jane Doe", b"AB\x02\x00hi")
    bare = bare_gzip(named)
    assert b"DOE_JANE" not in bare and b"Jane Doe" not in bare and b"hi" not in bare[:20]
    assert bare[3] == 0 and bare[4:8] == b"\0\0\0\0"  # no flags, mtime 0
    assert bare[10:] == named[len(named) - len(bare) + 10 :]  # payload kept byte for byte
    assert gzip.decompress(bare) == data
    ours = gzip_bytes(data)
    assert bare_gzip(ours) is ours  # ctloop's own blobs are bare already


def _slice_bytes(k: int) -> bytes:
    ds = ct_slice(IMAGE, AFFINE, k, "1.2.3")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_an_instance_within_its_budget_comes_back_whole_and_is_charged():
    budget = SeriesBudget(max_voxels=16 * 12 * 2)
    data = _slice_bytes(0)
    assert bounded_instance(io.BytesIO(data).read, budget) == data
    assert budget.voxels == 16 * 12
    bounded_instance(io.BytesIO(_slice_bytes(1)).read, budget)
    with pytest.raises(InflateRefused) as refused:  # a third slice passes the series' voxels
        bounded_instance(io.BytesIO(_slice_bytes(0)).read, budget)
    assert (refused.value.code, refused.value.too_large) == ("too_large", True)


def test_a_deflated_instance_is_inflated_within_its_budget_and_rewritten_plain():
    import pydicom

    plain = bounded_instance(
        io.BytesIO(deflated_instance(ct_slice(IMAGE, AFFINE, 0, "1.2.3"))).read,
        SeriesBudget(max_voxels=1 << 20),
    )
    ds = pydicom.dcmread(io.BytesIO(plain))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, (IMAGE[:, :, 0].T + 1024).astype(np.uint16))
    bomb = deflated_instance(ct_slice(IMAGE, AFFINE, 0, "1.2.3"), padding=64 << 20)
    with pytest.raises(InflateRefused) as refused:
        bounded_instance(io.BytesIO(bomb).read, SeriesBudget(max_voxels=1 << 20))
    assert refused.value.code == "dicom_too_large"


def test_a_file_that_is_not_dicom_is_refused_as_such():
    with pytest.raises(InflateRefused) as refused:
        bounded_instance(io.BytesIO(b"not dicom" * 100).read, SeriesBudget(max_voxels=100))
    assert refused.value.code == "bad_dicom"


def test_a_zip_needing_a_newer_version_is_not_a_readable_zip():
    from ctloop.core.bounded import open_zip
    from tests.helpers.volumes import zip_of

    data = bytearray(zip_of({"0.dcm": b"x" * 100}))
    directory = data.index(b"PK\x01\x02")
    data[directory + 6] = 0xFF  # version needed to extract: 25.5 (zipfile raises NotImplemented)
    with pytest.raises(InflateRefused) as refused:
        open_zip(bytes(data), 10)
    assert refused.value.code == "not_zip"


def test_a_deflated_file_whose_meta_cannot_be_written_back_is_bad_dicom():
    data = with_broken_meta(deflated_instance(ct_slice(IMAGE, AFFINE, 0, "1.2.3")))
    with pytest.raises(InflateRefused) as refused:
        bounded_instance(io.BytesIO(data).read, SeriesBudget(max_voxels=1 << 20))
    assert refused.value.code == "bad_dicom"
