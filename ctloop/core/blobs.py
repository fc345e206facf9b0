"""The stored-blob codec: how ctloop writes a volume or mask to S3 and reads it back.

Every blob (CT, label, annotation, pre-annotation) is a gzipped NIfTI-1 file. Writers and
readers anywhere in ctloop go through these functions, so the stored form is decided here only.
"""

from __future__ import annotations

from typing import Any, cast

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from numpy.typing import NDArray

# gzip through ISA-L (``isal``): the same format as the stdlib's, ~5x faster to write and ~2x
# faster to read, which is most of what ingest and inference spend on a blob.
gzip_error = cast(type[Exception], isal_zlib.error)


# The data types of a stored CT blob and label: an upload already in that form (and otherwise
# clean, see ``services.ingest.validation``) is stored as it came, not decoded and encoded again.
STORED_CT_DTYPES = ("int16", "float32")
STORED_LABEL_DTYPES = ("uint8",)


# gzip header flags (RFC 1952, 2.3.1)
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 0x02, 0x04, 0x08, 0x10


def gzip_bytes(data: bytes) -> bytes:
    return igzip.compress(data, 1, mtime=0)


def bare_gzip(data: bytes) -> bytes:
    """A gzip member as ctloop stores it: its header stripped to the bare 10 bytes (no file
    name, comment, extra field or header CRC; mtime 0, OS unknown) and its compressed data
    kept byte for byte. A client's gzip header can name the patient (``doe_jane.nii``) or the
    scan date; an upload stored "as it came" is stored like this. ``data`` must start with a
    gzip header (a checked upload); the same bytes come back when it is bare already."""
    flags, pos = data[3], 10
    if flags & _FEXTRA:
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    if flags & _FNAME:
        pos = data.index(b"\0", pos) + 1
    if flags & _FCOMMENT:
        pos = data.index(b"\0", pos) + 1
    if flags & _FHCRC:
        pos += 2
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + data[8:9] + b"\xff"
    if pos == 10 and data[:10] == header:
        return data
    return b"".join((header, memoryview(data)[pos:]))  # one copy of the payload


def gunzip_bytes(data: bytes) -> bytes:
    return isal_zlib.decompress(data, 16 + isal_zlib.MAX_WBITS)


def nifti_gz_bytes(array: NDArray, affine: NDArray) -> bytes:
    """A volume or mask as gzipped NIfTI bytes: the form ctloop stores blobs in."""
    # NIfTI data is column-major: nibabel writes a C-ordered array a slab at a time, which is
    # 2-3x slower than one transposing copy and a straight write.
    img = nib.Nifti1Image(np.asfortranarray(array), affine)
    img.header.set_xyzt_units("mm", "sec")
    return gzip_bytes(img.to_bytes())


def nifti_from_gz(data: bytes) -> nib.Nifti1Image:
    """The NIfTI image in gzipped bytes (a blob ctloop stored)."""
    return nib.Nifti1Image.from_bytes(gunzip_bytes(data))


def nifti_array_from_gz(data: bytes) -> tuple[NDArray, NDArray[np.float64]]:
    """The voxel array (column-major, read-only) and affine of a gzipped NIfTI blob, read in
    place from the decompressed bytes (:func:`nifti_voxels`)."""
    raw = gunzip_bytes(data)
    img = nib.Nifti1Image.from_bytes(raw)
    return nifti_voxels(img, raw), np.asarray(img.affine, dtype=np.float64)


def nifti_voxels(img: nib.Nifti1Image | nib.Nifti2Image, raw: bytes) -> NDArray:
    """``img``'s voxels: a read-only view of ``raw`` (the file's bytes, decompressed) when the
    file stores its values unscaled (nibabel's reader would copy the whole volume once more),
    else nibabel's scaled array."""
    proxy: Any = img.dataobj  # nibabel's ArrayProxy: where and how the voxels are stored
    dtype, offset, shape = np.dtype(proxy.dtype), int(proxy.offset), tuple(proxy.shape)
    count = int(np.prod(shape))
    unscaled = float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0
    if unscaled and proxy.order == "F" and len(raw) >= offset + count * dtype.itemsize:
        return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    return np.asanyarray(proxy)


def encode_ct(image: np.ndarray, affine: NDArray[np.float64]) -> bytes:
    """A validated CT as the blob ctloop stores: int16 when every value is a whole HU that
    fits (half the bytes of float32), float32 otherwise."""
    if np.issubdtype(image.dtype, np.integer):
        if image.min() >= -32768 and image.max() <= 32767:
            return nifti_gz_bytes(image.astype(np.int16, copy=False), affine)
        return nifti_gz_bytes(image.astype(np.float32), affine)
    sample = image[:, :, 0]  # one plane: a scanner's float HU fail here, cheaply
    if np.all(sample == np.rint(sample)) and image.min() >= -32768 and image.max() <= 32767:
        rounded = np.rint(image)  # one full-size copy, used for the check and the result
        if np.array_equal(rounded, image):
            return nifti_gz_bytes(rounded.astype(np.int16), affine)
    return nifti_gz_bytes(image.astype(np.float32, copy=False), affine)
