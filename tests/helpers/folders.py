"""Small Decathlon folders of NIfTI volumes written with nibabel, as a user would bring them."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

# The folders number organs their own way; loading maps them to the canonical ids.
LABELS = {"0": "background", "1": "spleen", "2": "liver"}
CANONICAL = np.array([0, 2, 1], dtype=np.uint8)  # folder id -> canonical id


def write_folder(root: Path, n: int, labelled: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` small NIfTI volumes, the first ``labelled`` with a label; returns the raw labels."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    training, labels = [], {}
    for i in range(n):
        vid = f"{root.name}_{i:03d}"
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        image = rng.normal(0.0, 50.0, size=(8, 8, 4)).astype(np.int16)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{vid}.nii.gz")
        entry = {"image": f"./imagesTr/{vid}.nii.gz"}
        if i < labelled:
            (root / "labelsTr").mkdir(exist_ok=True)
            label = rng.integers(0, 3, size=(8, 8, 4)).astype(np.uint8)
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{vid}.nii.gz")
            entry["label"] = f"./labelsTr/{vid}.nii.gz"
            labels[vid] = label
        training.append(entry)
    spec = {"name": root.name, "labels": LABELS, "training": training}
    (root / "dataset.json").write_text(json.dumps(spec))
    return labels
