"""The metrics service's snapshot as JSON: its state and, per topic partition, the next offset
that state covers (written by services/metrics/snapshot.py, to S3 under ``keys.metrics_snapshot``).

A reader validates the whole document; anything else (not JSON, another ``schema_version``, a
field missing or of the wrong type) is :class:`UnusableSnapshot`. A change an older reader would
misread is the next ``schema_version``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION: Literal[1] = 1

Blob = tuple[str, str, str | None]  # bucket, key, version id


class _Doc(BaseModel):
    # Dice is NaN where an evaluation label has no organ; JSON keeps it as NaN, not null.
    model_config = ConfigDict(ser_json_inf_nan="constants")


class RoundDoc(_Doc):
    model: str
    version: int
    minutes: list[float]
    dice: list[float]
    organ_dice: dict[str, list[float]]
    volumes: list[str]


class PredictionDoc(_Doc):
    volume_id: str
    model: str
    version: int
    mask: Blob


class RoundOfDoc(_Doc):
    model: str
    version: int
    round: int


class ScoreDoc(_Doc):
    model: str
    version: int
    volume_id: str
    mean_dice: float
    organ_dice: dict[str, float]


class HistoryGap(_Doc):
    """Offsets ``[first_missing, first_kept)`` of a partition were deleted unseen."""

    topic: str
    partition: int = Field(ge=0)
    first_missing: int = Field(ge=0)
    first_kept: int = Field(ge=0)


class StateDoc(_Doc):
    """Everything :class:`MetricsState` knows, as a JSON document."""

    events_seen: int = Field(ge=0)
    seen: list[str]  # event ids already folded in: a replayed event is counted once
    predictions: list[PredictionDoc]
    rounds: list[RoundDoc]
    round_of: list[RoundOfDoc]
    evaluation: dict[str, Blob]  # evaluation volume -> its label
    # scored volumes of a dataset other than "evaluation" (public-test); absent in snapshots
    # written before issue 19: every scored volume was then an evaluation one
    scored_datasets: dict[str, str] = Field(default_factory=dict)
    scores: list[ScoreDoc]
    gaps: list[HistoryGap] = Field(default_factory=list)


class PartitionOffset(_Doc):
    """The next offset of a topic partition that the snapshot's state covers."""

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class Snapshot(_Doc):
    schema_version: Literal[1]
    written_at: datetime
    kafka_cluster_id: str  # offsets mean something only on the cluster they came from
    offsets: list[PartitionOffset]
    state: StateDoc


class UnusableSnapshot(ValueError):
    """A stored snapshot that cannot be restored; the message says why."""


def parse_snapshot(raw: bytes) -> Snapshot:
    try:
        return Snapshot.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise UnusableSnapshot(
            f"{exc.error_count()} problem(s), first at {where}: {first['msg']}"
        ) from exc
