"""Test volumes as a client uploads them: phantoms, gzipped NIfTI, zipped DICOM series."""

from __future__ import annotations

import io
import tempfile
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.phantom import Phantom, generate_phantom
from tests.helpers import dicom  # (dicom imports this module too: used at call time)


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
            files = dicom.write_series(Path(tmp) / str(n), p.image, p.affine, series_uid=uid)
            for f in files:
                zf.write(f, f"series{n}/{f.name}")
    return buf.getvalue()


# ---------------------------------------------------------------- hostile uploads (bombs)
def nifti_raw(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Uncompressed single-file NIfTI-1 bytes."""
    return bytes(nib.Nifti1Image(np.asfortranarray(array), affine).to_bytes())


def gzip_member(prefix: bytes, zeros: int = 0, wbits: int = 31) -> bytes:
    """One gzip member (raw deflate for ``wbits`` -15) of ``prefix`` and then ``zeros`` zero
    bytes, built a MiB at a time: a bomb costs its compressed size here, not what it inflates
    to (about 1000:1)."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [c.compress(prefix)]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(c.compress(block))
    out.append(c.compress(bytes(zeros & ((1 << 20) - 1))))
    out.append(c.flush())
    return b"".join(out)


def gzip_with_header_text(data: bytes, name: bytes, comment: bytes, extra: bytes) -> bytes:
    """A gzip member whose header carries a file name, a comment and an extra field (what
    ``gzip -N`` and some scanners' exports write: the patient's name can be in there)."""
    flags = 0x04 | 0x08 | 0x10  # FEXTRA, FNAME, FCOMMENT (RFC 1952)
    header = b"\x1f\x8b\x08" + bytes([flags]) + (1_700_000_000).to_bytes(4, "little") + b"\x00\x03"
    header += len(extra).to_bytes(2, "little") + extra + name + b"\0" + comment + b"\0"
    body = gzip_member(data, wbits=-15)
    trailer = zlib.crc32(data).to_bytes(4, "little") + (len(data) & 0xFFFFFFFF).to_bytes(
        4, "little"
    )
    return header + body + trailer


def nifti_with_vox_offset(array: np.ndarray, affine: np.ndarray, vox_offset: int) -> bytes:
    """A gzipped NIfTI whose header puts the voxels ``vox_offset`` bytes in (an extension area
    of that size: zeros, cheap to send, costly to inflate)."""
    raw = bytearray(nifti_raw(array, affine))
    raw[108:112] = np.float32(vox_offset).tobytes()
    return gzip_member(bytes(raw[:352]), vox_offset - 352)


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_with_lying_size(members: dict[str, bytes], declared: int) -> bytes:
    """A deflated zip whose first member's sizes (local header and central directory) say
    ``declared`` bytes, whatever it inflates to."""
    data = bytearray(zip_of(members))
    size = declared.to_bytes(4, "little")
    data[22:26] = size  # local file header: uncompressed size
    directory = data.index(b"PK\x01\x02")
    data[directory + 24 : directory + 28] = size
    return bytes(data)


def many_member_zip(count: int) -> bytes:
    """A zip of ``count`` empty files (a central directory that costs memory to parse)."""
    return zip_of({f"{i}": b"" for i in range(count)}, zipfile.ZIP_STORED)
