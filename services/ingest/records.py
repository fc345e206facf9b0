"""The workflow records the routers read and write: volumes a caller may see, their latest
pre-annotation and annotation revisions, audited blob reads, and recording an annotation.

Nothing here knows HTTP beyond raising :class:`ApiError`; the REST, MONAI Label and workbench
routers all go through these, so site isolation and the audit log are applied in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import numpy as np
from sqlalchemy import Select, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.contracts import keys
from ctloop.contracts.payloads import BlobRef, ModelRef, annotation_submitted
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.organs import LabelMap
from ctloop.core.partial import PartialLabel
from ctloop.db import (
    AnnotationRevision,
    Lease,
    Prediction,
    Volume,
    VolumeStatus,
    in_the_loop,
    next_annotation_revision,
    session_scope,
    volume_status,
)
from ctloop.log import bind
from ctloop.outbox import stage_event
from services.ingest.deps import IngestContext
from services.ingest.errors import ApiError, conflict, not_found
from services.ingest.queue import current_lease, lease_holder
from services.ingest.schemas import AnnotationOut, VolumeOut
from services.ingest.validation import Grid, read_nifti, validate_mask

log = logging.getLogger("ctloop.ingest")
SOURCE = "/ctloop/ingest"


class Blob(NamedTuple):
    key: str
    version: str | None


def volume_out(v: Volume, status: str) -> VolumeOut:
    """The API's view of a volume; ``status`` as :func:`ctloop.db.volume_status` shows it."""
    g = v.geometry
    return VolumeOut(
        volume_id=v.id,
        site_id=v.site_id,
        dataset=v.dataset,
        shape=tuple(g["shape"]),
        spacing=tuple(g["spacing"]),
        sha256=v.sha256,
        status=status,
        labelled=v.label_s3_key is not None,
        created_at=v.created_at,
    )


def volumes_out(s: Session, q: Select[Volume]) -> list[VolumeOut]:
    """The volumes ``q`` selects, each with the status the API shows."""
    return [volume_out(v, status) for v, status in s.execute(q.add_columns(volume_status()))]


def shown_volume(s: Session, volume_id: str, who: Principal) -> VolumeOut:
    """A volume the caller may see, as the API shows it (404 otherwise)."""
    visible_volume(s, volume_id, who)
    return volumes_out(s, select(Volume).where(Volume.id == volume_id))[0]


def annotation_out(r: AnnotationRevision) -> AnnotationOut:
    d = r.detail
    return AnnotationOut(
        volume_id=r.volume_id,
        revision=r.revision,
        author=r.author,
        minutes=float(d.get("minutes", 0.0)),
        organs=d.get("organs") or {},
        reviewed_slices=d.get("reviewed_slices"),
        created_at=r.created_at,
        review_status=r.review_status,
        reviewer=r.reviewer,
        review_comment=r.review_comment,
    )


def visible_volume(s: Session, volume_id: str, who: Principal) -> Volume:
    """The volume, if the caller's sites include its site. Another site's volume is reported
    exactly like a missing one: no existence leak."""
    v = s.get(Volume, volume_id)
    if v is None or not who.may_see(v.site_id):
        raise not_found(f"no volume {volume_id}")
    return v


