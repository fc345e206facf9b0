"""MONAI Label's datastore upload and model endpoints, mapped onto ctloop (the rest of its API:
:mod:`services.ingest.routers.monailabel`).

============================  ===========================================================
MONAI Label                   ctloop
============================  ===========================================================
``PUT /datastore/``,          a clinical upload (``POST /v1/volumes``): NIfTI or a zip of
``PUT /datastore/image``      one DICOM series, every check of the upload path; ``image``
                              names the volume, ``params`` may name ``site_id`` (default:
                              your only site); admins, reviewers, integrations
``DELETE /datastore/``,       the volume withdrawn from the loop (never queued, predicted,
``DELETE /datastore/image``   trained on or scored again); its data is kept (admins)
``GET /model/info/{model}``   the serving (or named) model's latest version: its weights'
                              sha256 (the digest recorded at publish) and publish time, from
                              the training service (ingest has no model-repository grant)
``GET /model/{model}``        409 ``not_served_here``: where the weights are (admins)
============================  ===========================================================

Answers are MONAI Label's (``{"image": id}``; ``{"checksum": ..., "modified_time": ...}``),
errors ctloop's own (code, message).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ctloop.auth import Principal
from ctloop.timing import Laps
from services.ingest.backends import model_versions, serving_model
from services.ingest.deps import Admin, Anyone, Context, IngestContext, Uploader
from services.ingest.errors import ApiError, not_found
from services.ingest.forms import Form, FormFile
from services.ingest.records import withdraw_volume
from services.ingest.routers.monailabel import _known_model, _params
from services.ingest.schemas import ErrorOut
from services.ingest.uploads import Existing, Upload, ingest_upload
from services.ingest.validation import safe_id

router = APIRouter(tags=["MONAI Label compatibility"])


def _upload_site(who: Principal, params: dict[str, Any]) -> str:
    """``params["site_id"]`` if it is one of the caller's sites, else the caller's only site."""
    named = params.get("site_id")
    if named is not None:
        site = safe_id(str(named), "site id")
        if not who.may_see(site):
            raise ApiError("unknown_site", f"no site {site} of yours", 404)
        return site
    if len(who.sites) == 1:
        return next(iter(who.sites))
    raise ApiError(
        "site_required",
        'you belong to several sites (or are an admin): name one in params {"site_id": ...}',
    )


class DatastoreFields(BaseModel):
    """The text field of MONAI Label's datastore upload."""

    params: str | None = Field(default=None, description='JSON, e.g. {"site_id": "site-a"}')


DATASTORE_FORM = Form(
    DatastoreFields, {"file": FormFile("volume", "CT: NIfTI or a zip of one DICOM series")}
)
# The two paths MONAI Label's client may call.
DATASTORE_UPLOAD: dict[str, Any] = {
    "summary": "Upload a CT into your site (MONAI Label)",
    "responses": {415: {"model": ErrorOut}},
    "openapi_extra": DATASTORE_FORM.openapi(),
}


@router.put("/datastore/", **DATASTORE_UPLOAD)
@router.put("/datastore/image", **DATASTORE_UPLOAD)
async def datastore_upload(
    ctx: Context, who: Uploader, request: Request, image: str | None = None
) -> dict[str, Any]:
    """The form read as it arrives, as ``POST /v1/volumes`` (services/ingest/forms.py)."""
    form, files = await DATASTORE_FORM.read(request, ctx.limits)
    site = _upload_site(who, _params(form.params))
    up = Upload(who, site, "clinical", safe_id(image, "image id") if image else None)
    try:
        out = await run_in_threadpool(ingest_upload, ctx, up, files["file"], None, Laps())
    except Existing as same:  # the same bytes again: the stored volume
        out = same.volume
    return {"image": out.volume_id, "site_id": out.site_id, "status": str(out.status)}


@router.delete("/datastore/", summary="Withdraw a volume from the loop (MONAI Label; admins)")
@router.delete("/datastore/image", summary="Withdraw a volume from the loop (MONAI Label; admins)")
def datastore_remove(ctx: Context, who: Admin, id: str) -> dict[str, Any]:
    """MONAI Label deletes the image and its labels; ctloop keeps what it accepted and takes
    the volume out of the loop instead (:func:`services.ingest.records.withdraw_volume`)."""
    withdraw_volume(ctx, who, id, via="monailabel")
    return {}


def _latest(ctx: IngestContext, model: str) -> tuple[str, int, dict[str, Any]]:
    """(ctloop model, latest published version, its manifest) of a MONAI Label model name
    ("segmentation": the one serving), through the training and inference services."""
    name = _known_model(ctx.settings, model)
    if not name:
        name = serving_model(ctx.backends, "").model
        if not name:
            raise not_found("no model is serving yet", "no_model")
    versions = model_versions(ctx.backends, name)
    if not versions:
        raise not_found(f"{name} has no published version yet", "no_model")
    version, manifest = max(versions, key=lambda v: v[0])
    return name, version, manifest


@router.get("/model/info/{model}", summary="The latest version's digest and time (MONAI Label)")
def model_info(ctx: Context, who: Anyone, model: str) -> dict[str, Any]:
    name, version, manifest = _latest(ctx, model)
    created = manifest.get("created_at")
    return {
        "model": name,
        "version": version,
        "checksum": manifest.get("weights_sha256"),
        "modified_time": int(datetime.fromisoformat(created).timestamp()) if created else None,
    }


@router.get("/model/{model}", summary="Model weights are not served here (MONAI Label)")
def model_download(ctx: Context, who: Admin, model: str) -> Response:
    """MONAI Label hands out weights; ctloop's ingest has no grant on the model repository
    (least privilege, docs/security.md): an admin takes them from there, checking the digest
    ``/model/info`` gives."""
    name, version, _ = _latest(ctx, model)
    raise ApiError(
        "not_served_here",
        f"{name} v{version}'s weights are in the model repository (s3://"
        f"{ctx.settings.s3.model_bucket}/{ctx.settings.triton.model_prefix.strip('/')}/{name}/"
        f"{version}/); the API does not serve them; /model/info/{model} gives their sha256",
        409,
    )
