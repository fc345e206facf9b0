"""A CT series written slice by slice with pydicom loads back as the same volume."""

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctloop.core.datasets import DatasetError, load_dicom_series
from ctloop.core.phantom import generate_phantom


def _write_series(folder, image, affine, series_uid=None, shuffle=True):
    """One file per axial slice of a RAS-ordered array, in DICOM's LPS patient coordinates."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    nx, ny, nz = image.shape
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        # Columns run along RAS +x (= LPS -x), rows along RAS +y (= LPS -y).
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ras = affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [-ras[0], -ras[1], ras[2]]
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = (image[:, :, k].T + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        paths.append(folder / f"{k}.dcm")
    if shuffle:
        np.random.default_rng(0).shuffle(paths)
    return paths


def test_series_loads_in_slice_order_with_hu_and_spacing(tmp_path):
    p = generate_phantom("public", 0, "tiny")
    files = _write_series(tmp_path / "s", p.image, p.affine)
    vol = load_dicom_series(files).as_ras()
    assert vol.image.shape == p.image.shape
    assert np.array_equal(vol.image, p.image.astype(np.float32))
    assert np.allclose(vol.spacing, p.spacing)
    assert np.allclose(vol.affine, p.affine, atol=1e-4)
    assert vol.meta["modality"] == "CT"


def test_mixed_series_are_refused(tmp_path):
    p = generate_phantom("public", 0, "tiny")
    a = _write_series(tmp_path / "a", p.image[:, :, :3], p.affine)
    b = _write_series(tmp_path / "b", p.image[:, :, :3], p.affine)
    with pytest.raises(DatasetError, match="2 series"):
        load_dicom_series(a + b)


def test_non_dicom_file_is_refused(tmp_path):
    junk = tmp_path / "x.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(DatasetError, match="not a readable DICOM"):
        load_dicom_series([junk])
