"""The public REST API: volumes in, annotations in, pre-annotations out.

Every upload is validated in full before it is accepted; then the blob goes to S3 under an
immutable key, the workflow row and its event (outbox) commit in one SQL transaction, and the
outbox relay publishes the event. A clean NIfTI CT's bytes are written while its voxels are
checked (:class:`EarlyPut`) and that S3 version is removed unless the row commits.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any, Literal

import httpx
import nibabel as nib
import numpy as np
import urllib3
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from minio.error import ServerError
from numpy.typing import NDArray
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctloop import dicomweb
from ctloop.auth import ROLES, OidcVerifier, Principal
from ctloop.contracts import keys
from ctloop.contracts.payloads import (
    AnnotationSubmitted,
    BlobRef,
    Dataset,
    ModelRef,
    VolumeIngested,
    make_event,
)
from ctloop.contracts.topics import ANNOTATION_SUBMITTED, VOLUME_INGESTED
from ctloop.core import dicom
from ctloop.core.datasets import nifti_from_gz, nifti_gz_bytes
from ctloop.core.organs import LabelMap, UnknownLabel
from ctloop.core.partial import OrganStatus, PartialLabel
from ctloop.db import (
    AnnotationRevision,
    Lease,
    Prediction,
    Site,
    Volume,
    audit,
    next_annotation_revision,
    session_scope,
)
from ctloop.log import bind
from ctloop.outbox import OutboxRelay, stage_event
from ctloop.service import database_check, health_router
from ctloop.settings import Settings
from ctloop.storage import ObjectStore, StoredObject
from ctloop.timing import Laps
from services.ingest.admin import Auth, admin_router
from services.ingest.monailabel import Backends, monailabel_router
from services.ingest.queue import WorkQueue, lease_holder, queue_router
from services.ingest.validation import (
    Grid,
    Limits,
    NiftiUpload,
    UploadRejected,
    check_mask_grid,
    mask_values,
    may_be_stored_as_is,
    read_dicom_instances,
    read_dicom_zip,
    read_nifti,
    read_nifti_upload,
    safe_id,
    validate_ct,
    validate_mask,
)
from services.ingest.workbench import workbench_router

log = logging.getLogger("ctloop.ingest")
SOURCE = "/ctloop/ingest"


class VolumeOut(BaseModel):
    volume_id: str
    site_id: str
    dataset: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sha256: str
    status: str
    labelled: bool
    created_at: datetime


class AnnotationOut(BaseModel):
    volume_id: str
    revision: int
    author: str
    minutes: float
    organs: dict[str, OrganStatus]
    reviewed_slices: list[tuple[int, int]] | None
    created_at: datetime
    review_status: str = "pending"
    reviewer: str | None = None
    review_comment: str = ""


class ReviewIn(BaseModel):
    decision: Literal["approve", "send_back"]
    comment: str = ""


def _annotation_out(r: AnnotationRevision) -> AnnotationOut:
    d = r.detail
    return AnnotationOut(
        volume_id=r.volume_id,
        revision=r.revision,
        author=r.author,
        minutes=float(d.get("minutes", 0.0)),
        organs=d.get("organs") or {},
        reviewed_slices=d.get("reviewed_slices"),
        created_at=r.created_at,
        review_status=r.review_status,
        reviewer=r.reviewer,
        review_comment=r.review_comment,
    )


class PredictionOut(BaseModel):
    volume_id: str
    model: str
    version: int
    uncertainty: float
    created_at: datetime


class DicomWebIn(BaseModel):
    url: str = Field(description="base URL of an allowed DICOMweb service")
    study_uid: str
    series_uid: str
    site_id: str
    dataset: Dataset = "clinical"
    volume_id: str | None = None


class ErrorOut(BaseModel):
    code: str
    message: str


def _volume_out(v: Volume) -> VolumeOut:
    g = v.geometry
    return VolumeOut(
        volume_id=v.id,
        site_id=v.site_id,
        dataset=v.dataset,
        shape=tuple(g["shape"]),
        spacing=tuple(g["spacing"]),
        sha256=v.sha256,
        status=v.status,
        labelled=v.label_s3_key is not None,
        created_at=v.created_at,
    )


class Ingest:
    """The ingest service's state: settings, stores and the outbox relay to wake."""

    def __init__(self, settings: Settings, relay: OutboxRelay | None = None) -> None:
        self.settings = settings
        self.db = settings.database_url
        self.store = ObjectStore(settings)
        self.bucket = settings.s3.bucket
        self.relay = relay
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest-work")
        svc = settings.services
        self.limits = Limits(
            max_bytes=svc.max_upload_mb * 1024 * 1024, max_voxels=svc.max_volume_voxels
        )

    async def read_body(self, request: Request, what: str) -> bytes:
        """A raw request body, refused (413) by its declared length or as soon as it passes
        the size limit."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_bytes:
            raise self._too_large(what)
        return await self._collect(request.stream(), what)

    async def read_upload(self, upload: UploadFile, what: str) -> bytes:
        """The whole upload, refused (413) as soon as it passes the size limit."""

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await upload.read(1024 * 1024):
                yield chunk

        return await self._collect(chunks(), what)

    async def _collect(self, chunks: AsyncIterator[bytes], what: str) -> bytes:
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > self.limits.max_bytes:
                raise self._too_large(what)
            parts.append(chunk)
        if size == 0:
            raise UploadRejected("empty", f"the {what} is empty")
        return b"".join(parts)

    def _too_large(self, what: str) -> UploadRejected:
        return UploadRejected("too_large", f"the {what} exceeds {self.limits.max_bytes} bytes", 413)

    def published(self) -> None:
        if self.relay is not None:
            self.relay.notify()


class EarlyPut:
    """An upload's bytes written to their key while its voxels are still being checked, so
    the write overlaps the decode. Nothing refers to that version until the volume's row
    commits (readers go by the version id in the row): :meth:`kept` then; anything else
    (refused, rewritten, a duplicate, an error) removes the version, leaving no trace."""

    def __init__(self, ingest: Ingest, key: str, data: bytes) -> None:
        self.ingest, self.key, self.kept = ingest, key, False
        self._put: Future[StoredObject] = ingest.pool.submit(
            ingest.store.put_bytes, ingest.bucket, key, data
        )

    def result(self) -> StoredObject:
        return self._put.result()

    def discard(self) -> None:
        try:
            obj = self._put.result()
        except Exception:  # never stored
            return
        self.ingest.store.delete_version(self.ingest.bucket, self.key, obj.version_id)
        log.debug("early write removed", extra={"key": self.key, "version": obj.version_id})


def encode_ct(image: np.ndarray, grid: Grid) -> bytes:
    """A validated CT as the blob ctloop stores: int16 when every value is a whole HU that
    fits (half the bytes of float32), float32 otherwise."""
    if np.issubdtype(image.dtype, np.integer):
        if image.min() >= -32768 and image.max() <= 32767:
            return nifti_gz_bytes(image.astype(np.int16, copy=False), grid.affine)
        return nifti_gz_bytes(image.astype(np.float32), grid.affine)
    sample = image[:, :, 0]  # one plane: a scanner's float HU fail here, cheaply
    if np.all(sample == np.rint(sample)) and image.min() >= -32768 and image.max() <= 32767:
        rounded = np.rint(image)  # one full-size copy, used for the check and the result
        if np.array_equal(rounded, image):
            return nifti_gz_bytes(rounded.astype(np.int16), grid.affine)
    return nifti_gz_bytes(image.astype(np.float32, copy=False), grid.affine)


# The data types of a stored CT blob and label: an upload already in that form (and otherwise
# clean, see ``validation._stored_form``) is stored as it came, not decoded and encoded again.
STORED_CT_DTYPES = ("int16", "float32")
STORED_LABEL_DTYPES = ("uint8",)
# Body types of ``PUT /v1/volumes/{id}`` (the file itself, no multipart framing).
RAW_TYPES = (
    "application/gzip",
    "application/x-gzip",
    "application/octet-stream",
    "application/zip",
)


def _label_map(raw: str | None) -> LabelMap:
    if not raw:
        return LabelMap.canonical()
    try:
        spec = json.loads(raw)
        if not isinstance(spec, dict):
            raise ValueError("must be a JSON object")
        return LabelMap({str(k): int(v) for k, v in spec.items()})
    except (ValueError, TypeError, UnknownLabel) as exc:
        raise UploadRejected("bad_label_map", f"label_map: {exc}") from exc


def volumes_router(ingest: Ingest, auth: Auth) -> APIRouter:
    r = APIRouter(prefix="/v1/volumes", tags=["volumes"])
    anyone = auth.require(*ROLES)
    uploader = auth.require("admin", "integration", "reviewer")
    annotator = auth.require("admin", "reviewer", "annotator")

    def accept_volume(
        who: Principal,
        site: str,
        dataset: Dataset,
        volume_id: str | None,
        image_blob: bytes,
        grid: Grid,
        mask_blob: bytes | None,
        sha: str,
        provenance: dict[str, str],
        timings: Laps | None = None,
        early: EarlyPut | None = None,
    ) -> Any:
        """Store a validated, encoded volume (and label) under immutable keys; record and
        announce it. The same bytes again answer 200 with the volume; other content under the
        id, 409. ``early``: the image's bytes, already being written (marked kept once the
        row commits; the caller removes them otherwise)."""
        vid = _volume_id(volume_id, sha)

        with session_scope(ingest.db) as s:
            existing = s.get(Volume, vid)
            if existing is not None and not who.may_see(existing.site_id):
                raise UploadRejected("exists", f"volume {vid} exists", 409)
            if existing is not None:
                if existing.sha256 == sha and existing.site_id == site:
                    return JSONResponse(_volume_out(existing).model_dump(mode="json"), 200)
                raise UploadRejected("exists", f"volume {vid} exists with other content", 409)

        timings = timings if timings is not None else Laps()
        key = keys.volume_image(site, vid)
        label_put = None  # the label is stored while the image is
        if mask_blob is not None:
            lkey = keys.volume_label(site, vid)
            label_put = ingest.pool.submit(ingest.store.put_bytes, ingest.bucket, lkey, mask_blob)
        if early is not None:  # the same bytes, to the same key, already on their way
            img_obj = early.result()
        else:
            img_obj = ingest.store.put_bytes(ingest.bucket, key, image_blob)
        label_ref = None
        if label_put is not None:
            lobj = label_put.result()
            label_ref = BlobRef(bucket=ingest.bucket, key=lkey, version_id=lobj.version_id)
        timings.lap("store")
        payload = VolumeIngested(
            volume_id=vid,
            site_id=site,
            dataset=dataset,
            image=BlobRef(bucket=ingest.bucket, key=key, version_id=img_obj.version_id),
            label=label_ref,
            shape=grid.shape,
            spacing=grid.spacing,
            sha256=sha,
        )
        try:
            with session_scope(ingest.db) as s:
                if s.get(Site, site) is None:  # an admin, or a site named in an OIDC claim
                    s.add(Site(id=site, name=site))
                    s.flush()
                row = Volume(
                    id=vid,
                    site_id=site,
                    dataset=dataset,
                    s3_key=key,
                    s3_version_id=img_obj.version_id,
                    label_s3_key=label_ref.key if label_ref else None,
                    sha256=sha,
                    geometry={
                        "shape": list(grid.shape),
                        "spacing": list(grid.spacing),
                        "affine": grid.affine.tolist(),
                    },
                )
                s.add(row)
                stage_event(s, make_event(VOLUME_INGESTED, SOURCE, vid, payload))
                audit(s, who.user_id, "volume.create", vid, site_id=site, sha256=sha, **provenance)
                s.flush()
                out = _volume_out(row)
        except IntegrityError as exc:  # a concurrent upload of the same id won
            raise UploadRejected("exists", f"volume {vid} was created concurrently", 409) from exc
        timings.lap("commit")
        if early is not None:
            early.kept = True
        ingest.published()
        with bind(volume_id=vid, site_id=site):
            log.info("volume ingested", extra={"dataset": dataset, "shape": grid.shape})
        return out

    # What an upload answers besides 201 (POST and PUT alike).
    upload_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": VolumeOut},
        409: {"model": ErrorOut},
        413: {"model": ErrorOut},
        422: {"model": ErrorOut},
    }

    async def ingest_timed(response: Response, job: Callable[[Laps], Any]) -> Any:
        """``job`` (:func:`ingest_upload` with its arguments) off the event loop (decoding and
        checking is CPU work, other requests go on), with where the time went as a W3C
        ``Server-Timing`` header."""
        timings = Laps()
        out = await run_in_threadpool(job, timings)
        target = out if isinstance(out, Response) else response
        target.headers["Server-Timing"] = timings.server_timing()
        return out

    @r.post("", status_code=201, response_model=VolumeOut, responses=upload_responses)
    async def upload_volume(
        file: Annotated[
            UploadFile, File(description="CT as NIfTI (.nii/.nii.gz) or a zip of one DICOM series")
        ],
        site_id: Annotated[str, Form()],
        dataset: Annotated[Dataset, Form()],
        response: Response,
        volume_id: Annotated[str | None, Form()] = None,
        label: Annotated[
            UploadFile | None, File(description="label NIfTI (labelled datasets)")
        ] = None,
        label_map: Annotated[str | None, Form(description='JSON {"organ": id}')] = None,
        who: Principal = Depends(uploader),
    ) -> Any:
        site = safe_id(site_id, "site id")
        if not who.may_see(site):
            raise UploadRejected("unknown_site", f"no site {site} of yours", 404)
        data = await ingest.read_upload(file, "volume")
        label_data = await ingest.read_upload(label, "label") if label is not None else None
        return await ingest_timed(
            response,
            partial(ingest_upload, who, site, dataset, volume_id, data, label_data, label_map),
        )

    @r.put(
        "/{volume_id}",
        status_code=201,
        response_model=VolumeOut,
        responses={**upload_responses, 415: {"model": ErrorOut}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "the CT file itself: NIfTI (.nii/.nii.gz) or a zip of one DICOM "
                "series",
                "content": {
                    t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES
                },
            }
        },
    )
    async def put_volume(
        volume_id: str,
        request: Request,
        response: Response,
        site_id: Annotated[str, Query()],
        dataset: Annotated[Dataset, Query()] = "clinical",
        who: Principal = Depends(uploader),
    ) -> Any:
        """A CT as the request body under the id the client chose (no label: labelled volumes
        use the multipart ``POST``). The same checks, storage and answers as ``POST``, without
        multipart framing: a 90 MB CT arrives ~0.35 s sooner on this machine's cores."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in RAW_TYPES:
            raise UploadRejected(
                "unsupported_media_type",
                f"send the file as one of {', '.join(RAW_TYPES)} (got {ctype or 'nothing'})",
                415,
            )
        vid = safe_id(volume_id, "volume id")
        site = safe_id(site_id, "site id")
        if not who.may_see(site):
            raise UploadRejected("unknown_site", f"no site {site} of yours", 404)
        if dataset != "clinical":
            raise UploadRejected(
                "label_required", f"{dataset} (labelled) volumes need a label: use POST"
            )
        data = await ingest.read_body(request, "volume")
        job = partial(ingest_upload, who, site, dataset, vid, data, None, None)
        return await ingest_timed(response, job)

    def ingest_upload(
        who: Principal,
        site: str,
        dataset: Dataset,
        volume_id: str | None,
        data: bytes,
        label_data: bytes | None,
        label_map: str | None,
        timings: Laps,
    ) -> Any:
        label_job = None
        if label_data is not None:
            # The label is read and its values checked while the image is: both decompress and
            # scan on their own core. Its grid is compared with the image's once both are known.
            mapping = _label_map(label_map)

            def read_label(raw: bytes) -> tuple[NiftiUpload, NDArray[np.uint8], bool]:
                """The label, its canonical values and whether its bytes already are them."""
                lab = read_nifti_upload(raw, ingest.limits, "label", STORED_LABEL_DTYPES)
                return lab, mask_values(lab.array, mapping), lab.storable and mapping.is_identity

            label_job = ingest.pool.submit(read_label, label_data)
        elif dataset != "clinical":
            raise UploadRejected("label_required", f"{dataset} (labelled) volumes need a label")
        sha = hashlib.sha256(data).hexdigest()
        early = None
        if may_be_stored_as_is(data, STORED_CT_DTYPES):
            # Most clean NIfTI CTs are kept as they came: their write starts now and overlaps
            # the decode and checks (removed again if they fail).
            vid = _volume_id(volume_id, sha)
            with session_scope(ingest.db) as s:
                taken = s.get(Volume, vid) is not None
            if not taken:
                early = EarlyPut(ingest, keys.volume_image(site, vid), data)
        try:
            return _checked_and_stored(
                who, site, dataset, volume_id, data, sha, label_data, label_job, timings, early
            )
        finally:
            if early is not None and not early.kept:
                early.discard()

    def _checked_and_stored(
        who: Principal,
        site: str,
        dataset: Dataset,
        volume_id: str | None,
        data: bytes,
        sha: str,
        label_data: bytes | None,
        label_job: Future[tuple[NiftiUpload, NDArray[np.uint8], bool]] | None,
        timings: Laps,
        early: EarlyPut | None,
    ) -> Any:
        provenance = {"source": "nifti"}
        if data[:2] == b"PK":
            vol = read_dicom_zip(data, ingest.limits)
            # Only pixel data and geometry are kept: every DICOM attribute (patient, study,
            # institution, dates, UIDs) is dropped, which covers the PS3.15 Basic Profile.
            provenance = {"source": "dicom", "deidentified": "all DICOM attributes dropped"}
            array, grid = vol.image, Grid(vol.image.shape, vol.affine)  # type: ignore[arg-type]
            storable = False
        else:
            upload = read_nifti_upload(data, ingest.limits, dtypes=STORED_CT_DTYPES)
            array, grid, storable = upload.array, upload.grid, upload.storable
        image = validate_ct(array, grid)
        timings.lap("decode")
        # The upload's own bytes when they are already a stored blob (most NIfTI CTs: int16 or
        # float32, gzipped, no extensions): checked in full above, kept as they came.
        image_blob = data if storable else encode_ct(image, grid)
        provenance["stored"] = "as uploaded" if storable else "re-encoded"
        timings.lap("encode")
        mask_bytes = None
        if label_job is not None:
            lab, mask, canonical = label_job.result()
            check_mask_grid(lab.grid, grid)
            # Checked, canonical and on the volume's exact grid: kept as it came.
            keep = canonical and np.array_equal(lab.grid.affine, grid.affine)
            mask_bytes = label_data if keep else nifti_gz_bytes(mask, grid.affine)
        timings.lap("label")  # what the label's check took beyond the image's
        return accept_volume(
            who,
            site,
            dataset,
            volume_id,
            image_blob,
            grid,
            mask_bytes,
            sha,
            provenance,
            timings,
            early if storable else None,
        )

    @r.post(
        "/dicomweb",
        status_code=201,
        response_model=VolumeOut,
        responses={200: {"model": VolumeOut}, 403: {"model": ErrorOut}, 422: {"model": ErrorOut}},
    )
    def import_from_dicomweb(body: DicomWebIn, who: Principal = Depends(uploader)) -> Any:
        """Pull one CT series from a PACS (QIDO-RS, WADO-RS) and ingest it like an upload."""
        allowed = [u.rstrip("/") for u in ingest.settings.services.dicomweb_sources]
        if body.url.rstrip("/") not in allowed:
            raise UploadRejected(
                "source_not_allowed", "that DICOMweb service is not configured", 403
            )
        if body.dataset != "clinical":
            raise UploadRejected("label_required", f"{body.dataset} volumes need a label")
        site = safe_id(body.site_id, "site id")
        if not who.may_see(site):
            raise UploadRejected("unknown_site", f"no site {site} of yours", 404)
        try:
            dicomweb.series_instances(body.url, body.study_uid, body.series_uid)
            blobs = dicomweb.retrieve_series(
                body.url, body.study_uid, body.series_uid, ingest.limits.max_bytes
            )
        except (dicomweb.DicomWebError, httpx.HTTPError) as exc:
            raise UploadRejected("dicomweb", f"could not retrieve the series: {exc}", 422) from exc
        vol = read_dicom_instances(blobs)
        grid = Grid((vol.image.shape[0], vol.image.shape[1], vol.image.shape[2]), vol.affine)
        image_blob = encode_ct(validate_ct(vol.image, grid), grid)
        sha = hashlib.sha256(b"".join(sorted(blobs))).hexdigest()
        provenance = {
            "source": "dicomweb",
            "series_uid": body.series_uid,
            "deidentified": "all DICOM attributes dropped",
        }
        return accept_volume(
            who, site, body.dataset, body.volume_id, image_blob, grid, None, sha, provenance
        )

    @r.get("", response_model=list[VolumeOut])
    def list_volumes(
        who: Principal = Depends(anyone),
        site_id: str | None = None,
        dataset: Dataset | None = None,
        status: str | None = None,
    ) -> list[VolumeOut]:
        with session_scope(ingest.db) as s:
            q = select(Volume).order_by(Volume.created_at)
            if not who.is_admin:
                q = q.where(Volume.site_id.in_(who.sites))
            if site_id:
                q = q.where(Volume.site_id == site_id)
            if dataset:
                q = q.where(Volume.dataset == dataset)
            if status:
                q = q.where(Volume.status == status)
            return [_volume_out(v) for v in s.scalars(q)]

    @r.get("/{volume_id}", response_model=VolumeOut, responses={404: {"model": ErrorOut}})
    def get_volume(volume_id: str, who: Principal = Depends(anyone)) -> VolumeOut:
        with session_scope(ingest.db) as s:
            return _volume_out(_get_volume(s, volume_id, who))

    @r.get(
        "/{volume_id}/image",
        response_class=Response,
        responses={200: {"content": {"application/gzip": {}}}},
    )
    def get_image(volume_id: str, who: Principal = Depends(anyone)) -> Response:
        with session_scope(ingest.db) as s:
            v = _get_volume(s, volume_id, who)
            key, version = v.s3_key, v.s3_version_id
            audit(s, who.user_id, "volume.read", volume_id, site_id=v.site_id)
        return Response(
            ingest.store.get_bytes(ingest.bucket, key, version), media_type="application/gzip"
        )

    @r.get(
        "/{volume_id}/prediction",
        response_model=PredictionOut,
        responses={404: {"model": ErrorOut}},
    )
    def get_prediction(volume_id: str, who: Principal = Depends(anyone)) -> PredictionOut:
        with session_scope(ingest.db) as s:
            p = _latest_prediction(s, volume_id, who)
            return PredictionOut(
                volume_id=volume_id,
                model=p.model,
                version=p.version,
                uncertainty=p.uncertainty,
                created_at=p.created_at,
            )

    @r.get(
        "/{volume_id}/prediction/mask",
        response_class=Response,
        responses={200: {"content": {"application/gzip": {}}}},
    )
    def get_prediction_mask(volume_id: str, who: Principal = Depends(anyone)) -> Response:
        with session_scope(ingest.db) as s:
            p = _latest_prediction(s, volume_id, who)
            key = p.s3_key
            audit(
                s,
                who.user_id,
                "prediction.read",
                volume_id,
                site_id=_get_volume(s, volume_id, who).site_id,
            )
        return Response(ingest.store.get_bytes(ingest.bucket, key), media_type="application/gzip")

    reviewer = auth.require("admin", "reviewer")

    @r.get("/{volume_id}/annotations", response_model=list[AnnotationOut])
    def list_annotations(volume_id: str, who: Principal = Depends(anyone)) -> list[AnnotationOut]:
        with session_scope(ingest.db) as s:
            _get_volume(s, volume_id, who)
            rows = s.scalars(
                select(AnnotationRevision)
                .where(AnnotationRevision.volume_id == volume_id)
                .order_by(AnnotationRevision.revision)
            )
            return [_annotation_out(x) for x in rows]

    @r.post(
        "/{volume_id}/annotations/{revision}/review",
        response_model=AnnotationOut,
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    def review_annotation(
        volume_id: str, revision: int, body: ReviewIn, who: Principal = Depends(reviewer)
    ) -> AnnotationOut:
        """Approve a revision (it becomes training data when review is required) or send it
        back (the volume returns to the work queue)."""
        with session_scope(ingest.db) as s:
            v = _get_volume(s, volume_id, who)
            row = s.scalars(
                select(AnnotationRevision).where(
                    AnnotationRevision.volume_id == volume_id,
                    AnnotationRevision.revision == revision,
                )
            ).first()
            if row is None:
                raise UploadRejected("not_found", f"{volume_id} has no revision {revision}", 404)
            if row.review_status != "pending":
                raise UploadRejected("reviewed", f"revision {revision} is {row.review_status}", 409)
            if row.author == who.user_id:
                raise UploadRejected("own_revision", "a reviewer cannot review their own work", 409)
            row.review_status = "approved" if body.decision == "approve" else "sent_back"
            row.reviewer, row.review_comment = who.user_id, body.comment
            row.reviewed_at = datetime.now(UTC)
            if body.decision == "send_back":
                v.status = "sent_back"
            audit(
                s,
                who.user_id,
                f"annotation.{body.decision}",
                volume_id,
                site_id=v.site_id,
                revision=revision,
            )
            s.flush()
            return _annotation_out(row)

    def _nifti(key: str, version: str | None = None) -> nib.Nifti1Image:
        raw = ingest.store.get_bytes(ingest.bucket, key, version)
        return nifti_from_gz(raw)

    @r.get(
        "/{volume_id}/series.zip",
        response_class=Response,
        responses={200: {"content": {"application/zip": {}}}},
    )
    def get_series(volume_id: str, who: Principal = Depends(anyone)) -> Response:
        """The volume as a DICOM CT series (the one ctloop's SEG objects reference)."""
        with session_scope(ingest.db) as s:
            v = _get_volume(s, volume_id, who)
            key, version = v.s3_key, v.s3_version_id
            audit(s, who.user_id, "volume.read", volume_id, site_id=v.site_id, form="dicom")
        img = _nifti(key, version)
        series = dicom.ct_series(np.asarray(img.dataobj), np.asarray(img.affine), volume_id)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, ds in enumerate(series):
                zf.writestr(f"{volume_id}/{i:05d}.dcm", dicom.to_bytes(ds))
        return Response(buf.getvalue(), media_type="application/zip")

    @r.get(
        "/{volume_id}/prediction/seg",
        response_class=Response,
        responses={200: {"content": {"application/dicom": {}}}, 404: {"model": ErrorOut}},
    )
    def get_prediction_seg(volume_id: str, who: Principal = Depends(anyone)) -> Response:
        """The latest pre-annotation as a DICOM SEG referencing ``series.zip``."""
        with session_scope(ingest.db) as s:
            p = _latest_prediction(s, volume_id, who)
            v = _get_volume(s, volume_id, who)
            key, image_key, version = p.s3_key, v.s3_key, v.s3_version_id
            algorithm = f"{p.model} v{p.version}"
            audit(s, who.user_id, "prediction.read", volume_id, site_id=v.site_id, form="seg")
        img = _nifti(image_key, version)
        mask = np.asarray(_nifti(key).dataobj, dtype=np.uint8)
        series = dicom.ct_series(np.asarray(img.dataobj), np.asarray(img.affine), volume_id)
        seg = dicom.segmentation(mask, series, volume_id, f"prediction {algorithm}", algorithm)
        return Response(dicom.to_bytes(seg), media_type="application/dicom")

    @r.post(
        "/{volume_id}/annotations",
        status_code=201,
        response_model=AnnotationOut,
        responses={404: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut}},
    )
    async def submit_annotation(
        volume_id: str,
        mask: Annotated[UploadFile, File(description="corrected label NIfTI on the volume's grid")],
        minutes: Annotated[float, Form(ge=0, le=24 * 60)],
        organs: Annotated[
            str, Form(description='JSON {"organ": "accepted|corrected|skipped"}')
        ] = "{}",
        reviewed_slices: Annotated[
            str | None, Form(description="JSON [[first, last], ...]")
        ] = None,
        from_model: Annotated[
            str | None, Form(description='"model:version" it started from')
        ] = None,
        label_map: Annotated[str | None, Form(description='JSON {"organ": id}')] = None,
        who: Principal = Depends(annotator),
    ) -> AnnotationOut:
        with session_scope(ingest.db) as s:
            _get_volume(s, volume_id, who)
        try:
            partial = PartialLabel(
                organs=json.loads(organs),
                reviewed_slices=json.loads(reviewed_slices) if reviewed_slices else None,
            )
        except (ValueError, ValidationError, UnknownLabel) as exc:
            raise UploadRejected("bad_review", f"organs / reviewed_slices: {exc}") from exc
        data = await ingest.read_upload(mask, "mask")
        return record_annotation(
            ingest,
            who,
            volume_id,
            data,
            minutes,
            partial,
            _model_ref(from_model),
            _label_map(label_map),
        )

    return r


