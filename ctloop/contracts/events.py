"""CloudEvents 1.0 on Kafka, binary content mode.

Attributes travel as ``ce_*`` headers, the data as the JSON record value, the record key is the
entity the event is about (volume id, model id) so one entity's events stay ordered on one
partition. The data always carries ``schema_version``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ctloop.contracts.topics import EVENT_TYPES, EventType, Topic

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"
_REQUIRED = ("ce_specversion", "ce_id", "ce_source", "ce_type")


class InvalidEvent(ValueError):
    """A Kafka record that is not a well-formed ctloop CloudEvent (it goes to the dead letters)."""


class UnknownSubject(InvalidEvent):
    """A well-formed event about an entity this service's stores do not know."""


@dataclass(frozen=True)
class CloudEvent:
    type: EventType
    source: str
    subject: str  # the entity the event is about; also the Kafka record key
    data: dict[str, Any]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def topic(self) -> Topic:
        return self.type.topic

    def to_kafka(self) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """(key, value, headers) of the Kafka record for this event."""
        headers = [
            ("ce_specversion", SPEC_VERSION),
            ("ce_id", self.id),
            ("ce_source", self.source),
            ("ce_type", self.type.ce_type),
            ("ce_subject", self.subject),
            ("ce_time", self.time),
            ("content-type", CONTENT_TYPE),
        ]
        body = {"schema_version": self.type.schema_version, **self.data}
        value = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return self.subject.encode(), value, [(k, v.encode()) for k, v in headers]

    @classmethod
    def from_kafka(cls, value: bytes | None, headers: list[tuple[str, bytes]] | None) -> CloudEvent:
        """Parse a record; raise :class:`InvalidEvent` with the reason when it is malformed."""
        try:
            attrs = {k: v.decode() for k, v in headers or []}
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"header is not UTF-8: {exc}") from exc
        missing = [h for h in _REQUIRED if not attrs.get(h)]
        if missing:
            raise InvalidEvent(f"missing CloudEvents headers: {', '.join(missing)}")
        if attrs["ce_specversion"] != SPEC_VERSION:
            raise InvalidEvent(f"unsupported specversion {attrs['ce_specversion']!r}")
        event_type = EVENT_TYPES.get(attrs["ce_type"])
        if event_type is None:
            raise InvalidEvent(f"unknown event type {attrs['ce_type']!r}")
        try:
            data = json.loads(value or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEvent(f"data is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidEvent("data is not a JSON object")
        version = data.pop("schema_version", None)
        if version != event_type.schema_version:
            raise InvalidEvent(f"schema_version {version!r} does not match {event_type.ce_type}")
        return cls(
            type=event_type,
            source=attrs["ce_source"],
            subject=attrs.get("ce_subject", ""),
            data=data,
            id=attrs["ce_id"],
            time=attrs.get("ce_time", ""),
        )
