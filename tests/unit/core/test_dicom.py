"""A CT series written slice by slice with pydicom loads back as the same volume."""

import numpy as np
import pytest

from ctloop.core.datasets import DatasetError, load_dicom_series
from ctloop.core.phantom import generate_phantom
from tests.helpers.dicom import write_series


def test_series_loads_in_slice_order_with_hu_and_spacing(tmp_path):
    p = generate_phantom("public", 0, "tiny")
    files = write_series(tmp_path / "s", p.image, p.affine)
    vol = load_dicom_series(files).as_ras()
    assert vol.image.shape == p.image.shape
    assert np.array_equal(vol.image, p.image.astype(np.float32))
    assert np.allclose(vol.spacing, p.spacing)
    assert np.allclose(vol.affine, p.affine, atol=1e-4)
    assert vol.meta["modality"] == "CT"


def test_mixed_series_are_refused(tmp_path):
    p = generate_phantom("public", 0, "tiny")
    a = write_series(tmp_path / "a", p.image[:, :, :3], p.affine)
    b = write_series(tmp_path / "b", p.image[:, :, :3], p.affine)
    with pytest.raises(DatasetError, match="2 series"):
        load_dicom_series(a + b)


def test_non_dicom_file_is_refused(tmp_path):
    junk = tmp_path / "x.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(DatasetError, match="not a readable DICOM"):
        load_dicom_series([junk])
