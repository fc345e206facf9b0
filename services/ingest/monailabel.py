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
``POST /infer/{model}``       the inference service's ``Segment`` (gRPC) for a stored volume
``POST /train/{model}``       the training service's ``StartRound`` (gRPC); reviewers, admins
``GET /train/``               the latest training round as a MONAI Label task
============================  ===========================================================

Authentication, roles, site isolation and the audit log are the same as on ``/v1``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from importlib import metadata
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, select

from ctloop.auth import Principal
from ctloop.contracts.payloads import ModelRef
from ctloop.core.organs import FOREGROUND, ORGAN_IDS, LabelMap, UnknownLabel
from ctloop.core.partial import PartialLabel
from ctloop.db import AnnotationRevision, AuditEntry, Prediction, Volume, audit, session_scope
from ctloop.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services.ingest.admin import Auth
from services.ingest.queue import Strategy, WorkQueue
from services.ingest.validation import UploadRejected

SEGMENTATION = "segmentation"  # the model that is serving now (sustainer once it exists)
STRATEGIES: dict[str, Strategy] = {
    "uncertainty": "uncertainty",
    "random": "random",
    "sequential": "sequential",
    "first": "sequential",
}
GRPC_TIMEOUT_S = 600.0
VERSION = metadata.version("ctloop")


class Backends:
    """gRPC clients of the inference and training services, dialled on first use."""

    def __init__(self, inference_target: str, training_target: str) -> None:
        self._targets = {"inference": inference_target, "training": training_target}
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            self._channels[name] = grpc.insecure_channel(self._targets[name])
        return self._channels[name]

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self._channel("inference"))

    @property
    def training(self) -> training_pb2_grpc.TrainingStub:
        return training_pb2_grpc.TrainingStub(self._channel("training"))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def _rpc_error(service: str, exc: grpc.RpcError) -> UploadRejected:
    code, detail = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return UploadRejected("not_found", detail, 404)
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        return UploadRejected("not_possible_now", detail, 409)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UploadRejected("bad_request", detail, 422)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UploadRejected("unavailable", f"the {service} service is not answering", 503)
    return UploadRejected("backend_error", f"{service}: {code.name} {detail}", 502)