def record_annotation(
    ingest: Ingest,
    who: Principal,
    volume_id: str,
    data: bytes,
    minutes: float,
    partial: PartialLabel,
    origin: ModelRef | None,
    label_map: LabelMap,
) -> AnnotationOut:
    """Validate a corrected mask and store it as the volume's next immutable revision (the
    REST API and the MONAI Label layer both submit through here); releases the caller's lease."""
    author = who.user_id
    with session_scope(ingest.db) as s:
        v = _get_volume(s, volume_id, who)
        site, g, dataset = v.site_id, v.geometry, v.dataset
    if dataset != "clinical":
        raise UploadRejected("not_annotatable", f"{volume_id} is a {dataset} volume", 409)
    holder = lease_holder(ingest.db, volume_id)
    if holder is not None and holder != author:
        raise UploadRejected("leased", f"{volume_id} is leased to {holder}", 409)
    volume_grid = Grid((g["shape"][0], g["shape"][1], g["shape"][2]), np.asarray(g["affine"]))
    array, grid = read_nifti(data, ingest.limits, "mask")
    canonical = validate_mask(array, grid, volume_grid, label_map)

    with session_scope(ingest.db) as s:
        rev = next_annotation_revision(s, volume_id)
    key = keys.annotation_mask(site, volume_id, rev)
    obj = ingest.store.put_bytes(ingest.bucket, key, nifti_gz_bytes(canonical, volume_grid.affine))
    payload = AnnotationSubmitted(
        volume_id=volume_id,
        site_id=site,
        revision=rev,
        author=author,
        mask=BlobRef(bucket=ingest.bucket, key=key, version_id=obj.version_id),
        organs=partial.organs,
        reviewed_slices=partial.reviewed_slices,
        minutes=minutes,
        from_model=origin,
    )
    detail = {
        "minutes": minutes,
        "organs": partial.organs,
        "s3_version_id": obj.version_id,
        "reviewed_slices": partial.reviewed_slices,
        "from_model": origin.model_dump() if origin else None,
    }
    try:
        with session_scope(ingest.db) as s:
            row = AnnotationRevision(
                volume_id=volume_id, revision=rev, author=author, s3_key=key, detail=detail
            )
            # The lease is checked again and released in the revision's own transaction: a
            # claim that listed this volume before now finds it annotated and rolls back.
            lease = s.get(Lease, volume_id)
            now = datetime.now(UTC)
            if lease is not None and lease.expires_at > now and lease.holder != author:
                raise UploadRejected("leased", f"{volume_id} is leased to {lease.holder}", 409)
            if lease is not None:
                s.delete(lease)
            s.add(row)
            vol = s.get(Volume, volume_id)
            assert vol is not None
            vol.status = "annotated"
            stage_event(s, make_event(ANNOTATION_SUBMITTED, SOURCE, volume_id, payload))
            audit(s, author, "annotation.create", volume_id, site_id=site, revision=rev)
            s.flush()
            created = row.created_at
    except IntegrityError as exc:
        raise UploadRejected(
            "conflict", "another revision was submitted at the same time; retry", 409
        ) from exc
    ingest.published()
    with bind(volume_id=volume_id, site_id=site):
        log.info("annotation submitted", extra={"revision": rev, "minutes": minutes})
    return AnnotationOut(
        volume_id=volume_id,
        revision=rev,
        author=author,
        minutes=minutes,
        organs=partial.organs,
        reviewed_slices=partial.reviewed_slices,
        created_at=created,
    )


