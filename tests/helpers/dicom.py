"""A CT volume as a DICOM series, one pydicom file per slice (what a scanner exports)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.helpers import volumes  # (volumes imports this module too: used at call time)


def ct_slice(
    image: np.ndarray,
    affine: np.ndarray,
    k: int,
    series_uid: str,
    syntax: UID = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    frame_uid: str | None = None,
) -> FileDataset:
    """Axial slice ``k`` of a RAS-ordered array as a CT image, in DICOM's LPS coordinates.
    ``study_uid`` / ``frame_uid``: the series' study and frame of reference (derived from the
    series UID when not given, so every slice of a series shares them)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    nx, ny, _ = image.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(f"{k}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=["study", series_uid])
    ds.FrameOfReferenceUID = frame_uid or generate_uid(entropy_srcs=["frame", series_uid])
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
    return ds


def write_series(
    folder: Path,
    image: np.ndarray,
    affine: np.ndarray,
    series_uid: str | None = None,
    shuffle: bool = True,
) -> list[Path]:
    """One file per axial slice of a RAS-ordered array, in DICOM's LPS patient coordinates."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    paths = []
    for k in range(image.shape[2]):
        ds = ct_slice(image, affine, k, series_uid)
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        paths.append(folder / f"{k}.dcm")
    if shuffle:
        np.random.default_rng(0).shuffle(paths)
    return paths


def deflated_instance(ds: FileDataset, padding: int = 0) -> bytes:
    """``ds`` as a Deflated Explicit VR Little Endian file, its dataset followed by a Data Set
    Trailing Padding element of ``padding`` zero bytes inside the deflate stream (0: none):
    a few hundred KB on the wire per GB it inflates to."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    dataset = body.getvalue()
    if padding:  # (FFFC,FFFC) OB, explicit VR: tag, VR, 2 reserved bytes, 4-byte length
        dataset += b"\xfc\xff\xfc\xff" + b"OB\0\0" + padding.to_bytes(4, "little")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    return out.getvalue() + volumes.gzip_member(dataset, padding, wbits=-15)


def deflated_series_zip(image: np.ndarray, affine: np.ndarray, padding: int = 0) -> bytes:
    """A zip (members stored: deflated DICOM compresses no further) of a series in the
    deflated transfer syntax, each file padded as :func:`deflated_instance` says."""
    uid = generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for k in range(image.shape[2]):
            zf.writestr(f"{k}.dcm", deflated_instance(ct_slice(image, affine, k, uid), padding))
    return buf.getvalue()


def with_broken_meta(instance: bytes) -> bytes:
    """The file with its Implementation Class UID's VR made one that does not exist (pydicom
    reads it, but cannot write it back)."""
    broken = bytearray(instance)
    at = broken.index(b"\x02\x00\x12\x00UI")  # (0002,0012) Implementation Class UID
    broken[at + 4 : at + 6] = b"U\x9c"
    return bytes(broken)


def deflated_zip_with_broken_meta(image: np.ndarray, affine: np.ndarray) -> bytes:
    """:func:`deflated_series_zip` whose first file's meta is :func:`with_broken_meta`."""
    with zipfile.ZipFile(io.BytesIO(deflated_series_zip(image, affine))) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    first = sorted(files)[0]
    files[first] = with_broken_meta(files[first])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


# The compressed transfer syntaxes PACS exports use, each as a test can write it: pydicom's own
# encoders (RLE; JPEG-LS through pyjpegls; JPEG 2000 through pylibjpeg-openjpeg) and GDCM for
# JPEG Lossless (pydicom has no encoder for it; python-gdcm is a test dependency only, so the
# services decode with the pylibjpeg plugins alone).
COMPRESSED = {
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-2000": JPEG2000Lossless,
    "jpeg-lossless": JPEGLosslessSV1,
}


def compress_files(paths: list[Path], syntax: UID) -> None:
    """Re-encode each DICOM file in ``paths`` to ``syntax`` (losslessly), in place."""
    for path in paths:
        if syntax == JPEGLosslessSV1:
            import gdcm

            reader = gdcm.ImageReader()
            reader.SetFileName(str(path))
            assert reader.Read(), path
            change = gdcm.ImageChangeTransferSyntax()
            change.SetTransferSyntax(
                gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1)
            )
            change.SetInput(reader.GetImage())
            assert change.Change(), path
            writer = gdcm.ImageWriter()
            writer.SetFileName(str(path))
            writer.SetFile(reader.GetFile())
            writer.SetImage(change.GetOutput())
            assert writer.Write(), path
        else:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(path, enforce_file_format=True)
