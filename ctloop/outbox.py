"""Transactional outbox: events recorded with their effect, then relayed to Kafka."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ctloop.bus import EventProducer
from ctloop.contracts.events import CloudEvent
from ctloop.db import OutboxEvent, session_scope

log = logging.getLogger(__name__)


def stage_event(session: Session, event: CloudEvent) -> None:
    """Record ``event`` in the caller's transaction; it is published once that commits."""
    key, value, headers = event.to_kafka()
    session.add(
        OutboxEvent(
            event_id=event.id,
            topic=str(event.topic),
            key=key.decode(),
            value=value.decode(),
            headers={k: v.decode() for k, v in headers},
        )
    )


class OutboxRelay:
    """Publishes unsent outbox rows in order; safe to run in several processes (at-least-once).
    With ``topics``, only rows of those topics: each service relays what it staged, which is
    all its principal may write to the bus (:func:`ctloop.kafka_security.produced_topics`)."""

    def __init__(
        self,
        database_url: str,
        producer: EventProducer,
        batch: int = 100,
        topics: Collection[str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.producer = producer
        self.batch = batch
        self.topics = sorted(topics) if topics is not None else None
        self._wake = threading.Event()

    def flush(self) -> int:
        """Publish what is pending now; the number of events sent."""
        sent = 0
        while True:
            with session_scope(self.database_url) as s:
                pending = select(OutboxEvent).where(OutboxEvent.sent_at.is_(None))
                if self.topics is not None:
                    pending = pending.where(OutboxEvent.topic.in_(self.topics))
                rows = s.scalars(pending.order_by(OutboxEvent.id).limit(self.batch)).all()
                for row in rows:
                    self.producer.send_raw(
                        row.topic,
                        row.key.encode(),
                        row.value.encode(),
                        [(k, str(v).encode()) for k, v in row.headers.items()],
                    )
                    row.sent_at = datetime.now(UTC)
                    sent += 1
            if len(rows) < self.batch:
                return sent

    def notify(self) -> None:
        """Ask a running relay loop to flush now (after a commit)."""
        self._wake.set()

    def run(self, stop: threading.Event, interval_s: float = 2.0) -> None:
        while not stop.is_set():
            try:
                self.flush()
            except Exception:
                log.exception("outbox relay failed; will retry")
            self._wake.wait(interval_s)
            self._wake.clear()
