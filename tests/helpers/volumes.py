"""Test volumes as a client uploads them: phantoms, gzipped NIfTI, zipped DICOM series."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.phantom import Phantom, generate_phantom
from tests.helpers.dicom import write_series


def nifti(array: np.ndarray, affine: np.ndarray) -> bytes:
    return nifti_gz_bytes(array, affine)


def phantom(site: str = "clinical-a", seed: int = 0) -> Phantom:
    return generate_phantom(site, seed, "tiny")


def dicom_zip(p: Phantom, series_uids: tuple[str, ...] = ()) -> bytes:
    """The phantom as a zip of one (or, with several uids, a mix of) CT series."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buf, "w") as zf:
        uids = series_uids or (None,)
        for n, uid in enumerate(uids):
            files = write_series(Path(tmp) / str(n), p.image, p.affine, series_uid=uid)
            for f in files:
                zf.write(f, f"series{n}/{f.name}")
    return buf.getvalue()
