"""The four services as real processes (``ctloop services up``) on the session's real stack,
each test platform with its own ports, workflow database and model names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctloop.settings import REPO_ROOT
from ctloop.stack.services import instance_env

# A model small enough to train in seconds on 2 cores.
TINY_MODEL = {"spacing": [8, 8, 8], "patch": [32, 32, 32], "channels": [8, 16], "strides": [2]}


@contextmanager
def run_platform(
    tmp_path: Path, ports: dict[str, int], extra_env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """``ports``: INGEST/INFERENCE/TRAINING/METRICS -> HTTP port (gRPC is the next one)."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        **instance_env(tmp_path / "run", ports["INGEST"], tag),
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
        **(extra_env or {}),
    }

    def ctloop(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ctloop.cli", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    up = ctloop("services", "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        logs = tmp_path / "run" / "logs"
        yield {
            "env": env,
            "tag": tag,
            "ctloop": ctloop,
            "logs": logs,
            "api": f"http://127.0.0.1:{ports['INGEST']}",
            "admin_token": (logs.parent / "admin-token").read_text().strip(),
        }
    finally:
        ctloop("services", "down")


def until(what: str, check: Callable[[], Any], timeout_s: float, logs: Path) -> Any:
    """Poll ``check`` until it returns something truthy; on timeout fail with the logs' tails."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1.0)
    tails = {p.name: p.read_text()[-1500:] for p in sorted(logs.glob("*.log"))}
    raise AssertionError(f"timed out waiting for {what}; logs:\n{json.dumps(tails, indent=1)}")
