"""A ctloop platform of its own for the benchmarks: a platform instance (``ctloop.platform``:
the four services as real processes on the shared stack, with their own ports, workflow database,
Kafka consumer groups and model names), plus the client-side helpers the benchmarks drive it
with."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import tritonclient.grpc as triton_grpc
import urllib3
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from tritonclient.utils import InferenceServerException

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import ModelRef, model_published, payload_for
from ctloop.contracts.topics import Topic
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.kafka_security import client_config
from ctloop.model_repository import ModelRepository
from ctloop.platform import PlatformInstance, running

log = logging.getLogger("ctloop.bench")


class Platform(PlatformInstance):
    """A bench platform instance (see :func:`bench_platform`) with the benchmarks' client side:
    uploads through urllib3, publishing a checkpoint, waiting for a consumer group. It polls
    every 50 ms: the benchmarks time what they wait for. No round starts unless a benchmark asks
    for one (``extra_env``)."""

    def __init__(self, root: Path, port_base: int, extra_env: dict[str, str] | None = None) -> None:
        tag = uuid.uuid4().hex[:8]
        no_rounds = {
            "CTLOOP_TRAINING__IGNITER_MIN_VOLUMES": "1000000",
            "CTLOOP_TRAINING__ROUND_MIN_NEW": "1000000",
        }
        super().__init__(
            root / "run",
            port_base,
            tag,
            group_prefix=f"bench-{tag}-",
            extra_env={**no_rounds, **(extra_env or {})},
            echo=lambda line: log.debug(f"bench platform: {line}"),
            poll_s=0.05,
        )
        self.root = root
        self.group_prefix = self.settings.kafka.group_prefix
        self.inference_grpc = self.settings.services.grpc_target("inference")
        self._pool: urllib3.PoolManager | None = None

    # ------------------------------------------------------------ processes
    def service_pids(self) -> dict[str, int]:
        pids = {}
        for name in ("ingest", "inference", "training", "metrics"):
            f = self.run_dir / "state" / f"{name}.pid"
            if f.exists():
                pids[name] = int(f.read_text().strip())
        return pids

    def client(self, timeout: float = 600) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=timeout, headers=self.admin_headers())

    def upload(
        self, files: dict[str, tuple[str, bytes, str]], data: dict[str, str]
    ) -> tuple[int, dict[str, str], str]:
        """POST /v1/volumes as multipart form: status, headers and body.

        Through urllib3, the HTTP client the direct ``minio`` put of the baselines uses, so both
        sides pay the same client; httpx's sync client needs ~1.4 s to send 90 MB on this kind of
        machine (urllib3: 0.05 s), which would be charged to the platform.
        """
        r = self._http().request(
            "POST", f"{self.api}/v1/volumes", fields={**data, **files}, headers=self.admin_headers()
        )
        return r.status, dict(r.headers), r.data.decode(errors="replace")

    def put_volume(self, volume_id: str, body: bytes, site: str) -> tuple[int, str]:
        """PUT /v1/volumes/{id}: a clinical CT as the request body (urllib3, as above)."""
        r = self._http().request(
            "PUT",
            f"{self.api}/v1/volumes/{volume_id}?site_id={site}&dataset=clinical",
            body=body,
            headers={**self.admin_headers(), "Content-Type": "application/gzip"},
        )
        return r.status, r.data.decode(errors="replace")

    def _http(self) -> urllib3.PoolManager:
        if self._pool is None:
            self._pool = urllib3.PoolManager(maxsize=16, timeout=urllib3.Timeout(total=600))
        return self._pool

    # ------------------------------------------------------------ models
    def publish(self, checkpoint: Path, model: str, version: int) -> ModelRef:
        """Publish ``checkpoint`` as ``model``/``version`` the way training does: the version
        in the S3 model repository, then ``model.published`` (the inference service loads it)."""
        spec = segmentation_spec(model)
        package = package_checkpoint(checkpoint, spec, metrics={"bench": True})
        repo = ModelRepository(self.settings)
        repo.publish_version(spec, version, package.files, package.manifest)
        ref = ModelRef(model=model, version=version)
        event = model_published(
            "/ctloop/bench", model=ref, manifest=repo.manifest_ref(model, version)
        )
        producer = EventProducer(self.settings, client_id=f"bench-{self.tag}")
        try:
            producer.publish(event)
        finally:
            producer.close()
        return ref

    def wait_caught_up(self, group: str, topics: list[Topic], timeout_s: float = 300) -> None:
        """Until consumer group ``group`` (without prefix) has committed every record of
        ``topics``: the backlog a fresh group starts from is behind it."""
        admin = KafkaAdminClient(**client_config(self.settings), client_id="bench-lag")
        probe = KafkaConsumer(**client_config(self.settings))
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

            self.until(f"{group} caught up", lambda: lag() == 0, timeout_s)
        finally:
            probe.close()
            admin.close()


@contextmanager
def bench_platform(
    root: Path, port_base: int, extra_env: dict[str, str] | None = None
) -> Iterator[Platform]:
    """Start the services (HTTP port ``port_base + 2i``, gRPC the next); stop them after."""
    root.mkdir(parents=True, exist_ok=True)
    platform = Platform(root, port_base, extra_env)
    t0 = time.monotonic()
    try:
        with running(platform):  # down also after an interrupted up (what it started is stopped)
            log.info(
                "bench platform up", extra={"tag": platform.tag, "seconds": time.monotonic() - t0}
            )
            yield platform
    finally:
        unload_models(platform)


def unload_models(platform: Platform) -> None:
    """The platform's models out of the stack's Triton, which the benchmarks' platforms share:
    each loaded version holds a python stub (~0.9 GB here) that later benchmarks would run
    beside."""
    client = triton_grpc.InferenceServerClient(platform.settings.triton.grpc_url)
    try:
        for name in (platform.igniter, platform.sustainer):
            with contextlib.suppress(InferenceServerException):
                client.unload_model(name)
    finally:
        client.close()


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
        found = self.platform.until(
            f"prediction of {volume_id}", lambda: self.arrived.get(key), timeout_s
        )
        return float(found)

    def first(self, volume_ids: list[str], model: ModelRef, timeout_s: float = 1800) -> float:
        """Epoch time the first ``prediction.completed`` of ``model`` for any of
        ``volume_ids`` arrived."""
        wanted = [(v, model.model, model.version) for v in volume_ids]

        def earliest() -> float | None:
            times = [self.arrived[k] for k in wanted if k in self.arrived]
            return min(times) if times else None

        found = self.platform.until(
            f"a prediction by {model.model} v{model.version}", earliest, timeout_s
        )
        return float(found)
