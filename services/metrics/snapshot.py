"""The metrics service's state survives restarts and Kafka's retention: a snapshot in S3.

Its consumer reads every topic; the state it builds (services/metrics/state.py) is written to
S3 now and then, together with the next offset of every partition that the state covers, and
once more at a graceful shutdown. A restart restores the newest snapshot and reads each
partition from its offset, so events that Kafka has deleted since are not needed; partitions the
snapshot does not name are read from their beginning. The snapshot is written from the consumer
thread between two records, so its state and its offsets always agree; an event read again
after a crash is folded in once (the state keeps the ids it has seen).

A snapshot that cannot be used (unreadable, or from another Kafka cluster, whose offsets mean
nothing here) is copied aside under ``keys.metrics_snapshot_aside`` with an error in the log, and
the state is rebuilt from the topics. Where the earliest offset Kafka still has is past what the
state covers, those events are gone: the state records the gap, the log says so (WARNING) and
the report says it may be incomplete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime

from kafka import TopicPartition
from minio.error import S3Error
from prometheus_client import Gauge

from ctloop.contracts import keys
from ctloop.storage import ObjectStore
from services.metrics.snapshot_format import (
    SCHEMA_VERSION,
    HistoryGap,
    PartitionOffset,
    Snapshot,
    UnusableSnapshot,
    parse_snapshot,
)
from services.metrics.state import MetricsState

log = logging.getLogger("ctloop.metrics.snapshot")

SNAPSHOT_TIME = Gauge(
    "ctloop_metrics_snapshot_timestamp_seconds", "When the metrics state was last written to S3"
)


class SnapshotStore:
    """The snapshot's one S3 key (per snapshot name), read and replaced whole."""

    def __init__(self, store: ObjectStore, bucket: str, name: str) -> None:
        self.store = store
        self.bucket = bucket
        self.name = name
        self.key = keys.metrics_snapshot(name)
        self._written: str | None = None  # the version this process wrote last

    def load(self, cluster_id: str) -> Snapshot | None:
        """The stored snapshot if it can be restored on Kafka cluster ``cluster_id``; None if
        there is none or it cannot (it is then copied aside). S3 errors propagate."""
        raw = self.store.get_optional(self.bucket, self.key)
        if raw is None:
            log.info("no metrics snapshot yet: reading the topics from their beginning")
            return None
        try:
            snapshot = parse_snapshot(raw)
        except UnusableSnapshot as exc:
            self._set_aside(raw, "unreadable", str(exc))
            return None
        if snapshot.kafka_cluster_id != cluster_id:
            why = f"written for Kafka cluster {snapshot.kafka_cluster_id}, this is {cluster_id}"
            self._set_aside(raw, "other-cluster", why)
            return None
        return snapshot

    def save(self, snapshot: Snapshot) -> None:
        """Replace the stored snapshot; the version this process wrote before is removed (S3
        versioning would otherwise keep every one)."""
        data = snapshot.model_dump_json().encode()
        stored = self.store.put_bytes(self.bucket, self.key, data, "application/json")
        previous, self._written = self._written, stored.version_id
        if previous is not None and previous != stored.version_id:
            try:
                self.store.delete_version(self.bucket, self.key, previous)
            except S3Error as exc:
                log.warning("an older snapshot version stays", extra={"error": exc.code})

    def _set_aside(self, raw: bytes, reason: str, detail: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = keys.metrics_snapshot_aside(self.name, f"{stamp}-{reason}")
        self.store.put_bytes(self.bucket, aside, raw, "application/json")
        log.error(
            "metrics snapshot cannot be used: rebuilding the state from the topics",
            extra={"key": self.key, "reason": detail, "copied_to": aside},
        )


class SnapshotCheckpoint:
    """The consumer's :class:`ctloop.bus.Checkpoint`: restores the state, says where each
    partition starts, notices deleted events and writes snapshots when due.

    The consumer calls it between records or inside its poll, never while a handler runs, so a
    snapshot's state and offsets agree."""

    def __init__(
        self,
        state: MetricsState,
        snapshots: SnapshotStore,
        cluster_id: str,
        every_events: int,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.snapshots = snapshots
        self.cluster_id = cluster_id
        self.every_events = every_events
        self.every_s = every_s
        self._clock = clock
        self._covered: dict[TopicPartition, int] = {}  # the next offset the state covers
        self._started: dict[TopicPartition, int] = {}  # where the last assignment started
        self._pending = 0  # events folded in since the last snapshot
        self._dirty = False
        self._saved_at = clock()
        self._next_try = 0.0  # after a failed write: not before this (S3 may be down a while)

    def restore(self) -> bool:
        """Load the newest usable snapshot into the state; whether there was one."""
        snapshot = self.snapshots.load(self.cluster_id)
        if snapshot is None:
            return False
        self.state.restore(snapshot.state)
        self._covered = {TopicPartition(o.topic, o.partition): o.offset for o in snapshot.offsets}
        log.info(
            "metrics state restored from its snapshot",
            extra={
                "key": self.snapshots.key,
                "written_at": snapshot.written_at.isoformat(),
                "events_seen": snapshot.state.events_seen,
                "partitions": len(self._covered),
            },
        )
        return True

    def start_offsets(self, assigned: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        starts = {tp: self._covered.get(tp, 0) for tp in assigned}
        self._started.update(starts)
        return starts

    def earliest(self, offsets: Mapping[TopicPartition, int]) -> None:
        for tp, first_kept in offsets.items():
            start = self._started.get(tp, 0)
            if first_kept <= start:
                continue
            gap = HistoryGap(
                topic=tp.topic, partition=tp.partition, first_missing=start, first_kept=first_kept
            )
            self.state.note_gap(gap)
            self._covered[tp] = max(self._covered.get(tp, 0), first_kept)
            self._started[tp] = first_kept
            self._dirty = True

    def handled(self, tp: TopicPartition, next_offset: int) -> None:
        self._covered[tp] = next_offset
        self._pending += 1
        self._dirty = True

    def tick(self, stopping: bool) -> None:
        if not self._dirty:
            return
        now = self._clock()
        due = self._pending >= self.every_events or now - self._saved_at >= self.every_s
        if stopping or (due and now >= self._next_try):
            self.save()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            schema_version=SCHEMA_VERSION,
            written_at=datetime.now(UTC),
            kafka_cluster_id=self.cluster_id,
            offsets=[
                PartitionOffset(topic=tp.topic, partition=tp.partition, offset=offset)
                for tp, offset in sorted(self._covered.items())
            ],
            state=self.state.export(),
        )

    def save(self) -> None:
        """Write the snapshot now. A failure is logged and tried again ``every_s`` later, the
        consumer carrying on meanwhile: a later snapshot covers these events too."""
        try:
            self.snapshots.save(self.snapshot())
        except Exception:
            log.exception("metrics snapshot not written; trying again later")
            self._next_try = self._clock() + self.every_s
            return
        self._saved_at = self._clock()
        self._pending = 0
        self._dirty = False
        SNAPSHOT_TIME.set_to_current_time()
        log.debug(
            "metrics snapshot written",
            extra={"key": self.snapshots.key, "partitions": len(self._covered)},
        )
