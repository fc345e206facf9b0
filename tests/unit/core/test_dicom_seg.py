"""DICOM out: the CT series and the SEG read back with pydicom/highdicom and match."""

import io

import highdicom as hd
import numpy as np
import pydicom

from ctloop.core.datasets import load_dicom_series
from ctloop.core.dicom import ct_series, segmentation, to_bytes
from ctloop.core.organs import ORGAN_IDS
from ctloop.core.phantom import generate_phantom


def test_series_and_seg_round_trip(tmp_path):
    p = generate_phantom("public", 2, "tiny")
    series = ct_series(p.image.astype(np.float32), p.affine, "vol-x")
    files = []
    for i, ds in enumerate(series):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(to_bytes(ds))
        files.append(path)
    vol = load_dicom_series(files).as_ras()
    assert np.array_equal(vol.image, p.image.astype(np.float32))
    assert np.allclose(vol.affine, p.affine, atol=1e-4)

    seg = segmentation(p.label, series, "vol-x", "prediction", algorithm="sustainer v3")
    back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(to_bytes(seg))))
    assert back.SeriesInstanceUID != series[0].SeriesInstanceUID
    ref = back.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == series[0].SeriesInstanceUID
    labels = {d.segment_label: d for d in back.SegmentSequence}
    assert set(labels) == {o for o, i in ORGAN_IDS.items() if i and np.any(p.label == i)}
    assert labels["kidney_right"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "9846003"
    uids = [ds.SOPInstanceUID for ds in series]
    for organ, description in labels.items():
        frames = back.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[description.SegmentNumber]
        )  # (slices, rows, cols, 1), in our slice order
        got = np.transpose(frames[..., 0], (2, 1, 0)).astype(bool)
        assert np.array_equal(got, p.label == ORGAN_IDS[organ]), organ


def test_same_volume_same_uids():
    p = generate_phantom("public", 2, "tiny")
    a = ct_series(p.image, p.affine, "vol-y")
    b = ct_series(p.image, p.affine, "vol-y")
    assert [x.SOPInstanceUID for x in a] == [x.SOPInstanceUID for x in b]
    assert a[0].StudyInstanceUID != ct_series(p.image, p.affine, "vol-z")[0].StudyInstanceUID
