"""``/v1/tasks``: claim the next annotation task under a lease, renew it, give it back."""

from __future__ import annotations

from fastapi import APIRouter

from services.ingest.deps import Annotator, Context
from services.ingest.errors import not_found
from services.ingest.schemas import ClaimIn, TaskOut

router = APIRouter(prefix="/v1/tasks", tags=["work queue"])


@router.post(
    "/next",
    response_model=TaskOut,
    responses={404: {"description": "queue empty (code queue_empty)"}},
)
def claim_next(ctx: Context, who: Annotator, body: ClaimIn | None = None) -> TaskOut:
    body = body or ClaimIn()
    task = ctx.queue.claim(who, body.strategy, body.lease_seconds)
    if task is None:
        raise not_found("no task is waiting in your sites", "queue_empty")
    return task


@router.post("/{volume_id}/renew", response_model=TaskOut)
def renew(ctx: Context, who: Annotator, volume_id: str, body: ClaimIn | None = None) -> TaskOut:
    return ctx.queue.renew(who, volume_id, body.lease_seconds if body else None)


@router.delete("/{volume_id}", status_code=204)
def give_back(ctx: Context, who: Annotator, volume_id: str) -> None:
    ctx.queue.give_back(who, volume_id)
