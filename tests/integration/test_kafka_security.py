"""An authenticated bus (issue 18, finding 7): on a private broker started by the stack's own
Kafka component (own run folder and ports), every client signs in with SASL/SCRAM-SHA-512 as
its service's principal and the authorizer holds each to the grants table
(ctloop/contracts/kafka_acls.py). A forged ``model.published`` (the message that changes the
serving model for every site) is refused unless training sends it.
On the code before this, the broker took anything from anyone: these tests fail there."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from ctloop.bus import EventConsumer, EventProducer, cluster_id, ensure_topics
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.kafka_acls import ADMIN, GRANTS
from ctloop.contracts.payloads import BlobRef, ModelRef, model_published
from ctloop.contracts.topics import Topic
from ctloop.kafka_security import apply_grants, client_config, read_credentials
from ctloop.platform import settings_from
from ctloop.settings import Settings
from ctloop.stack import LocalStack

KAFKA_PORT = 29892  # the private broker; its controller listens on the next port


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A broker of this module's own, as the local stack starts one; its environment."""
    run = tmp_path_factory.mktemp("kafka-security")
    env = {
        "CTLOOP_RUN_DIR": str(run),
        "CTLOOP_KAFKA__PORT": str(KAFKA_PORT),
        "CTLOOP_KAFKA__CONTROLLER_PORT": str(KAFKA_PORT + 1),
    }
    stack = LocalStack(settings_from(env), echo=lambda _: None, only={"kafka"})
    try:
        stack.up()
        yield env
    finally:
        stack.down()


def _as(env: dict[str, str], principal: str, **extra: str) -> Settings:
    return settings_from({**env, "CTLOOP_KAFKA__PRINCIPAL": principal, **extra})


def _forged_rollback(unique: str) -> CloudEvent:
    return model_published(
        "/forged",
        model=ModelRef(model=f"sustainer{unique}", version=1),
        manifest=BlobRef(bucket="ctloop-models", key=f"models/sustainer{unique}/1/manifest.json"),
        rollback=True,
    )


def _publish(settings: Settings, event: CloudEvent) -> None:
    producer = EventProducer(settings, client_id="test-kafka-security")
    try:
        producer.publish(event, timeout_s=20)
    finally:
        producer.close()


def test_only_training_may_publish_a_model(broker, unique):
    event = _forged_rollback(unique)
    for name in sorted(set(GRANTS) - {"training"}):
        with pytest.raises(TopicAuthorizationFailedError):
            _publish(_as(broker, name), event)
    _publish(_as(broker, "training"), event)  # the one principal allowed

    # ... and inference, its consumer, gets exactly that event through its own group.
    inference = _as(broker, "inference")
    seen: list[CloudEvent] = []
    dead_letters = EventProducer(inference, client_id="test-dlq")
    consumer = EventConsumer(
        inference, "inference", [Topic.MODEL_PUBLISHED], seen.append, dead_letters
    )
    try:
        deadline = time.monotonic() + 60
        while not any(e.id == event.id for e in seen) and time.monotonic() < deadline:
            consumer.poll_once(timeout_ms=500)
    finally:
        consumer.close()
        dead_letters.close()
    assert [e.data["rollback"] for e in seen if e.id == event.id] == [True]


def _refused(config: dict[str, object]) -> bool:
    """Whether a producer with ``config`` fails to send a forged ``model.published``."""
    try:
        producer = KafkaProducer(max_block_ms=10000, request_timeout_ms=5000, **config)
        producer.send(str(Topic.MODEL_PUBLISHED), b"forged").get(timeout=10)
    except KafkaError:
        return True
    producer.close()
    return False


def test_no_credential_or_a_wrong_password_gets_nothing_in(broker):
    plaintext = {"bootstrap_servers": f"127.0.0.1:{KAFKA_PORT}"}  # no SASL handshake at all
    wrong = client_config(_as(broker, "training", CTLOOP_KAFKA__PASSWORD="not-the-password"))
    with ThreadPoolExecutor(2) as pool:  # each waits out the client's bootstrap timeout
        assert list(pool.map(_refused, [plaintext, wrong])) == [True, True]
    # The broker says why: the wrong password failed SCRAM authentication.
    log = (settings_from(broker).logs_dir / "kafka.log").read_text()
    assert "Failed authentication with /127.0.0.1" in log
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in log


def _may_produce(settings: Settings, topic: Topic) -> bool:
    producer = KafkaProducer(max_block_ms=15000, **client_config(settings))
    try:
        producer.send(str(topic), b"probe").get(timeout=15)
        return True
    except TopicAuthorizationFailedError:
        return False
    finally:
        producer.close()


def _may_read(settings: Settings, topic: Topic) -> bool:
    """Whether the principal sees the topic (DESCRIBE: an unseen one has no partitions for it)
    and may fetch from its first partition, without a group (only the topic's READ counts)."""
    consumer = KafkaConsumer(**client_config(settings))
    try:
        if not consumer.partitions_for_topic(str(topic)):
            return False
        partition = TopicPartition(str(topic), 0)
        consumer.assign([partition])
        consumer.seek(partition, 0)
        consumer.poll(timeout_ms=1000)
        consumer.poll(timeout_ms=500)
        return True
    except TopicAuthorizationFailedError:
        return False
    finally:
        consumer.close()


