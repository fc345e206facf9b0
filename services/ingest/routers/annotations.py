"""``/v1/volumes/{id}/annotations``: submit a corrected mask as a new revision, list a volume's
revisions, and review one (approve, or send it back to the queue)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import ValidationError
from sqlalchemy import select

from ctloop.audit_chain import audit
from ctloop.contracts.payloads import ModelRef
from ctloop.core.organs import UnknownLabel
from ctloop.core.partial import MAX_SLICE, PartialLabel
from ctloop.db import AnnotationRevision, ReviewStatus, VolumeStatus, session_scope
from ctloop.paging import Page, one_page
from services.ingest.deps import Annotator, Anyone, Context, Reviewer, read_upload
from services.ingest.errors import ApiError, conflict
from services.ingest.records import (
    Correction,
    annotation_out,
    record_annotation,
    revision_of,
    visible_volume,
)
from services.ingest.schemas import AnnotationOut, ErrorOut, ReviewIn
from services.ingest.uploads import parse_label_map
from services.ingest.validation import safe_id

router = APIRouter(prefix="/v1/volumes", tags=["annotations"])


MAX_VERSION = 2**31 - 1  # model versions are SQL integers
MAX_REVIEW_JSON = 64 * 1024  # organs / reviewed_slices: a few hundred bytes in practice


def _model_ref(raw: str | None) -> ModelRef | None:
    if not raw:
        return None
    name, _, version = raw.partition(":")
    shape = f"from_model must be 'model:version' with a version 1..{MAX_VERSION}"
    if not version.isascii() or not version.isdigit() or not 1 <= int(version) <= MAX_VERSION:
        raise ApiError("bad_model_ref", shape)
    try:
        return ModelRef(model=safe_id(name, "model"), version=int(version))
    except ValidationError as exc:
        raise ApiError("bad_model_ref", shape) from exc


def _partial(organs: str, reviewed_slices: str | None) -> PartialLabel:
    """The review the client declares; a refusal says what is expected, never parser text."""
    shape = (
        "organs must be a JSON object organ -> accepted|corrected|skipped of known organs; "
        f"reviewed_slices JSON [[first, last], ...] with 0 <= first <= last <= {MAX_SLICE}"
    )
    if len(organs) > MAX_REVIEW_JSON or len(reviewed_slices or "") > MAX_REVIEW_JSON:
        raise ApiError("bad_review", shape)
    try:
        return PartialLabel(
            organs=json.loads(organs),
            reviewed_slices=json.loads(reviewed_slices) if reviewed_slices else None,
        )
    except (ValueError, ValidationError, UnknownLabel, RecursionError) as exc:
        raise ApiError("bad_review", shape) from exc


@router.get("/{volume_id}/annotations", response_model=list[AnnotationOut])
def list_annotations(
    ctx: Context, who: Anyone, volume_id: str, page: Page, request: Request, response: Response
) -> list[AnnotationOut]:
    """A volume's revisions, first to latest, a page at a time (``ctloop.paging``)."""
    with session_scope(ctx.db) as s:
        visible_volume(s, volume_id, who)
        q = (
            select(AnnotationRevision)
            .where(AnnotationRevision.volume_id == volume_id)
            .order_by(AnnotationRevision.revision)
            .limit(page.fetch)
        )
        if (after := page.after_key(int)) is not None:
            q = q.where(AnnotationRevision.revision > after[0])
        rows = [annotation_out(x) for x in s.scalars(q)]
    return one_page(rows, page, lambda a: [a.revision], request, response)


@router.post(
    "/{volume_id}/annotations",
    status_code=201,
    response_model=AnnotationOut,
    responses={404: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
async def submit_annotation(
    ctx: Context,
    who: Annotator,
    volume_id: str,
    mask: Annotated[UploadFile, File(description="corrected label NIfTI on the volume's grid")],
    minutes: Annotated[float, Form(ge=0, le=24 * 60)],
    organs: Annotated[str, Form(description='JSON {"organ": "accepted|corrected|skipped"}')] = "{}",
    reviewed_slices: Annotated[str | None, Form(description="JSON [[first, last], ...]")] = None,
    from_model: Annotated[str | None, Form(description='"model:version" it started from')] = None,
    label_map: Annotated[str | None, Form(description='JSON {"organ": id}')] = None,
) -> AnnotationOut:
    with session_scope(ctx.db) as s:
        visible_volume(s, volume_id, who)
    partial = _partial(organs, reviewed_slices)
    data = await read_upload(ctx, mask, "mask")
    correction = Correction(minutes, partial, _model_ref(from_model), parse_label_map(label_map))
    return record_annotation(ctx, who, volume_id, data, correction)


@router.post(
    "/{volume_id}/annotations/{revision}/review",
    response_model=AnnotationOut,
    responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
)
def review_annotation(
    ctx: Context, who: Reviewer, volume_id: str, revision: int, body: ReviewIn
) -> AnnotationOut:
    """Approve a revision (it becomes training data when review is required) or send it
    back (the volume returns to the work queue)."""
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        row = revision_of(s, volume_id, revision)
        if row.review_status != ReviewStatus.PENDING:
            raise conflict("reviewed", f"revision {revision} is {row.review_status}")
        if row.author == who.user_id:
            raise conflict("own_revision", "a reviewer cannot review their own work")
        approve = body.decision == "approve"
        row.review_status = ReviewStatus.APPROVED if approve else ReviewStatus.SENT_BACK
        row.reviewer, row.review_comment = who.user_id, body.comment
        row.reviewed_at = datetime.now(UTC)
        if body.decision == "send_back":
            v.status = VolumeStatus.SENT_BACK
        action = f"annotation.{body.decision}"
        audit(s, who.user_id, action, volume_id, site_id=v.site_id, revision=revision)
        s.flush()
        return annotation_out(row)
