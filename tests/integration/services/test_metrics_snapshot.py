"""The metrics service keeps its rounds when Kafka deletes old events (retention).

The service runs as a real process against a private Kafka broker of this module (deleting
records on the session's broker would take other tests' events with them) and the session's S3,
under a snapshot name of its own. Events are deleted for real with the admin API's
``delete_records``, the way retention deletes old segments.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from ctloop.bus import EventProducer
from ctloop.contracts import keys
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import (
    BlobRef,
    ModelRef,
    annotation_submitted,
    model_published,
    prediction_completed,
    volume_ingested,
)
from ctloop.contracts.topics import Topic
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.kafka_security import client_config
from ctloop.platform import settings_from, until
from ctloop.settings import Settings
from ctloop.stack import LocalStack
from ctloop.stack.services import ServiceProcess
from ctloop.storage import ObjectStore
from services.metrics.snapshot_format import parse_snapshot

KAFKA_PORT, METRICS_PORT = 29692, 29680  # the private broker (and its controller, +1); HTTP


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Kafka broker of this module's own, with the catalog's topics; its environment."""
    run = tmp_path_factory.mktemp("metrics-kafka")
    env = {
        "CTLOOP_RUN_DIR": str(run),
        "CTLOOP_KAFKA__PORT": str(KAFKA_PORT),
        "CTLOOP_KAFKA__CONTROLLER_PORT": str(KAFKA_PORT + 1),
        "CTLOOP_SERVICES__METRICS__HTTP_PORT": str(METRICS_PORT),
        "CTLOOP_SERVICES__METRICS__GRPC_PORT": str(METRICS_PORT + 1),
    }
    stack = LocalStack(settings_from(env), echo=lambda _: None, only={"kafka"})
    stack.up()
    try:
        yield env
    finally:
        stack.down()


@pytest.fixture
def metrics_env(private_kafka, unique, settings: Settings) -> Iterator[dict[str, str]]:
    """The metrics service's environment for one test: its own snapshot name (removed after)."""
    name = f"test-{unique}"
    yield {**private_kafka, "CTLOOP_METRICS__SNAPSHOT_NAME": name}
    client = ObjectStore(settings).client
    prefix = f"{keys.METRICS_PREFIX}{name}/"
    for o in client.list_objects(settings.s3.bucket, prefix, recursive=True, include_version=True):
        client.remove_object(settings.s3.bucket, str(o.object_name), version_id=o.version_id)


@contextmanager
def metrics_service(env: dict[str, str]) -> Iterator[Settings]:
    """``python -m services.metrics`` until the block ends (SIGTERM: a graceful stop)."""
    settings = settings_from(env)
    service = ServiceProcess(settings, "metrics", "services.metrics", {**os.environ, **env})
    stack = LocalStack(settings, echo=lambda _: None, components=[service])
    stack.up()
    try:
        yield settings
    finally:
        stack.down()


def _report() -> dict:
    return httpx.get(f"http://127.0.0.1:{METRICS_PORT}/v1/report", timeout=30).json()


def _mask(shift: int) -> np.ndarray:
    """Three organs in blocks; ``shift`` moves the second one (a pre-annotation's error)."""
    mask = np.zeros((24, 24, 8), dtype=np.uint8)
    mask[2:10, 2:10, :] = 1
    mask[12 + shift : 20 + shift, 4:12, :] = 2
    mask[4:12, 14:22, 2:6] = 3
    return mask


def _blob(settings: Settings, key: str, mask: np.ndarray) -> BlobRef:
    stored = ObjectStore(settings).put_bytes(
        settings.s3.bucket, key, nifti_gz_bytes(mask, np.eye(4))
    )
    return BlobRef(bucket=stored.bucket, key=stored.key, version_id=stored.version_id)


