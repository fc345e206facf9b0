"""The metrics service's snapshot document: the state survives a round trip through its JSON,
an unusable document is refused with a reason (the service then rebuilds from the topics), and
the checkpoint starts partitions at the snapshot's offsets and notices deleted events. The S3
side (writing, loading, setting a bad snapshot aside) runs against the real store in
tests/integration/services/test_metrics_snapshot.py."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from kafka import TopicPartition

from ctloop.contracts.payloads import BlobRef, ModelRef, model_published, training_completed
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from services.metrics.snapshot import SnapshotCheckpoint, SnapshotStore
from services.metrics.snapshot_format import (
    SCHEMA_VERSION,
    HistoryGap,
    PartitionOffset,
    PredictionDoc,
    RoundDoc,
    RoundOfDoc,
    ScoreDoc,
    Snapshot,
    StateDoc,
    UnusableSnapshot,
    parse_snapshot,
)
from services.metrics.state import MetricsState

MASK = ("ctloop", "predictions/v1/igniter/v1/mask.nii.gz", "ver-1")


def _state() -> MetricsState:
    """A state that never reads a blob here (the events below carry no masks to score)."""
    settings = Settings()
    return MetricsState(ObjectStore(settings), settings.s3.bucket)


def _doc() -> StateDoc:
    """A state with a round (minutes, Dice, a skipped organ), evaluation scores (one NaN: a
    label without organs), predictions with and without a version id, and a gap."""
    return StateDoc(
        events_seen=7,
        seen=["e1", "e2", "e3"],
        predictions=[
            PredictionDoc(volume_id="v1", model="igniter", version=1, mask=MASK),
            PredictionDoc(volume_id="v2", model="igniter", version=1, mask=("b", "k", None)),
        ],
        rounds=[
            RoundDoc(
                model="igniter",
                version=1,
                minutes=[10.0, 11.5, 0.1 + 0.2],
                dice=[0.8125, 0.7],
                organ_dice={"liver": [0.9, 0.85], "pancreas": [0.4]},
                volumes=["v1", "v2", "v3"],
            )
        ],
        round_of=[RoundOfDoc(model="igniter", version=1, round=0)],
        evaluation={"e1": ("ctloop", "volumes/s/e1/label.nii.gz", None)},
        scores=[
            ScoreDoc(
                model="igniter",
                version=1,
                volume_id="e1",
                mean_dice=0.75,
                organ_dice={"liver": 0.9, "spleen": 0.6},
            ),
            ScoreDoc(model="igniter", version=1, volume_id="e2", mean_dice=math.nan, organ_dice={}),
        ],
        gaps=[
            HistoryGap(topic="ctloop.volume.ingested", partition=2, first_missing=0, first_kept=5)
        ],
    )


def _snapshot(state: MetricsState) -> bytes:
    return (
        Snapshot(
            schema_version=SCHEMA_VERSION,
            written_at=datetime.now(UTC),
            kafka_cluster_id="cluster-a",
            offsets=[PartitionOffset(topic="ctloop.annotation.submitted", partition=0, offset=42)],
            state=state.export(),
        )
        .model_dump_json()
        .encode()
    )


def test_state_survives_a_round_trip_through_the_snapshot():
    before = _state()
    before.restore(_doc())
    after = _state()
    snapshot = parse_snapshot(_snapshot(before))
    after.restore(snapshot.state)

    assert after.report() == before.report()
    assert after.report()[0]["minutes_per_ct"] == pytest.approx((10.0 + 11.5 + 0.3) / 3)
    assert (
        after.history()
        == before.history()
        == {
            "complete": False,
            "gaps": [_doc().gaps[0].model_dump()],
        }
    )
    assert after.events_seen == 7
    # NaN survives as NaN (JSON null would make the document unreadable).
    (row,) = after.evaluation()
    assert math.isnan(row["mean_dice"]) and row["volumes"] == 2
    assert after.export().model_dump_json() == before.export().model_dump_json()
    assert snapshot.offsets == [
        PartitionOffset(topic="ctloop.annotation.submitted", partition=0, offset=42)
    ]


def test_a_replayed_event_is_not_counted_again_after_a_restore():
    manifest = BlobRef(bucket="b", key="models/sustainer/2/manifest.json")
    published = model_published(
        "/t", model=ModelRef(model="sustainer", version=2), manifest=manifest, round=1
    )
    before = _state()
    before.handle(published)
    after = _state()
    after.restore(parse_snapshot(_snapshot(before)).state)
    after.handle(published)  # read again from the topic after the snapshot's offset
    assert after.events_seen == 1
    after.handle(
        training_completed("/t", round=1, model="sustainer", outcome="published", version=2)
    )
    assert after.events_seen == 2


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "document"),
        (b"\x00\xff garbage", "document"),
        (b'{"schema_version": 1, "written_at": "2025-01-01T00:00:00Z"', "document"),
        (b"[]", "document"),
        (b'{"schema_version": 99}', "schema_version"),
    ],
)
def test_an_unusable_snapshot_is_refused_with_a_reason(raw: bytes, why: str):
    with pytest.raises(UnusableSnapshot, match=why):
        parse_snapshot(raw)


def test_a_snapshot_with_a_wrong_field_is_refused():
    good = _snapshot(_state()).decode()
    with pytest.raises(UnusableSnapshot, match=r"offsets\.0\.offset"):
        parse_snapshot(good.replace('"offset":42', '"offset":-1').encode())
    with pytest.raises(UnusableSnapshot, match=r"state\.seen"):
        parse_snapshot(good.replace('"seen":[]', '"seen":7').encode())


def _checkpoint(state: MetricsState, covered: dict[TopicPartition, int]) -> SnapshotCheckpoint:
    settings = Settings()
    snapshots = SnapshotStore(ObjectStore(settings), settings.s3.bucket, "unit")
    checkpoint = SnapshotCheckpoint(state, snapshots, "cluster-a", 100, 60.0)
    for tp, offset in covered.items():
        checkpoint.handled(tp, offset)
    return checkpoint


def test_partitions_start_at_the_covered_offset_and_others_at_the_beginning():
    a0, a1 = TopicPartition("t.a", 0), TopicPartition("t.a", 1)
    checkpoint = _checkpoint(_state(), {a0: 12})
    assert checkpoint.start_offsets({a0, a1}) == {a0: 12, a1: 0}
    assert [o.model_dump() for o in checkpoint.snapshot().offsets] == [
        {"topic": "t.a", "partition": 0, "offset": 12}
    ]


def test_events_deleted_before_they_were_covered_are_a_gap():
    a0, a1, a2 = (TopicPartition("t.a", p) for p in range(3))
    state = _state()
    checkpoint = _checkpoint(state, {a0: 12, a1: 5})
    checkpoint.start_offsets({a0, a1, a2})
    # a0: retention deleted only what the snapshot covered; a1: 5..8 went unseen; a2 was
    # never read and starts at 3.
    checkpoint.earliest({a0: 10, a1: 9, a2: 3})
    assert state.history() == {
        "complete": False,
        "gaps": [
            {"topic": "t.a", "partition": 1, "first_missing": 5, "first_kept": 9},
            {"topic": "t.a", "partition": 2, "first_missing": 0, "first_kept": 3},
        ],
    }
    offsets = {(o.partition, o.offset) for o in checkpoint.snapshot().offsets}
    assert offsets == {(0, 12), (1, 9), (2, 3)}
    # A re-assignment starts where the state is, and reports nothing twice.
    checkpoint.start_offsets({a0, a1, a2})
    checkpoint.earliest({a0: 10, a1: 9, a2: 3})
    assert len(state.history()["gaps"]) == 2


def test_nothing_deleted_is_a_complete_history():
    a0 = TopicPartition("t.a", 0)
    state = _state()
    checkpoint = _checkpoint(state, {})
    checkpoint.start_offsets({a0})
    checkpoint.earliest({a0: 0})
    assert state.history() == {"complete": True, "gaps": []}


def test_a_failed_write_is_tried_again_a_period_later(caplog):
    """S3 not answering (nothing listens on its port) does not stop the consumer, and the write
    is not retried at every poll."""
    settings = Settings()
    settings = settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"external_endpoint": "127.0.0.1:9"})}
    )
    now = [0.0]
    snapshots = SnapshotStore(ObjectStore(settings), settings.s3.bucket, "unit")
    checkpoint = SnapshotCheckpoint(_state(), snapshots, "c", 1, 60.0, clock=lambda: now[0])
    checkpoint.handled(TopicPartition("t.a", 0), 1)
    checkpoint.tick(stopping=False)
    checkpoint.tick(stopping=False)
    now[0] = 59.0
    checkpoint.tick(stopping=False)
    assert caplog.text.count("metrics snapshot not written") == 1
    now[0] = 61.0
    checkpoint.tick(stopping=False)
    assert caplog.text.count("metrics snapshot not written") == 2


def test_an_event_whose_blob_read_fails_is_applied_whole_when_it_comes_again():
    """S3 down while an annotation is scored: nothing of it is counted and the event is not
    marked seen, so the redelivery is applied (before, it was skipped as seen with only its
    minutes counted)."""
    from ctloop.contracts.payloads import annotation_submitted

    down = Settings(s3={"port": 1})  # nothing listens there
    state = MetricsState(ObjectStore(down), down.s3.bucket)
    event = annotation_submitted(
        "test",
        volume_id="v1",
        site_id="s",
        revision=1,
        author="a",
        minutes=4.5,
        organs={"liver": "corrected"},
        reviewed_slices=None,
        mask=BlobRef(bucket="ctloop", key="annotations/v1/1/mask.nii.gz"),
        from_model=ModelRef(model="igniter", version=1),
    )
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a dead S3
        state.handle(event)
    assert state.events_seen == 0
    assert state.report() == []


def test_public_test_scores_are_kept_apart_and_survive_the_snapshot():
    """Forgetting (issue 19): a public-test volume's scores are not evaluation scores, and an
    older snapshot (no scored_datasets) reads every scored volume as evaluation."""
    doc = _doc()
    doc.evaluation["p1"] = ("ctloop", "volumes/public/p1/label.nii.gz", None)
    doc.scored_datasets = {"p1": "public-test"}
    doc.scores.append(
        ScoreDoc(model="igniter", version=1, volume_id="p1", mean_dice=0.5, organ_dice={})
    )
    state = _state()
    state.restore(doc)
    (evaluation,) = state.evaluation()
    (public,) = state.evaluation("public-test")
    assert evaluation["volumes"] == 2 and public["volumes"] == 1 and public["mean_dice"] == 0.5
    after = _state()
    after.restore(parse_snapshot(_snapshot(state)).state)
    assert after.evaluation("public-test") == [public]
    older = doc.model_dump()
    del older["scored_datasets"]
    state.restore(StateDoc.model_validate(older))
    assert state.evaluation("public-test") == [] and state.evaluation()[0]["volumes"] == 3
