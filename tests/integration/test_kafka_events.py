"""CloudEvents through the real broker with the services' own producer and consumer."""

import threading
import time

from kafka import KafkaConsumer

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.topics import VOLUME_INGESTED, Topic
from ctloop.kafka_security import client_config
from ctloop.retry import RetryPolicy


def _consume_until(consumer: EventConsumer, done, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        consumer.poll_once(timeout_ms=500)
    assert done(), "expected events did not arrive in time"


def _event(unique: str, n: int = 0, subject: str | None = None) -> CloudEvent:
    # Records with one subject (key) share a partition, so they arrive in order.
    subject = subject or f"vol-{unique}-{n}"
    return CloudEvent(
        type=VOLUME_INGESTED,
        source="/tests/kafka",
        subject=subject,
        data={"volume_id": subject, "site_id": "site-a", "n": n},
    )


def test_event_reaches_a_consumer_group_with_headers_intact(settings, unique):
    producer = EventProducer(settings, client_id=f"test-{unique}")
    sent = _event(unique)
    producer.publish(sent)

    seen: list[CloudEvent] = []
    consumer = EventConsumer(
        settings, f"test-group-{unique}", [Topic.VOLUME_INGESTED], seen.append, producer
    )
    try:
        _consume_until(consumer, lambda: any(e.id == sent.id for e in seen))
    finally:
        consumer.close()
    got = next(e for e in seen if e.id == sent.id)
    assert (got.type, got.source, got.subject, got.time, got.data) == (
        sent.type,
        sent.source,
        sent.subject,
        sent.time,
        sent.data,
    )

    # The raw record carries the CloudEvents binary-mode headers, keyed by the subject.
    raw = KafkaConsumer(
        str(Topic.VOLUME_INGESTED),
        **client_config(settings),
        group_id=f"test-raw-{unique}",
        auto_offset_reset="earliest",
        consumer_timeout_ms=20000,
    )
    try:
        record = next(r for r in raw if dict(r.headers).get("ce_id") == sent.id.encode())
    finally:
        raw.close()
    headers = dict(record.headers)
    assert record.key == sent.subject.encode()
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == b"org.ctloop.volume.ingested.v1"
    assert headers["ce_source"] == b"/tests/kafka"
    assert headers["content-type"] == b"application/json"
    producer.close()


def test_committed_events_are_not_redelivered_to_the_group(settings, unique):
    producer = EventProducer(settings, client_id=f"test-{unique}")
    first = [_event(unique, n) for n in range(3)]
    for e in first:
        producer.publish(e)
    group = f"test-group-{unique}"
    ids = {e.id for e in first}
    seen: list[CloudEvent] = []
    consumer = EventConsumer(settings, group, [Topic.VOLUME_INGESTED], seen.append, producer)
    _consume_until(consumer, lambda: ids <= {e.id for e in seen})
    consumer.close()

    later = _event(unique, 99)
    producer.publish(later)
    seen_again: list[CloudEvent] = []
    consumer = EventConsumer(settings, group, [Topic.VOLUME_INGESTED], seen_again.append, producer)
    try:
        _consume_until(consumer, lambda: any(e.id == later.id for e in seen_again))
    finally:
        consumer.close()
    assert not ids & {e.id for e in seen_again}
    producer.close()


def test_malformed_record_goes_to_dead_letters_and_consumer_carries_on(settings, unique):
    producer = EventProducer(settings, client_id=f"test-{unique}")
    producer.send_raw(
        Topic.VOLUME_INGESTED,
        f"bad-{unique}".encode(),
        b"{not json",
        [("ce_specversion", b"1.0"), ("ce_id", f"bad-{unique}".encode())],
    )
    good = _event(unique, 1, subject=f"bad-{unique}")
    producer.publish(good)

    seen: list[CloudEvent] = []
    consumer = EventConsumer(
        settings, f"test-group-{unique}", [Topic.VOLUME_INGESTED], seen.append, producer
    )
    try:
        _consume_until(consumer, lambda: any(e.id == good.id for e in seen))
    finally:
        consumer.close()

    dlq = KafkaConsumer(
        str(Topic.DEAD_LETTER),
        **client_config(settings),
        group_id=f"test-dlq-{unique}",
        auto_offset_reset="earliest",
        consumer_timeout_ms=20000,
    )
    try:
        record = next(r for r in dlq if r.key == f"bad-{unique}".encode())
    finally:
        dlq.close()
    headers = dict(record.headers)
    assert record.value == b"{not json"
    assert b"missing CloudEvents headers" in headers["ctloop_dlq_reason"]
    assert headers["ctloop_dlq_origin"].startswith(b"ctloop.volume.ingested/")
    producer.close()


def test_failing_handler_is_retried_then_dead_lettered(settings, unique):
    producer = EventProducer(settings, client_id=f"test-{unique}")
    poison, after = _event(unique, 1), _event(unique, 2, subject=f"vol-{unique}-1")
    producer.publish(poison)
    producer.publish(after)
    attempts: list[str] = []
    handled: list[str] = []
    lock = threading.Lock()

    def handler(event: CloudEvent) -> None:
        with lock:
            attempts.append(event.id)
        if event.id == poison.id:
            raise RuntimeError("cannot process this one")
        handled.append(event.id)

    consumer = EventConsumer(
        settings,
        f"test-group-{unique}",
        [Topic.VOLUME_INGESTED],
        handler,
        producer,
        retry=RetryPolicy(attempts=3, base_delay_s=0.01),
    )
    try:
        _consume_until(consumer, lambda: after.id in handled)
    finally:
        consumer.close()
    assert attempts.count(poison.id) == 3
    producer.close()


def _topic_config(settings, name: str) -> tuple[int, dict[str, str]]:
    """(replication factor, configs) of a topic, as the broker reports them."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(**client_config(settings))
    try:
        (meta,) = admin.describe_topics([name])
        replicas = {len(p["replica_nodes"]) for p in meta["partitions"]}
        answer = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        configs = {k: v["value"] for k, v in answer["topic"][name].items()}
    finally:
        admin.close()
    assert len(replicas) == 1, replicas
    return replicas.pop(), configs


def test_topics_are_made_with_the_configured_replication_and_keep_events_for_ever(settings, unique):
    """Topics are created with the replication factor and retention of the settings (the
    chart sets 3 replicas for its 3-broker example), and the retention of an existing topic
    (made by an earlier release with the broker's 7 days) is set to the configured one."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from ctloop.bus import ensure_topics

    fresh, old = f"ctloop.test.fresh-{unique}", f"ctloop.test.old-{unique}"
    admin = KafkaAdminClient(**client_config(settings))
    week = str(7 * 24 * 3600 * 1000)
    admin.create_topics([NewTopic(old, 1, 1, topic_configs={"retention.ms": week})])
    admin.close()
    assert _topic_config(settings, old)[1]["retention.ms"] == week

    ensure_topics(settings, [fresh, old])
    assert settings.kafka.topic_retention_ms == -1  # the default: keep every event
    replication, configs = _topic_config(settings, fresh)
    assert replication == settings.kafka.topic_replication_factor == 1
    assert configs["retention.ms"] == "-1"
    assert _topic_config(settings, old)[1]["retention.ms"] == "-1"

    day = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topic_retention_ms": 86_400_000})}
    )
    ensure_topics(day, [old])
    assert _topic_config(settings, old)[1]["retention.ms"] == "86400000"


def test_a_consumer_made_before_its_topic_exists_gets_its_partitions(settings, unique):
    """A consumer that joins its group before its metadata has a topic (one created a moment
    ago: the broker answers the create before every client sees it; or the admin's a moment
    late) is assigned none of its partitions and only finds them at its next metadata refresh,
    five minutes later: the event-bus benchmark waited out its deadlines in CI. The services'
    consumer waits for its topics' partitions before it joins."""
    from typing import cast

    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"ctloop.test.new-{unique}"

    def create_it_a_moment_later() -> None:
        time.sleep(3)
        admin = KafkaAdminClient(**client_config(settings))
        admin.create_topics([NewTopic(topic, 3, 1)])
        admin.close()

    creator = threading.Thread(target=create_it_a_moment_later)
    creator.start()
    producer = EventProducer(settings, client_id=f"test-{unique}")
    seen: list[CloudEvent] = []
    consumer = EventConsumer(
        settings, f"test-new-{unique}", cast(list[Topic], [topic]), seen.append, producer
    )
    creator.join()
    try:
        deadline = time.monotonic() + 30  # well inside the five-minute refresh
        while time.monotonic() < deadline and len(consumer._consumer.assignment()) < 3:
            consumer.poll_once(timeout_ms=200)
        assert {tp.partition for tp in consumer._consumer.assignment()} == {0, 1, 2}
        sent = _event(unique)
        key, value, headers = sent.to_kafka()
        producer.send_raw(topic, key, value, headers)
        _consume_until(consumer, lambda: any(e.id == sent.id for e in seen), 30)
    finally:
        consumer.close()
        producer.close()
