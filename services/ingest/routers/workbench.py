"""The web annotation workbench: a browser page served by ingest, and the data it needs.

``/ui/`` serves the page (plain HTML, CSS and JS from ``web/``; no build step, nothing from a CDN)
and ``/ui/dashboard.html`` the round dashboard. The page signs in with a bearer token and then
speaks only to ``/v1`` on the same origin, under the same roles, site isolation and audit log:

==========================================  ==================================================
``GET /v1/workbench/tasks``                 your leased tasks and the waiting queue of your sites
``GET /v1/volumes/{id}/viewer``             what the viewer needs: grid, affine, how each view is
                                            oriented on screen, intensity range, the label source
``GET /v1/volumes/{id}/slices/{axis}/{i}``  one plane (int16 HU, gzip): the viewer fetches what it
                                            shows and prefetches neighbours, so a 512x512x300 CT
                                            scrolls without downloading 150 MB first
``GET /v1/volumes/{id}/labels``             the whole label volume (uint8, gzip; a few MB at most,
                                            labels compress well): the pre-annotation, or a
                                            revision; the page edits it and submits it through
                                            ``POST /v1/volumes/{id}/annotations`` as NIfTI
``GET /v1/workbench/dashboard``             the metrics service's report, the serving models and
                                            the queue sizes of your sites (one origin for the page)
==========================================  ==================================================

Planes and label volumes are in voxel order, first axis fastest (NIfTI's own order); the viewer
maps them onto the screen (radiological convention) with the ``views`` the viewer endpoint gives.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ctloop.audit_chain import audit
from ctloop.core.blobs import gzip_bytes, nifti_from_gz
from ctloop.core.organs import ORGANS
from ctloop.db import AnnotationRevision, ServingModel, Volume, session_scope
from ctloop.log import bind
from services.ingest.deps import Annotator, Anyone, Context, IngestContext
from services.ingest.errors import not_found
from services.ingest.queue import current_lease
from services.ingest.records import (
    Blob,
    latest_prediction,
    revision_blob,
    revision_of,
    visible_volume,
)
from services.ingest.schemas import (
    DashboardOut,
    LabelSourceOut,
    OidcClientOut,
    OrganOut,
    TasksOut,
    ViewerOut,
    WorkbenchConfigOut,
)
from services.ingest.viewer import ORGAN_COLOURS, display_views, page_headers

log = logging.getLogger("ctloop.ingest.workbench")
router = APIRouter(tags=["workbench"])

WEB_DIR = Path(__file__).parent.parent / "web"
_WEB_FILE = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg)$")
_MEDIA = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
METRICS_TIMEOUT_S = 5.0
ORGAN_LIST = [OrganOut(id=i, name=o, colour=ORGAN_COLOURS[o]) for i, o in enumerate(ORGANS) if i]


def _gzip_response(payload: bytes, request: Request, headers: dict[str, str]) -> Response:
    """Raw bytes, gzip-encoded on the wire when the client takes it (browsers always do: the
    decoding is theirs, the page gets the raw array). Patient data: never cached on disk."""
    headers = {**headers, "Cache-Control": "no-store"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        payload = gzip_bytes(payload)
        headers["Content-Encoding"] = "gzip"
    return Response(payload, media_type="application/octet-stream", headers=headers)


def _shape_header(shape: tuple[int, ...]) -> str:
    return ",".join(str(n) for n in shape)


# ---------------------------------------------------------------------- the page
@router.get("/ui", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/", include_in_schema=False)
@router.get("/ui/{name}", include_in_schema=False)
def ui_file(ctx: Context, name: str = "index.html") -> FileResponse:
    match = _WEB_FILE.match(name)
    path = WEB_DIR / name
    if match is None or not path.is_file():
        raise not_found(f"no page {name}")
    cfg = ctx.settings.auth
    headers = page_headers(cfg.oidc_issuer if cfg.oidc_client_id else None)
    return FileResponse(path, media_type=_MEDIA[match.group(1)], headers=headers)


@router.get("/v1/workbench/config", response_model=WorkbenchConfigOut)
def config(ctx: Context) -> WorkbenchConfigOut:
    """What the page needs before anyone signs in: the OIDC provider to send annotators to
    (null: sign in with a pasted token). Public, like the issuer's own discovery document."""
    cfg = ctx.settings.auth
    if not (cfg.oidc_issuer and cfg.oidc_client_id):
        return WorkbenchConfigOut(oidc=None)
    return WorkbenchConfigOut(
        oidc=OidcClientOut(
            issuer=cfg.oidc_issuer, client_id=cfg.oidc_client_id, scope=cfg.oidc_scope
        )
    )


