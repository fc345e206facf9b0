"""The part of MONAI Label's REST API that 3D Slicer's MONAILabel extension (and MONAI Label's
own Python client) uses, mapped onto ctloop, so an annotation team can keep using Slicer.

============================  ===========================================================
MONAI Label                   ctloop
============================  ===========================================================
``GET /info/``                organs as labels; the serving model, igniter and sustainer as
                              models; queue strategies; datastore counts of your sites
``GET /auth/``,               ctloop's own tokens: ``/auth/token`` takes your user id as the
``POST /auth/token``          user name and one of your API tokens as the password
``GET /datastore/``           your sites' clinical volumes (``stats`` | ``all`` | ``ids``)
``GET /datastore/image``      the stored volume (NIfTI)
``GET /datastore/label``      ``tag=final``: latest annotation revision; ``original``: the
                              latest pre-annotation
``PUT /datastore/label``      a new annotation revision (params may carry ctloop's per-organ
                              status, reviewed slices, minutes; by default: fully corrected,
                              minutes since you claimed the task)
``POST /activelearning/{s}``  claims the next task under a lease (``uncertainty``, ``random``,
                              ``sequential``; MONAI Label's ``first`` = sequential)
``POST /infer/{model}``       the inference service's ``Segment`` (gRPC) for a stored volume;
                              with ``session_id``: a session's image (``SegmentSession``,
                              :mod:`services.ingest.routers.monailabel_sessions`)
``POST /train/{model}``       the training service's ``StartRound`` (gRPC); reviewers, admins
``GET /train/``               the latest training round as a MONAI Label task
============================  ===========================================================

Authentication, roles, site isolation and the audit log are the same as on ``/v1``.
"""

from __future__ import annotations

import json
import uuid
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.contracts.payloads import ModelRef
from ctloop.core.organs import FOREGROUND, ORGAN_IDS, LabelMap, UnknownLabel
from ctloop.core.partial import PartialLabel
from ctloop.db import RoundStatus, Volume, session_scope
from ctloop.settings import Settings
from ctloop.v1 import training_pb2
from services.ingest import label_sessions
from services.ingest.backends import latest_round, segment, start_round
from services.ingest.deps import Annotator, Anyone, Context, IngestContext, Reviewer, read_upload
from services.ingest.errors import ApiError, not_found
from services.ingest.queue import minutes_since_claim
from services.ingest.records import (
    Correction,
    annotated_ids,
    audited_read,
    clinical_volumes,
    image_blob,
    latest_prediction,
    predicted_ids,
    prediction_blob,
    record_annotation,
    required_prediction,
    revision_blob,
    revision_of,
    visible_volume,
)
from services.ingest.schemas import Strategy

router = APIRouter(tags=["MONAI Label compatibility"])

SEGMENTATION = "segmentation"  # the model that is serving now (sustainer once it exists)
STRATEGIES: dict[str, Strategy] = {
    "uncertainty": "uncertainty",
    "random": "random",
    "sequential": "sequential",
    "first": "sequential",
}
VERSION = metadata.version("ctloop")
# A training round's ctloop status as a MONAI Label task status (``retry``: it failed once
# and will run again).
ROUND_STATES: dict[str, str] = {
    RoundStatus.RUNNING: "RUNNING",
    RoundStatus.RETRY: "RUNNING",
    RoundStatus.PUBLISHED: "DONE",
    RoundStatus.REJECTED: "DONE",
}


def model_names(settings: Settings) -> dict[str, str]:
    """MONAI Label model name -> ctloop model ("": whichever serves now)."""
    svc = settings.services
    names = {SEGMENTATION: "", svc.igniter_model: svc.igniter_model}
    names[svc.sustainer_model] = svc.sustainer_model
    return names


def _known_model(settings: Settings, model: str) -> str:
    names = model_names(settings)
    if model not in names:
        raise not_found(f"model must be one of {', '.join(names)}", "unknown_model")
    return names[model]


