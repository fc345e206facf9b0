"""``/v1/volumes``: upload CTs (multipart, raw body, or from a PACS), list and read them, and
read their latest pre-annotation (NIfTI mask, DICOM SEG)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import and_, or_, select
from starlette.concurrency import run_in_threadpool

from ctloop.contracts.payloads import Dataset
from ctloop.core import dicom
from ctloop.core.blobs import nifti_from_gz
from ctloop.db import Volume, session_scope, volume_status
from ctloop.paging import Page, one_page
from ctloop.timing import Laps
from services.ingest.deps import Admin, Anyone, Context, Uploader, read_body
from services.ingest.errors import ApiError
from services.ingest.forms import Form, FormFile
from services.ingest.records import (
    audited_read,
    image_blob,
    prediction_blob,
    required_prediction,
    shown_volume,
    volumes_out,
    withdraw_volume,
)
from services.ingest.schemas import (
    DicomWebIn,
    ErrorOut,
    PacsTargetIn,
    PredictionOut,
    SegStoredOut,
    VolumeOut,
)
from services.ingest.seg_export import Reference, prediction_seg, store_seg_in_pacs
from services.ingest.uploads import Existing, Upload, import_series, ingest_upload
from services.ingest.validation import safe_id

router = APIRouter(prefix="/v1/volumes", tags=["volumes"])

# Body types of ``PUT /v1/volumes/{id}`` (the file itself, no multipart framing).
RAW_TYPES = (
    "application/gzip",
    "application/x-gzip",
    "application/octet-stream",
    "application/zip",
)
# What an upload answers besides 201 (POST and PUT alike).
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": VolumeOut},
    409: {"model": ErrorOut},
    413: {"model": ErrorOut},
    422: {"model": ErrorOut},
}
GZIP: dict[int | str, dict[str, Any]] = {200: {"content": {"application/gzip": {}}}}


def _site_of_yours(who: Any, site_id: str) -> str:
    site = safe_id(site_id, "site id")
    if not who.may_see(site):
        raise ApiError("unknown_site", f"no site {site} of yours", 404)
    return site


async def _timed(response: Response, job: Callable[[Laps], VolumeOut]) -> Any:
    """``job`` off the event loop (decoding and checking is CPU work, other requests go on),
    with where the time went as a W3C ``Server-Timing`` header. The same bytes again answer
    200 with the stored volume."""
    timings = Laps()
    try:
        out: Any = await run_in_threadpool(job, timings)
    except Existing as same:
        out = JSONResponse(same.volume.model_dump(mode="json"), 200)
    target = out if isinstance(out, Response) else response
    target.headers["Server-Timing"] = timings.server_timing()
    return out


class UploadFields(BaseModel):
    """The text fields of ``POST /v1/volumes``."""

    site_id: str
    dataset: Dataset
    volume_id: str | None = None
    label_map: str | None = Field(default=None, description='JSON {"organ": id}')


UPLOAD_FORM = Form(
    UploadFields,
    {
        "file": FormFile("volume", "CT as NIfTI (.nii/.nii.gz) or a zip of one DICOM series"),
        "label": FormFile("label", "label NIfTI (labelled datasets)", required=False),
    },
)


@router.post(
    "",
    status_code=201,
    response_model=VolumeOut,
    responses={**UPLOAD_RESPONSES, 415: {"model": ErrorOut}},
    openapi_extra=UPLOAD_FORM.openapi(),
)
async def upload_volume(ctx: Context, who: Uploader, request: Request, response: Response) -> Any:
    """A CT as a ``multipart/form-data`` form (and its label, for labelled datasets), read as
    it arrives (:mod:`services.ingest.forms`)."""
    form, files = await UPLOAD_FORM.read(request, ctx.limits)
    up = Upload(who, _site_of_yours(who, form.site_id), form.dataset, form.volume_id)
    label = files.get("label")
    labelled = (label, form.label_map) if label is not None else None
    return await _timed(response, partial(ingest_upload, ctx, up, files["file"], labelled))


@router.put(
    "/{volume_id}",
    status_code=201,
    response_model=VolumeOut,
    responses={**UPLOAD_RESPONSES, 415: {"model": ErrorOut}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the CT file itself: NIfTI (.nii/.nii.gz) or a zip of one DICOM series",
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES},
        }
    },
)
async def put_volume(
    ctx: Context,
    who: Uploader,
    volume_id: str,
    request: Request,
    response: Response,
    site_id: Annotated[str, Query()],
    dataset: Annotated[Dataset, Query()] = "clinical",
) -> Any:
    """A CT as the request body under the id the client chose (no label: labelled volumes
    use the multipart ``POST``). The same checks, storage and answers as ``POST``, without
    multipart framing: a 90 MB CT arrives ~0.35 s sooner on this machine's cores."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in RAW_TYPES:
        raise ApiError(
            "unsupported_media_type",
            f"send the file as one of {', '.join(RAW_TYPES)} (got {ctype or 'nothing'})",
            415,
        )
    vid = safe_id(volume_id, "volume id")
    up = Upload(who, _site_of_yours(who, site_id), dataset, vid)
    if dataset != "clinical":
        raise ApiError("label_required", f"{dataset} (labelled) volumes need a label: use POST")
    data = await read_body(ctx, request, "volume")
    return await _timed(response, partial(ingest_upload, ctx, up, data, None))


