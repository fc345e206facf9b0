"""Stored blobs (gzipped NIfTI) read back exactly, whatever their type or scaling."""

import nibabel as nib
import numpy as np
import pytest

from ctloop.core.blobs import gzip_bytes, nifti_array_from_gz, nifti_gz_bytes

AFFINE = np.array([[0.7, 0, 0, 1.0], [0, 0.8, 0, 2.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_a_blob_reads_back_in_place_with_its_type_and_grid(dtype):
    a = (np.random.default_rng(0).standard_normal((20, 30, 40)) * 100).astype(dtype)
    array, affine = nifti_array_from_gz(nifti_gz_bytes(a, AFFINE))
    assert array.dtype == a.dtype and array.shape == a.shape
    assert np.array_equal(array, a)
    assert not array.flags.writeable  # read in place from the decompressed blob, no copy
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)


def test_a_scaled_or_big_endian_file_is_read_through_nibabel():
    a = (np.random.default_rng(1).standard_normal((10, 12, 14)) * 100).astype(np.int16)
    scaled = nib.Nifti1Image(a, AFFINE)
    scaled.header.set_slope_inter(2.0, -5.0)
    array, _ = nifti_array_from_gz(gzip_bytes(scaled.to_bytes()))
    np.testing.assert_allclose(array, a * 2.0 - 5.0)
    swapped = nib.Nifti1Image(a.astype(">i2"), AFFINE)
    array, _ = nifti_array_from_gz(gzip_bytes(swapped.to_bytes()))
    assert np.array_equal(array, a)