def _volume_id(volume_id: str | None, sha: str) -> str:
    """The id a volume is stored under: the client's (checked), else from its bytes' hash."""
    return safe_id(volume_id, "volume id") if volume_id else f"vol-{sha[:16]}"


def _model_ref(raw: str | None) -> ModelRef | None:
    if not raw:
        return None
    name, _, version = raw.partition(":")
    try:
        return ModelRef(model=safe_id(name, "model"), version=int(version))
    except (ValueError, ValidationError) as exc:
        raise UploadRejected(
            "bad_model_ref", f"from_model must be 'model:version' ({exc})"
        ) from exc


def _get_volume(s: Any, volume_id: str, who: Principal) -> Volume:
    v = s.get(Volume, volume_id)
    # Another site's volume is reported exactly like a missing one: no existence leak.
    if v is None or not who.may_see(v.site_id):
        raise HTTPException(404, detail={"code": "not_found", "message": f"no volume {volume_id}"})
    return v


def latest_prediction(s: Any, volume_id: str) -> Prediction | None:
    """The volume's newest pre-annotation, if it has one."""
    p: Prediction | None = s.scalars(
        select(Prediction)
        .where(Prediction.volume_id == volume_id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    ).first()
    return p


def _latest_prediction(s: Any, volume_id: str, who: Principal) -> Prediction:
    _get_volume(s, volume_id, who)
    p = latest_prediction(s, volume_id)
    if p is None:
        raise HTTPException(
            404,
            detail={"code": "no_prediction", "message": f"{volume_id} has no pre-annotation yet"},
        )
    return p


def create_app(settings: Settings, relay: OutboxRelay | None = None) -> FastAPI:
    ingest = Ingest(settings, relay)
    app = FastAPI(
        title="ctloop ingest",
        version="1",
        description="Upload CT volumes and annotations; fetch pre-annotations.",
    )

    @app.exception_handler(UploadRejected)
    async def rejected(_: Request, exc: UploadRejected) -> JSONResponse:
        return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)  # routing's 404/405 too, not only ours
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        body = (
            exc.detail
            if isinstance(exc.detail, dict)
            else {"code": codes.get(exc.status_code, "error"), "message": str(exc.detail)}
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        problems = "; ".join(f"{e['where']}: {e['problem']}" for e in errors)
        return JSONResponse(
            {"code": "invalid_request", "message": problems, "errors": errors}, status_code=422
        )

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        # A dependency (object store, database) is down: the request changed nothing that
        # stays (S3 objects without their database row are unreferenced), so it can be retried.
        log.warning("dependency unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        return JSONResponse(
            {
                "code": "unavailable",
                "message": "a storage dependency is not answering; retry shortly",
            },
            status_code=503,
            headers={"Retry-After": "5"},
        )

    for kind in (urllib3.exceptions.HTTPError, OperationalError, ServerError):
        app.add_exception_handler(kind, unavailable)

    def s3_ready() -> tuple[bool, str]:
        return ingest.store.client.bucket_exists(ingest.bucket), ingest.bucket

    app.include_router(
        health_router("ingest", {"database": database_check(settings.database_url), "s3": s3_ready})
    )
    oidc = OidcVerifier(settings.auth) if settings.auth.oidc_issuer else None
    auth = Auth(settings.database_url, oidc)
    app.include_router(volumes_router(ingest, auth))
    app.include_router(admin_router(settings.database_url, auth))
    svc = settings.services
    queue = WorkQueue(settings.database_url, svc.queue_strategy, svc.lease_s)
    app.include_router(queue_router(queue, auth))
    backends = Backends(svc.grpc_target("inference"), svc.grpc_target("training"))
    app.include_router(monailabel_router(ingest, auth, queue, backends))
    app.include_router(workbench_router(ingest, auth, queue))
    app.state.backends = backends
    app.state.ingest = ingest
    return app
