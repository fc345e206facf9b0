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

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.db import AuditEntry, Lease, Volume, VolumeStatus, session_scope, waiting_for_annotation
from services.ingest.errors import ApiError
from services.ingest.schemas import QueueSize, Strategy, TaskOut, TaskRow


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


def _now() -> datetime:
    return datetime.now(UTC)


def current_lease(s: Session, volume_id: str) -> Lease | None:
    """The unexpired lease on ``volume_id``, if anyone holds one."""
    lease = s.get(Lease, volume_id)
    return lease if lease is not None and lease.expires_at > _now() else None


def lease_holder(database_url: str, volume_id: str) -> str | None:
    """Who holds an unexpired lease on ``volume_id`` (None: nobody)."""
    with session_scope(database_url) as s:
        lease = current_lease(s, volume_id)
        return lease.holder if lease is not None else None


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

    def renew(self, who: Principal, volume_id: str, lease_s: float | None = None) -> TaskOut:
        """Extend the caller's unexpired lease (409 ``not_leased`` when they hold none)."""
        until = _now() + timedelta(seconds=lease_s or self.lease_s)
        with session_scope(self.db) as s:
            lease = self._held(s, who, volume_id)
            lease.expires_at = until
            site = s.get(Volume, volume_id).site_id  # type: ignore[union-attr]
        return TaskOut(volume_id=volume_id, site_id=site, expires_at=until)

    def give_back(self, who: Principal, volume_id: str) -> None:
        """Release the caller's unexpired lease (409 ``not_leased`` when they hold none)."""
        with session_scope(self.db) as s:
            s.delete(self._held(s, who, volume_id))

    @staticmethod
    def _held(s: Session, who: Principal, volume_id: str) -> Lease:
        lease = s.get(Lease, volume_id)
        if lease is None or lease.holder != who.user_id or lease.expires_at <= _now():
            raise ApiError("not_leased", f"you hold no lease on {volume_id}", 409)
        return lease

    def leases(self) -> dict[str, tuple[str, datetime]]:
        """volume id -> (holder, expiry) of every unexpired lease."""
        now = _now()
        with session_scope(self.db) as s:
            return {
                x.volume_id: (x.holder, x.expires_at)
                for x in s.scalars(select(Lease))
                if x.expires_at > now
            }

    def tasks(self, who: Principal) -> tuple[list[TaskRow], list[TaskRow]]:
        """(the caller's leased tasks, the tasks waiting in their sites in the order the queue
        hands them out; at most 500)."""
        leases = self.leases()
        rows = {
            c.volume_id: TaskRow(
                volume_id=c.volume_id,
                site_id=c.site_id,
                model=c.model,
                version=c.version,
                uncertainty=c.uncertainty,
                leased=c.volume_id in leases,
            )
            for c in self.candidates(who, self.strategy)
        }
        mine = [
            rows[vid].model_copy(update={"expires_at": until})
            for vid, (holder, until) in leases.items()
            if holder == who.user_id and vid in rows
        ]
        return mine, list(rows.values())[:500]

    def sizes(self, who: Principal) -> list[QueueSize]:
        """Per clinical site of the caller's: tasks waiting, of those leased, and annotated."""
        leased = self.leases()
        sizes: dict[str, dict[str, int]] = {}
        with session_scope(self.db) as s:
            clinical = s.scalars(select(Volume).where(Volume.dataset == "clinical"))
            for site in {v.site_id for v in clinical if who.may_see(v.site_id)}:
                sizes[site] = {"waiting": 0, "leased": 0, "annotated": 0}
            for row in s.execute(waiting_for_annotation()).all():
                if row.site_id in sizes:
                    sizes[row.site_id]["waiting"] += 1
                    sizes[row.site_id]["leased"] += row.id in leased
            for v in s.scalars(select(Volume).where(Volume.status == VolumeStatus.ANNOTATED)):
                if v.site_id in sizes:
                    sizes[v.site_id]["annotated"] += 1
        return [QueueSize(site_id=k, **v) for k, v in sorted(sizes.items())]


def minutes_since_claim(database_url: str, volume_id: str, who: Principal) -> float:
    """Minutes since the caller last claimed ``volume_id`` (0: never), at most a day: what a
    client that does not time its annotators reports."""
    with session_scope(database_url) as s:
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
    return round(min((_now() - since).total_seconds() / 60.0, 24 * 60.0), 2)
