"""The four services as real processes on the session's real stack (``ctloop.platform``), each
test platform with its own ports, workflow database and model names, tuned so rounds come after
a few volumes and train in seconds."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctloop.core.model import TINY_MODEL
from ctloop.platform import PlatformInstance, running

# Rounds after 3 volumes, a few steps of the tiny model, on 2 cores.
TEST_TRAINING = {
    "CTLOOP_TRAINING__IGNITER_MIN_VOLUMES": "3",
    "CTLOOP_TRAINING__ROUND_MIN_NEW": "3",
    "CTLOOP_TRAINING__DEBOUNCE_S": "2",
    "CTLOOP_TRAINING__HOLDOUT_EVERY": "3",
    "CTLOOP_TRAINING__NPROC_PER_NODE": "2",
    "CTLOOP_TRAINING__IGNITER_STEPS": "16",
    "CTLOOP_TRAINING__SUSTAINER_STEPS": "8",
    "CTLOOP_TRAINING__ACCEPT_TOLERANCE": "1.0",
    "CTLOOP_TRAINING__TICK_S": "1",
    "CTLOOP_TRAINING__MODEL": json.dumps(TINY_MODEL),
}


@contextmanager
def run_platform(
    tmp_path: Path, ports: dict[str, int], extra_env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """``ports``: INGEST/INFERENCE/TRAINING/METRICS -> HTTP port (gRPC is the next one); the
    instance's ports follow the ingest port. Yields what tests read of it: its environment, tag,
    ``ctloop`` command, logs folder, API address, admin token and gRPC channel maker."""
    instance = PlatformInstance(
        tmp_path / "run",
        ports["INGEST"],
        uuid.uuid4().hex[:8],
        extra_env={**TEST_TRAINING, **(extra_env or {})},
    )
    with running(instance):
        yield {
            "env": instance.env,
            "tag": instance.tag,
            "ctloop": instance.ctloop,
            "logs": instance.logs_dir,
            "api": instance.api,
            "admin_token": instance.admin_token,
            "grpc_channel": instance.grpc_channel,  # the operator's, to any of its gRPC APIs
        }