@router.get("/v1/workbench/tasks", response_model=TasksOut)
def tasks(ctx: Context, who: Annotator) -> TasksOut:
    """Your unexpired leases, and the tasks waiting in your sites in the order the queue
    hands them out (``POST /v1/tasks/next`` claims the first free one)."""
    mine, waiting = ctx.queue.tasks(who)
    return TasksOut(
        user=who.user_id,
        name=who.name or who.user_id,
        role=who.role,
        sites=sorted(who.sites),
        mine=mine,
        waiting=waiting,
    )


# ---------------------------------------------------------------------- the viewer's data
def _label_source(
    s: Session, v: Volume, revision: int | None
) -> tuple[Blob | None, LabelSourceOut]:
    """The labels the viewer starts from: a given revision, else the latest pre-annotation,
    else none."""
    if revision is not None:
        row = revision_of(s, v.id, revision)
        return revision_blob(row), LabelSourceOut(kind="revision", revision=revision)
    p = latest_prediction(s, v.id)
    if p is None:
        return None, LabelSourceOut(kind="none")
    source = LabelSourceOut(kind="prediction", model=p.model, version=p.version)
    return Blob(p.s3_key, None), source


@router.get(
    "/v1/volumes/{volume_id}/viewer",
    response_model=ViewerOut,
    responses={404: {"description": "no such volume of yours"}},
)
def viewer(ctx: Context, who: Anyone, volume_id: str) -> ViewerOut:
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        key, version, site, g, dataset = v.s3_key, v.s3_version_id, v.site_id, v.geometry, v.dataset
        _, source = _label_source(s, v, None)
        revisions = s.scalar(
            select(func.count(AnnotationRevision.id)).where(
                AnnotationRevision.volume_id == volume_id
            )
        )
        lease = current_lease(s, volume_id)
        holder, until = (lease.holder, lease.expires_at) if lease else (None, None)
        audit(s, who.user_id, "volume.read", volume_id, site_id=site, via="workbench")
    image = ctx.volumes.get(ctx.store, ctx.bucket, key, version)
    shape = (g["shape"][0], g["shape"][1], g["shape"][2])
    affine = np.asarray(g["affine"], dtype=np.float64)
    step = max(1, round((image.size / 1e6) ** (1 / 3)))  # about a million voxels
    lo, hi = np.percentile(image[::step, ::step, ::step], [0.5, 99.5])
    with bind(volume_id=volume_id, site_id=site):
        log.info("viewer opened", extra={"user": who.user_id, "shape": shape})
    return ViewerOut(
        volume_id=volume_id,
        site_id=site,
        dataset=dataset,
        shape=shape,
        spacing=tuple(float(x) for x in g["spacing"]),  # type: ignore[arg-type]
        affine=affine.tolist(),
        views=display_views(affine, shape),
        intensity=(int(lo), int(hi)),
        organs=ORGAN_LIST,
        labels=source,
        revisions=revisions or 0,
        lease_holder=holder,
        lease_expires_at=until,
    )


