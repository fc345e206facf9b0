"""The one event producer and the one consumer loop every service uses.

Producer: idempotent, ``acks=all``; ``publish`` returns once the broker has the record.
Consumer: a consumer group with auto-commit off. Each record is handled, then its offset
committed, so a crash replays rather than loses (handlers deduplicate by event id). A record
that is not a valid CloudEvent, or whose handler keeps failing, goes to the dead-letter topic
with the reason and its origin in headers; the consumer carries on.

A consumer that keeps its own durable record of how far it got (the metrics service's snapshot)
passes a :class:`Checkpoint`: newly assigned partitions start where it says, and it hears of
every handled record and of each poll, to save when due.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from ctloop.contracts.events import CloudEvent, InvalidEvent
from ctloop.contracts.kafka_acls import GRANTS
from ctloop.contracts.topics import Topic
from ctloop.kafka_security import client_config, is_restricted, principal
from ctloop.log import bind
from ctloop.retry import RetryPolicy
from ctloop.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[CloudEvent], None]


def broker_ready(settings: Settings) -> tuple[bool, str]:
    """Whether the broker answers metadata requests."""
    try:
        admin = KafkaAdminClient(
            client_id="ctloop-health", request_timeout_ms=3000, **client_config(settings)
        )
    except KafkaError as exc:
        return False, f"no broker: {type(exc).__name__}"
    try:
        topics = admin.list_topics()
    except KafkaError as exc:
        return False, f"metadata request failed: {type(exc).__name__}"
    finally:
        admin.close()
    ours = [t for t in topics if t.startswith("ctloop.")]
    return True, f"{len(ours)} ctloop topics"


def topic_configs(settings: Settings) -> dict[str, str]:
    """The per-topic configuration ctloop sets on its topics (from settings)."""
    return {"retention.ms": str(settings.kafka.topic_retention_ms)}


def ensure_topics(settings: Settings, topics: Iterable[str] = tuple(Topic)) -> None:
    """Create the catalog's topics that do not exist yet, with the configured partitions,
    replication factor and retention; set the retention of those that do (an upgrade from a
    release that kept events for a week keeps them from then on).

    A service principal on a SASL broker may not create topics: it only checks that those it
    sees exist (the broker's admin creates them: the local stack at start, the chart's
    kafka-setup container) and raises until they do."""
    k = settings.kafka
    admin = KafkaAdminClient(client_id="ctloop-admin", **client_config(settings))
    try:
        existing = set(admin.list_topics())
        if is_restricted(settings):
            _require_visible(settings, existing, topics)
            return
        created = []
        for name in topics:
            if name in existing:
                resource = ConfigResource(ConfigResourceType.TOPIC, name, topic_configs(settings))
                admin.alter_configs([resource])
                continue
            new = NewTopic(
                name,
                num_partitions=k.topic_partitions,
                replication_factor=k.topic_replication_factor,
                topic_configs=topic_configs(settings),
            )
            # A concurrent caller may have created it in the meantime.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([new])
            created.append(name)
        if created:
            # The broker answers the create before its metadata has the topic's partitions and
            # leaders; a consumer that joins its group before then is assigned nothing and only
            # finds the partitions at its next metadata refresh (5 minutes by default).
            admin.wait_for_topics(created, timeout_ms=30_000)
    finally:
        admin.close()


def _require_visible(settings: Settings, existing: set[str], topics: Iterable[str]) -> None:
    """Raise unless every topic of ``topics`` this principal may use is in ``existing``."""
    grant = GRANTS.get(principal(settings))
    usable = set() if grant is None else {str(t) for t in grant.produces | grant.consumes}
    missing = sorted(usable.intersection(topics) - existing)
    if missing:
        raise RuntimeError(f"topics not created yet (the Kafka admin creates them): {missing}")


def cluster_id(settings: Settings) -> str:
    """The Kafka cluster's id: offsets mean something only on the cluster they came from."""
    admin = KafkaAdminClient(client_id="ctloop-cluster-id", **client_config(settings))
    try:
        return str(admin.describe_cluster()["cluster_id"])
    finally:
        admin.close()


