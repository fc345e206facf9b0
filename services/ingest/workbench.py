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
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import nibabel as nib
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from numpy.typing import NDArray
from pydantic import BaseModel, Field
from sqlalchemy import select

from ctloop.auth import ROLES, Principal
from ctloop.core.datasets import gzip_bytes, nifti_from_gz
from ctloop.core.organs import ORGANS
from ctloop.db import AnnotationRevision, Lease, ServingModel, Volume, audit, session_scope
from ctloop.db import waiting_for_annotation as waiting_query
from ctloop.log import bind
from services.ingest.admin import Auth
from services.ingest.queue import WorkQueue
from services.ingest.validation import UploadRejected

if TYPE_CHECKING:
    from services.ingest.app import Ingest

log = logging.getLogger("ctloop.ingest.workbench")

WEB_DIR = Path(__file__).with_name("web")
_WEB_FILE = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg)$")
_MEDIA = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}


def page_headers(oidc_issuer: str | None) -> dict[str, str]:
    """The page loads nothing from elsewhere and runs no inline script; it talks to ctloop and,
    with OIDC sign-in, to the issuer (discovery, token and refresh requests)."""
    connect = "'self'"
    if oidc_issuer:
        origin = urlsplit(oidc_issuer)
        connect += f" {origin.scheme}://{origin.netloc}"
    return {
        "Content-Security-Policy": (
            f"default-src 'self'; img-src 'self' data: blob:; connect-src {connect}; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


# Decoded volumes kept in this process for slicing: a 512x512x300 int16 CT is 150 MB.
VOLUME_CACHE_BYTES = 1 << 30
# Scrolling reads hundreds of planes; one audit entry per user and volume per period says it.
SLICE_AUDIT_PERIOD_S = 600.0
METRICS_TIMEOUT_S = 5.0
# Overlay colours (RGB), one per canonical organ id; index 0 (background) is never drawn.
ORGAN_COLOURS: dict[str, str] = {
    "liver": "#d2553c",
    "spleen": "#8e5ec8",
    "kidney_right": "#e8c547",
    "kidney_left": "#c9a227",
    "stomach": "#4aa3df",
    "pancreas": "#f08fc0",
    "gallbladder": "#4cbf73",
    "aorta": "#e23b3b",
    "ivc": "#3b6fe2",
}
VIEW_NAMES = ("axial", "coronal", "sagittal")


class ViewOut(BaseModel):
    """How one view shows the volume: the plane at ``index`` along voxel axis ``axis``; screen
    rows run along voxel axis ``rows`` (reversed when ``flip_rows``), columns along ``cols``."""

    axis: int
    rows: int
    cols: int
    flip_rows: bool
    flip_cols: bool
    row_mm: float
    col_mm: float
    size: int = Field(description="number of planes along axis")


class OidcClientOut(BaseModel):
    issuer: str
    client_id: str
    scope: str


class WorkbenchConfigOut(BaseModel):
    oidc: OidcClientOut | None = Field(
        description="sign in at this issuer (authorization code + PKCE); null: tokens only"
    )


class OrganOut(BaseModel):
    id: int
    name: str
    colour: str


class LabelSourceOut(BaseModel):
    kind: str = Field(description="prediction | revision | none")
    model: str | None = None
    version: int | None = None
    revision: int | None = None


class ViewerOut(BaseModel):
    volume_id: str
    site_id: str
    dataset: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    views: dict[str, ViewOut]
    intensity: tuple[int, int]
    organs: list[OrganOut]
    labels: LabelSourceOut
    revisions: int
    lease_holder: str | None
    lease_expires_at: datetime | None
    reviewed_axis: int = Field(
        default=2, description="the axis reviewed_slices count along (the volume's 3rd)"
    )


class TaskRow(BaseModel):
    volume_id: str
    site_id: str
    model: str | None = None
    version: int | None = None
    uncertainty: float | None = None
    expires_at: datetime | None = None
    leased: bool = False


class TasksOut(BaseModel):
    user: str
    role: str
    sites: list[str]
    mine: list[TaskRow]
    waiting: list[TaskRow]


class QueueSize(BaseModel):
    site_id: str
    waiting: int
    leased: int
    annotated: int


class DashboardOut(BaseModel):
    report: dict[str, Any] | None
    metrics_error: str | None = None
    serving: list[dict[str, Any]]
    current_model: dict[str, Any] | None
    queues: list[QueueSize]


def display_views(affine: NDArray[np.float64], shape: tuple[int, int, int]) -> dict[str, ViewOut]:
    """Axial, coronal and sagittal views in the radiological convention: the patient's right on
    the screen's left, anterior (axial) or superior (coronal, sagittal) at the top, anterior on
    the left of the sagittal view. Works for any axis order the volume was stored in."""
    codes = nib.aff2axcodes(affine)
    axis: dict[str, int] = {}
    towards: dict[str, bool] = {}  # index grows towards R / A / S
    for ax, code in enumerate(codes):
        world = {"R": "x", "L": "x", "A": "y", "P": "y", "S": "z", "I": "z"}[str(code)]
        axis[world], towards[world] = ax, code in ("R", "A", "S")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    layout = {  # view: (slice, rows, cols); a row or column is reversed when its index grows
        "axial": ("z", "y", "x"),  # towards what the screen shows at its top / left
        "coronal": ("y", "z", "x"),
        "sagittal": ("x", "z", "y"),
    }
    views = {}
    for name, (s, r, c) in layout.items():
        views[name] = ViewOut(
            axis=axis[s],
            rows=axis[r],
            cols=axis[c],
            flip_rows=towards[r],
            flip_cols=towards[c],
            row_mm=float(spacing[axis[r]]),
            col_mm=float(spacing[axis[c]]),
            size=shape[axis[s]],
        )
    return views


class VolumeCache:
    """Decoded volumes (int16) by S3 key and version, least recently used dropped first."""

    def __init__(self, budget_bytes: int = VOLUME_CACHE_BYTES) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[tuple[str, str | None], NDArray[np.int16]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ingest: Ingest, key: str, version: str | None) -> NDArray[np.int16]:
        with self._lock:
            hit = self._items.get((key, version))
            if hit is not None:
                self._items.move_to_end((key, version))
                return hit
        raw = ingest.store.get_bytes(ingest.bucket, key, version)
        data = np.asarray(nifti_from_gz(raw).dataobj)
        if data.dtype != np.int16:
            data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
        with self._lock:
            self._items[(key, version)] = data
            while len(self._items) > 1 and sum(a.nbytes for a in self._items.values()) > (
                self.budget
            ):
                self._items.popitem(last=False)
        return data


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


def workbench_router(ingest: Ingest, auth: Auth, queue: WorkQueue) -> APIRouter:
    from services.ingest.app import _get_volume, _latest_prediction

    r = APIRouter(tags=["workbench"])
    anyone = auth.require(*ROLES)
    worker = auth.require("admin", "reviewer", "annotator")
    cache = VolumeCache()
    auth_cfg = ingest.settings.auth
    headers = page_headers(auth_cfg.oidc_issuer if auth_cfg.oidc_client_id else None)
    audited: dict[tuple[str, str], float] = {}
    audited_lock = threading.Lock()

    # ------------------------------------------------------------------ the page
    @r.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @r.get("/ui/", include_in_schema=False)
    @r.get("/ui/{name}", include_in_schema=False)
    def ui_file(name: str = "index.html") -> FileResponse:
        match = _WEB_FILE.match(name)
        path = WEB_DIR / name
        if match is None or not path.is_file():
            raise HTTPException(404, detail={"code": "not_found", "message": f"no page {name}"})
        return FileResponse(path, media_type=_MEDIA[match.group(1)], headers=headers)

    @r.get("/v1/workbench/config", response_model=WorkbenchConfigOut)
    def config() -> WorkbenchConfigOut:
        """What the page needs before anyone signs in: the OIDC provider to send annotators to
        (null: sign in with a pasted token). Public, like the issuer's own discovery document."""
        cfg = ingest.settings.auth
        if not (cfg.oidc_issuer and cfg.oidc_client_id):
            return WorkbenchConfigOut(oidc=None)
        return WorkbenchConfigOut(
            oidc=OidcClientOut(
                issuer=cfg.oidc_issuer, client_id=cfg.oidc_client_id, scope=cfg.oidc_scope
            )
        )

    # ------------------------------------------------------------------ tasks
    @r.get("/v1/workbench/tasks", response_model=TasksOut)
    def tasks(who: Principal = Depends(worker)) -> TasksOut:
        """Your unexpired leases, and the tasks waiting in your sites in the order the queue
        hands them out (``POST /v1/tasks/next`` claims the first free one)."""
        now = datetime.now(UTC)
        with session_scope(ingest.db) as s:
            leases = {
                x.volume_id: (x.holder, x.expires_at)
                for x in s.scalars(select(Lease))
                if _aware(x.expires_at) > now
            }
        waiting = queue.candidates(who, queue.strategy)
        rows = {
            c.volume_id: TaskRow(
                volume_id=c.volume_id,
                site_id=c.site_id,
                model=c.model,
                version=c.version,
                uncertainty=c.uncertainty,
                leased=c.volume_id in leases,
            )
            for c in waiting
        }
        mine = []
        for vid, (holder, until) in leases.items():
            if holder == who.user_id and vid in rows:
                mine.append(rows[vid].model_copy(update={"expires_at": until}))
        return TasksOut(
            user=who.user_id,
            role=who.role,
            sites=sorted(who.sites),
            mine=mine,
            waiting=list(rows.values())[:500],
        )

    # ------------------------------------------------------------------ the viewer's data
    def label_source(s: Any, v: Volume, who: Principal, revision: int | None) -> Any:
        """(key, version, LabelSourceOut) of the labels the viewer starts from: a given
        revision, else the latest pre-annotation, else none."""
        if revision is not None:
            row = s.scalars(
                select(AnnotationRevision).where(
                    AnnotationRevision.volume_id == v.id, AnnotationRevision.revision == revision
                )
            ).first()
            if row is None:
                raise UploadRejected("not_found", f"{v.id} has no revision {revision}", 404)
            source = LabelSourceOut(kind="revision", revision=revision)
            return row.s3_key, row.detail.get("s3_version_id"), source
        try:
            p = _latest_prediction(s, v.id, who)
        except HTTPException:
            return None, None, LabelSourceOut(kind="none")
        return p.s3_key, None, LabelSourceOut(kind="prediction", model=p.model, version=p.version)

    @r.get(
        "/v1/volumes/{volume_id}/viewer",
        response_model=ViewerOut,
        responses={404: {"description": "no such volume of yours"}},
    )
    def viewer(volume_id: str, who: Principal = Depends(anyone)) -> ViewerOut:
        with session_scope(ingest.db) as s:
            v = _get_volume(s, volume_id, who)
            key, version, site = v.s3_key, v.s3_version_id, v.site_id
            g, dataset = v.geometry, v.dataset
            _, _, source = label_source(s, v, who, None)
            revisions = len(
                s.scalars(
                    select(AnnotationRevision.id).where(AnnotationRevision.volume_id == volume_id)
                ).all()
            )
            lease = s.get(Lease, volume_id)
            holder = (
                (lease.holder, lease.expires_at)
                if lease is not None and _aware(lease.expires_at) > datetime.now(UTC)
                else (None, None)
            )
            audit(s, who.user_id, "volume.read", volume_id, site_id=site, via="workbench")
        image = cache.get(ingest, key, version)
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
            organs=[
                OrganOut(id=i, name=o, colour=ORGAN_COLOURS[o])
                for i, o in enumerate(ORGANS)
                if i > 0
            ],
            labels=source,
            revisions=revisions,
            lease_holder=holder[0],
            lease_expires_at=holder[1],
        )

    @r.get(
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
        volume_id: str, axis: int, index: int, request: Request, who: Principal = Depends(anyone)
    ) -> Response:
        """One plane of the CT: the plane ``index`` along voxel ``axis`` (0, 1, 2)."""
        with session_scope(ingest.db) as s:
            v = _get_volume(s, volume_id, who)
            key, version, site = v.s3_key, v.s3_version_id, v.site_id
            now = time.monotonic()
            with audited_lock:
                due = now - audited.get((who.user_id, volume_id), -1e9) > SLICE_AUDIT_PERIOD_S
                if due:
                    audited[(who.user_id, volume_id)] = now
            if due:
                audit(s, who.user_id, "volume.read", volume_id, site_id=site, form="slices")
        image = cache.get(ingest, key, version)
        if axis not in (0, 1, 2) or not 0 <= index < image.shape[axis]:
            raise UploadRejected(
                "out_of_range", f"no plane {index} along axis {axis} of {image.shape}", 404
            )
        plane = image[(slice(None),) * axis + (index,)]  # a view: np.take would copy it all
        return _gzip_response(
            plane.astype("<i2").tobytes(order="F"),
            request,
            {"X-Shape": _shape_header(plane.shape), "X-Dtype": "int16"},
        )

    @r.get(
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
        volume_id: str,
        request: Request,
        revision: int | None = None,
        who: Principal = Depends(anyone),
    ) -> Response:
        """The whole label volume the viewer edits: a revision, or the latest
        pre-annotation (404 ``no_prediction`` when there is none yet)."""
        with session_scope(ingest.db) as s:
            v = _get_volume(s, volume_id, who)
            key, version, source = label_source(s, v, who, revision)
            if key is None:
                raise UploadRejected("no_prediction", f"{volume_id} has no pre-annotation", 404)
            action = "annotation.read" if source.kind == "revision" else "prediction.read"
            audit(s, who.user_id, action, volume_id, site_id=v.site_id, via="workbench")
        raw = ingest.store.get_bytes(ingest.bucket, key, version)
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

    # ------------------------------------------------------------------ the dashboard
    svc = ingest.settings.services
    metrics_url = f"http://{svc.metrics.address or svc.host}:{svc.metrics.http_port}/v1/report"

    @r.get("/v1/workbench/dashboard", response_model=DashboardOut)
    def dashboard(who: Principal = Depends(anyone)) -> DashboardOut:
        """Dice and minutes per CT by round (the metrics service's report, this platform's
        igniter and sustainer), the serving models, and per site of yours: tasks waiting,
        leased, annotated."""
        report, error = None, None
        try:
            answer = httpx.get(metrics_url, timeout=METRICS_TIMEOUT_S)
            answer.raise_for_status()
            report = _this_platform(answer.json(), svc.igniter_model, svc.sustainer_model)
        except (httpx.HTTPError, ValueError) as exc:
            error = f"the metrics service did not answer: {exc}"
            log.warning("dashboard without metrics", extra={"error": str(exc)})
        now = datetime.now(UTC)
        sizes: dict[str, dict[str, int]] = {}
        with session_scope(ingest.db) as s:
            sites = {
                v.site_id
                for v in s.scalars(select(Volume).where(Volume.dataset == "clinical"))
                if who.may_see(v.site_id)
            }
            for site in sites:
                sizes[site] = {"waiting": 0, "leased": 0, "annotated": 0}
            leased = {x.volume_id for x in s.scalars(select(Lease)) if _aware(x.expires_at) > now}
            for row in s.execute(waiting_query()).all():
                if row.site_id in sizes:
                    sizes[row.site_id]["waiting"] += 1
                    sizes[row.site_id]["leased"] += row.id in leased
            for v in s.scalars(select(Volume).where(Volume.status == "annotated")):
                if v.site_id in sizes:
                    sizes[v.site_id]["annotated"] += 1
            serving = [
                {"model": m.model, "version": m.version, "since": m.updated_at}
                for m in s.scalars(select(ServingModel).order_by(ServingModel.model))
            ]
        names = (svc.sustainer_model, svc.igniter_model)
        current = next((m for n in names for m in serving if m["model"] == n), None)
        return DashboardOut(
            report=report,
            metrics_error=error,
            serving=serving,
            current_model=current,
            queues=[QueueSize(site_id=k, **v) for k, v in sorted(sizes.items())],
        )

    return r


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


def _aware(t: datetime) -> datetime:
    """SQLite hands datetimes back naive (they were stored as UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
