import json

import numpy as np
import pytest

from ctloop.core.datasets import DatasetError, DecathlonDataset, phantom_volume, write_decathlon
from ctloop.core.organs import ORGAN_IDS, LabelMap, UnknownLabel
from ctloop.core.phantom import generate_phantom


def test_two_datasets_with_different_ids_harmonise_to_one_canonical_label(tmp_path):
    vol = phantom_volume(generate_phantom("public", 0, "tiny"), "v0")
    # Dataset A numbers organs one way, dataset B another, with other names for two of them.
    map_a = LabelMap(
        {
            "liver": 1,
            "spleen": 2,
            "kidney_right": 3,
            "kidney_left": 4,
            "stomach": 5,
            "pancreas": 6,
            "gallbladder": 7,
            "aorta": 8,
            "ivc": 9,
        }
    )
    map_b = LabelMap({"Spleen": 1, "Liver": 6, "right kidney": 2, "left kidney": 3,
                      "stomach": 4, "pancreas": 5, "gall bladder": 7, "aorta": 10,
                      "inferior vena cava": 12})  # fmt: skip
    a = write_decathlon(tmp_path / "a", [vol], "A", map_a)
    b = write_decathlon(tmp_path / "b", [vol], "B", map_b)
    raw_b = json.loads((tmp_path / "b" / "dataset.json").read_text())["labels"]
    assert raw_b["6"] == "liver" and raw_b["12"] == "ivc"
    label_a, label_b = a.load(0).label, b.load(0).label
    assert np.array_equal(label_a, vol.label)
    assert np.array_equal(label_b, vol.label)


def test_label_value_outside_the_map_is_refused():
    lm = LabelMap({"liver": 1})
    with pytest.raises(UnknownLabel, match=r"\[7\]"):
        lm.to_canonical(np.array([[[0, 1, 7]]]))


def test_a_value_in_a_gap_of_the_map_is_refused_and_a_canonical_mask_passes_as_is():
    lm = LabelMap({"liver": 1, "spleen": 5})  # 2..4 are not declared
    with pytest.raises(UnknownLabel, match=r"\[3\]"):
        lm.to_canonical(np.array([[[0, 1, 3, 5]]], dtype=np.uint8))
    canonical = LabelMap.canonical()
    assert canonical.is_identity and not lm.is_identity
    mask = np.asfortranarray(np.arange(len(ORGAN_IDS), dtype=np.uint8).reshape(1, 1, -1))
    assert np.array_equal(canonical.to_canonical(mask), mask)
    assert np.shares_memory(canonical.to_canonical(mask), mask)  # checked, not mapped again
    with pytest.raises(UnknownLabel, match=rf"\[{len(ORGAN_IDS)}\]"):
        canonical.to_canonical(mask + 1)


def test_unknown_organ_name_is_refused():
    with pytest.raises(UnknownLabel, match="brain"):
        LabelMap({"brain": 1})


def test_one_id_for_two_organs_is_refused():
    with pytest.raises(UnknownLabel):
        LabelMap({"liver": 1, "spleen": 1})


def test_canonical_map_round_trips_through_decathlon_labels():
    lm = LabelMap.canonical()
    assert LabelMap.from_decathlon(lm.to_decathlon()).organ_to_id == ORGAN_IDS


def test_label_on_another_grid_is_refused(tmp_path):
    vol = phantom_volume(generate_phantom("public", 0, "tiny"), "v0")
    write_decathlon(tmp_path / "d", [vol], "D")
    from ctloop.core.datasets import save_nifti

    save_nifti(tmp_path / "d" / "labelsTr" / "v0.nii.gz", vol.label[:-1], vol.affine)
    with pytest.raises(DatasetError, match="grid"):
        DecathlonDataset.open(tmp_path / "d").load(0)


def test_corrupt_nifti_is_a_clear_error(tmp_path):
    vol = phantom_volume(generate_phantom("public", 0, "tiny"), "v0")
    write_decathlon(tmp_path / "d", [vol], "D")
    (tmp_path / "d" / "imagesTr" / "v0.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match="not a readable NIfTI"):
        DecathlonDataset.open(tmp_path / "d").load(0)


@pytest.mark.parametrize("bad", [-1, 65536, 10**9])
def test_a_label_id_outside_uint16_is_refused_before_any_table_is_made(bad):
    # Slicer's label_info and a client's label_map both end here: an id of 10**9 would have
    # sized a 2 GB lookup table, a negative one silently named the table's last slot.
    with pytest.raises(UnknownLabel, match=r"0\.\.65535"):
        LabelMap({"liver": bad})
