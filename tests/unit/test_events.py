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


def test_each_constructor_fixes_its_type_and_subject_and_validates_its_data():
    from ctloop.contracts import payloads as p
    from ctloop.contracts.topics import ANNOTATION_SUBMITTED, VOLUME_INGESTED

    blob = p.BlobRef(bucket="b", key="k", version_id="v")
    ref = p.ModelRef(model="sustainer", version=2)
    events = {
        "volume.ingested": p.volume_ingested(
            "/s",
            volume_id="v1",
            site_id="a",
            dataset="clinical",
            image=blob,
            shape=(2, 3, 4),
            spacing=(1.0, 1.0, 2.5),
            sha256="0" * 64,
        ),
        "prediction.completed": p.prediction_completed(
            "/s", volume_id="v1", site_id="a", model=ref, mask=blob, uncertainty=0.1, seconds=2.0
        ),
        "annotation.submitted": p.annotation_submitted(
            "/s", volume_id="v1", site_id="a", revision=1, author="ann", mask=blob, minutes=3.0
        ),
        "training.started": p.training_started("/s", round=1, model="sustainer", volumes=["v1"]),
        "training.completed": p.training_completed(
            "/s", round=1, model="sustainer", outcome="published", version=2
        ),
        "model.published": p.model_published("/s", model=ref, manifest=blob, round=1),
    }
    for name, event in events.items():
        assert event.type.name == name
        assert event.subject == ("sustainer" if "model" in name or "training" in name else "v1")
        assert p.payload_for(CloudEvent.from_kafka(*event.to_kafka()[1:])) is not None
    # The same bytes as the payload built by hand (what producers did before).
    by_hand = p.make_event(
        ANNOTATION_SUBMITTED,
        "/s",
        "v1",
        p.AnnotationSubmitted(
            volume_id="v1", site_id="a", revision=1, author="ann", mask=blob, minutes=3.0
        ),
    )
    assert by_hand.data == events["annotation.submitted"].data
    assert VOLUME_INGESTED.ce_type == events["volume.ingested"].type.ce_type


def test_a_consumer_ignores_fields_a_newer_producer_added():
    """A rolling upgrade: the producer is one release ahead and adds optional fields (at the
    top level and inside a blob reference); the older consumer reads the event, it does not
    dead-letter it."""
    from ctloop.contracts import payloads as p

    event = p.volume_ingested(
        "/ingest",
        volume_id="v1",
        site_id="s",
        dataset="clinical",
        image=p.BlobRef(bucket="b", key="k"),
        shape=(2, 2, 2),
        spacing=(1.0, 1.0, 1.0),
        sha256="0" * 64,
    )
    _, value, headers = event.to_kafka()
    newer = json.loads(value)
    newer["scanner"] = "added in the next release"
    newer["image"]["storage_class"] = "STANDARD"
    consumed = CloudEvent.from_kafka(json.dumps(newer).encode(), headers)
    payload = p.payload_for(consumed)
    assert isinstance(payload, p.VolumeIngested)
    assert payload.volume_id == "v1" and payload.image.key == "k"
    assert "scanner" not in payload.model_dump()


def test_a_breaking_change_is_a_new_type_that_older_consumers_refuse():
    """What an older consumer cannot read safely travels as another schema version: a type it
    does not know, dead-lettered with the reason."""
    with pytest.raises(InvalidEvent, match="unknown event type"):
        CloudEvent.from_kafka(
            b'{"schema_version": 2}', _headers(ce_type="org.ctloop.model.published.v2")
        )