def latest_prediction(s: Session, volume_id: str) -> Prediction | None:
    """The volume's newest pre-annotation, if it has one."""
    p: Prediction | None = s.scalars(
        select(Prediction)
        .where(Prediction.volume_id == volume_id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    ).first()
    return p


def required_prediction(s: Session, volume_id: str, who: Principal) -> Prediction:
    """The newest pre-annotation of a volume the caller may see (404 ``no_prediction``)."""
    visible_volume(s, volume_id, who)
    p = latest_prediction(s, volume_id)
    if p is None:
        raise not_found(f"{volume_id} has no pre-annotation yet", "no_prediction")
    return p


def revision_of(s: Session, volume_id: str, revision: int | None = None) -> AnnotationRevision:
    """One annotation revision of a volume; ``None``: its latest (404 when there is none)."""
    q = select(AnnotationRevision).where(AnnotationRevision.volume_id == volume_id)
    if revision is None:
        q = q.order_by(AnnotationRevision.revision.desc()).limit(1)
    else:
        q = q.where(AnnotationRevision.revision == revision)
    row = s.scalars(q).first()
    if row is None and revision is None:
        raise not_found(f"{volume_id} has no annotation yet", "no_label")
    if row is None:
        raise not_found(f"{volume_id} has no revision {revision}")
    return row


def image_blob(v: Volume) -> Blob:
    return Blob(v.s3_key, v.s3_version_id)


def prediction_blob(p: Prediction) -> Blob:
    return Blob(p.s3_key, None)


def revision_blob(r: AnnotationRevision) -> Blob:
    return Blob(r.s3_key, r.detail.get("s3_version_id"))


def audited_read(
    ctx: IngestContext,
    who: Principal,
    volume_id: str,
    action: str,
    pick: Callable[[Session, Volume], Blob],
    **detail: str,
) -> bytes:
    """The bytes of the blob ``pick`` chooses for a volume the caller may see, with the read
    in the audit log (``action``: ``volume.read``, ``prediction.read``, ``annotation.read``)."""
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        blob = pick(s, v)
        audit(s, who.user_id, action, volume_id, site_id=v.site_id, **detail)
    return ctx.store.get_bytes(ctx.bucket, blob.key, blob.version)


@dataclass(frozen=True)
class Correction:
    """What an annotator submits besides the mask."""

    minutes: float
    partial: PartialLabel
    origin: ModelRef | None
    label_map: LabelMap


def record_annotation(
    ctx: IngestContext, who: Principal, volume_id: str, data: bytes, correction: Correction
) -> AnnotationOut:
    """Validate a corrected mask and store it as the volume's next immutable revision (the
    REST API and the MONAI Label layer both submit through here); releases the caller's lease."""
    site, volume_grid = _annotatable(ctx, who, volume_id)
    array, grid = read_nifti(data, ctx.limits, "mask")
    canonical = validate_mask(array, grid, volume_grid, correction.label_map)
    with session_scope(ctx.db) as s:
        rev = next_annotation_revision(s, volume_id)
    key = keys.annotation_mask(site, volume_id, rev)
    obj = ctx.store.put_bytes(ctx.bucket, key, nifti_gz_bytes(canonical, volume_grid.affine))
    mask = BlobRef(bucket=ctx.bucket, key=key, version_id=obj.version_id)
    created = _commit_revision(ctx, who.user_id, volume_id, site, rev, mask, correction)
    ctx.published()
    with bind(volume_id=volume_id, site_id=site):
        log.info("annotation submitted", extra={"revision": rev, "minutes": correction.minutes})
    return AnnotationOut(
        volume_id=volume_id,
        revision=rev,
        author=who.user_id,
        minutes=correction.minutes,
        organs=correction.partial.organs,
        reviewed_slices=correction.partial.reviewed_slices,
        created_at=created,
    )


def _annotatable(ctx: IngestContext, who: Principal, volume_id: str) -> tuple[str, Grid]:
    """(site, grid) of a clinical volume the caller may annotate now (not leased to another)."""
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        site, g, dataset, status = v.site_id, v.geometry, v.dataset, v.status
    if dataset != "clinical":
        raise conflict("not_annotatable", f"{volume_id} is a {dataset} volume")
    if status == VolumeStatus.WITHDRAWN:
        raise conflict("withdrawn", f"{volume_id} was withdrawn from the loop by an admin")
    holder = lease_holder(ctx.db, volume_id)
    if holder is not None and holder != who.user_id:
        raise conflict("leased", f"{volume_id} is leased to {holder}")
    shape = (g["shape"][0], g["shape"][1], g["shape"][2])
    return site, Grid(shape, np.asarray(g["affine"]))


def _commit_revision(
    ctx: IngestContext,
    author: str,
    volume_id: str,
    site: str,
    rev: int,
    mask: BlobRef,
    correction: Correction,
) -> datetime:
    """The revision's row, the volume's status, its event and audit entry in one transaction.
    The lease is checked again and released there too: a claim that listed this volume
    before now finds it annotated and rolls back."""
    partial, origin = correction.partial, correction.origin
    event = annotation_submitted(
        SOURCE,
        volume_id=volume_id,
        site_id=site,
        revision=rev,
        author=author,
        mask=mask,
        organs=partial.organs,
        reviewed_slices=partial.reviewed_slices,
        minutes=correction.minutes,
        from_model=origin,
    )
    detail = {
        "minutes": correction.minutes,
        "organs": partial.organs,
        "s3_version_id": mask.version_id,
        "reviewed_slices": partial.reviewed_slices,
        "from_model": origin.model_dump() if origin else None,
    }
    try:
        with session_scope(ctx.db) as s:
            held = current_lease(s, volume_id)
            if held is not None and held.holder != author:
                raise conflict("leased", f"{volume_id} is leased to {held.holder}")
            lease = s.get(Lease, volume_id)  # also an expired one: released with the claim
            if lease is not None:
                s.delete(lease)
            row = AnnotationRevision(
                volume_id=volume_id, revision=rev, author=author, s3_key=mask.key, detail=detail
            )
            s.add(row)
            vol = s.get(Volume, volume_id)
            assert vol is not None
            vol.status = VolumeStatus.ANNOTATED
            stage_event(s, event)
            audit(s, author, "annotation.create", volume_id, site_id=site, revision=rev)
            s.flush()
            return row.created_at
    except IntegrityError as exc:
        raise ApiError(
            "conflict", "another revision was submitted at the same time; retry", 409
        ) from exc


def withdraw_volume(ctx: IngestContext, who: Principal, volume_id: str, **detail: str) -> VolumeOut:
    """Take a volume out of the loop (admins): never queued, pre-annotated, trained on or
    scored again. Its row, blobs and revisions stay (nothing accepted is lost), its lease
    ends, the id stays taken; withdrawing it again changes nothing."""
    with session_scope(ctx.db) as s:
        v = visible_volume(s, volume_id, who)
        if v.status != VolumeStatus.WITHDRAWN:
            was = v.status
            v.status = VolumeStatus.WITHDRAWN
            s.execute(delete(Lease).where(Lease.volume_id == volume_id))
            audit(
                s, who.user_id, "volume.withdraw", volume_id, site_id=v.site_id, was=was, **detail
            )
        s.flush()
        return volume_out(v, VolumeStatus.WITHDRAWN)


def clinical_volumes(s: Session, who: Principal) -> list[tuple[Volume, str]]:
    """The clinical volumes of the caller's sites, oldest first, each with its shown status."""
    q = select(Volume).where(Volume.dataset == "clinical", in_the_loop())
    q = q.order_by(Volume.created_at)
    q = q if who.is_admin else q.where(Volume.site_id.in_(who.sites))
    return [(v, status) for v, status in s.execute(q.add_columns(volume_status()))]


def annotated_ids(s: Session, ids: list[str]) -> set[str]:
    """Which of ``ids`` have at least one annotation revision."""
    q = select(AnnotationRevision.volume_id).where(AnnotationRevision.volume_id.in_(ids))
    return set(s.scalars(q))


def predicted_ids(s: Session, ids: list[str]) -> set[str]:
    """Which of ``ids`` have at least one pre-annotation."""
    return set(s.scalars(select(Prediction.volume_id).where(Prediction.volume_id.in_(ids))))
