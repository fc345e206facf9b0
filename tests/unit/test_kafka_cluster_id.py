"""The KRaft cluster id ``ctloop stack up`` formats Kafka's storage with."""

from __future__ import annotations

import base64
import uuid
from unittest import mock

from ctloop.stack.components import kafka


def test_cluster_ids_are_16_bytes_and_never_look_like_an_option():
    # uuid4 bytes whose base64 starts with "-" come first: the id must skip them.
    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))
    fine = uuid.UUID(bytes=b"\x04" + bytes(15))
    assert base64.urlsafe_b64encode(dash.bytes).decode().startswith("-")
    with mock.patch.object(kafka.uuid, "uuid4", side_effect=[dash, dash, fine]):
        cluster_id = kafka._kafka_cluster_id()
    assert not cluster_id.startswith("-")
    assert base64.urlsafe_b64decode(cluster_id + "==") == fine.bytes
    for _ in range(2000):
        cid = kafka._kafka_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