def test_each_service_produces_and_consumes_exactly_its_topics(broker):
    for name, grant in sorted(GRANTS.items()):
        settings = _as(broker, name)
        produced = {t for t in Topic if _may_produce(settings, t)}
        read = {t for t in Topic if _may_read(settings, t)}
        assert (name, produced) == (name, set(grant.produces))
        assert (name, read) == (name, set(grant.consumes))


def test_consumer_groups_are_each_services_own(broker, unique):
    metrics = _as(broker, "metrics")
    # The metrics service's groups (a fresh one per process) are its own ...
    consumer = KafkaConsumer(
        str(Topic.VOLUME_INGESTED), group_id=f"metrics-{unique}", **client_config(metrics)
    )
    try:
        consumer.poll(timeout_ms=5000)
    finally:
        consumer.close()
    # ... but it may not join inference's group, even on a topic it may read.
    intruder = KafkaConsumer(
        str(Topic.VOLUME_INGESTED), group_id="inference", **client_config(metrics)
    )
    try:
        with pytest.raises(GroupAuthorizationFailedError):
            for _ in range(10):
                intruder.poll(timeout_ms=1000)
    finally:
        intruder.close()


def test_services_start_with_their_principal_only(broker):
    # What a service does at start: the metrics service reads the cluster id, and a service
    # pod's provisioning only checks that its topics exist (it may not create or alter them).
    metrics = _as(broker, "metrics")
    assert cluster_id(metrics) == cluster_id(settings_from(broker))
    for name in GRANTS:
        ensure_topics(_as(broker, name))


def test_credentials_stay_with_their_owner(broker):
    settings = settings_from(broker)
    path = settings.kafka_credentials_file
    config = settings.data_dir / "kafka" / "server.properties"
    for f in (path, config):  # both hold passwords
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    passwords = read_credentials(path)
    assert set(passwords) == {ADMIN, *GRANTS}
    assert len(set(passwords.values())) == len(passwords)
    text = config.read_text()
    assert "security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT" in text
    assert "PLAINTEXT://" not in text.replace("SASL_PLAINTEXT", "")
    assert f"super.users=User:{ADMIN}\n" in text


def test_the_charts_setup_command_sets_each_services_password(broker, tmp_path):
    """``python -m ctloop.kafka_security`` as admin (the chart's kafka-setup container): the
    password of a service's Secret is the one the broker takes from then on."""
    settings = settings_from(broker)
    admin_password = read_credentials(settings.kafka_credentials_file)[ADMIN]
    env = {
        **os.environ,
        **broker,
        "CTLOOP_RUN_DIR": str(tmp_path),  # no credentials file: only what the chart gives
        "CTLOOP_KAFKA__PRINCIPAL": ADMIN,
        "CTLOOP_KAFKA__PASSWORD": admin_password,
        "CTLOOP_KAFKA_PASSWORD_INGEST": "rotated-by-the-chart",
    }
    ready = tmp_path / "ready"
    setup = subprocess.Popen(
        [sys.executable, "-m", "ctloop.kafka_security", "--stay", str(ready)], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and setup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready.exists(), "the setup never said it was done"
        rotated = _as(broker, "ingest", CTLOOP_KAFKA__PASSWORD="rotated-by-the-chart")
        assert _may_produce(rotated, Topic.VOLUME_INGESTED)
    finally:
        setup.terminate()
        setup.wait(timeout=30)
        apply_grants(settings, read_credentials(settings.kafka_credentials_file))  # as before


def test_a_service_relays_only_the_outbox_rows_its_principal_may_send(broker, tmp_path, unique):
    """The outbox is one table in the shared database. Inference's relay once picked up a
    ``training.started`` row training had staged, the broker refused it, and the refusal stopped
    inference's own ``prediction.completed`` events for good (found in the cluster run)."""
    from ctloop.contracts.payloads import prediction_completed, training_started
    from ctloop.db import OutboxEvent, create_schema, session_scope
    from ctloop.kafka_security import produced_topics
    from ctloop.outbox import OutboxRelay, stage_event

    db = f"sqlite:///{tmp_path / 'outbox.db'}"
    create_schema(db)
    theirs = training_started("/training", round=1, model=f"m{unique}", volumes=[])
    ours = prediction_completed(
        "/inference",
        volume_id=f"v{unique}",
        site_id="s",
        model=ModelRef(model=f"m{unique}", version=1),
        mask=BlobRef(bucket="ctloop", key=f"predictions/s/v{unique}/1.nii.gz"),
        uncertainty=0.1,
        seconds=1.0,
    )
    with session_scope(db) as s:
        stage_event(s, theirs)
        stage_event(s, ours)
    inference = _as(broker, "inference")
    assert produced_topics(inference) == {str(t) for t in GRANTS["inference"].produces}
    producer = EventProducer(inference, client_id="test-outbox")
    try:
        relay = OutboxRelay(db, producer, topics=produced_topics(inference))
        assert relay.flush() == 1  # its own row went out; no refusal raised
    finally:
        producer.close()
    with session_scope(db) as s:
        unsent = {r.event_id for r in s.query(OutboxEvent).filter(OutboxEvent.sent_at.is_(None))}
    assert unsent == {theirs.id}  # training's row waits for training's relay
    assert produced_topics(_as(broker, ADMIN)) is None  # the operator's tools send every row
