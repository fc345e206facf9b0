"""Everything an upload must pass before it is accepted.

Each refusal is an :class:`ApiError` with a stable ``code`` (what a client can act on), an
HTTP status and a message saying what was wrong.
"""

from __future__ import annotations

import io
import logging
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray

from ctloop.contracts import keys
from ctloop.core.blobs import nifti_voxels
from ctloop.core.bounded import GzipReader, InflateRefused, open_zip, zip_member_reader
from ctloop.core.datasets import DatasetError, Volume, load_dicom_series
from ctloop.core.dicom_budget import HEADER_BYTES_PER_SERIES, SeriesBudget, bounded_instance
from ctloop.core.organs import LabelMap, UnknownLabel
from services.ingest.errors import ApiError

MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
MAX_DIM = 4096
MAX_DICOM_FILES = 5000
MAX_ZIP_RATIO = 200  # uncompressed / compressed; far beyond what CT pixel data reaches
# What a NIfTI file's header is read from (NIfTI-2's 540 bytes and the extension flag), and
# how far its extensions (DICOM headers, JSON sidecars) may push the voxels' offset.
NIFTI_HEAD_BYTES = 544
MAX_NIFTI_EXTENSIONS = 4 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")

log = logging.getLogger("ctloop.ingest")


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_voxels: int


@dataclass
class Grid:
    shape: tuple[int, int, int]
    affine: NDArray[np.float64]

    @property
    def spacing(self) -> tuple[float, float, float]:
        s = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return float(s[0]), float(s[1]), float(s[2])


def safe_id(value: str, what: str) -> str:
    """``value`` if it is a safe key segment, else a 422 ``bad_id``."""
    try:
        return keys.safe_id(value, what)
    except keys.InvalidKeyPart as exc:
        raise ApiError("bad_id", str(exc)) from exc


@contextmanager
def _refusals() -> Iterator[None]:
    """A bounded reader's refusal as the API's: 413 for a size limit, 422 otherwise."""
    try:
        yield
    except InflateRefused as exc:
        raise ApiError(exc.code, exc.message, 413 if exc.too_large else 422) from exc


@dataclass(frozen=True)
class NiftiUpload:
    array: NDArray
    grid: Grid
    # The upload's own bytes are a blob as ctloop stores it (see ``_stored_form``): keeping
    # them (with a bare gzip header) saves re-encoding the volume.
    storable: bool


def read_nifti(data: bytes, limits: Limits, what: str = "volume") -> tuple[NDArray, Grid]:
    """Parse NIfTI bytes (plain or gzipped) into an array and its grid; header checked first."""
    upload = read_nifti_upload(data, limits, what)
    return upload.array, upload.grid


