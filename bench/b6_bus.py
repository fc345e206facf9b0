"""6. Event bus: produce → consume latency (p50, p99) through the services' own
``EventProducer`` (idempotent, ``acks=all``) and ``EventConsumer`` (commit after each record),
against kafka-python's defaults (``acks=1``, auto-commit) on the same broker. Each side has its
own scratch topic; events are sent one at a time (each send waits for its acknowledgement)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from bench.common import Context, median, percentile, result
from bench.session import Session
from ctloop.bus import EventConsumer, EventProducer, ensure_topics, subscribe_when_known
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import BlobRef, ModelRef, model_published
from ctloop.contracts.topics import Topic
from ctloop.kafka_security import client_config
from ctloop.settings import Settings

NAME = "6_bus"
GAP_S = 0.005  # between sends: latency, not a backlog, is measured


def _event(i: int) -> CloudEvent:
    return model_published(
        "/ctloop/bench",
        model=ModelRef(model="bench", version=i + 1),
        manifest=BlobRef(bucket="bench", key="bench/manifest.json"),
    )


def run(ctx: Context, session: Session) -> dict[str, Any]:
    bus = _Bus(session.platform().settings)
    try:
        ours, theirs = _measure(bus, ctx.preset.bus_events)
    finally:
        bus.close()
    return _result(ours, theirs)


class _Bus:
    """Both sides on their scratch topics (no service of any platform sees these events): the
    services' producer and consumer, and kafka-python's defaults, each consumer on a thread
    that records when each event arrived."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tag = uuid.uuid4().hex[:8]
        self.ours_topic, self.raw_topic = f"ctloop.bench.{tag}.services", f"ctloop.bench.{tag}.raw"
        ensure_topics(settings, [self.ours_topic, self.raw_topic])
        self.sent: dict[str, float] = {}
        self.got: dict[str, float] = {}
        self.stop = threading.Event()
        self.producer = EventProducer(settings, client_id=f"bench-bus-{tag}")
        self.consumer = EventConsumer(
            settings,
            f"bench-bus-{tag}",
            cast(list[Topic], [self.ours_topic]),
            self._on_event,
            self.producer,
        )
        self.raw_producer = KafkaProducer(**client_config(settings))
        self.raw_consumer = KafkaConsumer(
            **client_config(settings),
            group_id=f"bench-bus-raw-{tag}",
            auto_offset_reset="earliest",
        )
        # As the services' consumer does: joining before the new topic's metadata is known
        # left this side without partitions for five minutes (CI, stop 26).
        subscribe_when_known(self.raw_consumer, [self.raw_topic])
        self.threads = [
            threading.Thread(target=self.consumer.run, args=(self.stop,), daemon=True),
            threading.Thread(target=self._raw_loop, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _on_event(self, event: CloudEvent) -> None:
        self.got.setdefault(event.id, time.perf_counter())

    def _raw_loop(self) -> None:
        while not self.stop.is_set():
            for records in self.raw_consumer.poll(timeout_ms=200).values():
                for r in records:
                    self.got.setdefault(r.key.decode(), time.perf_counter())

    def send_ours(self, e: CloudEvent) -> None:
        _, value, headers = e.to_kafka()
        self.producer.send_raw(self.ours_topic, e.id.encode(), value, headers)

    def send_raw(self, e: CloudEvent) -> None:
        _, value, headers = e.to_kafka()
        self.raw_producer.send(self.raw_topic, key=e.id.encode(), value=value, headers=headers).get(
            30
        )

    def batch(self, send: Callable[[CloudEvent], None], n: int) -> list[float]:
        """``n`` events sent one at a time; each one's latency in ms (those that arrived
        within two minutes)."""
        events = [_event(i) for i in range(n)]
        for e in events:
            self.sent[e.id] = time.perf_counter()
            send(e)
            time.sleep(GAP_S)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(e.id in self.got for e in events):
            time.sleep(0.05)
        return [(self.got[e.id] - self.sent[e.id]) * 1000 for e in events if e.id in self.got]

    def close(self) -> None:
        """Stop both consumers, close every client, delete both topics."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.consumer.close()
        self.producer.close()
        self.raw_consumer.close()
        self.raw_producer.close()
        admin = KafkaAdminClient(**client_config(self.settings))
        try:
            admin.delete_topics([self.ours_topic, self.raw_topic])
        finally:
            admin.close()


def _measure(bus: _Bus, n: int) -> tuple[list[float], list[float]]:
    """``n`` events per side in 4 chunks, ABAB, after a warm-up of each side."""
    for side, send in (("ctloop", bus.send_ours), ("baseline", bus.send_raw)):
        # warm-up: group joins, metadata, connections
        if not bus.batch(send, 5):
            raise RuntimeError(f"event bus: no {side} event came back within two minutes")
    chunks = 4
    ours: list[float] = []
    theirs: list[float] = []
    sides = ((bus.send_ours, ours), (bus.send_raw, theirs))
    for c in range(chunks):  # ABAB
        for send, out in sides[:: 1 if c % 2 == 0 else -1]:
            out.extend(bus.batch(send, n // chunks))
    return ours, theirs


def _result(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    p99 = (percentile(ours, 99), percentile(theirs, 99))
    return result(
        NAME,
        "Event bus",
        "produce → consume latency p50",
        "ms",
        ours,
        theirs,
        {
            "events_per_side": len(ours),
            "gap_between_sends_s": GAP_S,
            "ctloop": "EventProducer (idempotent, acks=all, linger 2 ms) → EventConsumer "
            "(manual commit after each record)",
            "baseline": "KafkaProducer/KafkaConsumer defaults (acks=1, auto-commit)",
        },
        baseline_name="kafka-python defaults",
        details={
            "p50_ms": {"ctloop": median(ours), "baseline": median(theirs)},
            "p99_ms": {"ctloop": p99[0], "baseline": p99[1]},
            "note": f"p99 {p99[0]:.1f} ms vs {p99[1]:.1f} ms",
        },
    )
