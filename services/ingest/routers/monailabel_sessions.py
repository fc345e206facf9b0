"""MONAI Label's sessions, mapped onto ctloop (:mod:`services.ingest.label_sessions`).

============================  ===========================================================
MONAI Label                   ctloop
============================  ===========================================================
``PUT /session/``             one CT (NIfTI, or a zip of one DICOM series) checked as an
                              upload is, kept (``volumes/_sessions/``) ``expiry`` seconds
                              after its last use (0: the default, capped by the setting);
                              never a volume of the loop. Annotators, reviewers, admins;
                              ``site_id`` (form) names the site when you have several
``GET /session/{id}``         its ``SessionInfo`` (``image=true``: the stored CT as NIfTI;
                              ``update_ts=true`` renews its expiry)
``DELETE /session/{id}``      ends it now: image and masks removed, every version
``POST /infer/{m}?session_id``  the session's image segmented by the serving model
============================  ===========================================================

A session is its owner's (and their sites' admins'): anyone else gets 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from services.ingest import label_sessions
from services.ingest.deps import Annotator, Anyone, Context, read_upload
from services.ingest.errors import ApiError
from services.ingest.routers.monailabel_datastore import _upload_site

router = APIRouter(tags=["MONAI Label compatibility"])


@router.put("/session/", summary="Open a session with a CT outside the loop (MONAI Label)")
async def create_session(
    ctx: Context,
    who: Annotator,
    files: Annotated[list[UploadFile], File(description="one CT: NIfTI or a DICOM series zip")],
    uncompress: bool = False,
    expiry: int = 0,
    site_id: Annotated[str | None, Form()] = None,
) -> dict[str, Any]:
    """MONAI Label's ``uncompress`` is accepted: a zip is always read as one DICOM series."""
    del uncompress
    if len(files) != 1:
        raise ApiError("one_file", "a session holds one CT: one NIfTI file or one zip of a series")
    site = _upload_site(who, {"site_id": site_id} if site_id else {})
    data = await read_upload(ctx, files[0], "volume")
    name = files[0].filename or "image"
    row = await run_in_threadpool(label_sessions.create, ctx, who, site, name, data, expiry)
    return {"session_id": row.id, "session_info": label_sessions.info(row)}


@router.get("/session/{session_id}", summary="A session's details or its CT (MONAI Label)")
def get_session(
    ctx: Context, who: Anyone, session_id: str, update_ts: bool = False, image: bool = False
) -> Any:
    row = label_sessions.owned(ctx, who, session_id, touch=update_ts)
    if image:
        data = ctx.store.get_bytes(ctx.bucket, row.image_key, row.image_version)
        return Response(
            data,
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{row.id}.nii.gz"'},
        )
    return label_sessions.info(row)


@router.delete("/session/{session_id}", summary="End a session: its data is removed")
def remove_session(ctx: Context, who: Anyone, session_id: str) -> dict[str, Any]:
    row = label_sessions.owned(ctx, who, session_id, touch=False)
    label_sessions.remove(ctx.store, ctx.db, ctx.bucket, row, who.user_id, "session.delete")
    return label_sessions.info(row)