class _Round:
    """A round's events for model ``igniter<unique>`` v1: published as round 0, pre-annotations
    of annotated volumes and of an evaluation volume, the corrections with their minutes."""

    def __init__(self, settings: Settings, unique: str) -> None:
        self.settings = settings
        self.unique = unique
        self.model = ModelRef(model=f"igniter{unique}", version=1)

    def published(self) -> CloudEvent:
        manifest = BlobRef(bucket="ctloop-models", key=f"models/{self.model.model}/1/m.json")
        return model_published("/tests/metrics", model=self.model, manifest=manifest, round=0)

    def predicted(self, volume_id: str, shift: int) -> CloudEvent:
        key = keys.prediction_mask(volume_id, self.model.model, 1)
        return prediction_completed(
            "/tests/metrics",
            volume_id=volume_id,
            site_id="site-m",
            model=self.model,
            mask=_blob(self.settings, key, _mask(shift)),
            uncertainty=0.2,
            seconds=1.0,
        )

    def corrected(self, volume_id: str, minutes: float, skipped: bool = False) -> CloudEvent:
        key = keys.annotation_mask("site-m", volume_id, 1)
        return annotation_submitted(
            "/tests/metrics",
            volume_id=volume_id,
            site_id="site-m",
            revision=1,
            author="annotator-m",
            mask=_blob(self.settings, key, _mask(0)),
            minutes=minutes,
            organs={"spleen": "skipped"} if skipped else {},
            from_model=self.model,
        )

    def evaluation(self, volume_id: str) -> CloudEvent:
        label = _blob(self.settings, keys.volume_label("site-m", volume_id), _mask(0))
        return volume_ingested(
            "/tests/metrics",
            volume_id=volume_id,
            site_id="site-m",
            dataset="evaluation",
            image=label,
            label=label,
            shape=(24, 24, 8),
            spacing=(1.0, 1.0, 1.0),
            sha256="0" * 64,
        )

    def events(self) -> list[CloudEvent]:
        u = self.unique
        return [
            self.published(),
            self.predicted(f"a-{u}", 1),
            self.predicted(f"b-{u}", 3),
            self.corrected(f"a-{u}", 12.0),
            self.corrected(f"b-{u}", 8.5, skipped=True),
            self.evaluation(f"e-{u}"),
            self.predicted(f"e-{u}", 2),
        ]


def _publish(settings: Settings, events: list[CloudEvent]) -> None:
    producer = EventProducer(settings, client_id="test-metrics-snapshot")
    try:
        for event in events:
            producer.publish(event)
    finally:
        producer.close()


def _partitions(settings: Settings) -> list[TopicPartition]:
    consumer = KafkaConsumer(**client_config(settings))
    try:
        return [
            TopicPartition(str(t), p)
            for t in Topic
            if t != Topic.DEAD_LETTER
            for p in sorted(consumer.partitions_for_topic(str(t)) or ())
        ]
    finally:
        consumer.close()


def _offsets(settings: Settings, end: bool) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(**client_config(settings))
    try:
        tps = _partitions(settings)
        found = consumer.end_offsets(tps) if end else consumer.beginning_offsets(tps)
        return {tp: int(o) for tp, o in found.items()}
    finally:
        consumer.close()


def _delete_records(settings: Settings, upto: dict[TopicPartition, int]) -> None:
    """What retention does to old segments: the records before ``upto`` are gone for good."""
    admin = KafkaAdminClient(**client_config(settings))
    try:
        admin.delete_records({tp: o for tp, o in upto.items() if o > 0})
    finally:
        admin.close()
    assert _offsets(settings, end=False) == upto


def _ours(report: dict, model: str) -> dict:
    """The parts of ``/v1/report`` about ``model``, and what the whole report says of itself."""
    return {
        "rounds": [r for r in report["rounds"] if r["model"] == model],
        "evaluation": [e for e in report["evaluation"] if e["model"] == model],
        "history": report["history"],
    }


def _the_round_is_reported(model: str, annotated: int, logs: Path) -> dict:
    def ready() -> dict | None:
        ours = _ours(_report(), model)
        rows = ours["rounds"]
        # Topics are read side by side: the round's number and Dice may come last.
        if rows and (rows[0]["round"], rows[0]["volumes_annotated"]) == (0, annotated):
            return ours if ours["evaluation"] else None
        return None

    return until(f"round of {model} with {annotated} annotated", ready, 90, logs)


def _stored_snapshot(settings: Settings, name: str):
    raw = ObjectStore(settings).get_optional(settings.s3.bucket, keys.metrics_snapshot(name))
    return None if raw is None else parse_snapshot(raw)