class EventProducer:
    def __init__(self, settings: Settings, client_id: str) -> None:
        self._producer = KafkaProducer(
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            retries=5,
            linger_ms=2,
            **client_config(settings),
        )

    def publish(self, event: CloudEvent, timeout_s: float = 30.0) -> None:
        """Send ``event`` and wait until the broker has acknowledged it."""
        key, value, headers = event.to_kafka()
        self.send_raw(event.topic, key, value, headers, timeout_s)
        log.debug("published", extra={"event_id": event.id, "event_type": event.type.ce_type})

    def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        timeout_s: float = 30.0,
    ) -> None:
        self._producer.send(topic, key=key, value=value, headers=headers).get(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()


class Checkpoint(Protocol):
    """A consumer's own record of how far it got, kept with the state it built."""

    def start_offsets(self, assigned: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each newly assigned partition is read from; one left out starts where the group
        committed, or at its beginning. Runs on the Kafka client's I/O thread: no I/O here."""
        ...

    def earliest(self, offsets: Mapping[TopicPartition, int]) -> None:
        """The earliest offsets still on the brokers, of the partitions just assigned."""
        ...

    def handled(self, tp: TopicPartition, next_offset: int) -> None:
        """The records of ``tp`` before ``next_offset`` are handled."""
        ...

    def tick(self, stopping: bool) -> None:
        """After each poll, and once when the loop stops (``stopping``): save if due."""
        ...


class _StartAtCheckpoint(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the checkpoint's offsets and notes them, so the
    consumer asks for their earliest offsets after the poll (the listener must not block)."""

    def __init__(self, consumer: KafkaConsumer, checkpoint: Checkpoint) -> None:
        self._consumer = consumer
        self._checkpoint = checkpoint
        self.assigned: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp, offset in self._checkpoint.start_offsets(assigned).items():
            self._consumer.seek(tp, offset)
        self.assigned |= set(assigned)


def subscribe_when_known(
    consumer: KafkaConsumer,
    topics: list[str],
    listener: ConsumerRebalanceListener | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Subscribe ``consumer`` to ``topics`` once its own metadata has their partitions.

    A consumer that joins its group before its metadata has a topic (one created a moment ago:
    the broker answers the create before every client sees it) is assigned none of its
    partitions ("No partition metadata for topic"), and only finds them at its next metadata
    refresh, five minutes later. Waits at most ``timeout_s``, then subscribes anyway (a topic
    that does not exist yet is found at a refresh, as before)."""
    deadline = time.monotonic() + timeout_s
    missing = list(topics)
    while missing and time.monotonic() < deadline:
        missing = [t for t in missing if not consumer.partitions_for_topic(t)]
        if missing:
            time.sleep(0.2)
    if missing:
        log.warning(
            "subscribing before the topics' partitions are known", extra={"topics": missing}
        )
    if listener is None:
        consumer.subscribe(topics)
    else:
        consumer.subscribe(topics, listener=listener)


class EventConsumer:
    """Feeds the events of ``topics`` to ``handler`` as member of consumer group ``group_id``."""

    def __init__(
        self,
        settings: Settings,
        group_id: str,
        topics: Iterable[Topic],
        handler: Handler,
        dead_letters: EventProducer,
        retry: RetryPolicy | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        group_id = settings.kafka.group_prefix + group_id
        names = [str(t) for t in topics]
        self._consumer = KafkaConsumer(
            group_id=group_id,
            client_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=50,
            **client_config(settings),
        )
        self.group_id = group_id
        self._handler = handler
        self._dead_letters = dead_letters
        self._retry = retry or RetryPolicy(give_up_on=(InvalidEvent,))
        self._checkpoint = checkpoint
        self._listener: _StartAtCheckpoint | None = None
        if checkpoint is not None:  # to seek to the checkpoint as partitions are assigned
            self._listener = _StartAtCheckpoint(self._consumer, checkpoint)
        subscribe_when_known(self._consumer, names, self._listener)

    def poll_once(self, timeout_ms: int = 1000, stop: threading.Event | None = None) -> int:
        """Handle what one poll returns; the number of records it took.

        When ``stop`` is set it returns after the record in hand: the rest of the batch is not
        committed and goes to the next member of the group.
        """
        batches = self._consumer.poll(timeout_ms=timeout_ms)
        self._tell_earliest()
        count = 0
        for tp, records in batches.items():
            for record in records:
                if stop is not None and stop.is_set():
                    return count
                self._handle_record(tp, record)
                self._consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
                if self._checkpoint is not None:
                    self._checkpoint.handled(tp, record.offset + 1)
                count += 1
        return count

    def _tell_earliest(self) -> None:
        """The checkpoint learns the earliest offsets of the partitions assigned in the last
        poll (what retention left), to see whether events it never covered are gone."""
        if self._checkpoint is None or self._listener is None or not self._listener.assigned:
            return
        assigned = set(self._listener.assigned)
        self._checkpoint.earliest(self._consumer.beginning_offsets(list(assigned)))
        self._listener.assigned -= assigned

    def _handle_record(self, tp: TopicPartition, record: object) -> None:
        value = getattr(record, "value", None)
        headers = list(getattr(record, "headers", None) or [])
        origin = f"{tp.topic}/{tp.partition}@{getattr(record, 'offset', '?')}"
        try:
            event = CloudEvent.from_kafka(value, headers)
        except InvalidEvent as exc:
            self._dead_letter(record, headers, f"invalid event: {exc}", origin)
            return
        with bind(event_id=event.id, event_type=event.type.ce_type, subject=event.subject):
            try:
                self._retry.call(lambda: self._handler(event))
            except InvalidEvent as exc:
                self._dead_letter(record, headers, f"invalid event: {exc}", origin)
            except Exception as exc:
                log.exception("handler failed; dead-lettering", extra={"origin": origin})
                self._dead_letter(record, headers, f"handler failed: {exc!r}", origin)

    def _dead_letter(
        self, record: object, headers: list[tuple[str, bytes]], reason: str, origin: str
    ) -> None:
        log.warning("dead letter", extra={"reason": reason, "origin": origin})
        extra = [
            ("ctloop_dlq_reason", reason.encode()),
            ("ctloop_dlq_origin", origin.encode()),
            ("ctloop_dlq_group", self.group_id.encode()),
        ]
        self._dead_letters.send_raw(
            Topic.DEAD_LETTER,
            getattr(record, "key", None),
            getattr(record, "value", None),
            headers + extra,
        )

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.poll_once(stop=stop)
            except KafkaError:
                log.exception("poll failed; retrying")
                time.sleep(1.0)
            if self._checkpoint is not None:
                self._checkpoint.tick(stopping=False)
        if self._checkpoint is not None:
            self._checkpoint.tick(stopping=True)

    def close(self) -> None:
        self._consumer.close()
