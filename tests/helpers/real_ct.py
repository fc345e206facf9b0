"""The real CT of the tests (issue 20): TotalSegmentator 2.18.0's own test data, unpacked from its
PyPI source distribution by ``make setup`` (target ``real-ct``) under ``.ctloop/real-ct/``:

* ``example_ct_dicom/``: 20 axial slices of a contrast-enhanced upper abdomen (Siemens, 512x512,
  0.977 mm pixels, 2 mm apart, 3 mm thick), JPEG 2000 lossless, anonymised by blanking: the
  study, series and SOP UIDs in the datasets are empty (the SOP UIDs survive in the file meta);
* ``example_seg_dicom.nii.gz``: its label map on the same grid, in TotalSegmentator's ids.

The labels are TotalSegmentator's output, not an expert's: a reference, never truth.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from ctloop.core.organs import from_totalsegmentator

ROOT = Path(__file__).resolve().parents[2] / ".ctloop" / "real-ct"
SERIES = ROOT / "example_ct_dicom"
LABELS = ROOT / "example_seg_dicom.nii.gz"

_NAMESPACE = uuid.UUID("0b5d9a8e-3f0c-4c1e-9a51-6c2f1f4f7d11")


def series_files() -> list[Path]:
    """The raw files, as the sdist has them; a clear failure when setup has not run."""
    files = sorted(SERIES.glob("CT.*")) if SERIES.is_dir() else []
    assert len(files) == 20, f"the real CT is missing from {SERIES}: run `make setup` (real-ct)"
    return files


def _uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}"


def as_a_pacs_holds_it(files: list[Path]) -> list[Dataset]:
    """The series with what its anonymiser blanked put back the way a PACS holds an exam: SOP
    UIDs from each file's meta, one study and series UID, a patient. Pixel data untouched
    (still JPEG 2000)."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = _uid("study")
        ds.SeriesInstanceUID = _uid("series")
        ds.PatientID, ds.PatientName = "TS-EXAMPLE-1", "Example^Totalsegmentator"
        ds.PatientBirthDate, ds.PatientSex = "19500101", "O"
        ds.StudyID, ds.AccessionNumber = "TS1", "ACC-TS-1"
        out.append(ds)
    return out


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def reference_labels() -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    """The label map in ctloop's canonical ids, RAS-canonical, and its affine."""
    img = nib.as_closest_canonical(nib.load(LABELS))
    return from_totalsegmentator(np.asarray(img.dataobj)), np.asarray(img.affine)


def dciodvfy(path: Path) -> list[str]:
    """David Clunie's validator (Debian dicom3tools) on one file: its error lines."""
    assert shutil.which("dciodvfy"), "dciodvfy is missing: run `make setup` (dicom3tools)"
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
