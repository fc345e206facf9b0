"""MONAI Label sessions: a CT a Slicer user segments without adding it to the loop.

A session's image passes every check an upload does and is stored under
``volumes/_sessions/<site>/<id>/`` (its masks under ``predictions/_sessions/...``); the
serving model segments it on request (the inference service's ``SegmentSession``), and the
mask is kept for the next request of the same model version. Nothing of a session is a
volume: no row in ``volumes``, no event, never queued, trained on or scored. It ends when its
owner deletes it or ``expiry`` seconds after its last use; then its row and every version of
its blobs are removed, and the audit log keeps that it existed (who, which site, when; never
the image).

A session is its owner's (and admins'): anyone else gets 404, as for another site's volume.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from minio.error import S3Error
from sqlalchemy import func, select

from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.contracts import keys
from ctloop.db import LabelSession, session_scope
from ctloop.log import bind
from ctloop.settings import Settings
from ctloop.storage import MISSING, ObjectStore
from ctloop.timing import Laps
from ctloop.v1 import common_pb2
from services.ingest.backends import segment_session, serving_ref
from services.ingest.deps import IngestContext
from services.ingest.errors import ApiError, not_found
from services.ingest.uploads import check_image

log = logging.getLogger("ctloop.ingest.sessions")


def _expiry(settings: Settings, asked: int) -> int:
    """The seconds a session lives after its last use: what the client asked for (0: the
    default), at most the configured maximum."""
    svc = settings.services
    if asked < 0:
        raise ApiError("bad_expiry", "expiry is in seconds, 0 for the default")
    return min(asked or svc.session_expiry_s, svc.session_max_expiry_s)


def _expired(row: LabelSession, now: datetime) -> bool:
    return row.last_access_at + timedelta(seconds=row.expiry_s) < now


def info(row: LabelSession) -> dict[str, Any]:
    """A session as MONAI Label describes one (``SessionInfo``), plus ctloop's site."""
    return {
        "name": row.id,
        "path": row.image_key,
        "image": row.name,
        "meta": {**row.meta, "site_id": row.site_id, "masks": sorted(row.masks)},
        "create_ts": int(row.created_at.timestamp()),
        "last_access_ts": int(row.last_access_at.timestamp()),
        "expiry": row.expiry_s,
    }


def create(
    ctx: IngestContext, who: Principal, site: str, name: str, data: bytes, expiry: int
) -> LabelSession:
    """Check ``data`` as an upload is checked, store it and open a session for ``who``."""
    expiry_s = _expiry(ctx.settings, expiry)
    with session_scope(ctx.db) as s:
        live = s.scalar(
            select(func.count())
            .select_from(LabelSession)
            .where(LabelSession.user_id == who.user_id)
        )
    limit = ctx.settings.services.sessions_per_user
    if (live or 0) >= limit:
        raise ApiError(
            "too_many_sessions", f"you have {live} sessions open (at most {limit}); end one", 429
        )
    sha = hashlib.sha256(data).hexdigest()
    checked = check_image(ctx, data, sha, Laps())
    sid = uuid.uuid4().hex
    key = keys.session_image(site, sid)
    obj = ctx.store.put_bytes(ctx.bucket, key, checked.image_blob)
    row = LabelSession(
        id=sid,
        site_id=site,
        user_id=who.user_id,
        name=name[:256],
        expiry_s=expiry_s,
        image_key=key,
        image_version=obj.version_id,
        meta={
            "shape": list(checked.grid.shape),
            "spacing": list(checked.grid.spacing),
            "sha256": sha,
            "source": checked.provenance.get("source"),
        },
        masks={},
    )
    try:
        with session_scope(ctx.db) as s:
            s.add(row)
            audit(s, who.user_id, "session.create", sid, site_id=site, via="monailabel")
    except Exception:
        _delete(ctx.store, ctx.bucket, key, obj.version_id)
        raise
    with bind(session_id=sid, site_id=site):
        log.info("session opened", extra={"shape": list(checked.grid.shape), "expiry_s": expiry_s})
    return row


