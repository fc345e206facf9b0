import json

import pytest

from ctloop.contracts.events import CloudEvent, InvalidEvent
from ctloop.contracts.topics import EVENT_TYPES, MODEL_PUBLISHED, Topic


def _headers(**over: str) -> list[tuple[str, bytes]]:
    base = {
        "ce_specversion": "1.0",
        "ce_id": "e1",
        "ce_source": "/s",
        "ce_type": "org.ctloop.model.published.v1",
    }
    base.update(over)
    return [(k, v.encode()) for k, v in base.items()]


def test_round_trip_keeps_every_attribute():
    event = CloudEvent(MODEL_PUBLISHED, "/training", "sustainer", {"version": 3})
    key, value, headers = event.to_kafka()
    assert key == b"sustainer"
    assert json.loads(value) == {"schema_version": 1, "version": 3}
    assert CloudEvent.from_kafka(value, headers) == event


def test_every_event_type_travels_on_its_own_catalog_topic():
    assert {t.topic for t in EVENT_TYPES.values()} == set(Topic) - {Topic.DEAD_LETTER}
    assert all(name.startswith("org.ctloop.") for name in EVENT_TYPES)


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"{}", _headers(ce_id=""), "missing CloudEvents headers: ce_id"),
        (b"{}", _headers(ce_specversion="0.3"), "unsupported specversion"),
        (b"{}", _headers(ce_type="org.other.thing"), "unknown event type"),
        (b"{nope", _headers(), "not JSON"),
        (b"[1, 2]", _headers(), "not a JSON object"),
        (b'{"schema_version": 2}', _headers(), "schema_version 2"),
        (b"{}", _headers(), "schema_version None"),
        (b"{}", [("ce_id", b"\xff\xfe")], "not UTF-8"),
    ],
)
def test_malformed_records_are_rejected_with_the_reason(value, headers, reason):
    with pytest.raises(InvalidEvent, match=reason):
        CloudEvent.from_kafka(value, headers)
