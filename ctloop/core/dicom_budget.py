"""How many bytes a DICOM instance may take, from what its own header declares.

A series may hold at most ``max_voxels`` pixels in all (rows x columns x frames of each
instance); each instance its pixel data (those voxels x samples x bits allocated) plus a header
allowance, and the headers of a series share a second allowance. An instance is read in two
steps: its header (at most :data:`HEADER_BYTES_PER_INSTANCE`), then the rest its header
accounts for and not a byte more. A Deflated Explicit VR Little Endian dataset is inflated
against the same budget and handed on un-deflated (pydicom would inflate it whole, unbounded).

Used for zipped series uploads and for DICOMweb pulls alike (:func:`bounded_instance`).
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from ctloop.core.bounded import InflateRefused, read_at_most

log = logging.getLogger("ctloop.dicom")

HEADER_BYTES_PER_INSTANCE = 4 << 20  # per-frame functional groups of a long multi-frame fit
HEADER_BYTES_PER_SERIES = 64 << 20
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # float, double float, pixel data
_BITS_ALLOCATED = {1, 8, 16, 32, 64}


@dataclass(frozen=True)
class PixelDeclaration:
    """What an instance's header says its pixel data holds."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def voxels(self) -> int:
        return self.rows * self.columns * self.frames

    @property
    def nbytes(self) -> int:
        return (self.voxels * self.samples * self.bits_allocated + 7) // 8


@dataclass
class SeriesBudget:
    """What one series may still take: voxels over all its instances, header bytes beyond
    their pixel data. :meth:`admit` charges an instance before its bulk is read."""

    max_voxels: int
    header_bytes: int = HEADER_BYTES_PER_SERIES
    voxels: int = 0
    headers: int = 0

    def admit(self, pixels: PixelDeclaration) -> int:
        """The most bytes the instance may take; refused (413) once the series passes its
        voxel limit."""
        self.voxels += pixels.voxels
        if self.voxels > self.max_voxels:
            raise InflateRefused(
                "too_large", f"the series declares more than {self.max_voxels} voxels", True
            )
        headroom = max(0, min(HEADER_BYTES_PER_INSTANCE, self.header_bytes - self.headers))
        return pixels.nbytes + headroom

    def settle(self, size: int, pixels: PixelDeclaration) -> None:
        self.headers += max(0, size - pixels.nbytes)


def bounded_instance(read: Callable[[int], bytes], budget: SeriesBudget) -> bytes:
    """One DICOM Part 10 instance from ``read(n)`` (a zip member, an HTTP part), read no
    further than its header allows; a deflated dataset comes back inflated (and its transfer
    syntax rewritten to Explicit VR Little Endian). Refusals: ``bad_dicom`` (no file meta, no
    pixel description), ``too_large`` / ``dicom_too_large`` (413)."""
    head = read_at_most(read, HEADER_BYTES_PER_INSTANCE)
    fp = io.BytesIO(head)
    try:
        preamble = read_preamble(fp, False) or b"\0" * 128
        meta = FileMetaDataset(
            read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
        )
        syntax = UID(str(meta.TransferSyntaxUID))
    except Exception as exc:
        log.info("not a DICOM file", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise InflateRefused("bad_dicom", "a file is not DICOM (no preamble or file meta)") from exc
    body = head[fp.tell() :]
    if syntax == DeflatedExplicitVRLittleEndian:
        return _plain_file(preamble, meta, _inflated(body, read, budget))
    pixels = declared_pixels(body, syntax, complete=len(head) <= HEADER_BYTES_PER_INSTANCE)
    limit = budget.admit(pixels) + (len(head) - len(body))  # the file meta on top
    data = head + read_at_most(read, max(0, limit - len(head)))
    if len(data) > limit:
        raise _too_large()
    budget.settle(len(data), pixels)
    return data


def _plain_file(preamble: bytes, meta: FileMetaDataset, dataset: bytes) -> bytes:
    """An inflated dataset as a file in Explicit VR Little Endian (what it was deflated from)."""
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(preamble + b"DICM")
    try:
        write_file_meta_info(out, meta, enforce_standard=False)
    except Exception as exc:  # a file meta element pydicom cannot write back (a broken VR)
        log.info("unwritable DICOM file meta", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise InflateRefused("bad_dicom", "a DICOM file's meta information is broken") from exc
    return out.getvalue() + dataset


def _inflated(body: bytes, read: Callable[[int], bytes], budget: SeriesBudget) -> bytes:
    """A deflated dataset (what follows the file meta) inflated in two steps: its header, then
    what that header declares; the compressed input is read as it is needed."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = [body]

    def more(limit: int) -> bytes:
        parts, size = [], 0
        while size < limit and not inflater.eof:
            src = inflater.unconsumed_tail or (pending.pop() if pending else read(1 << 20))
            if not src:
                break
            try:
                chunk = inflater.decompress(src, limit - size)
            except zlib.error as exc:
                raise InflateRefused("bad_dicom", "a deflated DICOM dataset is corrupt") from exc
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    head = more(HEADER_BYTES_PER_INSTANCE + 1)
    complete = inflater.eof
    pixels = declared_pixels(head, ExplicitVRLittleEndian, complete)
    limit = budget.admit(pixels)
    dataset = head + more(max(0, limit + 1 - len(head)))
    if len(dataset) > limit:
        raise _too_large()
    if not inflater.eof:
        raise InflateRefused("truncated", "a deflated DICOM dataset ends early")
    budget.settle(len(dataset), pixels)
    return dataset


def declared_pixels(dataset: bytes, syntax: UID, complete: bool) -> PixelDeclaration:
    """Rows, columns, frames, samples and bits allocated from the start of a dataset (up to its
    pixel data); ``complete``: ``dataset`` is the whole dataset, not its first bytes."""
    fp = io.BytesIO(dataset)
    try:
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
        ds: Dataset = read_dataset(
            fp,
            implicit,
            little,
            stop_when=lambda tag, vr, length: int(BaseTag(tag)) in _PIXEL_TAGS,
        )
        found_pixels = fp.tell() < len(dataset)
        pixels = PixelDeclaration(
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            samples=int(ds.get("SamplesPerPixel", 1) or 1),
            bits_allocated=int(ds.BitsAllocated),
        )
    except Exception as exc:
        log.info("unreadable DICOM header", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise InflateRefused("bad_dicom", "a DICOM file has no readable image header") from exc
    if not found_pixels and not complete:
        raise InflateRefused(
            "dicom_too_large", f"a DICOM header exceeds {HEADER_BYTES_PER_INSTANCE} bytes", True
        )
    if min(pixels.rows, pixels.columns, pixels.frames, pixels.samples) < 1 or (
        pixels.bits_allocated not in _BITS_ALLOCATED
    ):
        raise InflateRefused("bad_dicom", "a DICOM file declares an impossible image size")
    return pixels


def _too_large() -> InflateRefused:
    return InflateRefused(
        "dicom_too_large", "a DICOM file holds more than its header declares", True
    )
