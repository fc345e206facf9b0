"""A ctloop platform of its own for the benchmarks: the four services as real processes
(``ctloop services up``) on the shared stack, with their own ports, workflow database, Kafka
consumer groups and model names, plus the client-side helpers the benchmarks drive it with."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import urllib3
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts import keys
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import BlobRef, ModelPublished, ModelRef, make_event, payload_for
from ctloop.contracts.topics import MODEL_PUBLISHED, Topic
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.model_repository import ModelRepository
from ctloop.settings import REPO_ROOT, Settings
from ctloop.stack.services import instance_env

log = logging.getLogger("ctloop.bench")


class Platform:
    """A running bench platform (see :func:`bench_platform`)."""

    def __init__(self, root: Path, port_base: int, env: dict[str, str], tag: str) -> None:
        self.root = root
        self.port_base = port_base
        self.env = env
        self.tag = tag
        self.run_dir = root / "run"
        self.igniter = f"igniter{tag}"
        self.sustainer = f"sustainer{tag}"
        self.group_prefix = env["CTLOOP_KAFKA__GROUP_PREFIX"]
        self.settings = settings_from(env)
        self.api = f"http://127.0.0.1:{port_base}"
        self.inference_grpc = f"127.0.0.1:{port_base + 3}"
        self.training_grpc = f"127.0.0.1:{port_base + 5}"
        self._pool: urllib3.PoolManager | None = None

    # ------------------------------------------------------------ processes
    def ctloop(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ctloop.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def service_pids(self) -> dict[str, int]:
        pids = {}
        for name in ("ingest", "inference", "training", "metrics"):
            f = self.run_dir / "state" / f"{name}.pid"
            if f.exists():
                pids[name] = int(f.read_text().strip())
        return pids

    def client(self, timeout: float = 600) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=timeout, headers=self._auth())

    def upload(
        self, files: dict[str, tuple[str, bytes, str]], data: dict[str, str]
    ) -> tuple[int, dict[str, str], str]:
        """POST /v1/volumes as multipart form: status, headers and body.

        Through urllib3, the HTTP client the direct ``minio`` put of the baselines uses, so both
        sides pay the same client; httpx's sync client needs ~1.4 s to send 90 MB on this kind of
        machine (urllib3: 0.05 s), which would be charged to the platform.
        """
        r = self._http().request(
            "POST", f"{self.api}/v1/volumes", fields={**data, **files}, headers=self._auth()
        )
        return r.status, dict(r.headers), r.data.decode(errors="replace")

    def put_volume(self, volume_id: str, body: bytes, site: str) -> tuple[int, str]:
        """PUT /v1/volumes/{id}: a clinical CT as the request body (urllib3, as above)."""
        r = self._http().request(
            "PUT",
            f"{self.api}/v1/volumes/{volume_id}?site_id={site}&dataset=clinical",
            body=body,
            headers={**self._auth(), "Content-Type": "application/gzip"},
        )
        return r.status, r.data.decode(errors="replace")

    def _http(self) -> urllib3.PoolManager:
        if self._pool is None:
            self._pool = urllib3.PoolManager(maxsize=16, timeout=urllib3.Timeout(total=600))
        return self._pool

    def _auth(self) -> dict[str, str]:
        token = (self.run_dir / "admin-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def logs_tail(self, chars: int = 1500) -> str:
        logs = self.run_dir / "logs"
        return json.dumps({p.name: p.read_text()[-chars:] for p in sorted(logs.glob("*.log"))})

    # ------------------------------------------------------------ models
    def publish(self, checkpoint: Path, model: str, version: int) -> ModelRef:
        """Publish ``checkpoint`` as ``model``/``version`` the way training does: the version
        in the S3 model repository, then ``model.published`` (the inference service loads it)."""
        spec = segmentation_spec(model)
        package = package_checkpoint(checkpoint, spec, metrics={"bench": True})
        ModelRepository(self.settings).publish_version(
            spec, version, package.files, package.manifest
        )
        ref = ModelRef(model=model, version=version)
        key = keys.model_manifest(self.settings.triton.model_prefix, model, version)
        payload = ModelPublished(
            model=ref, manifest=BlobRef(bucket=self.settings.s3.model_bucket, key=key)
        )
        producer = EventProducer(self.settings, client_id=f"bench-{self.tag}")
        try:
            producer.publish(make_event(MODEL_PUBLISHED, "/ctloop/bench", model, payload))
        finally:
            producer.close()
        return ref

    def wait_caught_up(self, group: str, topics: list[Topic], timeout_s: float = 300) -> None:
        """Until consumer group ``group`` (without prefix) has committed every record of
        ``topics``: the backlog a fresh group starts from is behind it."""
        admin = KafkaAdminClient(
            bootstrap_servers=self.settings.kafka.bootstrap_servers, client_id="bench-lag"
        )
        probe = KafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        try:
            parts = [
                TopicPartition(t, p)
                for t in topics
                for p in sorted(probe.partitions_for_topic(str(t)) or [])
            ]
            ends = probe.end_offsets(parts)

            def lag() -> int:
                gid = self.group_prefix + group
                done = admin.list_group_offsets({gid: None}).get(gid, {})
                return sum(
                    max(0, end - (done[tp].offset if tp in done else 0)) for tp, end in ends.items()
                )

            until(f"{group} caught up", lambda: lag() == 0, timeout_s, self)
        finally:
            probe.close()
            admin.close()


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process started with ``env`` sees (for this process's own clients)."""
    ours = {k: v for k, v in env.items() if k.startswith("CTLOOP_")}
    saved = {k: os.environ.get(k) for k in ours}
    os.environ.update(ours)
    try:
        return Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def bench_platform(
    root: Path, port_base: int, extra_env: dict[str, str] | None = None
) -> Iterator[Platform]:
    """Start the services (HTTP port ``port_base + 2i``, gRPC the next); stop them after."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        **instance_env(root / "run", port_base, tag, group_prefix=f"bench-{tag}-"),
        # No round unless a benchmark asks for one.
        "CTLOOP_TRAINING__IGNITER_MIN_VOLUMES": "1000000",
        "CTLOOP_TRAINING__ROUND_MIN_NEW": "1000000",
        **(extra_env or {}),
    }
    root.mkdir(parents=True, exist_ok=True)
    platform = Platform(root, port_base, env, tag)
    t0 = time.monotonic()
    try:  # down also after an interrupted up (the services it started are stopped)
        up = platform.ctloop("services", "up")
        if up.returncode != 0:
            raise RuntimeError(f"services did not start: {up.stdout[-2000:]}{up.stderr[-2000:]}")
        log.info("bench platform up", extra={"tag": tag, "seconds": time.monotonic() - t0})
        yield platform
    finally:
        platform.ctloop("services", "down")


def until(what: str, check: Callable[[], Any], timeout_s: float, platform: Platform) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}; logs: {platform.logs_tail()}")


class CompletionWatcher:
    """Records when each ``prediction.completed`` event reaches a consumer of the services'
    own kind (keyed by volume id and model), from a background thread."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.arrived: dict[tuple[str, str, int], float] = {}
        self._stop = threading.Event()
        self._producer = EventProducer(platform.settings, client_id=f"bench-watch-{platform.tag}")
        self._consumer = EventConsumer(
            platform.settings,
            f"bench-watch-{uuid.uuid4().hex[:6]}",
            [Topic.PREDICTION_COMPLETED],
            self._on_event,
            self._producer,
        )
        self._thread = threading.Thread(target=self._consumer.run, args=(self._stop,), daemon=True)

    def _on_event(self, event: CloudEvent) -> None:
        data = payload_for(event).model_dump()
        key = (data["volume_id"], data["model"]["model"], data["model"]["version"])
        self.arrived.setdefault(key, time.time())

    def __enter__(self) -> CompletionWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._consumer.close()
        self._producer.close()

    def wait(self, volume_id: str, model: ModelRef, timeout_s: float = 1800) -> float:
        """Epoch time ``prediction.completed`` for (volume, model version) arrived."""
        key = (volume_id, model.model, model.version)
        found = until(f"prediction of {volume_id}", lambda: self.arrived.get(key), timeout_s,
                      self.platform)  # fmt: skip
        return float(found)
