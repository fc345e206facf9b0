"""A CT series written slice by slice with pydicom loads back as the same volume."""

import numpy as np
import pytest

from ctloop.core.datasets import DatasetError, load_dicom_series
from ctloop.core.phantom import generate_phantom
from tests.helpers.dicom import COMPRESSED, compress_files, write_series


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


# ------------------------------------------------------------ what real scanners send (issue 20)
def _slices(tmp_path, n: int = 5):  # type: ignore[no-untyped-def]
    """A short series as pydicom datasets (slice k at z = 2k mm) and a way to write them."""
    import pydicom

    p = generate_phantom("public", 0, "tiny")
    files = write_series(tmp_path / "src", p.image[:, :, :n], p.affine, shuffle=False)
    datasets = [pydicom.dcmread(f) for f in files]

    def save(ds_list):  # type: ignore[no-untyped-def]
        out = []
        for i, ds in enumerate(ds_list):
            path = tmp_path / "out" / f"{i}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
        return out

    return p, datasets, save


def test_a_missing_slice_is_refused_not_stretched(tmp_path):
    """The old reader spread 4 slices over the 5 positions' span: 2.67 mm instead of 2 mm."""
    _, datasets, save = _slices(tmp_path)
    with pytest.raises(DatasetError, match=r"regular.*missing"):
        load_dicom_series(save(datasets[:2] + datasets[3:]))


def test_each_slice_is_rescaled_with_its_own_slope_and_intercept(tmp_path):
    """Scanners may store slices with different RescaleIntercept: the old reader applied the
    first slice's to all (a 1024 HU error on the others)."""
    p, datasets, save = _slices(tmp_path)
    for ds in datasets[1:]:
        stored = ds.pixel_array.astype(np.int32) + 1024  # intercept -2048 instead of -1024
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.RescaleIntercept = -2048
    vol = load_dicom_series(save(datasets)).as_ras()
    assert np.array_equal(vol.image, p.image[:, :, :5].astype(np.float32))


def test_mixed_orientation_or_pixel_spacing_is_refused(tmp_path):
    _, datasets, save = _slices(tmp_path)
    datasets[2].ImageOrientationPatient = [0, 1, 0, -1, 0, 0]
    with pytest.raises(DatasetError, match="not one regular CT volume"):
        load_dicom_series(save(datasets))
    _, datasets, save = _slices(tmp_path / "b")
    datasets[2].PixelSpacing = [3.0, 3.0]
    with pytest.raises(DatasetError, match="not one regular CT volume"):
        load_dicom_series(save(datasets))


def test_other_modalities_and_burned_in_annotation_are_refused(tmp_path):
    _, datasets, save = _slices(tmp_path)
    for ds in datasets:
        ds.Modality = "MR"
    with pytest.raises(DatasetError, match="not CT"):
        load_dicom_series(save(datasets))
    _, datasets, save = _slices(tmp_path / "b")
    datasets[0].BurnedInAnnotation = "YES"
    with pytest.raises(DatasetError, match="burned-in annotation"):
        load_dicom_series(save(datasets))


def test_an_enhanced_multiframe_ct_loads_like_its_slices(tmp_path):
    """One enhanced CT object holding every slice as a frame (highdicom's legacy converter)."""
    import highdicom

    p, datasets, _ = _slices(tmp_path)
    for ds in datasets:  # what the converter needs of a legacy CT
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = (
            "p1",
            "Anon",
            "20260101",
            "100000",
        )
        ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = 1, 1, "a1"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.StudyID = "", "O", "", "1"
        ds.Manufacturer, ds.ContentDate, ds.ContentTime = "x", "20260101", "100000"
        ds.KVP = 120
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=highdicom.UID(), series_number=2,
        sop_instance_uid=highdicom.UID(), instance_number=1,
    )  # fmt: skip
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    vol = load_dicom_series([path]).as_ras()
    assert np.array_equal(vol.image, p.image[:, :, :5].astype(np.float32))
    assert np.allclose(vol.affine, p.affine, atol=1e-4)


@pytest.mark.parametrize("syntax", sorted(COMPRESSED))
def test_compressed_series_decode_to_the_same_hu(tmp_path, syntax):
    """What PACS exports use (RLE, JPEG-LS, JPEG 2000 and JPEG Lossless, all lossless), decoded
    by the pinned pylibjpeg plugins: the services' decoders, not the test's GDCM encoder."""
    from pydicom.pixels import get_decoder

    uid = COMPRESSED[syntax]
    assert {"pylibjpeg", "pydicom"} & set(get_decoder(uid).available_plugins), uid.name
    p = generate_phantom("public", 0, "tiny")
    files = write_series(tmp_path / "s", p.image, p.affine)
    compress_files(files, uid)
    assert pydicom_syntax(files[0]) == uid
    import pydicom

    ds = pydicom.dcmread(files[0])  # the pinned plugin alone decodes it (no GDCM in the image)
    ds.pixel_array_options(decoding_plugin="pydicom" if syntax == "rle" else "pylibjpeg")
    assert ds.pixel_array.shape == (p.image.shape[1], p.image.shape[0])
    vol = load_dicom_series(files).as_ras()
    assert np.array_equal(vol.image, p.image.astype(np.float32))
    assert np.allclose(vol.affine, p.affine, atol=1e-4)


def pydicom_syntax(path):  # type: ignore[no-untyped-def]
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
