"""Workflow state in SQL (SQLite by default, PostgreSQL in CI and in the cluster).

SQL holds workflow state only; blobs live in S3 and the history of what happened in Kafka.
The same models and queries run on both engines; the tests run them on both.

Each table says which service writes it and which read it; a column has one writer. A status
column holds only its enum's values (stored as plain strings: no schema change).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    Select,
    String,
    Text,
    UniqueConstraint,
    and_,
    case,
    create_engine,
    event,
    exists,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator


def _now() -> datetime:
    return datetime.now(UTC)


class VolumeStatus(StrEnum):
    """Where a volume is in the loop. Ingest writes the column (ingested, annotated, sent_back);
    ``predicted`` is read, never written: see :func:`volume_status`."""

    INGESTED = "ingested"
    PREDICTED = "predicted"
    ANNOTATED = "annotated"
    SENT_BACK = "sent_back"
    # An admin took it out of the loop (MONAI Label's datastore delete, DELETE /v1/volumes/{id}):
    # never queued, pre-annotated, trained on or scored again; its row, blobs and revisions are
    # kept (nothing accepted is lost) and its id stays taken.
    WITHDRAWN = "withdrawn"


class ReviewStatus(StrEnum):
    """The optional review of an annotation revision: pending -> approved | sent_back."""

    PENDING = "pending"
    APPROVED = "approved"
    SENT_BACK = "sent_back"


class RoundStatus(StrEnum):
    """A training round: running, then retry (crashed, attempts left) or one of the ends."""

    RUNNING = "running"
    RETRY = "retry"
    PUBLISHED = "published"
    REJECTED = "rejected"
    FAILED = "failed"


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UtcDateTime()}


class Site(Base):
    # written by: ingest (uploads, admin) / read by: ingest
    __tablename__ = "sites"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Volume(Base):
    # written by: ingest / read by: ingest, inference
    __tablename__ = "volumes"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    dataset: Mapped[str] = mapped_column(String(32))  # public | clinical
    s3_key: Mapped[str] = mapped_column(String(512))
    s3_version_id: Mapped[str | None] = mapped_column(String(128))
    label_s3_key: Mapped[str | None] = mapped_column(String(512))  # labelled (public) volumes
    sha256: Mapped[str] = mapped_column(String(64))
    geometry: Mapped[dict[str, Any]] = mapped_column(default=dict)  # shape, spacing, affine
    # VolumeStatus, written by ingest only; read it through volume_status()
    status: Mapped[str] = mapped_column(String(32), default=VolumeStatus.INGESTED)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class AnnotationRevision(Base):
    """An immutable annotation revision; a correction is a new row, never an update."""

    # written by: ingest / read by: ingest (also for training, over gRPC)
    __tablename__ = "annotation_revisions"
    __table_args__ = (UniqueConstraint("volume_id", "revision"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(128))
    s3_key: Mapped[str] = mapped_column(String(512))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    # The optional review step: pending -> approved | sent_back (the only mutable part).
    review_status: Mapped[str] = mapped_column(  # ReviewStatus
        String(16), default=ReviewStatus.PENDING, server_default=ReviewStatus.PENDING.value
    )
    reviewer: Mapped[str | None] = mapped_column(String(128), default=None)
    review_comment: Mapped[str] = mapped_column(Text, default="", server_default="")
    reviewed_at: Mapped[datetime | None] = mapped_column(default=None)


class Prediction(Base):
    """A pre-annotation of a volume by one model version (immutable; one per pair)."""

    # written by: inference / read by: inference, ingest
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("volume_id", "model", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    s3_key: Mapped[str] = mapped_column(String(512))
    uncertainty: Mapped[float] = mapped_column()
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=_now)


class ServingModel(Base):
    """Which version of a model the inference service serves (rebuilt from model.published)."""

    # written by: inference / read by: inference, ingest (workbench), bench
    __tablename__ = "serving_models"
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)


class TrainingRound(Base):
    """One training round (round 0 trains the igniter); at most one is ``running``."""

    # written by: training / read by: training (ingest over gRPC), bench
    __tablename__ = "training_rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # the round number
    model: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # RoundStatus
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    volumes: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"train": [...], "holdout": []}
    version: Mapped[int | None] = mapped_column(Integer, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class ProcessedEvent(Base):
    """Which consumer has durably handled which event: the idempotency record."""

    # written by: inference, training (claim_event) / read by: the same consumer only
    __tablename__ = "processed_events"
    consumer: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(default=_now)


class OutboxEvent(Base):
    """An event written in the same transaction as its effect, published afterwards.

    The relay (:class:`ctloop.outbox.OutboxRelay`) sends unsent rows, so an event is never lost
    between "the effect committed" and "the broker has it" (at-least-once; consumers dedupe).
    """

    # written by: ingest, inference, training (stage_event) / read by: their outbox relays
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    topic: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(256))
    value: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    sent_at: Mapped[datetime | None] = mapped_column(default=None, index=True)


class Lease(Base):
    """Who is annotating a volume until when; an expired lease returns the task to the queue."""

    # written by: ingest / read by: ingest
    __tablename__ = "leases"
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class User(Base):
    """A person or a machine client; ``role`` is one of :data:`ctloop.auth.Role`."""

    # written by: ingest (admin), ctloop.auth (the first admin) / read by: ctloop.auth
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    # shown to people; the id (an OIDC ``sub``) is what every row refers to
    display_name: Mapped[str] = mapped_column(String(200), default="", server_default="")
    # a disabled user's tokens and JWTs are refused; nothing of theirs is deleted
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)


class SiteMembership(Base):
    # written by: ingest (admin) / read by: ctloop.auth, ingest (admin)
    __tablename__ = "site_memberships"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)


class ApiToken(Base):
    """A static API token; only its SHA-256 is stored."""

    # written by: ctloop.auth (for ingest's admin API and the first admin) / read by: ctloop.auth
    __tablename__ = "api_tokens"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEntry(Base):
    # written by: ingest (audit()) / read by: ingest (admin)
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=_now, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(512))
    site_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # hash chain: entry_hash = SHA-256 over prev_hash and this row's fields, so an edited or
    # deleted row breaks every hash after it
    prev_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")
    entry_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")


class SiteDicomwebSource(Base):
    """A DICOMweb service (base URL) a site's volumes may be pulled from."""

    # written by: ingest (admin) / read by: ingest (DICOMweb pulls)
    __tablename__ = "site_dicomweb_sources"
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    base_url: Mapped[str] = mapped_column(String(512), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class LabelSession(Base):
    """A MONAI Label session: an image a client segments without adding it to the loop (no
    volume, no event, never queued, trained on or scored). Its blobs live under
    ``sessions/<site>/<id>/``; the row and every version of them go when it expires or is
    deleted."""

    # written by: ingest / read by: ingest
    __tablename__ = "label_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))  # the uploaded file's name
    created_at: Mapped[datetime] = mapped_column(default=_now)
    last_access_at: Mapped[datetime] = mapped_column(default=_now, index=True)
    expiry_s: Mapped[int] = mapped_column(Integer)  # after the last access
    image_key: Mapped[str] = mapped_column(String(512))
    image_version: Mapped[str | None] = mapped_column(String(256))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # shape, spacing, sha256, source
    # "<model>:<version>" -> {key, version_id, uncertainty, seconds}: the masks made so far
    masks: Mapped[dict[str, Any]] = mapped_column(default=dict)


@cache
def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(eng, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return eng
    return create_engine(url, pool_pre_ping=True)


def ping(url: str) -> None:
    with engine_for(url).connect() as conn:
        conn.execute(text("SELECT 1"))


MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def create_schema(url: str) -> None:
    """Bring the database to the current schema (Alembic migrations; idempotent)."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(engine_for(url), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


def claim_event(session: Session, consumer: str, event_id: str) -> bool:
    """Record that ``consumer`` handles ``event_id``; False if it already did.

    Call it in the same transaction as the handler's effect, so the effect and the record
    commit together: a replayed event is then skipped, never applied twice.
    """
    values = {"consumer": consumer, "event_id": event_id, "processed_at": _now()}
    stmt: postgresql.Insert | sqlite.Insert
    if session.get_bind().dialect.name == "postgresql":
        stmt = postgresql.insert(ProcessedEvent).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(ProcessedEvent).values(**values).on_conflict_do_nothing()
    claimed = session.execute(stmt.returning(ProcessedEvent.event_id)).scalar_one_or_none()
    return claimed is not None


def event_claimed(session: Session, consumer: str, event_id: str) -> bool:
    """Whether ``consumer`` has already handled ``event_id`` (read-only)."""
    return session.get(ProcessedEvent, (consumer, event_id)) is not None


def volume_status() -> ColumnElement[str]:
    """A volume's :class:`VolumeStatus` as the API shows it, for ``select()`` and ``where()``.

    Ingest owns ``Volume.status``; whether a pre-annotation exists is the inference service's
    ``predictions`` table. So a volume still ``ingested`` that has a prediction reads as
    ``predicted``, and nothing writes ``predicted`` (rows that hold it read back as it).
    """
    predicted = exists().where(Prediction.volume_id == Volume.id)
    return case(
        (and_(Volume.status == VolumeStatus.INGESTED, predicted), VolumeStatus.PREDICTED.value),
        else_=Volume.status,
    ).label("status")


def in_the_loop() -> ColumnElement[bool]:
    """Volumes not withdrawn: what queues, inference, training and scoring may use."""
    return Volume.status != VolumeStatus.WITHDRAWN


def waiting_for_annotation() -> Select[str, str, str, int, float, datetime]:
    """Clinical volumes still to annotate (none, or only sent-back, revisions), with their
    latest pre-annotation if any: (id, site, model, version, uncertainty, created_at)."""
    done = (
        select(AnnotationRevision.volume_id)
        .where(AnnotationRevision.review_status != ReviewStatus.SENT_BACK)
        .distinct()
    )
    latest = (
        select(Prediction.volume_id, func.max(Prediction.id).label("pid"))
        .group_by(Prediction.volume_id)
        .subquery()
    )
    return (
        select(
            Volume.id,
            Volume.site_id,
            Prediction.model,
            Prediction.version,
            Prediction.uncertainty,
            Volume.created_at,
        )
        .outerjoin(latest, latest.c.volume_id == Volume.id)
        .outerjoin(Prediction, Prediction.id == latest.c.pid)
        .where(Volume.dataset == "clinical", Volume.id.not_in(done), in_the_loop())
    )


def next_annotation_revision(session: Session, volume_id: str) -> int:
    current = session.execute(
        text("SELECT COALESCE(MAX(revision), 0) FROM annotation_revisions WHERE volume_id = :v"),
        {"v": volume_id},
    ).scalar_one()
    return int(current) + 1
