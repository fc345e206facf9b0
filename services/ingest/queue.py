"""The annotation work queue: an annotator claims the next task and holds it under a lease.

Tasks are the clinical volumes of the caller's sites that have no annotation yet. The next one
is chosen by the active-learning strategy (most uncertain pre-annotation first by default;
random or sequential as options). A claim is a lease: renewable, releasable, and it expires;
two annotators never hold the same volume (the claim is one conditional write).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctloop.auth import Principal
from ctloop.db import Lease, Volume, audit, session_scope, waiting_for_annotation
from services.ingest.admin import Auth

Strategy = Literal["uncertainty", "random", "sequential"]


class TaskOut(BaseModel):
    volume_id: str
    site_id: str
    expires_at: datetime
    model: str | None = Field(default=None, description="the pre-annotation to start from")
    version: int | None = None
    uncertainty: float | None = None


class ClaimIn(BaseModel):
    strategy: Strategy | None = None
    lease_seconds: float | None = Field(default=None, gt=0, le=24 * 3600)


@dataclass(frozen=True)
class Candidate:
    volume_id: str
    site_id: str
    model: str | None
    version: int | None
    uncertainty: float | None
    created_at: datetime


class _NoLongerWaiting(Exception):
    """Rolls a claim back: the volume was annotated after the candidates were listed."""


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


def _now() -> datetime:
    return datetime.now(UTC)


def lease_holder(database_url: str, volume_id: str) -> str | None:
    """Who holds an unexpired lease on ``volume_id`` (None: nobody)."""
    with session_scope(database_url) as s:
        lease = s.get(Lease, volume_id)
        return lease.holder if lease is not None and lease.expires_at > _now() else None


def release(database_url: str, volume_id: str) -> None:
    with session_scope(database_url) as s:
        lease = s.get(Lease, volume_id)
        if lease is not None:
            s.delete(lease)


class WorkQueue:
    """Claims on the annotation queue, shared by the REST queue and the MONAI Label layer."""

    def __init__(self, database_url: str, strategy: Strategy, lease_s: float) -> None:
        self.db = database_url
        self.strategy = strategy
        self.lease_s = lease_s

    def candidates(self, who: Principal, order: Strategy) -> list[Candidate]:
        with session_scope(self.db) as s:
            q = waiting_for_annotation()
            if not who.is_admin:
                q = q.where(Volume.site_id.in_(who.sites))
            rows = [
                Candidate(r.id, r.site_id, r.model, r.version, r.uncertainty, r.created_at)
                for r in s.execute(q).all()
            ]
        if order == "random":
            random.shuffle(rows)
        elif order == "uncertainty":
            # Most uncertain first; volumes without a pre-annotation last.
            rows.sort(key=lambda c: (c.uncertainty is None, -(c.uncertainty or 0.0), c.created_at))
        else:
            rows.sort(key=lambda c: (c.created_at, c.volume_id))
        return rows

    def _try_claim(self, volume_id: str, holder: str, until: datetime) -> bool:
        """Lease ``volume_id`` if nobody holds it and it is still waiting for annotation.

        The lease write and the "still waiting" check are one transaction: the candidate list
        was read earlier, and the volume may have been annotated (and its lease released, in
        the annotation's own transaction) since then."""

        def waiting(s: Session) -> bool:
            q = waiting_for_annotation().where(Volume.id == volume_id)
            return s.execute(q).first() is not None

        try:
            with session_scope(self.db) as s:
                s.add(Lease(volume_id=volume_id, holder=holder, expires_at=until))
                s.flush()
                if not waiting(s):
                    raise _NoLongerWaiting
            return True
        except _NoLongerWaiting:
            return False
        except IntegrityError:
            pass  # someone holds (or held) a lease: take it over only if it has expired
        try:
            with session_scope(self.db) as s:
                taken = s.execute(
                    update(Lease)
                    .where(Lease.volume_id == volume_id, Lease.expires_at <= _now())
                    .values(holder=holder, expires_at=until)
                )
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    return False
                if not waiting(s):
                    raise _NoLongerWaiting
            return True
        except _NoLongerWaiting:
            return False

    def claim(
        self, who: Principal, strategy: Strategy | None = None, lease_s: float | None = None
    ) -> TaskOut | None:
        """Lease the next waiting volume of the caller's sites (None: nothing is waiting)."""
        until = _now() + timedelta(seconds=lease_s or self.lease_s)
        for c in self.candidates(who, strategy or self.strategy):
            if self._try_claim(c.volume_id, who.user_id, until):
                with session_scope(self.db) as s:
                    audit(s, who.user_id, "task.claim", c.volume_id, site_id=c.site_id)
                return TaskOut(
                    volume_id=c.volume_id,
                    site_id=c.site_id,
                    expires_at=until,
                    model=c.model,
                    version=c.version,
                    uncertainty=c.uncertainty,
                )
        return None


def queue_router(queue: WorkQueue, auth: Auth) -> APIRouter:
    r = APIRouter(prefix="/v1/tasks", tags=["work queue"])
    worker = auth.require("admin", "reviewer", "annotator")
    db, lease_s = queue.db, queue.lease_s

    @r.post(
        "/next",
        response_model=TaskOut,
        responses={404: {"description": "queue empty (code queue_empty)"}},
    )
    def claim_next(body: ClaimIn | None = None, who: Principal = Depends(worker)) -> TaskOut:
        body = body or ClaimIn()
        task = queue.claim(who, body.strategy, body.lease_seconds)
        if task is None:
            raise _error(404, "queue_empty", "no task is waiting in your sites")
        return task

    def held(volume_id: str, who: Principal) -> Lease:
        with session_scope(db) as s:
            lease = s.get(Lease, volume_id)
            if lease is None or lease.holder != who.user_id or lease.expires_at <= _now():
                raise _error(409, "not_leased", f"you hold no lease on {volume_id}")
            s.expunge(lease)
            return lease

    @r.post("/{volume_id}/renew", response_model=TaskOut)
    def renew(
        volume_id: str, body: ClaimIn | None = None, who: Principal = Depends(worker)
    ) -> TaskOut:
        held(volume_id, who)
        until = _now() + timedelta(seconds=(body.lease_seconds if body else None) or lease_s)
        with session_scope(db) as s:
            lease = s.get(Lease, volume_id)
            assert lease is not None
            lease.expires_at = until
            site = s.get(Volume, volume_id).site_id  # type: ignore[union-attr]
        return TaskOut(volume_id=volume_id, site_id=site, expires_at=until)

    @r.delete("/{volume_id}", status_code=204)
    def give_back(volume_id: str, who: Principal = Depends(worker)) -> None:
        held(volume_id, who)
        release(db, volume_id)

    return r