def visible(ctx: IngestContext, who: Principal, session_id: str, touch: bool) -> LabelSession:
    """The session, if ``who`` may see its site and it has not expired (404 otherwise: an
    expired one is removed now); ``touch`` renews its expiry."""
    now = datetime.now(UTC)
    with session_scope(ctx.db) as s:
        row = s.get(LabelSession, session_id)
        if row is None or not who.may_see(row.site_id):
            raise not_found(f"no session {session_id}", "no_session")
        if _expired(row, now):
            expired = row
        else:
            if touch:
                row.last_access_at = now
            return row
    remove(ctx.store, ctx.db, ctx.bucket, expired, "system", "session.expired")
    raise not_found(f"no session {session_id} (it expired)", "no_session")


def owned(ctx: IngestContext, who: Principal, session_id: str, touch: bool) -> LabelSession:
    """:func:`visible`, and ``who``'s own (or ``who`` an admin of its site): 404 otherwise."""
    row = visible(ctx, who, session_id, touch)
    if row.user_id != who.user_id and who.role != "admin":
        raise not_found(f"no session {session_id}", "no_session")
    return row


def remove(
    store: ObjectStore, db: str, bucket: str, row: LabelSession, actor: str, action: str
) -> bool:
    """Every version of the session's blobs, then its row; False if it was gone already."""
    for key, version in _blobs(row):
        _delete(store, bucket, key, version)
    with session_scope(db) as s:
        current = s.get(LabelSession, row.id)
        if current is None:
            return False
        late = set(_blobs(current)) - set(_blobs(row))  # masks made since ``row`` was read
        s.delete(current)
        audit(s, actor, action, row.id, site_id=row.site_id, via="monailabel")
    for key, version in late:
        _delete(store, bucket, key, version)
    with bind(session_id=row.id, site_id=row.site_id):
        log.info("session removed", extra={"why": action})
    return True


def _blobs(row: LabelSession) -> list[tuple[str, str | None]]:
    return [(row.image_key, row.image_version)] + [
        (m["key"], m.get("version_id")) for m in row.masks.values()
    ]


def _delete(store: ObjectStore, bucket: str, key: str, version: str | None) -> None:
    """One version removed for good; one that is gone already is fine."""
    try:
        store.delete_version(bucket, key, version)
    except S3Error as exc:
        if exc.code not in (*MISSING, "NoSuchVersion"):
            raise


def segmented(ctx: IngestContext, row: LabelSession, model: str) -> tuple[bytes, dict[str, Any]]:
    """The session's mask by ``model`` ("": whichever serves) at the version serving now,
    made once per version and kept for the session's life; (mask bytes, its description)."""
    ref = serving_ref(ctx.backends, model)
    tag = f"{ref.model}:{ref.version}"
    made = row.masks.get(tag)
    if made is None:
        image = common_pb2.ObjectRef(
            bucket=ctx.bucket, key=row.image_key, version_id=row.image_version or ""
        )
        reply = segment_session(ctx.backends, row.id, row.site_id, image, ref)
        made = {
            "model": reply.model.model,
            "version": reply.model.version,
            "key": reply.mask.key,
            "version_id": reply.mask.version_id or None,
            "uncertainty": reply.uncertainty,
            "seconds": reply.seconds,
        }
        with session_scope(ctx.db) as s:
            current = s.get(LabelSession, row.id)
            if current is None:  # ended meanwhile: its new mask goes too
                _delete(ctx.store, ctx.bucket, made["key"], made["version_id"])
                raise not_found(f"no session {row.id}", "no_session")
            current.masks = {**current.masks, tag: made}
    data = ctx.store.get_bytes(ctx.bucket, made["key"], made["version_id"])
    return data, made


def sweep(settings: Settings, store: ObjectStore) -> int:
    """Remove every expired session; how many."""
    now = datetime.now(UTC)
    with session_scope(settings.database_url) as s:
        rows = list(s.scalars(select(LabelSession)))
    removed = 0
    for row in rows:
        if _expired(row, now) and remove(
            store, settings.database_url, settings.s3.bucket, row, "system", "session.expired"
        ):
            removed += 1
    return removed


def sweeper(settings: Settings) -> Any:
    """A worker for the service runtime: every ``session_sweep_s``, expired sessions go."""
    store = ObjectStore(settings)

    def run(stop: threading.Event) -> None:
        while not stop.wait(settings.services.session_sweep_s):
            try:
                sweep(settings, store)
            except Exception:  # the database or the store away: the next tick tries again
                log.warning("expired sessions not removed yet", exc_info=True)

    return run