@router.get(
    "/v1/volumes/{volume_id}/slices/{axis}/{index}",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "int16 little-endian plane, first remaining axis fastest; "
            "header X-Shape: n1,n2",
        }
    },
)
def get_slice(
    ctx: Context, who: Anyone, volume_id: str, axis: int, index: int, request: Request
) -> Response:
    """One plane of the CT: the plane ``index`` along voxel ``axis`` (0, 1, 2)."""
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        key, version, site = v.s3_key, v.s3_version_id, v.site_id
        if ctx.slice_reads.due(who.user_id, volume_id):
            audit(s, who.user_id, "volume.read", volume_id, site_id=site, form="slices")
    image = ctx.volumes.get(ctx.store, ctx.bucket, key, version)
    if axis not in (0, 1, 2) or not 0 <= index < image.shape[axis]:
        raise not_found(f"no plane {index} along axis {axis} of {image.shape}", "out_of_range")
    plane = image[(slice(None),) * axis + (index,)]  # a view: np.take would copy it all
    return _gzip_response(
        plane.astype("<i2").tobytes(order="F"),
        request,
        {"X-Shape": _shape_header(plane.shape), "X-Dtype": "int16"},
    )


@router.get(
    "/v1/volumes/{volume_id}/labels",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "uint8 label volume, first axis fastest; header X-Shape",
        }
    },
)
def get_labels(
    ctx: Context, who: Anyone, volume_id: str, request: Request, revision: int | None = None
) -> Response:
    """The whole label volume the viewer edits: a revision, or the latest
    pre-annotation (404 ``no_prediction`` when there is none yet)."""
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        blob, source = _label_source(s, v, revision)
        if blob is None:
            raise not_found(f"{volume_id} has no pre-annotation", "no_prediction")
        action = "annotation.read" if source.kind == "revision" else "prediction.read"
        audit(s, who.user_id, action, volume_id, site_id=v.site_id, via="workbench")
    raw = ctx.store.get_bytes(ctx.bucket, blob.key, blob.version)
    mask = np.asarray(nifti_from_gz(raw).dataobj, np.uint8)
    origin = f"{source.model}:{source.version}" if source.kind == "prediction" else ""
    return _gzip_response(
        mask.tobytes(order="F"),
        request,
        {
            "X-Shape": _shape_header(mask.shape),
            "X-Dtype": "uint8",
            "X-Label-Source": source.kind,
            "X-From-Model": origin,
            "X-Revision": str(source.revision or ""),
        },
    )


# ---------------------------------------------------------------------- the dashboard
def _metrics_report(ctx: IngestContext) -> tuple[dict[str, Any] | None, str | None]:
    """(the metrics service's report of this platform's models, or the error reaching it)."""
    svc = ctx.settings.services
    url = f"http://{svc.metrics.address or svc.host}:{svc.metrics.http_port}/v1/report"
    try:
        answer = httpx.get(url, timeout=METRICS_TIMEOUT_S)
        answer.raise_for_status()
        return _this_platform(answer.json(), svc.igniter_model, svc.sustainer_model), None
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("dashboard without metrics", extra={"error": str(exc)})
        return None, f"the metrics service did not answer: {exc}"


def _this_platform(report: dict[str, Any], igniter: str, sustainer: str) -> dict[str, Any]:
    """The report's rounds and evaluations of this platform's two models (a metrics service
    reads every event on the broker, other platform instances' too), each with its role."""
    roles = {igniter: "igniter", sustainer: "sustainer"}
    out = dict(report)
    for part in ("rounds", "evaluation"):
        out[part] = [
            {**x, "role": roles[x["model"]]} for x in report.get(part, []) if x["model"] in roles
        ]
    return out


@router.get("/v1/workbench/dashboard", response_model=DashboardOut)
def dashboard(ctx: Context, who: Anyone) -> DashboardOut:
    """Dice and minutes per CT by round (the metrics service's report, this platform's
    igniter and sustainer), the serving models, and per site of yours: tasks waiting,
    leased, annotated."""
    report, error = _metrics_report(ctx)
    with session_scope(ctx.db) as s:
        serving = [
            {"model": m.model, "version": m.version, "since": m.updated_at}
            for m in s.scalars(select(ServingModel).order_by(ServingModel.model))
        ]
    svc = ctx.settings.services
    names = (svc.sustainer_model, svc.igniter_model)
    current = next((m for n in names for m in serving if m["model"] == n), None)
    return DashboardOut(
        report=report,
        metrics_error=error,
        serving=serving,
        current_model=current,
        queues=ctx.queue.sizes(who),
    )