@router.post(
    "/dicomweb",
    status_code=201,
    response_model=VolumeOut,
    responses={
        200: {"model": VolumeOut},
        403: {"model": ErrorOut},
        404: {"model": ErrorOut},
        422: {"model": ErrorOut},
    },
)
def import_from_dicomweb(ctx: Context, who: Uploader, body: DicomWebIn) -> Any:
    """Pull one CT series from a PACS (QIDO-RS, WADO-RS) and ingest it like an upload, into
    one of the caller's sites (404 for others, as for a missing one) from one of that site's
    services (403 otherwise); UIDs that are not DICOM UIDs: 422 ``bad_uid``."""
    if body.dataset != "clinical":
        raise ApiError("label_required", f"{body.dataset} volumes need a label")
    up = Upload(who, _site_of_yours(who, body.site_id), body.dataset, body.volume_id)
    try:
        return import_series(ctx, up, body.url, body.study_uid, body.series_uid)
    except Existing as same:
        return JSONResponse(same.volume.model_dump(mode="json"), 200)


@router.get("", response_model=list[VolumeOut])
def list_volumes(
    ctx: Context,
    who: Anyone,
    page: Page,
    request: Request,
    response: Response,
    site_id: str | None = None,
    dataset: Dataset | None = None,
    status: str | None = None,
) -> list[VolumeOut]:
    """Your sites' volumes, oldest first, a page at a time (``ctloop.paging``)."""
    with session_scope(ctx.db) as s:
        q = select(Volume).order_by(Volume.created_at, Volume.id).limit(page.fetch)
        if (after := page.after_key(datetime, str)) is not None:
            at, vid = after
            q = q.where(or_(Volume.created_at > at, and_(Volume.created_at == at, Volume.id > vid)))
        if not who.is_admin:
            q = q.where(Volume.site_id.in_(who.sites))
        if site_id:
            q = q.where(Volume.site_id == site_id)
        if dataset:
            q = q.where(Volume.dataset == dataset)
        if status:
            q = q.where(volume_status() == status)
        rows = volumes_out(s, q)
    return one_page(rows, page, _volume_key, request, response)


def _volume_key(v: VolumeOut) -> list[Any]:
    return [v.created_at.isoformat(), v.volume_id]


@router.get("/{volume_id}", response_model=VolumeOut, responses={404: {"model": ErrorOut}})
def get_volume(ctx: Context, who: Anyone, volume_id: str) -> VolumeOut:
    with session_scope(ctx.db) as s:
        return shown_volume(s, volume_id, who)


@router.delete(
    "/{volume_id}",
    response_model=VolumeOut,
    responses={403: {"model": ErrorOut}, 404: {"model": ErrorOut}},
)
def withdraw(ctx: Context, who: Admin, volume_id: str) -> VolumeOut:
    """Withdraw the volume from the loop (admins): it is never queued, pre-annotated, trained
    on or scored again; its data and revisions are kept and its id stays taken."""
    return withdraw_volume(ctx, who, volume_id)


@router.get("/{volume_id}/image", response_class=Response, responses=GZIP)
def get_image(ctx: Context, who: Anyone, volume_id: str) -> Response:
    data = audited_read(ctx, who, volume_id, "volume.read", lambda s, v: image_blob(v))
    return Response(data, media_type="application/gzip")


@router.get(
    "/{volume_id}/prediction", response_model=PredictionOut, responses={404: {"model": ErrorOut}}
)
def get_prediction(ctx: Context, who: Anyone, volume_id: str) -> PredictionOut:
    with session_scope(ctx.db) as s:
        p = required_prediction(s, volume_id, who)
        return PredictionOut(
            volume_id=volume_id,
            model=p.model,
            version=p.version,
            uncertainty=p.uncertainty,
            created_at=p.created_at,
        )


@router.get("/{volume_id}/prediction/mask", response_class=Response, responses=GZIP)
def get_prediction_mask(ctx: Context, who: Anyone, volume_id: str) -> Response:
    data = audited_read(
        ctx,
        who,
        volume_id,
        "prediction.read",
        lambda s, v: prediction_blob(required_prediction(s, v.id, who)),
    )
    return Response(data, media_type="application/gzip")


@router.get(
    "/{volume_id}/series.zip",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def get_series(ctx: Context, who: Anyone, volume_id: str) -> Response:
    """The volume as a DICOM CT series (the one ctloop's SEG objects reference)."""
    raw = audited_read(ctx, who, volume_id, "volume.read", lambda s, v: image_blob(v), form="dicom")
    img = nifti_from_gz(raw)
    series = dicom.ct_series(np.asarray(img.dataobj), np.asarray(img.affine), volume_id)
    return Response(dicom.series_zip(series, volume_id), media_type="application/zip")


@router.get(
    "/{volume_id}/prediction/seg",
    response_class=Response,
    responses={
        200: {"content": {"application/dicom": {}}},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut},
    },
)
def get_prediction_seg(
    ctx: Context,
    who: Anyone,
    volume_id: str,
    reference: Annotated[
        Reference,
        Query(
            description="auto: the original DICOM series the volume came from when there is "
            "one, else series.zip; original: only the original (409 without one); ctloop: "
            "series.zip"
        ),
    ] = "auto",
) -> Response:
    """The latest pre-annotation as a DICOM SEG (patient and study attributes empty)."""
    seg = prediction_seg(ctx, who, volume_id, reference)
    return Response(dicom.to_bytes(seg), media_type="application/dicom")


@router.post(
    "/{volume_id}/prediction/seg/pacs",
    response_model=SegStoredOut,
    status_code=201,
    responses={403: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
def store_prediction_seg(
    ctx: Context, who: Uploader, volume_id: str, body: PacsTargetIn
) -> SegStoredOut:
    """The latest pre-annotation as a SEG on the original series, stored back with STOW-RS in
    one of the volume's site's PACS, with the patient and study attributes that PACS holds
    for the original images (read as it is sent, never stored)."""
    return SegStoredOut(**store_seg_in_pacs(ctx, who, volume_id, body.url))