def test_rounds_survive_events_deleted_after_the_snapshot(metrics_env, unique):
    """The round's report is the same after a restart, though Kafka no longer has one of the
    events it was made of; events that come after the restart are added to it once."""
    # Only a graceful stop writes a snapshot here.
    env = {
        **metrics_env,
        "CTLOOP_METRICS__SNAPSHOT_EVERY_EVENTS": "100000",
        "CTLOOP_METRICS__SNAPSHOT_EVERY_S": "3600",
    }
    private = settings_from(env)
    rnd = _Round(private, unique)
    _publish(private, rnd.events())
    with metrics_service(env) as settings:
        before = _the_round_is_reported(rnd.model.model, 2, settings.logs_dir)
        events_before = _report()["events_seen"]
    assert before["rounds"][0]["minutes_per_ct"] == pytest.approx((12.0 + 8.5) / 2)
    assert before["rounds"][0]["round"] == 0

    # The shutdown's snapshot covers every event; then Kafka deletes them all.
    end = _offsets(private, end=True)
    snapshot = _stored_snapshot(private, env["CTLOOP_METRICS__SNAPSHOT_NAME"])
    assert snapshot is not None
    covered = {TopicPartition(o.topic, o.partition): o.offset for o in snapshot.offsets}
    assert covered == {tp: o for tp, o in end.items() if o > 0}
    _delete_records(private, end)

    with metrics_service(env) as settings:
        after = _report()
        assert _ours(after, rnd.model.model) == before
        assert after["events_seen"] == events_before
        # A correction that comes now is added to the restored round, once.
        _publish(private, [rnd.corrected(f"c-{unique}", 10.0)])
        again = _the_round_is_reported(rnd.model.model, 3, settings.logs_dir)
        assert again["rounds"][0]["minutes_per_ct"] == pytest.approx((12.0 + 8.5 + 10.0) / 3)
        assert again["evaluation"] == before["evaluation"]
        assert again["history"] == before["history"]  # no events missing: no new gap


def test_events_deleted_before_any_snapshot_make_the_report_incomplete(metrics_env, unique):
    """With no snapshot, a topic whose first events are gone is a gap: a WARNING in the log,
    ``history.complete`` false in the report, and the Prometheus gauge at 0."""
    private = settings_from(metrics_env)
    rnd = _Round(private, unique)
    _publish(private, [rnd.published()])
    end = _offsets(private, end=True)
    _delete_records(private, end)
    published = [tp for tp in end if tp.topic == Topic.MODEL_PUBLISHED and end[tp] > 0]
    with metrics_service(metrics_env) as settings:
        # the gap is known once the consumer has its partitions and their earliest offsets,
        # which can come after the service answers (a loaded machine: seconds)
        deadline = time.monotonic() + 60
        history = _report()["history"]
        while history["complete"] and time.monotonic() < deadline:
            time.sleep(0.5)
            history = _report()["history"]
        prometheus = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
        log = (settings.logs_dir / "metrics.log").read_text()
    assert not history["complete"]
    gaps = {(g["topic"], g["partition"]): g for g in history["gaps"]}
    for tp in published:
        assert gaps[(tp.topic, tp.partition)]["first_missing"] == 0
        assert gaps[(tp.topic, tp.partition)]["first_kept"] == end[tp]
    assert "ctloop_metrics_history_complete 0.0" in prometheus
    warned = {
        (line["topic"], line["partition"])
        for line in map(json.loads, (x for x in log.splitlines() if x.startswith("{")))
        if line["level"] == "warning" and "the report may be incomplete" in line["msg"]
    }
    assert {(tp.topic, tp.partition) for tp in published} <= warned


def test_an_unreadable_snapshot_is_set_aside_and_the_state_rebuilt(metrics_env, unique, settings):
    """A snapshot that is not valid JSON of the right schema does not stop the service: it is
    copied aside (bytes intact), the state is rebuilt from the topics, and a good snapshot
    replaces it."""
    name = metrics_env["CTLOOP_METRICS__SNAPSHOT_NAME"]
    env = {**metrics_env, "CTLOOP_METRICS__SNAPSHOT_EVERY_S": "1"}
    private = settings_from(env)
    store, bucket = ObjectStore(settings), settings.s3.bucket
    garbage = b'{"schema_version": 1, "written_at": "not a time", "offsets": [}'
    store.put_bytes(bucket, keys.metrics_snapshot(name), garbage)
    rnd = _Round(private, unique)
    _publish(private, rnd.events())
    with metrics_service(env) as running:
        rebuilt = _the_round_is_reported(rnd.model.model, 2, running.logs_dir)
        assert rebuilt["rounds"][0]["minutes_per_ct"] == pytest.approx((12.0 + 8.5) / 2)

        def replaced():
            try:
                return _stored_snapshot(private, name)
            except ValueError:
                return None

        until("a good snapshot in place of the bad one", replaced, 60, running.logs_dir)
        log = (running.logs_dir / "metrics.log").read_text()
    assert "metrics snapshot cannot be used" in log
    aside = store.list_keys(bucket, f"{keys.METRICS_PREFIX}{name}/set-aside/")
    assert len(aside) == 1 and aside[0].endswith("-unreadable.json")
    assert store.get_bytes(bucket, aside[0]) == garbage
