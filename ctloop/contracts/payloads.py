"""The data of each event type (JSON, validated on both ends).

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
# volumes with reference labels, never trained on, scored against every model that serves.
Dataset = Literal["public", "clinical", "evaluation"]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    organs: dict[str, Literal["accepted", "corrected", "skipped"]] = Field(default_factory=dict)
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
    outcome: Literal["published", "rejected", "failed"]
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
