"""The upload pipeline, top-down: read and check every voxel, encode, store, record, announce.

:func:`ingest_upload` takes an uploaded file (NIfTI or a zip of one DICOM series, and a label
for labelled datasets); :func:`import_series` takes a series pulled from a PACS. Both end in
:func:`accept_volume`: the blobs go to S3 under immutable keys, then the volume's row, its
``volume.ingested`` event (outbox) and its audit entry commit in one SQL transaction.

A clean NIfTI CT's own bytes are kept as they came (its compressed data byte for byte; the
gzip header bare, without the file name or comment a client's tool wrote into it), and written
while its voxels are still being checked (:class:`EarlyPut`); that S3 version is removed unless
the row commits.
No FastAPI here: the routers turn requests into these calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray
from sqlalchemy.exc import IntegrityError

from ctloop import dicomweb
from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.contracts import keys
from ctloop.contracts.payloads import BlobRef, Dataset, volume_ingested
from ctloop.core.blobs import (
    STORED_CT_DTYPES,
    STORED_LABEL_DTYPES,
    bare_gzip,
    encode_ct,
    nifti_gz_bytes,
)
from ctloop.core.organs import MAX_LABEL_ID, LabelMap, UnknownLabel
from ctloop.db import Site, Volume, VolumeStatus, session_scope
from ctloop.log import bind
from ctloop.outbox import stage_event
from ctloop.storage import StoredObject
from ctloop.timing import Laps
from services.ingest.deps import IngestContext
from services.ingest.errors import ApiError, conflict
from services.ingest.pacs_sources import allowed_source, uid
from services.ingest.records import SOURCE, shown_volume, volume_out
from services.ingest.schemas import VolumeOut
from services.ingest.validation import (
    Grid,
    NiftiUpload,
    check_mask_grid,
    mask_values,
    may_be_stored_as_is,
    read_dicom_instances,
    read_dicom_zip,
    read_nifti_upload,
    safe_id,
    validate_ct,
)

log = logging.getLogger("ctloop.ingest")

# What the audit log says of a volume read from DICOM: only pixel data, geometry and the
# original series' UIDs are kept (patient, study description, institution, dates and every
# other attribute are not), so a SEG can reference the images the PACS holds
# (ctloop/core/dicom_source.py; docs/design.md).
DEIDENTIFIED = "DICOM attributes dropped but pixel data, geometry and the series' UIDs"


@dataclass(frozen=True)
class Upload:
    """Who uploads what, where; ``volume_id`` None: named from the bytes' hash."""

    who: Principal
    site: str
    dataset: Dataset
    volume_id: str | None


@dataclass(frozen=True)
class Checked:
    """A validated volume ready to store: its blob, grid, label blob and provenance."""

    image_blob: bytes
    grid: Grid
    mask_blob: bytes | None
    sha: str
    provenance: dict[str, str]
    # the original DICOM series' UIDs and geometry (ctloop/core/dicom_source.py), if any
    source_series: dict[str, Any] | None = None


class Existing(Exception):
    """The same bytes were uploaded under this id before: answer with that volume (200)."""

    def __init__(self, volume: VolumeOut) -> None:
        super().__init__(volume.volume_id)
        self.volume = volume


LabelRead = tuple[NiftiUpload, NDArray[np.uint8], bool]


class EarlyPut:
    """An upload's bytes written to their key while its voxels are still being checked, so
    the write overlaps the decode. Nothing refers to that version until the volume's row
    commits (readers go by the version id in the row): :meth:`kept` then; anything else
    (refused, rewritten, a duplicate, an error) removes the version, leaving no trace."""

    def __init__(self, ctx: IngestContext, key: str, data: bytes) -> None:
        self.ctx, self.key, self.kept = ctx, key, False
        self.data = data  # what is written: the upload with a bare gzip header
        self._put: Future[StoredObject] = ctx.pool.submit(
            ctx.store.put_bytes, ctx.bucket, key, data
        )

    def result(self) -> StoredObject:
        return self._put.result()

    def discard(self) -> None:
        try:
            obj = self._put.result()
        except Exception:  # never stored
            return
        self.ctx.store.delete_version(self.ctx.bucket, self.key, obj.version_id)
        log.debug("early write removed", extra={"key": self.key, "version": obj.version_id})


def parse_label_map(raw: str | None) -> LabelMap:
    """A client's ``{"organ": id}`` JSON (ids: integers 0..MAX_LABEL_ID); none: the
    canonical ids."""
    if not raw:
        return LabelMap.canonical()
    shape = f'label_map must be a JSON object {{"organ": id}} with integer ids 0..{MAX_LABEL_ID}'
    try:
        spec = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError("bad_label_map", shape) from exc
    if not isinstance(spec, dict) or not all(
        type(v) is int and 0 <= v <= MAX_LABEL_ID for v in spec.values()
    ):
        raise ApiError("bad_label_map", shape)
    try:
        return LabelMap({str(k): v for k, v in spec.items()})
    except UnknownLabel as exc:
        raise ApiError("bad_label_map", f"label_map: {exc}") from exc


