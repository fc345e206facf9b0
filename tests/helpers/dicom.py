"""A CT volume as a DICOM series, one pydicom file per slice (what a scanner exports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_series(
    folder: Path,
    image: np.ndarray,
    affine: np.ndarray,
    series_uid: str | None = None,
    shuffle: bool = True,
) -> list[Path]:
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