def _params(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError("bad_params", f"params must be JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ApiError("bad_params", "params must be a JSON object")
    return value


def _nifti_response(data: bytes, name: str) -> Response:
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _multipart(params: dict[str, Any], filename: str, data: bytes) -> Response:
    """MONAI Label's infer answer: a ``params`` JSON part and the mask as a file part."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="params"\r\n'
        "Content-Type: application/json\r\n\r\n"
        f"{json.dumps(params)}\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return Response(body, media_type=f"multipart/form-data; boundary={boundary}")


def _stats(ctx: IngestContext, who: Principal) -> dict[str, Any]:
    with session_scope(ctx.db) as s:
        ids = [v.id for v, _ in clinical_volumes(s, who)]
        done, predicted = annotated_ids(s, ids), predicted_ids(s, ids)
    return {
        "total": len(ids),
        "completed": len(done),
        "label_tags": {"final": len(done), "original": len(predicted)},
    }


@router.get("/info/", summary="Server, labels, models, strategies (MONAI Label)")
def info(ctx: Context, who: Anyone) -> dict[str, Any]:
    svc = ctx.settings.services
    labels = {organ: ORGAN_IDS[organ] for organ in FOREGROUND}
    model = {"type": "segmentation", "dimension": 3, "labels": labels, "config": {}}
    return {
        "name": "ctloop",
        "description": "Multi-organ CT pre-annotation with an igniter/sustainer loop",
        "version": VERSION,
        "labels": list(FOREGROUND),
        "models": {
            name: {**model, "description": m or "the model serving now"}
            for name, m in model_names(ctx.settings).items()
        },
        "trainers": {
            name: {"description": f"a {name} round on your annotations", "config": {}}
            for name in (svc.sustainer_model, svc.igniter_model)
        },
        "strategies": {
            name: {"description": f"next task by {target}"} for name, target in STRATEGIES.items()
        },
        "scoring": {},
        "train_stats": {},
        "datastore": _stats(ctx, who),
    }


@router.get("/auth/", summary="Whether auth is on (MONAI Label)")
def auth_info() -> dict[str, Any]:
    return {"enabled": True, "client_id": "ctloop", "realm_uri": ""}


@router.post("/auth/token", summary="Exchange user id + API token for a bearer token")
def auth_token(
    ctx: Context,
    request: Request,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> dict[str, str]:
    who = ctx.auth.verify(password)
    # an OIDC user may give their user name (display name) or their id (``sub``)
    if who is None or username not in (who.user_id, who.name):
        address = request.client.host if request.client else "unknown"
        where = f"{request.method} {request.url.path}"
        ctx.auth_audit.failed(address, where, f"Bearer {password}", "bad_token")
        raise ApiError("unauthorized", "unknown user or token", 401)
    return {"access_token": password, "token_type": "bearer"}


@router.get("/auth/token/valid", summary="Whether the bearer token is valid")
def auth_token_valid(who: Anyone) -> dict[str, str]:
    return {"user": who.user_id}


@router.get("/datastore/", summary="Datastore of your sites' clinical volumes (MONAI Label)")
def datastore(
    ctx: Context,
    who: Anyone,
    output: Annotated[str, Query(pattern="^(stats|all|ids)$")] = "stats",
) -> Any:
    if output == "stats":
        return _stats(ctx, who)
    with session_scope(ctx.db) as s:
        vols = [(v.id, v.site_id, status, v.geometry) for v, status in clinical_volumes(s, who)]
        ids = [v[0] for v in vols]
        done, predicted = annotated_ids(s, ids), predicted_ids(s, ids)
    if output == "ids":
        return [v[0] for v in vols]
    objects = {}
    for vid, site, status, geometry in vols:
        # "original": the stored pre-annotation (Slicer loads it instead of running inference
        # again); "final": the latest annotation revision
        labels = {
            tag: {"ext": ".nii.gz", "info": {}}
            for tag, present in (("original", vid in predicted), ("final", vid in done))
            if present
        }
        shown: dict[str, Any] = {
            k: geometry[k] for k in ("shape", "spacing", "affine") if k in geometry
        }
        objects[vid] = {
            "image": {"ext": ".nii.gz", "info": {"site_id": site, "status": status, **shown}},
            "labels": labels,
        }
    return {"name": "ctloop", "description": "clinical volumes", "objects": objects}


@router.get("/datastore/image", summary="A stored volume as NIfTI (MONAI Label)")
def datastore_image(ctx: Context, who: Anyone, image: str) -> Response:
    data = audited_read(
        ctx, who, image, "volume.read", lambda s, v: image_blob(v), via="monailabel"
    )
    return _nifti_response(data, f"{image}.nii.gz")


@router.get("/datastore/label", summary="A volume's label: final (annotation) or original")
def datastore_label(ctx: Context, who: Anyone, label: str, tag: str = "final") -> Response:
    if tag == "original":
        action = "prediction.read"

        def pick(s: Session, v: Volume) -> Any:
            return prediction_blob(required_prediction(s, v.id, who))

    elif tag == "final":
        action = "annotation.read"

        def pick(s: Session, v: Volume) -> Any:
            return revision_blob(revision_of(s, v.id))

    else:
        with session_scope(ctx.db) as s:
            visible_volume(s, label, who)
        raise not_found("tag must be final or original", "unknown_tag")
    data = audited_read(ctx, who, label, action, pick, via="monailabel")
    return _nifti_response(data, f"{label}.nii.gz")


def _correction(ctx: IngestContext, image: str, who: Principal, raw: str | None) -> Correction:
    """What Slicer's ``params`` carry (label_info, organs, reviewed slices, minutes), with
    ctloop's defaults: fully corrected, minutes since the claim, from the latest prediction."""
    extra = _params(raw)
    try:
        label_map = LabelMap.canonical()
        if extra.get("label_info"):  # Slicer: [{"name": ..., "idx": ...}, ...]
            label_map = LabelMap({x["name"]: int(x["idx"]) for x in extra["label_info"]})
        partial = PartialLabel(
            organs=extra.get("organs", {}), reviewed_slices=extra.get("reviewed_slices")
        )
    except (KeyError, TypeError, ValueError, ValidationError, UnknownLabel) as exc:
        raise ApiError("bad_params", f"label_info / organs: {exc}") from exc
    minutes = extra.get("minutes")
    if not isinstance(minutes, int | float) or not 0 <= minutes <= 24 * 60:
        minutes = minutes_since_claim(ctx.db, image, who)
    with session_scope(ctx.db) as s:
        p = latest_prediction(s, image)
        origin = ModelRef(model=p.model, version=p.version) if p is not None else None
    return Correction(float(minutes), partial, origin, label_map)


@router.put("/datastore/label", summary="Save a label as a new annotation revision")
async def save_label(
    ctx: Context,
    who: Annotator,
    image: str,
    label: Annotated[UploadFile, File(description="label NIfTI on the volume's grid")],
    tag: str = "final",
    params: Annotated[str | None, Form()] = None,
) -> dict[str, Any]:
    if tag != "final":
        raise ApiError("unknown_tag", "labels are saved with tag final", 422)
    with session_scope(ctx.db) as s:
        visible_volume(s, image, who)
    correction = _correction(ctx, image, who, params)
    data = await read_upload(ctx, label, "label")
    out = record_annotation(ctx, who, image, data, correction)
    return {"image": image, "label": image, "tag": tag, "revision": out.revision}


@router.post("/activelearning/{strategy}", summary="Claim the next task (MONAI Label)")
def next_sample(
    ctx: Context, who: Annotator, strategy: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise not_found(f"strategy must be one of {', '.join(STRATEGIES)}", "unknown_strategy")
    task = ctx.queue.claim(who, STRATEGIES[strategy])
    if task is None:
        raise not_found("no task is waiting in your sites", "queue_empty")
    return {
        "id": task.volume_id,
        "name": f"{task.volume_id}.nii.gz",
        "strategy": strategy,
        "site_id": task.site_id,
        "expires_at": task.expires_at.isoformat(),
        "model": task.model,
        "version": task.version,
        "uncertainty": task.uncertainty,
    }


@router.post("/infer/{model}", summary="Segment a stored volume (MONAI Label)")
def infer(
    ctx: Context,
    who: Anyone,
    model: str,
    image: str = "",
    session_id: str = "",
    output: Annotated[str, Query(pattern="^(all|image|json)$")] = "all",
    params: Annotated[str | None, Form()] = None,
) -> Response:
    name = _known_model(ctx.settings, model)
    _params(params)
    if session_id:  # an image of a session (outside the loop): services.ingest.label_sessions
        row = label_sessions.owned(ctx, who, session_id, touch=True)
        data, made = label_sessions.segmented(ctx, row, name)
        with session_scope(ctx.db) as s:
            audit(
                s, who.user_id, "session.segment", session_id, site_id=row.site_id, via="monailabel"
            )
        image = session_id
        model_ref = (made["model"], made["version"], made["uncertainty"], made["seconds"])
    elif not image:
        raise ApiError("image_required", "name a stored volume (image) or a session (session_id)")
    else:
        with session_scope(ctx.db) as s:
            site = visible_volume(s, image, who).site_id
        reply = segment(ctx.backends, image, site, name)
        data = ctx.store.get_bytes(reply.mask.bucket, reply.mask.key)
        with session_scope(ctx.db) as s:
            audit(s, who.user_id, "prediction.read", image, site_id=site, via="monailabel")
        model_ref = (reply.model.model, reply.model.version, reply.uncertainty, reply.seconds)
    result = {
        "model": model_ref[0],
        "version": model_ref[1],
        "uncertainty": model_ref[2],
        "seconds": model_ref[3],
        "label_names": {organ: ORGAN_IDS[organ] for organ in FOREGROUND},
    }
    if output == "json":
        return JSONResponse(result)
    if output == "image":
        return _nifti_response(data, f"{image}.nii.gz")
    return _multipart(result, f"{image}.nii.gz", data)


def _task(round_: training_pb2.Round) -> dict[str, Any]:
    """A training round as MONAI Label's task."""
    return {
        "id": f"round-{round_.round}",
        "type": "train",
        "status": ROUND_STATES.get(round_.status, "ERROR"),
        "round": round_.round,
        "model": round_.model,
        "ctloop_status": round_.status,
        "version": round_.version or None,
        "volumes": len(round_.volumes),
        "result": {
            "candidate_dice": round_.candidate_dice,
            "serving_dice": round_.serving_dice,
            "reason": round_.reason,
        },
    }


@router.post("/train/", summary="Start a training round (MONAI Label)")
@router.post("/train/{model}", summary="Start a training round of a model (MONAI Label)")
def train_start(
    ctx: Context, who: Reviewer, model: str | None = None, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    name = _known_model(ctx.settings, model) if model is not None else ""
    started = start_round(ctx.backends, name)
    with session_scope(ctx.db) as s:
        audit(s, who.user_id, "training.start", f"round-{started.round}", model=started.model)
    return _task(started)


@router.get("/train/", summary="The latest training round as a MONAI Label task")
def train_status(ctx: Context, who: Anyone, check_if_running: bool = False) -> dict[str, Any]:
    latest = latest_round(ctx.backends)
    if check_if_running and (
        latest is None or latest.status not in (RoundStatus.RUNNING, RoundStatus.RETRY)
    ):
        raise not_found("no training round is running", "not_running")
    if latest is None:
        raise not_found("no training round has run yet", "no_rounds")
    return _task(latest)


@router.delete("/train/", summary="Stopping a round is not supported")
def train_stop(who: Reviewer) -> None:
    raise ApiError(
        "cannot_stop", "a ctloop round runs to its end; a rejected candidate is not served", 409
    )