def volume_id_for(volume_id: str | None, sha: str) -> str:
    """The id a volume is stored under: the client's (checked), else from its bytes' hash."""
    return safe_id(volume_id, "volume id") if volume_id else f"vol-{sha[:16]}"


def ingest_upload(
    ctx: IngestContext,
    up: Upload,
    data: bytes,
    label: tuple[bytes, str | None] | None,
    timings: Laps,
) -> VolumeOut:
    """Check an uploaded CT (and its label: bytes and label map) in full, store and record it.
    Raises :class:`Existing` when the same bytes are already stored under the id."""
    label_job = _start_label_read(ctx, label) if label is not None else None
    if label is None and up.dataset != "clinical":
        raise ApiError("label_required", f"{up.dataset} (labelled) volumes need a label")
    sha = hashlib.sha256(data).hexdigest()
    early = _early_put(ctx, up, data, sha)
    try:
        checked = check_image(ctx, data, sha, timings, early.data if early else None)
        if label is not None and label_job is not None:
            checked = _with_label(checked, label[0], label_job.result())
        timings.lap("label")  # what the label's check took beyond the image's
        kept = early if early is not None and checked.image_blob is early.data else None
        return accept_volume(ctx, up, checked, timings, kept)
    finally:
        if early is not None and not early.kept:
            early.discard()


def _start_label_read(ctx: IngestContext, label: tuple[bytes, str | None]) -> Future[LabelRead]:
    """The label is read and its values checked while the image is: both decompress and scan
    on their own core. Its grid is compared with the image's once both are known."""
    raw, raw_map = label
    mapping = parse_label_map(raw_map)

    def read_label() -> LabelRead:
        """The label, its canonical values and whether its bytes already are them."""
        lab = read_nifti_upload(raw, ctx.limits, "label", STORED_LABEL_DTYPES)
        return lab, mask_values(lab.array, mapping), lab.storable and mapping.is_identity

    return ctx.pool.submit(read_label)


def _early_put(ctx: IngestContext, up: Upload, data: bytes, sha: str) -> EarlyPut | None:
    """Most clean NIfTI CTs are kept as they came: their write starts now and overlaps the
    decode and checks (removed again if they fail). Never for an id that is taken."""
    if not may_be_stored_as_is(data, STORED_CT_DTYPES):
        return None
    vid = volume_id_for(up.volume_id, sha)
    with session_scope(ctx.db) as s:
        if s.get(Volume, vid) is not None:
            return None
    return EarlyPut(ctx, keys.volume_image(up.site, vid), bare_gzip(data))


def check_image(
    ctx: IngestContext, data: bytes, sha: str, timings: Laps, bare: bytes | None = None
) -> Checked:
    """Decode and check every voxel; the blob to store is the upload's own bytes when they
    already are a stored blob (most NIfTI CTs: int16 or float32, gzipped, no extensions),
    with a bare gzip header (``bare``: that form, when the early write made it already)."""
    if data[:2] == b"PK":
        vol = read_dicom_zip(data, ctx.limits)
        provenance = {"source": "dicom", "deidentified": DEIDENTIFIED}
        array, grid = vol.image, Grid(vol.image.shape, vol.affine)  # type: ignore[arg-type]
        storable, source = False, vol.meta.get("source_series")
    else:
        upload = read_nifti_upload(data, ctx.limits, dtypes=STORED_CT_DTYPES)
        provenance = {"source": "nifti"}
        array, grid, storable = upload.array, upload.grid, upload.storable
        source = None
    image = validate_ct(array, grid)
    timings.lap("decode")
    if storable:
        image_blob = bare if bare is not None else bare_gzip(data)
    else:
        image_blob = encode_ct(image, grid.affine)
    provenance["stored"] = "as uploaded" if storable else "re-encoded"
    timings.lap("encode")
    return Checked(image_blob, grid, None, sha, provenance, source)


def _with_label(checked: Checked, raw: bytes, read: LabelRead) -> Checked:
    """The label on the image's grid: kept as it came when it is checked, canonical and on
    the volume's exact grid, re-encoded otherwise."""
    lab, mask, canonical = read
    grid = checked.grid
    check_mask_grid(lab.grid, grid)
    keep = canonical and np.array_equal(lab.grid.affine, grid.affine)
    mask_blob = bare_gzip(raw) if keep else nifti_gz_bytes(mask, grid.affine)
    return Checked(
        checked.image_blob, grid, mask_blob, checked.sha, checked.provenance, checked.source_series
    )


