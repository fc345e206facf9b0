"""The data of each event type (JSON, validated on both ends), and one constructor per event.

A producer builds an event only through its constructor (:func:`volume_ingested`, ...,
:func:`model_published`), which fixes its type and its subject (the Kafka record key).
``payload_for(event)`` turns a consumed :class:`CloudEvent` into its typed payload; a payload
that does not validate makes the event invalid (it goes to the dead letters).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ctloop.contracts.events import CloudEvent, InvalidEvent
from ctloop.contracts.topics import (
    ANNOTATION_SUBMITTED,
    MODEL_PUBLISHED,
    PREDICTION_COMPLETED,
    TRAINING_COMPLETED,
    TRAINING_STARTED,
    VOLUME_INGESTED,
    EventType,
)

# public: labelled, trains the igniter; clinical: unlabelled, to annotate; evaluation: clinical
# volumes with reference labels, never trained on, scored against every model that serves;
# public-test: labelled public-site volumes, never trained on, scored the same way (how much a
# sustainer forgets of the public site). A value added in issue 19: a consumer older than it
# refuses such an event (dead-letter topic) during a rolling upgrade; only transfer runs send it.
Dataset = Literal["public", "clinical", "evaluation", "public-test"]
SCORED_DATASETS: tuple[str, ...] = ("evaluation", "public-test")
OrganReview = Literal["accepted", "corrected", "skipped"]
RoundOutcome = Literal["published", "rejected", "failed"]


class Payload(BaseModel):
    """Event data. Consumers ignore fields they do not know, so a producer one release ahead
    (a rolling upgrade) may add an optional field without sending every older consumer's
    events to the dead letters. A change an older consumer would misread (a field removed,
    renamed, retyped or made required) is a new ``schema_version``: a new CloudEvents type that
    older consumers do not know, so they dead-letter it instead of misreading it. Producers
    build events only through the typed constructors below, so they cannot send a field that
    is not declared."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class BlobRef(Payload):
    bucket: str
    key: str
    version_id: str | None = None


class ModelRef(Payload):
    model: str
    version: int = Field(ge=1)


class VolumeIngested(Payload):
    volume_id: str
    site_id: str
    dataset: Dataset
    image: BlobRef
    label: BlobRef | None = None  # labelled (public) volumes come with their label
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sha256: str


class PredictionCompleted(Payload):
    volume_id: str
    site_id: str
    model: ModelRef
    mask: BlobRef
    uncertainty: float
    seconds: float


class AnnotationSubmitted(Payload):
    volume_id: str
    site_id: str
    revision: int = Field(ge=1)
    author: str
    mask: BlobRef
    organs: dict[str, OrganReview] = Field(default_factory=dict)
    reviewed_slices: list[tuple[int, int]] | None = None
    minutes: float = Field(ge=0)
    from_model: ModelRef | None = None


class TrainingStarted(Payload):
    round: int = Field(ge=0)
    model: str
    volumes: list[str]


class TrainingCompleted(Payload):
    round: int = Field(ge=0)
    model: str
    outcome: RoundOutcome
    version: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""


class ModelPublished(Payload):
    model: ModelRef
    parent: ModelRef | None = None
    manifest: BlobRef
    metrics: dict[str, Any] = Field(default_factory=dict)
    round: int | None = None
    rollback: bool = False  # serve this (older) version again


PAYLOADS: dict[str, type[Payload]] = {
    VOLUME_INGESTED.ce_type: VolumeIngested,
    PREDICTION_COMPLETED.ce_type: PredictionCompleted,
    ANNOTATION_SUBMITTED.ce_type: AnnotationSubmitted,
    TRAINING_STARTED.ce_type: TrainingStarted,
    TRAINING_COMPLETED.ce_type: TrainingCompleted,
    MODEL_PUBLISHED.ce_type: ModelPublished,
}


