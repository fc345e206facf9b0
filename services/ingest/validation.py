"""Everything an upload must pass before it is accepted.

Each refusal is an :class:`ApiError` with a stable ``code`` (what a client can act on), an
HTTP status and a message saying what was wrong.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
from isal import isal_zlib
from numpy.typing import NDArray

from ctloop.contracts import keys
from ctloop.core.blobs import gzip_error, nifti_voxels
from ctloop.core.datasets import DatasetError, Volume, load_dicom_series
from ctloop.core.organs import LabelMap, UnknownLabel
from services.ingest.errors import ApiError

MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
MAX_DIM = 4096
MAX_DICOM_FILES = 5000
MAX_ZIP_RATIO = 200  # uncompressed / compressed; far beyond what CT pixel data reaches


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


def _gunzip_bounded(data: bytes, limit: int) -> tuple[bytes, bool]:
    """Decompress gzip without ever holding more than ``limit`` bytes (decompression bombs);
    and whether it was one gzip member with nothing after it (what ctloop's readers take).
    Several members one after another (bgzip writes them) are read as one stream."""
    members: list[bytes] = []
    total, rest = 0, data
    while rest:
        d = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
        try:
            chunk = d.decompress(rest, limit + 1 - total)
        except gzip_error as exc:
            raise ApiError("corrupt_gzip", f"the gzip stream is corrupt ({exc})") from exc
        total += len(chunk)
        if total > limit or d.unconsumed_tail:
            raise ApiError("too_large", f"decompresses to more than {limit} bytes", 413)
        if not d.eof:
            raise ApiError("truncated", "the gzip stream ends early (truncated upload?)")
        members.append(chunk)
        rest = d.unused_data  # the next member, or data after the stream (refused above)
    if len(members) == 1:
        return members[0], True  # the common case: no copy
    return b"".join(members), False


@dataclass(frozen=True)
class NiftiUpload:
    array: NDArray
    grid: Grid
    # The upload's own bytes are a blob as ctloop stores it (see ``_stored_form``): keeping
    # them saves re-encoding the volume.
    storable: bool


def read_nifti(data: bytes, limits: Limits, what: str = "volume") -> tuple[NDArray, Grid]:
    """Parse NIfTI bytes (plain or gzipped) into an array and its grid; header checked first."""
    upload = read_nifti_upload(data, limits, what)
    return upload.array, upload.grid


def read_nifti_upload(
    data: bytes, limits: Limits, what: str = "volume", dtypes: tuple[str, ...] = ()
) -> NiftiUpload:
    """:func:`read_nifti`, and whether the bytes may be stored as they came (``dtypes``: the
    stored forms' data types; none: never)."""
    raw, single_member = data, False
    if data[:2] == b"\x1f\x8b":
        raw, single_member = _gunzip_bounded(data, limits.max_voxels * 8 + 352 + 1024)
    if len(raw) < 348:
        raise ApiError("not_nifti", f"the {what} is not a NIfTI file (too short)")
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:
        try:
            img = nib.Nifti2Image.from_bytes(raw)
        except Exception:
            raise ApiError("not_nifti", f"the {what} is not a readable NIfTI file ({exc})") from exc
    shape = tuple(int(d) for d in img.header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ApiError("not_3d", f"the {what} must be 3-D, got shape {shape}")
    if any(d < 2 or d > MAX_DIM for d in shape):
        raise ApiError("bad_shape", f"each dimension must be 2..{MAX_DIM}, got {shape}")
    if int(np.prod(shape)) > limits.max_voxels:
        raise ApiError("too_large", f"{shape} exceeds {limits.max_voxels} voxels", 413)
    try:
        array = nifti_voxels(img, raw).reshape(shape)  # in place: no second copy
    except Exception as exc:
        raise ApiError("truncated", f"the {what}'s data is incomplete ({exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    grid = Grid(shape=(shape[0], shape[1], shape[2]), affine=affine)
    _check_grid(grid, what)
    storable = single_member and _stored_form(img, raw, dtypes)
    return NiftiUpload(array, grid, storable)


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
        head = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS).decompress(data[:65536], 352)
        if len(head) < 352:
            return False
        header = _file_header(head)
    except Exception:  # not gzip, not NIfTI-1, a broken header: the full read says why
        return False
    return _stored_header(header, head, dtypes)


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
    """One CT series from a zip of its files, checked for traversal and zip bombs."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except zipfile.BadZipFile as exc:
        raise ApiError("not_zip", f"not a readable zip archive ({exc})") from exc
    if not members:
        raise ApiError("empty_zip", "the zip holds no files")
    if len(members) > MAX_DICOM_FILES:
        raise ApiError("too_many_files", f"more than {MAX_DICOM_FILES} files", 413)
    total = 0
    for m in members:
        path = PurePosixPath(m.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or m.filename.startswith("/"):
            raise ApiError("unsafe_path", f"zip member {m.filename!r} escapes the archive")
        total += m.file_size
        if m.compress_size and m.file_size / m.compress_size > MAX_ZIP_RATIO:
            raise ApiError("zip_bomb", f"{m.filename!r} expands {MAX_ZIP_RATIO}x+", 413)
    if total > limits.max_voxels * 2 + len(members) * 4096:
        raise ApiError("too_large", f"the zip expands to {total} bytes", 413)
    blobs = []
    for m in members:
        with archive.open(m) as src:
            blobs.append(src.read(m.file_size + 1)[: m.file_size + 1])
    return read_dicom_instances(blobs)


def read_dicom_instances(blobs: list[bytes]) -> Volume:
    """One CT series from its instances' bytes (a zip's members, or a PACS's WADO-RS answer)."""
    with tempfile.TemporaryDirectory(prefix="ctloop-dicom-") as tmp:
        files = []
        for i, blob in enumerate(blobs):
            target = Path(tmp) / f"{i:05d}.dcm"  # never a name the sender chose
            target.write_bytes(blob)
            files.append(target)
        try:
            volume = load_dicom_series(files).as_ras()
        except DatasetError as exc:
            raise ApiError("bad_dicom", str(exc)) from exc
    shape = volume.image.shape
    if len(shape) != 3 or shape[2] < 2:
        raise ApiError("not_3d", f"the series must have at least 2 slices, got {shape}")
    _check_grid(Grid(shape=(shape[0], shape[1], shape[2]), affine=volume.affine), "series")
    return volume