def import_series(
    ctx: IngestContext, up: Upload, url: str, study_uid: str, series_uid: str
) -> VolumeOut:
    """Pull one CT series from a PACS (QIDO-RS, WADO-RS) and ingest it like an upload (a
    clinical volume: no label). ``up.site`` is one of the caller's; ``url`` must be one of
    that site's services (403 otherwise), and only UIDs reach the URL (422 ``bad_uid``)."""
    study_uid, series_uid = uid(study_uid, "study_uid"), uid(series_uid, "series_uid")
    url = allowed_source(ctx, up.site, url)
    try:
        dicomweb.series_instances(url, study_uid, series_uid)
        blobs = dicomweb.retrieve_series(url, study_uid, series_uid, ctx.limits.max_bytes)
    except (dicomweb.DicomWebError, httpx.HTTPError) as exc:
        raise ApiError("dicomweb", f"could not retrieve the series: {exc}", 422) from exc
    vol = read_dicom_instances(blobs, ctx.limits, series_uid)
    grid = Grid((vol.image.shape[0], vol.image.shape[1], vol.image.shape[2]), vol.affine)
    provenance = {
        "source": "dicomweb",
        "pacs": url,
        "series_uid": series_uid,
        "deidentified": DEIDENTIFIED,
    }
    checked = Checked(
        encode_ct(validate_ct(vol.image, grid), grid.affine),
        grid,
        None,
        hashlib.sha256(b"".join(sorted(blobs))).hexdigest(),
        provenance,
        vol.meta.get("source_series"),
    )
    return accept_volume(ctx, up, checked, Laps())


def accept_volume(
    ctx: IngestContext,
    up: Upload,
    checked: Checked,
    timings: Laps,
    early: EarlyPut | None = None,
) -> VolumeOut:
    """Store a validated, encoded volume (and label) under immutable keys; record and
    announce it. The same bytes again raise :class:`Existing`; other content under the id,
    409. ``early``: the image's bytes, already being written (marked kept once the row
    commits; the caller removes them otherwise)."""
    vid = volume_id_for(up.volume_id, checked.sha)
    _refuse_taken(ctx, up, vid, checked.sha)
    image, label = _store_blobs(ctx, up.site, vid, checked, early)
    timings.lap("store")
    out = _commit_volume(ctx, up, vid, checked, image, label)
    timings.lap("commit")
    if early is not None:
        early.kept = True
    ctx.published()
    with bind(volume_id=vid, site_id=up.site):
        log.info("volume ingested", extra={"dataset": up.dataset, "shape": checked.grid.shape})
    return out


def _refuse_taken(ctx: IngestContext, up: Upload, vid: str, sha: str) -> None:
    """Nothing when ``vid`` is free; :class:`Existing` for the same bytes at the same site;
    409 for other content (or another site's volume: its existence is not told)."""
    with session_scope(ctx.db) as s:
        existing = s.get(Volume, vid)
        if existing is None:
            return
        if not up.who.may_see(existing.site_id):
            raise conflict("exists", f"volume {vid} exists")
        if existing.sha256 == sha and existing.site_id == up.site:
            raise Existing(shown_volume(s, vid, up.who))
    raise conflict("exists", f"volume {vid} exists with other content")


def _store_blobs(
    ctx: IngestContext, site: str, vid: str, checked: Checked, early: EarlyPut | None
) -> tuple[BlobRef, BlobRef | None]:
    """The image and label written (the label while the image is)."""
    key = keys.volume_image(site, vid)
    label_put = None
    if checked.mask_blob is not None:
        lkey = keys.volume_label(site, vid)
        label_put = ctx.pool.submit(ctx.store.put_bytes, ctx.bucket, lkey, checked.mask_blob)
    if early is not None:  # the same bytes, to the same key, already on their way
        img_obj = early.result()
    else:
        img_obj = ctx.store.put_bytes(ctx.bucket, key, checked.image_blob)
    image = BlobRef(bucket=ctx.bucket, key=key, version_id=img_obj.version_id)
    if label_put is None:
        return image, None
    return image, BlobRef(bucket=ctx.bucket, key=lkey, version_id=label_put.result().version_id)


def _commit_volume(
    ctx: IngestContext,
    up: Upload,
    vid: str,
    checked: Checked,
    image: BlobRef,
    label: BlobRef | None,
) -> VolumeOut:
    """The volume's row, its event and audit entry, in one transaction."""
    grid, site = checked.grid, up.site
    event = volume_ingested(
        SOURCE,
        volume_id=vid,
        site_id=site,
        dataset=up.dataset,
        image=image,
        label=label,
        shape=grid.shape,
        spacing=grid.spacing,
        sha256=checked.sha,
    )
    geometry = {
        "shape": list(grid.shape),
        "spacing": list(grid.spacing),
        "affine": grid.affine.tolist(),
    }
    if checked.source_series is not None:  # UIDs and geometry only: docs/design.md
        geometry["source_series"] = checked.source_series
    try:
        with session_scope(ctx.db) as s:
            if s.get(Site, site) is None:  # an admin, or a site named in an OIDC claim
                s.add(Site(id=site, name=site))
                s.flush()
            row = Volume(
                id=vid,
                site_id=site,
                dataset=up.dataset,
                s3_key=image.key,
                s3_version_id=image.version_id,
                label_s3_key=label.key if label else None,
                sha256=checked.sha,
                geometry=geometry,
            )
            s.add(row)
            stage_event(s, event)
            audit(
                s,
                up.who.user_id,
                "volume.create",
                vid,
                site_id=site,
                sha256=checked.sha,
                **checked.provenance,
            )
            s.flush()
            return volume_out(row, VolumeStatus.INGESTED)
    except IntegrityError as exc:  # a concurrent upload of the same id won
        raise conflict("exists", f"volume {vid} was created concurrently") from exc
