"""The series a DICOM volume came from: its UIDs and geometry, nothing that names the patient.

ctloop keeps no DICOM attribute of an upload but these (docs/design.md): the study, series and
frame-of-reference UIDs, each instance's SOP UIDs and position, the orientation and pixel grid.
They are what a DICOM SEG needs to reference the *original* series, so a hospital's PACS and
viewers place ctloop's masks on the images they already hold. The patient and study attributes a
SEG stored back to a PACS must carry (so it joins the same patient's study) are read from that
PACS when the SEG is sent (:func:`patient_study_module`), and never stored.

The mask is taken onto each source image's own pixel grid by nearest-voxel lookup through the
affines (the stored volume is the same grid, reoriented to RAS), so a series stored bottom-up or
head-first, or with flipped rows, is referenced frame by frame as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

# The patient and study attributes a SEG copies from its source images (highdicom does), read
# from the PACS at send time; every other attribute of the PACS's answer is ignored.
PATIENT_STUDY_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
    "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


class SourceInstance(BaseModel):
    model_config = ConfigDict(frozen=True)

    sop_instance_uid: str
    position: tuple[float, float, float]  # ImagePositionPatient (LPS, mm)


class SourceSeries(BaseModel):
    """What a SEG needs of the original single-frame CT series (stored with the volume's row)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    orientation: tuple[float, float, float, float, float, float]  # ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    rows: int = Field(gt=0)
    columns: int = Field(gt=0)
    slice_thickness: float | None = None
    instances: list[SourceInstance] = Field(min_length=1)


def source_of(datasets: Sequence[Dataset]) -> SourceSeries | None:
    """The reference of a single-frame series already read as one regular volume; ``None`` for
    an enhanced multi-frame image or a series whose study, series or frame-of-reference UID is
    missing (their SEGs reference ctloop's own series)."""
    first = datasets[0]
    if len(datasets) == 1 and int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        return None
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
    if not all(str(first.get(k, "") or "") for k in uids):
        return None  # blanked by an anonymiser: no original a SEG could reference
    thickness = first.get("SliceThickness")
    return SourceSeries(
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_class_uid=str(first.SOPClassUID),
        orientation=tuple(float(v) for v in first.ImageOrientationPatient),  # type: ignore[arg-type]
        pixel_spacing=(float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        rows=int(first.Rows),
        columns=int(first.Columns),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        instances=[
            SourceInstance(
                sop_instance_uid=str(d.SOPInstanceUID),
                position=tuple(float(v) for v in d.ImagePositionPatient),  # type: ignore[arg-type]
            )
            for d in datasets
        ],
    )


def mask_on_source(mask: NDArray, affine: NDArray, source: SourceSeries) -> NDArray[np.uint8]:
    """``(instances, rows, columns)``: the mask of a ``(x, y, z)`` volume with RAS ``affine``,
    sampled at every pixel centre of every source image (nearest voxel; 0 outside)."""
    row_dir = np.asarray(source.orientation[:3])  # direction of increasing column index
    col_dir = np.asarray(source.orientation[3:])  # direction of increasing row index
    dr, dc = source.pixel_spacing
    r, c = np.meshgrid(np.arange(source.rows), np.arange(source.columns), indexing="ij")
    offsets = c[..., None] * dc * row_dir + r[..., None] * dr * col_dir  # LPS, (rows, cols, 3)
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = np.zeros((len(source.instances), source.rows, source.columns), dtype=np.uint8)
    shape = np.asarray(mask.shape[:3])
    for k, inst in enumerate(source.instances):
        ras = (np.asarray(inst.position) + offsets) * _LPS_TO_RAS
        ijk = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < shape), axis=-1)
        i, j, z = (np.where(inside, ijk[..., a], 0) for a in range(3))
        out[k] = np.where(inside, mask[i, j, z], 0)
    return out


def source_images(source: SourceSeries, patient_study: Dataset | None = None) -> list[Dataset]:
    """Header-only stand-ins of the original instances, what highdicom's Segmentation reads of
    its source images: their UIDs, geometry and (from the PACS, or empty) patient and study."""
    images = []
    for number, inst in enumerate(source.instances, start=1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = UID(source.sop_class_uid)
        ds.SOPInstanceUID = UID(inst.sop_instance_uid)
        ds.StudyInstanceUID = source.study_uid
        ds.SeriesInstanceUID = source.series_uid
        ds.FrameOfReferenceUID = source.frame_of_reference_uid
        ds.Modality, ds.InstanceNumber = "CT", number
        ds.Rows, ds.Columns = source.rows, source.columns
        ds.PixelSpacing = list(source.pixel_spacing)
        ds.ImageOrientationPatient = list(source.orientation)
        ds.ImagePositionPatient = list(inst.position)
        if source.slice_thickness is not None:
            ds.SliceThickness = source.slice_thickness
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for keyword in PATIENT_STUDY_KEYWORDS:
            value = patient_study.get(keyword) if patient_study is not None else None
            setattr(ds, keyword, value if value is not None else "")
        images.append(ds)
    return images


def patient_study_module(metadata: dict[str, Any]) -> Dataset:
    """The patient and study attributes of one instance's DICOM JSON metadata (a PACS's
    WADO-RS answer), and nothing else."""
    wanted = {f"{tag_for_keyword(k):08X}" for k in PATIENT_STUDY_KEYWORDS}
    return Dataset.from_json({t: v for t, v in metadata.items() if t.upper() in wanted})