def read_nifti_upload(
    data: bytes, limits: Limits, what: str = "volume", dtypes: tuple[str, ...] = ()
) -> NiftiUpload:
    """:func:`read_nifti`, and whether the bytes may be stored as they came (``dtypes``: the
    stored forms' data types; none: never).

    The header is inflated and checked first; then exactly the bytes it declares (header,
    extensions, voxels) are inflated, and anything after them is refused (``trailing_data``):
    nothing is inflated beyond what the header accounts for."""
    gzipped = data[:2] == b"\x1f\x8b"
    with _refusals():
        head = GzipReader(data).read(NIFTI_HEAD_BYTES) if gzipped else data[:NIFTI_HEAD_BYTES]
    header = _nifti_header(head, what)
    shape = _declared_shape(header, limits, what)
    size = _declared_size(header, what)
    raw, single_member = _exact_bytes(data, size, gzipped, what)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        img = image_class.from_bytes(raw)
        array = nifti_voxels(img, raw).reshape(shape)  # in place: no second copy
    except Exception as exc:
        log.info("unreadable NIfTI", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise ApiError("not_nifti", f"the {what} is not a readable NIfTI file") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    grid = Grid(shape=(shape[0], shape[1], shape[2]), affine=affine)
    _check_grid(grid, what)
    storable = single_member and _stored_form(img, raw, dtypes)
    return NiftiUpload(array, grid, storable)


def _nifti_header(head: bytes, what: str) -> nib.Nifti1Header:
    """The single-file NIfTI-1 or NIfTI-2 header at the start of ``head`` (nibabel's parser,
    its own checks); ``not_nifti`` otherwise."""
    if len(head) < nib.Nifti1Header.sizeof_hdr:
        raise ApiError("not_nifti", f"the {what} is not a NIfTI file (too short)")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    klass = nib.Nifti2Header if nib.Nifti2Header.sizeof_hdr in sizes else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head[: klass.sizeof_hdr]), check=True)
        magic = bytes(header["magic"].item())
    except Exception as exc:
        log.info("unreadable NIfTI header", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise ApiError("not_nifti", f"the {what} is not a readable NIfTI file") from exc
    if magic not in (b"n+1", b"n+2"):
        raise ApiError("not_nifti", f"the {what} is not a single-file NIfTI (.nii)")
    return header


def _declared_shape(header: nib.Nifti1Header, limits: Limits, what: str) -> tuple[int, ...]:
    """The 3-D shape the header declares, within the limits, with a numeric data type."""
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
        kind = header.get_data_dtype().kind
    except Exception as exc:
        raise ApiError("not_nifti", f"the {what}'s header declares no valid image") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ApiError("not_3d", f"the {what} must be 3-D, got shape {shape}")
    if any(d < 2 or d > MAX_DIM for d in shape):
        raise ApiError("bad_shape", f"each dimension must be 2..{MAX_DIM}, got {shape}")
    if int(np.prod(shape)) > limits.max_voxels:
        raise ApiError("too_large", f"{shape} exceeds {limits.max_voxels} voxels", 413)
    if kind not in "iuf":
        raise ApiError("bad_dtype", f"the {what} must hold integer or real voxels")
    return shape


def _declared_size(header: nib.Nifti1Header, what: str) -> int:
    """The file's size as its header declares it: the voxels' offset (header and extensions,
    at most MAX_NIFTI_EXTENSIONS of them) plus the voxels' bytes."""
    minimum = header.sizeof_hdr + 4
    try:
        offset = int(header["vox_offset"])
    except (ValueError, OverflowError) as exc:
        raise ApiError("not_nifti", f"the {what}'s header has no valid data offset") from exc
    if offset < minimum:
        raise ApiError("not_nifti", f"the {what}'s data offset lies inside its header")
    if offset > minimum + MAX_NIFTI_EXTENSIONS:
        raise ApiError("too_large", f"the {what}'s header extensions exceed the limit", 413)
    shape, dtype = header.get_data_shape(), header.get_data_dtype()
    return offset + int(np.prod(shape)) * dtype.itemsize


def _exact_bytes(data: bytes, size: int, gzipped: bool, what: str) -> tuple[bytes, bool]:
    """The file's first ``size`` bytes, decompressed, and whether it was one gzip member;
    refused when shorter (``truncated``) or when anything follows (``trailing_data``)."""
    if not gzipped:
        if len(data) > size:
            raise ApiError("trailing_data", f"the {what} holds data after the image it declares")
        raw, single_member = data, False
    else:
        with _refusals():
            reader = GzipReader(data)
            raw = reader.read(size)
            if len(raw) == size:
                reader.expect_end()
        single_member = reader.members == 1
    if len(raw) < size:
        raise ApiError("truncated", f"the {what}'s data is incomplete (truncated upload?)")
    return raw, single_member


def _stored_form(img: nib.Nifti1Image, raw: bytes, dtypes: tuple[str, ...]) -> bool:
    """True if the decompressed file is what ctloop would write for this array: a stored
    header (:func:`_stored_header`, read from the file's own bytes: a loaded image's header
    no longer shows the scaling) with the data right after it and nothing more."""
    if type(img) is not nib.Nifti1Image or not _stored_header(_file_header(raw), raw, dtypes):
        return False
    return len(raw) == 352 + int(np.prod(img.shape)) * img.get_data_dtype().itemsize


def _file_header(raw: bytes) -> nib.Nifti1Header:
    """The NIfTI-1 header as the file has it (raises for anything else)."""
    return nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=True)


