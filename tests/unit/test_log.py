import json
import logging

from ctloop.log import JsonFormatter, bind


def test_lines_are_json_with_bound_identifiers():
    logger = logging.getLogger("ctloop.test")
    record = logger.makeRecord("ctloop.test", logging.INFO, __file__, 1, "handled", (), None)
    with bind(event_id="e-1", volume_id="v-9"):
        line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "handled"
    assert line["event_id"] == "e-1"
    assert line["volume_id"] == "v-9"
    assert line["level"] == "info"
    outside = json.loads(JsonFormatter().format(record))
    assert "event_id" not in outside
