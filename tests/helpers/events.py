"""Reading what the services announced: a topic consumed from its start, as a service would."""

from __future__ import annotations

import time
from collections.abc import Callable

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.topics import Topic
from ctloop.settings import Settings


def wait_for_events(
    settings: Settings,
    topic: Topic,
    match: Callable[[CloudEvent], bool],
    count: int = 1,
    timeout_s: float = 60.0,
    group: str | None = None,
) -> list[CloudEvent]:
    """Consume ``topic`` from the start until ``count`` events match (or fail)."""
    seen: list[CloudEvent] = []
    producer = EventProducer(settings, client_id="test-dlq")
    consumer = EventConsumer(
        settings,
        group or f"test-{time.monotonic_ns()}",
        [topic],
        lambda e: seen.append(e) if match(e) else None,
        producer,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < count and time.monotonic() < deadline:
            consumer.poll_once(500)
    finally:
        consumer.close()
        producer.close()
    assert len(seen) >= count, f"{len(seen)} of {count} matching events on {topic}"
    return seen
