"""6. Event bus: produce → consume latency (p50, p99) through the services' own
``EventProducer`` (idempotent, ``acks=all``) and ``EventConsumer`` (commit after each record),
against kafka-python's defaults (``acks=1``, auto-commit) on the same broker. Each side has its
own scratch topic; events are sent one at a time (each send waits for its acknowledgement)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, cast

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from bench.common import Context, median, percentile, result
from bench.session import Session
from ctloop.bus import EventConsumer, EventProducer, ensure_topics
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import BlobRef, ModelRef, model_published
from ctloop.contracts.topics import Topic

NAME = "6_bus"
GAP_S = 0.005  # between sends: latency, not a backlog, is measured


def _event(i: int) -> CloudEvent:
    return model_published(
        "/ctloop/bench",
        model=ModelRef(model="bench", version=i + 1),
        manifest=BlobRef(bucket="bench", key="bench/manifest.json"),
    )


def run(ctx: Context, session: Session) -> dict[str, Any]:
    settings = session.platform().settings
    tag = uuid.uuid4().hex[:8]
    ours_topic, raw_topic = f"ctloop.bench.{tag}.services", f"ctloop.bench.{tag}.raw"
    ensure_topics(settings, [ours_topic, raw_topic])
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    stop = threading.Event()

    def on_event(event: CloudEvent) -> None:
        got.setdefault(event.id, time.perf_counter())

    producer = EventProducer(settings, client_id=f"bench-bus-{tag}")
    # (a scratch topic instead of a catalog one: no service of any platform sees these events)
    consumer = EventConsumer(
        settings, f"bench-bus-{tag}", cast(list[Topic], [ours_topic]), on_event, producer
    )
    raw_producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    raw_consumer = KafkaConsumer(
        raw_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=f"bench-bus-raw-{tag}",
        auto_offset_reset="earliest",
    )

    def raw_loop() -> None:
        while not stop.is_set():
            for records in raw_consumer.poll(timeout_ms=200).values():
                for r in records:
                    got.setdefault(r.key.decode(), time.perf_counter())

    threads = [
        threading.Thread(target=consumer.run, args=(stop,), daemon=True),
        threading.Thread(target=raw_loop, daemon=True),
    ]
    for t in threads:
        t.start()

    def send_ours(e: CloudEvent) -> None:
        _, value, headers = e.to_kafka()
        producer.send_raw(ours_topic, e.id.encode(), value, headers)

    def send_raw(e: CloudEvent) -> None:
        _, value, headers = e.to_kafka()
        raw_producer.send(raw_topic, key=e.id.encode(), value=value, headers=headers).get(30)

    def batch(send: Any, n: int) -> list[float]:
        events = [_event(i) for i in range(n)]
        for e in events:
            sent[e.id] = time.perf_counter()
            send(e)
            time.sleep(GAP_S)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(e.id in got for e in events):
            time.sleep(0.05)
        return [(got[e.id] - sent[e.id]) * 1000 for e in events if e.id in got]

    try:
        for send in (send_ours, send_raw):  # warm-up: group joins, metadata, connections
            batch(send, 5)
        n = ctx.preset.bus_events
        chunks = 4
        ours: list[float] = []
        theirs: list[float] = []
        for c in range(chunks):  # ABAB
            for send, out in ((send_ours, ours), (send_raw, theirs))[:: 1 if c % 2 == 0 else -1]:
                out.extend(batch(send, n // chunks))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        consumer.close()
        producer.close()
        raw_consumer.close()
        raw_producer.close()
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
        try:
            admin.delete_topics([ours_topic, raw_topic])
        finally:
            admin.close()
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
