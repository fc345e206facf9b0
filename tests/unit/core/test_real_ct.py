"""A real CT (TotalSegmentator's test series, tests/helpers/real_ct.py) through ctloop's DICOM
reader and writers: read onto the same grid as its reference labels, a SEG on the original
series that dciodvfy accepts and a second reader (highdicom's volume API) places where the
labels are, and ctloop's own CT series valid too. The labels are a model's output, not truth."""

from __future__ import annotations

import io

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctloop.core import dicom
from ctloop.core.datasets import DatasetError, load_dicom_series
from ctloop.core.dicom_source import SourceSeries, mask_on_source, source_images
from ctloop.core.organs import ORGAN_IDS
from tests.helpers import real_ct


@pytest.fixture(scope="module")
def pacs_series(tmp_path_factory):
    """The series as a PACS holds it (blanked UIDs put back), written to files."""
    folder = tmp_path_factory.mktemp("real-ct")
    return real_ct.write(real_ct.as_a_pacs_holds_it(real_ct.series_files()), folder)


def test_the_series_as_published_reads_onto_its_labels_grid_in_hu():
    """Blanked SOP UIDs come from the file meta; the JPEG 2000 pixels decode; the volume is
    the labels' grid exactly (both RAS-canonical) and in HU. With its study and series UIDs
    blanked there is no original a SEG could reference."""
    volume = load_dicom_series(real_ct.series_files()).as_ras()
    labels, affine = real_ct.reference_labels()
    assert volume.image.shape == labels.shape == (512, 512, 20)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-3)
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert volume.image.min() == -1024 and 1000 < volume.image.max() < 3100
    liver = volume.image[labels == ORGAN_IDS["liver"]]
    aorta = volume.image[labels == ORGAN_IDS["aorta"]]
    assert 60 < np.median(liver) < 200 and np.median(aorta) > np.median(liver)  # contrast CT
    assert volume.meta["source_series"] is None


def test_a_missing_slice_of_the_real_series_is_refused(pacs_series):
    with pytest.raises(DatasetError, match="missing, duplicated or unevenly spaced"):
        load_dicom_series(pacs_series[:9] + pacs_series[10:])


def test_a_truncated_slice_of_the_real_series_is_refused(pacs_series, tmp_path):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(pacs_series[7].read_bytes()[:-2000])
    with pytest.raises(DatasetError, match="truncated"):
        load_dicom_series([*pacs_series[:7], cut, *pacs_series[8:]])


def test_each_slice_keeps_its_own_rescale(pacs_series, tmp_path):
    """One slice stored with another slope and intercept (its pixel values rewritten to
    match) reads as the same HU: each slice's own rescale is applied."""
    before = load_dicom_series(pacs_series).as_ras()
    ds = pydicom.dcmread(pacs_series[5])
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
    ds.PixelData = np.rint((hu + 2048) / 2).astype(np.uint16).tobytes()
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    after = load_dicom_series([*pacs_series[:5], changed, *pacs_series[6:]]).as_ras()
    assert np.max(np.abs(after.image - before.image)) <= 1.0  # odd HU round to even


def test_a_seg_on_the_original_series_is_valid_and_lands_on_the_labels(pacs_series, tmp_path):
    volume = load_dicom_series(pacs_series).as_ras()
    source = SourceSeries.model_validate(volume.meta["source_series"])
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs_series]
    assert source.series_uid == originals[0].SeriesInstanceUID
    assert source.frame_of_reference_uid == originals[0].FrameOfReferenceUID
    assert len(source.instances) == 20
    labels, affine = real_ct.reference_labels()

    frames = mask_on_source(labels, affine, source)
    seg = dicom.segmentation_of_frames(
        frames, source_images(source), "real", "reference original", "TotalSegmentator"
    )
    path = tmp_path / "seg.dcm"
    path.write_bytes(dicom.to_bytes(seg))
    assert real_ct.dciodvfy(path) == []

    # A second reader: highdicom places the SEG's frames through their own geometry.
    back = hd.seg.segread(path)
    ref = back.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.series_uid
    assert back.FrameOfReferenceUID == source.frame_of_reference_uid
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == {
        o.SOPInstanceUID for o in originals
    }
    present = [str(d.SegmentLabel) for d in back.SegmentSequence]
    assert set(present) == {
        o for o in ORGAN_IDS if o != "background" and (labels == ORGAN_IDS[o]).any()
    }
    for number, organ in enumerate(present, start=1):
        placed = back.get_volume(segment_numbers=[number], combine_segments=True)
        got = nib.as_closest_canonical(placed.to_nibabel())
        np.testing.assert_allclose(got.affine, affine, atol=1e-3)
        assert np.array_equal(np.asarray(got.dataobj) > 0, labels == ORGAN_IDS[organ]), organ


def test_ctloops_own_series_and_seg_of_the_real_ct_are_valid(tmp_path):
    volume = load_dicom_series(real_ct.series_files()).as_ras()
    labels, _ = real_ct.reference_labels()
    series = dicom.ct_series(volume.image, volume.affine, "real")
    for k in (0, 19):
        path = tmp_path / f"ct{k}.dcm"
        path.write_bytes(dicom.to_bytes(series[k]))
        assert real_ct.dciodvfy(path) == [], k
    seg = dicom.segmentation(labels, series, "real", "reference", "TotalSegmentator")
    path = tmp_path / "seg.dcm"
    path.write_bytes(dicom.to_bytes(seg))
    assert real_ct.dciodvfy(path) == []
    back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(path.read_bytes())))
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID


def test_the_real_ct_case_is_checked_before_any_model_runs(tmp_path):
    from ctloop.transfer.real_ct import RealCtError, load_case

    case = load_case(real_ct.SERIES, real_ct.LABELS, "totalsegmentator")
    assert case["truth"].shape == case["image"].shape == (512, 512, 20)
    assert (case["truth"] == ORGAN_IDS["liver"]).sum() > 100_000
    small = nib.load(real_ct.ROOT / "example_seg.nii.gz")  # the 3 mm case: another grid
    with pytest.raises(RealCtError, match="grid"):
        load_case(real_ct.SERIES, real_ct.ROOT / "example_seg.nii.gz", "totalsegmentator")
    assert small.shape != case["truth"].shape
    with pytest.raises(RealCtError, match="no DICOM series"):
        load_case(tmp_path / "none", real_ct.LABELS, "totalsegmentator")


def test_real_ct_command_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from ctloop import cli

    monkeypatch.setenv("CTLOOP_RUNS_DIR", str(tmp_path))
    assert cli.main(["real-ct", "--run", "nope"]) == 2
    assert "no finished run" in capsys.readouterr().err