def _stored_header(h: nib.Nifti1Header, raw: bytes, dtypes: tuple[str, ...]) -> bool:
    """NIfTI-1, a stored data type, exact values (no scaling), no extensions (DICOM headers,
    JSON sidecars; the flag after the header in ``raw``, the file's first 352 bytes at least)
    and no free text (description, aux file, intent name, db name) that could carry patient
    details, one affine (sform and qform agree if both are set)."""
    if str(h.get_data_dtype()) not in dtypes:
        return False
    slope, inter = h["scl_slope"], h["scl_inter"]
    if not (np.isnan(slope) or slope in (0.0, 1.0)) or not (np.isnan(inter) or inter == 0.0):
        return False
    if raw[348:352] != b"\0\0\0\0" or int(h["vox_offset"]) not in (0, 352):
        return False
    if any(bytes(h[f].item()).strip(b"\0 ") for f in ("descrip", "aux_file", "intent_name")):
        return False
    if bytes(h["db_name"].item()).strip(b"\0 ") or bytes(h["data_type"].item()).strip(b"\0 "):
        return False
    sform, s_code = h.get_sform(coded=True)
    qform, q_code = h.get_qform(coded=True)
    return bool(s_code or q_code) and not (
        s_code and q_code and not np.allclose(sform, qform, atol=1e-4)
    )


def may_be_stored_as_is(data: bytes, dtypes: tuple[str, ...]) -> bool:
    """Whether a gzipped NIfTI upload's header alone says its bytes would be kept as they
    came; inflates only the header. Its voxels, gzip stream and length are still to be checked
    (:func:`read_nifti_upload` has the last word)."""
    if data[:2] != b"\x1f\x8b":
        return False
    try:
        head = GzipReader(data).read(352)
        return len(head) == 352 and _stored_header(_file_header(head), head, dtypes)
    except Exception:  # not gzip, not NIfTI-1, a broken header: the full read says why
        return False


def _check_grid(grid: Grid, what: str) -> None:
    if not np.all(np.isfinite(grid.affine)) or abs(np.linalg.det(grid.affine[:3, :3])) < 1e-9:
        raise ApiError("bad_affine", f"the {what}'s affine is not a valid voxel->mm map")
    for s in grid.spacing:
        if not MIN_SPACING_MM <= s <= MAX_SPACING_MM:
            raise ApiError(
                "bad_spacing",
                f"voxel spacing {tuple(round(v, 4) for v in grid.spacing)} mm is outside "
                f"{MIN_SPACING_MM}..{MAX_SPACING_MM} mm",
            )


def validate_ct(array: NDArray, grid: Grid) -> NDArray:
    """The volume if its values are CT Hounsfield units: integer volumes as they are, others as
    float32 (NaN and infinities refused)."""
    if np.issubdtype(array.dtype, np.integer):
        image: NDArray = array
        lo, hi = float(array.min()), float(array.max())
    else:
        image = np.asarray(array, dtype=np.float32)
        lo, hi = float(image.min()), float(image.max())  # NaN propagates, infinities show
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ApiError("not_finite", "the volume holds NaN or infinite values")
    if lo < -3000 or hi > 40000:
        raise ApiError("not_hu", f"values {lo:.0f}..{hi:.0f} are not CT Hounsfield units")
    return image


def validate_mask(
    array: NDArray, grid: Grid, volume: Grid, label_map: LabelMap
) -> NDArray[np.uint8]:
    """A mask on the volume's grid with only the dataset's label values, as canonical ids."""
    check_mask_grid(grid, volume)
    return mask_values(array, label_map)


def check_mask_grid(grid: Grid, volume: Grid) -> None:
    if grid.shape != volume.shape or not np.allclose(grid.affine, volume.affine, atol=1e-3):
        raise ApiError(
            "grid_mismatch",
            f"the mask grid {grid.shape} (spacing {tuple(round(s, 3) for s in grid.spacing)}) "
            f"differs from the volume's {volume.shape} "
            f"(spacing {tuple(round(s, 3) for s in volume.spacing)})",
        )


def mask_values(array: NDArray, label_map: LabelMap) -> NDArray[np.uint8]:
    """The mask in canonical ids; refused if it holds a value the label map does not declare."""
    if not np.issubdtype(array.dtype, np.integer):
        values = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ApiError("float_mask", "the mask holds non-integer values")
        array = values.astype(np.int64)
    try:
        return label_map.to_canonical(array)
    except UnknownLabel as exc:
        raise ApiError("unknown_label", str(exc)) from exc


