"""MONAI Label's batch inference, scoring and logs, mapped onto ctloop (the rest of its API:
:mod:`services.ingest.routers.monailabel` and :mod:`~.monailabel_datastore`).

==================================  =====================================================
MONAI Label                         ctloop
==================================  =====================================================
``POST /batch/infer/{model}``       a background task: the inference service's ``Segment``
                                    (which stores the pre-annotation) for each of your sites'
                                    clinical volumes in the loop (``images``: ``all``,
                                    ``unlabeled``: no annotation yet, ``labeled``); admins;
                                    429 while one runs
``GET /batch/infer``                the latest task (``all``: every task of this process,
                                    ``check_if_running``: 404 unless one runs)
``DELETE /batch/infer``             stops it after the volume in hand (admins)
``POST /scoring/uncertainty``       each of your volumes' stored pre-annotation uncertainty
                                    (mean entropy; what ``/activelearning/uncertainty``
                                    orders by): ctloop scores at inference, so this is done
                                    at once
``GET /scoring/``                   the latest scoring task
``GET /logs/?lines=N``              the ingest process's last N log lines (JSON lines; admins)
==================================  =====================================================

Tasks live in the ingest process that runs them (a restart forgets them; what they stored
stays): MONAI Label's own tasks are per server process too.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.db import session_scope
from ctloop.log import keep_recent_lines
from services.ingest.backends import segment
from services.ingest.background import Task
from services.ingest.deps import Admin, Annotator, Anyone, Context, IngestContext
from services.ingest.errors import ApiError, not_found
from services.ingest.records import annotated_ids, clinical_volumes, latest_prediction
from services.ingest.routers.monailabel import _known_model

router = APIRouter(tags=["MONAI Label compatibility"])

Images = Literal["all", "unlabeled", "labeled"]


def _volumes(ctx: IngestContext, who: Principal, images: Images) -> list[tuple[str, str]]:
    """(volume id, site) of the caller's clinical volumes in the loop that ``images`` asks for."""
    with session_scope(ctx.db) as s:
        vols = [(v.id, v.site_id) for v, _ in clinical_volumes(s, who)]
        labelled = annotated_ids(s, [v for v, _ in vols])
    if images == "unlabeled":
        return [v for v in vols if v[0] not in labelled]
    if images == "labeled":
        return [v for v in vols if v[0] in labelled]
    return vols


def _batch(ctx: IngestContext, task: Task, model: str, volumes: list[tuple[str, str]]) -> None:
    for volume_id, site in volumes:
        if task.stop.is_set():
            task.status = "STOPPED"
            break
        try:
            segment(ctx.backends, volume_id, site, model)
        except ApiError as exc:  # one volume's failure is reported, the rest go on
            task.failed[volume_id] = f"{exc.code}: {exc.message}"
        task.done += 1
    else:
        task.status = "DONE" if not task.failed else "ERROR"
    task.end_ts = time.time()


@router.post("/batch/infer/{model}", summary="Pre-annotate your volumes in the background")
def batch_infer(
    ctx: Context, who: Admin, model: str, images: Images = "all", body: dict[str, Any] | None = None
) -> dict[str, Any]:
    name = _known_model(ctx.settings, model)
    volumes = _volumes(ctx, who, images)
    task = ctx.background.add(Task("batch_infer", {"model": model, "images": images}))
    task.total = len(volumes)
    with session_scope(ctx.db) as s:
        audit(s, who.user_id, "batch_infer.start", task.id, model=model, images=images)
    threading.Thread(
        target=_batch, args=(ctx, task, name, volumes), name=f"batch-infer-{task.id}", daemon=True
    ).start()
    return task.view()


@router.get("/batch/infer", summary="The latest batch inference task (MONAI Label)")
@router.get("/scoring/", summary="The latest scoring task (MONAI Label)")
def task_status(
    request: Request, ctx: Context, who: Anyone, all: bool = False, check_if_running: bool = False
) -> Any:
    kind = "scoring" if request.url.path.startswith("/scoring") else "batch_infer"
    return ctx.background.answer(kind, all, check_if_running)


@router.delete("/batch/infer", summary="Stop the running batch inference (MONAI Label)")
def batch_infer_stop(ctx: Context, who: Admin) -> dict[str, Any]:
    running = ctx.background.running("batch_infer")
    if running is None:
        raise not_found("no batch_infer task is running", "not_running")
    running.stop.set()
    return running.view()


@router.post("/scoring/{method}", summary="Score your volumes (MONAI Label; uncertainty)")
def scoring(ctx: Context, who: Annotator, method: str) -> dict[str, Any]:
    if method != "uncertainty":
        raise not_found("scoring methods: uncertainty (computed at inference)", "unknown_method")
    task = ctx.background.add(Task("scoring", {"method": method}))
    ids = [v for v, _ in _volumes(ctx, who, "all")]
    with session_scope(ctx.db) as s:
        for vid in ids:
            p = latest_prediction(s, vid)
            if p is not None:
                task.result[vid] = {
                    "uncertainty": p.uncertainty,
                    "model": p.model,
                    "version": p.version,
                }
    task.total, task.done = len(ids), len(task.result)
    task.status, task.end_ts = "DONE", time.time()
    return task.view()


@router.get("/logs/", summary="The ingest process's last log lines (MONAI Label; admins)")
def logs(who: Admin, lines: Annotated[int, Query(ge=1, le=5000)] = 300) -> PlainTextResponse:
    recent = list(keep_recent_lines().lines)[-lines:]
    return PlainTextResponse("\n".join(recent) + ("\n" if recent else ""))
