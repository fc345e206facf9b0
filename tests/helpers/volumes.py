"""Test volumes as a client uploads them: phantoms, gzipped NIfTI, zipped DICOM series."""

from __future__ import annotations

import io
import struct
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


def dicom_zip(p: Phantom, series_uids: tuple[str, ...] = (), syntax: str | None = None) -> bytes:
    """The phantom as a zip of one (or, with several uids, a mix of) CT series; ``syntax``: a
    key of :data:`tests.helpers.dicom.COMPRESSED` to compress every slice with."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buf, "w") as zf:
        uids = series_uids or (None,)
        for n, uid in enumerate(uids):
            files = dicom.write_series(Path(tmp) / str(n), p.image, p.affine, series_uid=uid)
            if syntax is not None:
                dicom.compress_files(files, dicom.COMPRESSED[syntax])
            for f in files:
                zf.write(f, f"series{n}/{f.name}")
    return buf.getvalue()


# ---------------------------------------------------------------- hostile uploads (bombs)
def nifti_raw(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Uncompressed single-file NIfTI-1 bytes."""
    return bytes(nib.Nifti1Image(np.asfortranarray(array), affine).to_bytes())


def gzip_member(prefix: bytes, zeros: int = 0, wbits: int = 31) -> bytes:
    """One gzip member (raw deflate for ``wbits`` -15) of ``prefix`` and then ``zeros`` zero
    bytes. Cheap to build whatever it inflates to: after a full flush the compressor starts
    afresh, so one compressed MiB of zeros, repeated, is the stream for many."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(prefix), c.flush(zlib.Z_FULL_FLUSH)]
    block, whole = bytes(1 << 20), zeros >> 20
    if whole:
        parts.append((c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)) * whole)
    rest = bytes(zeros & ((1 << 20) - 1))
    parts += [c.compress(rest), c.flush()]
    deflate = b"".join(parts)
    if wbits < 0:
        return deflate
    crc = zlib.crc32(prefix)
    for _ in range(whole):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(rest, crc)
    size = (len(prefix) + zeros) & 0xFFFFFFFF
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + deflate + crc.to_bytes(4, "little") + size.to_bytes(4, "little")


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
    """A zip of ``count`` empty stored files: a central directory that costs memory to parse
    (written with struct: zipfile takes seconds for 100 000 members). The end record's 16-bit
    entry count wraps past 65535; its directory size is exact."""
    local, central, offset = [], [], 0
    for i in range(count):
        name = str(i).encode()
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0)
        entry = (b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset)
        central.append(struct.pack("<4s6H3L5H2L", *entry) + name)
        local.append(header + name)
        offset += len(header) + len(name)
    directory = b"".join(central)
    n = count & 0xFFFF
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(directory), offset, 0)
    return b"".join(local) + directory + end


def encrypted_zip(data: bytes) -> bytes:
    """The zip with every member flagged as encrypted (zipfile cannot write one itself)."""
    out = bytearray(data)
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.find(signature)
        while at >= 0:
            out[at + flags_at] |= 0x01
            at = out.find(signature, at + 4)
    return bytes(out)