def read_dicom_zip(data: bytes, limits: Limits) -> Volume:
    """One CT series from a zip of its files: checked for traversal, nested archives and
    zip bombs, each member inflated no further than its DICOM header declares
    (:mod:`ctloop.core.dicom_budget`)."""
    with _refusals():
        archive, members = open_zip(data, MAX_DICOM_FILES)
        if not members:
            raise ApiError("empty_zip", "the zip holds no files")
        _check_members(members, limits)
        budget = SeriesBudget(limits.max_voxels)
        blobs = [_member_instance(archive, m, budget) for m in members]
    return _series_volume(blobs)


def _check_members(members: list[zipfile.ZipInfo], limits: Limits) -> None:
    """What the zip's directory says, checked before anything is inflated (the budgets bound
    the inflate itself: these sizes may lie)."""
    total = 0
    for m in members:
        path = PurePosixPath(m.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or m.filename.startswith("/"):
            raise ApiError("unsafe_path", f"zip member {m.filename!r} escapes the archive")
        if path.suffix.lower() == ".zip":
            raise ApiError("nested_zip", "the zip holds another archive; send the files")
        total += m.file_size
        if m.compress_size and m.file_size / m.compress_size > MAX_ZIP_RATIO:
            raise ApiError("zip_bomb", f"{m.filename!r} expands {MAX_ZIP_RATIO}x+", 413)
    if total > limits.max_voxels * 4 + HEADER_BYTES_PER_SERIES:
        raise ApiError("too_large", f"the zip expands to {total} bytes", 413)


def _member_instance(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, budget: SeriesBudget
) -> bytes:
    """A zip member read as one DICOM instance against the series' budget; an archive inside
    the archive is refused, whatever its name."""
    read = zip_member_reader(archive, member)
    magic = read(4)
    if magic in _ZIP_MAGIC:
        raise ApiError("nested_zip", "the zip holds another archive; send the files")
    pending = [magic]

    def again(n: int) -> bytes:
        return pending.pop() if pending else read(n)

    return bounded_instance(again, budget)


def read_dicom_instances(blobs: list[bytes], limits: Limits, series_uid: str) -> Volume:
    """One CT series from its instances' bytes (a PACS's WADO-RS answer), each checked against
    the series' budget first (deflated datasets inflated within it), and each of the series
    asked for: a PACS that answers with another series' instances (another patient's, or a
    mix) is refused (422 ``series_mismatch``) before anything is decoded or stored."""
    budget = SeriesBudget(limits.max_voxels)
    with _refusals():
        bounded = [bounded_instance(io.BytesIO(blob).read, budget) for blob in blobs]
    for blob in bounded:
        if _series_of(blob) != series_uid:
            raise ApiError(
                "series_mismatch",
                f"the PACS answered instances that are not of series {series_uid}",
            )
    return _series_volume(bounded)


def _series_of(blob: bytes) -> str | None:
    """An instance's SeriesInstanceUID (its header only; the blob is already within budget)."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(blob), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
        )
    except Exception:  # not DICOM at all: no series
        return None
    value = ds.get("SeriesInstanceUID")
    return str(value) if value is not None else None


def _series_volume(blobs: list[bytes]) -> Volume:
    """The series' volume (RAS), from instances already within their budget."""
    with tempfile.TemporaryDirectory(prefix="ctloop-dicom-") as tmp:
        files = []
        for i, blob in enumerate(blobs):
            target = Path(tmp) / f"{i:05d}.dcm"  # never a name the sender chose
            target.write_bytes(blob)
            files.append(target)
        try:
            volume = load_dicom_series(files).as_ras()
        except DatasetError as exc:  # the reader says what is wrong with the series
            raise ApiError("bad_dicom", str(exc)) from exc
        except Exception as exc:  # pydicom's and its decoders' errors are many; none is ours
            log.info("unreadable DICOM series", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise ApiError(
                "bad_dicom",
                "the files are not one readable CT series (one series, with its geometry and "
                "pixel data, in a transfer syntax ctloop reads)",
            ) from exc
    shape = volume.image.shape
    if len(shape) != 3 or shape[2] < 2:
        raise ApiError("not_3d", f"the series must have at least 2 slices, got {shape}")
    _check_grid(Grid(shape=(shape[0], shape[1], shape[2]), affine=volume.affine), "series")
    return volume