def payload_for(event: CloudEvent) -> Payload:
    try:
        return PAYLOADS[event.type.ce_type].model_validate(event.data)
    except ValidationError as exc:
        raise InvalidEvent(f"{event.type.ce_type} data does not validate: {exc}") from exc


def make_event(event_type: EventType, source: str, subject: str, payload: Payload) -> CloudEvent:
    expected = PAYLOADS[event_type.ce_type]
    if not isinstance(payload, expected):
        raise TypeError(f"{event_type.ce_type} carries {expected.__name__}")
    return CloudEvent(
        type=event_type, source=source, subject=subject, data=payload.model_dump(mode="json")
    )


# ---------------------------------------------------------------- one constructor per event
def volume_ingested(
    source: str,
    *,
    volume_id: str,
    site_id: str,
    dataset: Dataset,
    image: BlobRef,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    sha256: str,
    label: BlobRef | None = None,
) -> CloudEvent:
    """A volume was stored and recorded; keyed by the volume."""
    payload = VolumeIngested(
        volume_id=volume_id,
        site_id=site_id,
        dataset=dataset,
        image=image,
        label=label,
        shape=shape,
        spacing=spacing,
        sha256=sha256,
    )
    return make_event(VOLUME_INGESTED, source, volume_id, payload)


def prediction_completed(
    source: str,
    *,
    volume_id: str,
    site_id: str,
    model: ModelRef,
    mask: BlobRef,
    uncertainty: float,
    seconds: float,
) -> CloudEvent:
    """A pre-annotation was stored and recorded; keyed by the volume."""
    payload = PredictionCompleted(
        volume_id=volume_id,
        site_id=site_id,
        model=model,
        mask=mask,
        uncertainty=uncertainty,
        seconds=seconds,
    )
    return make_event(PREDICTION_COMPLETED, source, volume_id, payload)


def annotation_submitted(
    source: str,
    *,
    volume_id: str,
    site_id: str,
    revision: int,
    author: str,
    mask: BlobRef,
    minutes: float,
    organs: dict[str, OrganReview] | None = None,
    reviewed_slices: list[tuple[int, int]] | None = None,
    from_model: ModelRef | None = None,
) -> CloudEvent:
    """An annotation revision was stored and recorded; keyed by the volume."""
    payload = AnnotationSubmitted(
        volume_id=volume_id,
        site_id=site_id,
        revision=revision,
        author=author,
        mask=mask,
        organs=organs or {},
        reviewed_slices=reviewed_slices,
        minutes=minutes,
        from_model=from_model,
    )
    return make_event(ANNOTATION_SUBMITTED, source, volume_id, payload)


def training_started(source: str, *, round: int, model: str, volumes: list[str]) -> CloudEvent:
    """A round began training ``volumes``; keyed by the model."""
    payload = TrainingStarted(round=round, model=model, volumes=volumes)
    return make_event(TRAINING_STARTED, source, model, payload)


def training_completed(
    source: str,
    *,
    round: int,
    model: str,
    outcome: RoundOutcome,
    version: int | None = None,
    metrics: dict[str, Any] | None = None,
    reason: str = "",
) -> CloudEvent:
    """A round ended (published, rejected or failed for good); keyed by the model."""
    payload = TrainingCompleted(
        round=round,
        model=model,
        outcome=outcome,
        version=version,
        metrics=metrics or {},
        reason=reason,
    )
    return make_event(TRAINING_COMPLETED, source, model, payload)


def model_published(
    source: str,
    *,
    model: ModelRef,
    manifest: BlobRef,
    parent: ModelRef | None = None,
    metrics: dict[str, Any] | None = None,
    round: int | None = None,
    rollback: bool = False,
) -> CloudEvent:
    """A model version is complete in the repository and should serve (``rollback``: an
    older one again); keyed by the model's name."""
    payload = ModelPublished(
        model=model,
        parent=parent,
        manifest=manifest,
        metrics=metrics or {},
        round=round,
        rollback=rollback,
    )
    return make_event(MODEL_PUBLISHED, source, model.model, payload)
