"""DICOM out: a volume as a CT series, and a mask as a DICOM SEG (highdicom) referencing it.

UIDs are derived from the volume id (``2.25.<uuid5>``), so the same volume always gives the same
study and series, and a SEG made later still references the series a PACS already holds.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from ctloop.core.organs import FOREGROUND, ORGAN_IDS

_NAMESPACE = uuid.UUID("6f1c1f64-5e2b-4f6a-9c35-1b8ad0c7e0a1")

# SNOMED CT codes of the canonical organs (segmented property type).
ORGAN_CODES: dict[str, hd.sr.CodedConcept] = {
    "liver": hd.sr.CodedConcept(*codes.SCT.Liver[:3]),
    "spleen": hd.sr.CodedConcept(*codes.SCT.Spleen[:3]),
    "kidney_right": hd.sr.CodedConcept("9846003", "SCT", "Right kidney"),
    "kidney_left": hd.sr.CodedConcept("18639004", "SCT", "Left kidney"),
    "stomach": hd.sr.CodedConcept(*codes.SCT.Stomach[:3]),
    "pancreas": hd.sr.CodedConcept(*codes.SCT.Pancreas[:3]),
    "gallbladder": hd.sr.CodedConcept(*codes.SCT.Gallbladder[:3]),
    "aorta": hd.sr.CodedConcept(*codes.SCT.Aorta[:3]),
    "ivc": hd.sr.CodedConcept(*codes.SCT.InferiorVenaCava[:3]),
}


def derived_uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}"


def ct_series(
    image: NDArray, affine: NDArray, volume_id: str, patient_id: str = "ANONYMOUS^"
) -> list[Dataset]:
    """One CT image per axial slice of a ``(x, y, z)`` HU volume on a RAS grid."""
    study, series = derived_uid(volume_id, "study"), derived_uid(volume_id, "series")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ras_to_lps = np.array([-1.0, -1.0, 1.0])
    row_dir = ras_to_lps * affine[:3, 0] / spacing[0]  # along x: DICOM columns
    col_dir = ras_to_lps * affine[:3, 1] / spacing[1]  # along y: DICOM rows
    hu = np.clip(np.rint(image), -1024, 31743).astype(np.int32)
    slices: list[Dataset] = []
    for k in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(derived_uid(volume_id, "ct", str(k)))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)  # type: ignore[arg-type]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = derived_uid(volume_id, "frame")
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.PatientID, ds.PatientName = patient_id, patient_id
        ds.StudyID, ds.AccessionNumber = "1", ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "", ""
        ds.Manufacturer = "ctloop"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        origin = affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [float(v) for v in ras_to_lps * origin[:3]]
        ds.PositionReferenceIndicator = ""
        # Type 2 attributes a derived series does not know: present and empty (dciodvfy checks)
        ds.BodyPartExamined = "ABDOMEN"  # what ctloop segments; an unpaired part: no Laterality
        ds.PatientPosition = ""
        ds.KVP = ds.AcquisitionNumber = None
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = (hu[:, :, k].T + 1024).astype(np.uint16).tobytes()
        slices.append(ds)
    return slices


def segmentation(
    mask: NDArray, source: Sequence[Dataset], volume_id: str, what: str, algorithm: str = ""
) -> Dataset:
    """A BINARY DICOM SEG of a canonical ``(x, y, z)`` label mask on ctloop's own series
    (:func:`ct_series`), one segment per organ present."""
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])])  # (slices, rows, cols)
    return segmentation_of_frames(frames, source, volume_id, what, algorithm)


def segmentation_of_frames(
    frames: NDArray, source: Sequence[Dataset], volume_id: str, what: str, algorithm: str = ""
) -> Dataset:
    """A BINARY DICOM SEG of canonical label ``frames`` (one per source image, on its pixel
    grid: ``(images, rows, columns)``), one segment per organ present."""
    present = [o for o in FOREGROUND if np.any(frames == ORGAN_IDS[o])]
    labels = np.zeros(frames.shape, dtype=np.uint8)
    descriptions = []
    for number, organ in enumerate(present, start=1):
        labels[frames == ORGAN_IDS[organ]] = number
        kind = (
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
            if algorithm
            else hd.seg.SegmentAlgorithmTypeValues.MANUAL
        )
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=organ,
                segmented_property_category=hd.sr.CodedConcept(*codes.SCT.Organ[:3]),
                segmented_property_type=ORGAN_CODES[organ],
                algorithm_type=kind,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=algorithm, version="1", family=codes.cid7162.ArtificialIntelligence
                )
                if algorithm
                else None,
            )
        )
    if not descriptions:
        raise ValueError("the mask holds no organ")
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(volume_id, what, "seg-series"),
        series_number=100,
        sop_instance_uid=derived_uid(volume_id, what, "seg"),
        instance_number=1,
        manufacturer="ctloop",
        manufacturer_model_name="ctloop",
        software_versions="0.1",
        device_serial_number="0",
        series_description=f"ctloop {what}"[:64],
        omit_empty_frames=False,
    )
    return seg


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def series_zip(series: Sequence[Dataset], folder: str) -> bytes:
    """A series as a zip of ``<folder>/00000.dcm, ...`` (what ``series.zip`` answers)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, ds in enumerate(series):
            zf.writestr(f"{folder}/{i:05d}.dcm", to_bytes(ds))
    return buf.getvalue()