def _params(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise UploadRejected("bad_params", f"params must be JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UploadRejected("bad_params", "params must be a JSON object")
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


def monailabel_router(ingest: Any, auth: Auth, queue: WorkQueue, backends: Backends) -> APIRouter:
    # Imported here: app.py imports this module to mount the router.
    from services.ingest.app import (
        _get_volume,
        _latest_prediction,
        latest_prediction,
        record_annotation,
    )

    r = APIRouter(tags=["MONAI Label compatibility"])
    anyone = auth.require("admin", "reviewer", "annotator", "integration")
    annotator = auth.require("admin", "reviewer", "annotator")
    trainer = auth.require("admin", "reviewer")
    svc = ingest.settings.services
    model_names = {SEGMENTATION: "", svc.igniter_model: svc.igniter_model}
    model_names[svc.sustainer_model] = svc.sustainer_model

    def clinical(who: Principal) -> Any:
        q = select(Volume).where(Volume.dataset == "clinical").order_by(Volume.created_at)
        return q if who.is_admin else q.where(Volume.site_id.in_(who.sites))

    def annotated_ids(s: Any, ids: list[str]) -> set[str]:
        rows = s.scalars(
            select(AnnotationRevision.volume_id).where(AnnotationRevision.volume_id.in_(ids))
        )
        return set(rows)

    def stats(who: Principal) -> dict[str, Any]:
        with session_scope(ingest.db) as s:
            ids = [v.id for v in s.scalars(clinical(who))]
            done = annotated_ids(s, ids)
            predicted = set(
                s.scalars(select(Prediction.volume_id).where(Prediction.volume_id.in_(ids)))
            )
        return {
            "total": len(ids),
            "completed": len(done),
            "label_tags": {"final": len(done), "original": len(predicted)},
        }

    @r.get("/info/", summary="Server, labels, models, strategies (MONAI Label)")
    def info(who: Principal = Depends(anyone)) -> dict[str, Any]:
        labels = {organ: ORGAN_IDS[organ] for organ in FOREGROUND}
        model = {"type": "segmentation", "dimension": 3, "labels": labels, "config": {}}
        return {
            "name": "ctloop",
            "description": "Multi-organ CT pre-annotation with an igniter/sustainer loop",
            "version": VERSION,
            "labels": list(FOREGROUND),
            "models": {
                name: {**model, "description": m or "the model serving now"}
                for name, m in model_names.items()
            },
            "trainers": {
                name: {"description": f"a {name} round on your annotations", "config": {}}
                for name in (svc.sustainer_model, svc.igniter_model)
            },
            "strategies": {
                name: {"description": f"next task by {target}"}
                for name, target in STRATEGIES.items()
            },
            "scoring": {},
            "train_stats": {},
            "datastore": stats(who),
        }

    @r.get("/auth/", summary="Whether auth is on (MONAI Label)")
    def auth_info() -> dict[str, Any]:
        return {"enabled": True, "client_id": "ctloop", "realm_uri": ""}

    @r.post("/auth/token", summary="Exchange user id + API token for a bearer token")
    def auth_token(
        username: Annotated[str, Form()], password: Annotated[str, Form()]
    ) -> dict[str, str]:
        who = auth.verify(password)
        if who is None or who.user_id != username:
            raise UploadRejected("unauthorized", "unknown user or token", 401)
        return {"access_token": password, "token_type": "bearer"}

    @r.get("/auth/token/valid", summary="Whether the bearer token is valid")
    def auth_token_valid(who: Principal = Depends(anyone)) -> dict[str, str]:
        return {"user": who.user_id}

    @r.get("/datastore/", summary="Datastore of your sites' clinical volumes (MONAI Label)")
    def datastore(
        output: Annotated[str, Query(pattern="^(stats|all|ids)$")] = "stats",
        who: Principal = Depends(anyone),
    ) -> Any:
        if output == "stats":
            return stats(who)
        with session_scope(ingest.db) as s:
            vols = [(v.id, v.site_id, v.status, v.geometry) for v in s.scalars(clinical(who))]
            done = annotated_ids(s, [v[0] for v in vols])
        if output == "ids":
            return [v[0] for v in vols]
        objects = {}
        for vid, site, status, geometry in vols:
            labels = {"final": {"ext": ".nii.gz", "info": {}}} if vid in done else {}
            objects[vid] = {
                "image": {
                    "ext": ".nii.gz",
                    "info": {"site_id": site, "status": status, **geometry},
                },
                "labels": labels,
            }
        return {"name": "ctloop", "description": "clinical volumes", "objects": objects}

    @r.get("/datastore/image", summary="A stored volume as NIfTI (MONAI Label)")
    def datastore_image(image: str, who: Principal = Depends(anyone)) -> Response:
        with session_scope(ingest.db) as s:
            v = _get_volume(s, image, who)
            key, version = v.s3_key, v.s3_version_id
            audit(s, who.user_id, "volume.read", image, site_id=v.site_id, via="monailabel")
        return _nifti_response(
            ingest.store.get_bytes(ingest.bucket, key, version), f"{image}.nii.gz"
        )

    @r.get("/datastore/label", summary="A volume's label: final (annotation) or original")
    def datastore_label(
        label: str, tag: str = "final", who: Principal = Depends(anyone)
    ) -> Response:
        with session_scope(ingest.db) as s:
            v = _get_volume(s, label, who)
            if tag == "original":
                p = _latest_prediction(s, label, who)
                key, version = p.s3_key, None
                action = "prediction.read"
            elif tag == "final":
                row = s.scalars(
                    select(AnnotationRevision)
                    .where(AnnotationRevision.volume_id == label)
                    .order_by(AnnotationRevision.revision.desc())
                    .limit(1)
                ).first()
                if row is None:
                    raise UploadRejected("no_label", f"{label} has no annotation yet", 404)
                key, version = row.s3_key, row.detail.get("s3_version_id")
                action = "annotation.read"
            else:
                raise UploadRejected("unknown_tag", "tag must be final or original", 404)
            audit(s, who.user_id, action, label, site_id=v.site_id, via="monailabel")
        return _nifti_response(
            ingest.store.get_bytes(ingest.bucket, key, version), f"{label}.nii.gz"
        )

    @r.put("/datastore/label", summary="Save a label as a new annotation revision")
    async def save_label(
        image: str,
        label: Annotated[UploadFile, File(description="label NIfTI on the volume's grid")],
        tag: str = "final",
        params: Annotated[str | None, Form()] = None,
        who: Principal = Depends(annotator),
    ) -> dict[str, Any]:
        if tag != "final":
            raise UploadRejected("unknown_tag", "labels are saved with tag final", 422)
        with session_scope(ingest.db) as s:
            _get_volume(s, image, who)
        extra = _params(params)
        try:
            label_map = LabelMap.canonical()
            if extra.get("label_info"):  # Slicer: [{"name": ..., "idx": ...}, ...]
                label_map = LabelMap({x["name"]: int(x["idx"]) for x in extra["label_info"]})
            partial = PartialLabel(
                organs=extra.get("organs", {}), reviewed_slices=extra.get("reviewed_slices")
            )
        except (KeyError, TypeError, ValueError, ValidationError, UnknownLabel) as exc:
            raise UploadRejected("bad_params", f"label_info / organs: {exc}") from exc
        minutes = extra.get("minutes")
        if not isinstance(minutes, int | float) or not 0 <= minutes <= 24 * 60:
            minutes = minutes_since_claim(image, who)
        with session_scope(ingest.db) as s:
            p = latest_prediction(s, image)
            origin = ModelRef(model=p.model, version=p.version) if p is not None else None
        data = await ingest.read_upload(label, "label")
        out = record_annotation(
            ingest, who, image, data, float(minutes), partial, origin, label_map
        )
        return {"image": image, "label": image, "tag": tag, "revision": out.revision}

    def minutes_since_claim(volume_id: str, who: Principal) -> float:
        with session_scope(ingest.db) as s:
            since = s.scalar(
                select(func.max(AuditEntry.at)).where(
                    AuditEntry.action == "task.claim",
                    AuditEntry.resource == volume_id,
                    AuditEntry.actor == who.user_id,
                )
            )
        if since is None:
            return 0.0
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        return round(min((datetime.now(UTC) - since).total_seconds() / 60.0, 24 * 60.0), 2)

    @r.post("/activelearning/{strategy}", summary="Claim the next task (MONAI Label)")
    def next_sample(
        strategy: str, body: dict[str, Any] | None = None, who: Principal = Depends(annotator)
    ) -> dict[str, Any]:
        if strategy not in STRATEGIES:
            raise UploadRejected(
                "unknown_strategy", f"strategy must be one of {', '.join(STRATEGIES)}", 404
            )
        task = queue.claim(who, STRATEGIES[strategy])
        if task is None:
            raise UploadRejected("queue_empty", "no task is waiting in your sites", 404)
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

    @r.post("/infer/{model}", summary="Segment a stored volume (MONAI Label)")
    def infer(
        model: str,
        image: str,
        output: Annotated[str, Query(pattern="^(all|image|json)$")] = "all",
        params: Annotated[str | None, Form()] = None,
        who: Principal = Depends(anyone),
    ) -> Response:
        if model not in model_names:
            raise UploadRejected(
                "unknown_model", f"model must be one of {', '.join(model_names)}", 404
            )
        _params(params)
        with session_scope(ingest.db) as s:
            v = _get_volume(s, image, who)
            site = v.site_id
        name = model_names[model]
        ref = common_pb2.ModelVersionRef()
        try:
            if name:
                status = backends.inference.GetModelStatus(
                    inference_pb2.GetModelStatusRequest(model=name), timeout=30
                )
                if status.serving.model != name:
                    serving = status.serving.model or "none yet"
                    raise UploadRejected(
                        "not_serving", f"{name} is not serving (serving: {serving})", 409
                    )
                ref = status.serving
            reply = backends.inference.Segment(
                inference_pb2.SegmentRequest(
                    volume=common_pb2.VolumeRef(volume_id=image, site_id=site), model=ref
                ),
                timeout=GRPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise _rpc_error("inference", exc) from exc
        data = ingest.store.get_bytes(reply.mask.bucket, reply.mask.key)
        with session_scope(ingest.db) as s:
            audit(s, who.user_id, "prediction.read", image, site_id=site, via="monailabel")
        result = {
            "model": reply.model.model,
            "version": reply.model.version,
            "uncertainty": reply.uncertainty,
            "seconds": reply.seconds,
            "label_names": {organ: ORGAN_IDS[organ] for organ in FOREGROUND},
        }
        if output == "json":
            return JSONResponse(result)
        if output == "image":
            return _nifti_response(data, f"{image}.nii.gz")
        return _multipart(result, f"{image}.nii.gz", data)

    def task(round_: training_pb2.Round) -> dict[str, Any]:
        # ``retry``: the round failed once and will run again.
        state = {"running": "RUNNING", "retry": "RUNNING", "published": "DONE", "rejected": "DONE"}
        return {
            "id": f"round-{round_.round}",
            "type": "train",
            "status": state.get(round_.status, "ERROR"),
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

    @r.post("/train/", summary="Start a training round (MONAI Label)")
    @r.post("/train/{model}", summary="Start a training round of a model (MONAI Label)")
    def train_start(
        model: str | None = None,
        body: dict[str, Any] | None = None,
        who: Principal = Depends(trainer),
    ) -> dict[str, Any]:
        if model is not None and model not in model_names:
            raise UploadRejected(
                "unknown_model", f"model must be one of {', '.join(model_names)}", 404
            )
        try:
            started = backends.training.StartRound(
                training_pb2.StartRoundRequest(model=model_names.get(model or "", "")),
                timeout=60,
            )
        except grpc.RpcError as exc:
            raise _rpc_error("training", exc) from exc
        with session_scope(ingest.db) as s:
            audit(s, who.user_id, "training.start", f"round-{started.round}", model=started.model)
        return task(started)

    @r.get("/train/", summary="The latest training round as a MONAI Label task")
    def train_status(
        check_if_running: bool = False, who: Principal = Depends(anyone)
    ) -> dict[str, Any]:
        try:
            rounds = backends.training.ListRounds(training_pb2.ListRoundsRequest(), timeout=30)
        except grpc.RpcError as exc:
            raise _rpc_error("training", exc) from exc
        latest = max(rounds.rounds, key=lambda x: x.round, default=None)
        if check_if_running and (latest is None or latest.status not in ("running", "retry")):
            raise UploadRejected("not_running", "no training round is running", 404)
        if latest is None:
            raise UploadRejected("no_rounds", "no training round has run yet", 404)
        return task(latest)

    @r.delete("/train/", summary="Stopping a round is not supported")
    def train_stop(request: Request, who: Principal = Depends(trainer)) -> None:
        raise UploadRejected(
            "cannot_stop", "a ctloop round runs to its end; a rejected candidate is not served", 409
        )

    return r
