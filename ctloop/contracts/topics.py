"""The event catalog: every Kafka topic and CloudEvents type ctloop uses.

No service spells a topic name or an event type itself; they import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Topic(StrEnum):
    VOLUME_INGESTED = "ctloop.volume.ingested"
    PREDICTION_COMPLETED = "ctloop.prediction.completed"
    ANNOTATION_SUBMITTED = "ctloop.annotation.submitted"
    TRAINING_STARTED = "ctloop.training.started"
    TRAINING_COMPLETED = "ctloop.training.completed"
    MODEL_PUBLISHED = "ctloop.model.published"
    DEAD_LETTER = "ctloop.deadletter"


@dataclass(frozen=True)
class EventType:
    """A CloudEvents ``type`` and the topic it travels on."""

    name: str
    topic: Topic
    schema_version: int = 1

    @property
    def ce_type(self) -> str:
        return f"org.ctloop.{self.name}.v{self.schema_version}"


VOLUME_INGESTED = EventType("volume.ingested", Topic.VOLUME_INGESTED)
PREDICTION_COMPLETED = EventType("prediction.completed", Topic.PREDICTION_COMPLETED)
ANNOTATION_SUBMITTED = EventType("annotation.submitted", Topic.ANNOTATION_SUBMITTED)
TRAINING_STARTED = EventType("training.started", Topic.TRAINING_STARTED)
TRAINING_COMPLETED = EventType("training.completed", Topic.TRAINING_COMPLETED)
MODEL_PUBLISHED = EventType("model.published", Topic.MODEL_PUBLISHED)

EVENT_TYPES: dict[str, EventType] = {
    t.ce_type: t
    for t in (
        VOLUME_INGESTED,
        PREDICTION_COMPLETED,
        ANNOTATION_SUBMITTED,
        TRAINING_STARTED,
        TRAINING_COMPLETED,
        MODEL_PUBLISHED,
    )
}
