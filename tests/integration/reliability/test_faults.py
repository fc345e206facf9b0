"""Faults during the end-to-end flow, on a private stack (own run folder and ports, so the
session's stack keeps serving the other tests): SIGKILL the S3 gateway, the Kafka broker, Triton
and each service at chosen points, start them again, and check the invariants from the stores
(SQL, S3, the Kafka topics), never from logs:

* every accepted upload and annotation is in S3 and SQL exactly once, and announced once;
* no model version is half-published or duplicated;
* every event is eventually processed (the consumer groups' lag drains to zero);
* while a dependency is down the API answers 503 with Retry-After, not 500, and recovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from sqlalchemy import func, select

from ctloop.contracts.topics import Topic
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.model import TINY_MODEL
from ctloop.core.phantom import generate_phantom
from ctloop.db import AnnotationRevision, Prediction, TrainingRound, Volume, session_scope
from ctloop.kafka_security import client_config
from ctloop.platform import PlatformInstance
from ctloop.settings import Settings
from ctloop.stack import LocalStack
from ctloop.storage import ObjectStore

PORT_BASE = 29400  # the services' ports: ingest 29400/29401, inference 29402/29403, ...
# The private stack's own ports, and a training policy that rounds quickly.
PRIVATE_ENV = {
    "CTLOOP_KAFKA__PORT": "29492",
    "CTLOOP_KAFKA__CONTROLLER_PORT": "29493",
    "CTLOOP_S3__PORT": "27270",
    "CTLOOP_TRITON__HTTP_PORT": "28300",
    "CTLOOP_TRITON__GRPC_PORT": "28301",
    "CTLOOP_TRITON__METRICS_PORT": "28302",
    "CTLOOP_TRAINING__IGNITER_MIN_VOLUMES": "3",
    "CTLOOP_TRAINING__ROUND_MIN_NEW": "2",
    "CTLOOP_TRAINING__DEBOUNCE_S": "2",
    "CTLOOP_TRAINING__HOLDOUT_EVERY": "1000",
    "CTLOOP_TRAINING__IGNITER_STEPS": "150",  # long enough to be killed in the middle
    "CTLOOP_TRAINING__SUSTAINER_STEPS": "8",
    "CTLOOP_TRAINING__ACCEPT_TOLERANCE": "1.0",
    "CTLOOP_TRAINING__TICK_S": "1",
    "CTLOOP_TRAINING__MODEL": json.dumps(TINY_MODEL),
}
REPORT: dict[str, list[str]] = {"faults": [], "invariants": []}


class Private(PlatformInstance):
    """A platform instance on a private stack of its own: start, kill, restart, clients."""

    def __init__(self, run: Path) -> None:
        super().__init__(run, PORT_BASE, "", extra_env=PRIVATE_ENV, echo=lambda _: None)
        self.stack = LocalStack(self.settings, echo=lambda _: None)
        self.http = httpx.Client(base_url=self.api, timeout=60)
        self.inference_api = f"http://127.0.0.1:{self.settings.services.inference.http_port}"

    def up(self) -> None:
        """The private stack, then the services: whatever is not running."""
        self.stack.up()
        super().up()

    def kill(self, name: str) -> None:
        pid = int((self.settings.state_dir / f"{name}.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.1)
        REPORT["faults"].append(name)

    def until(self, what: str, check: Callable[[], Any], timeout_s: float = 300) -> Any:
        """Wait for ``check``; a dependency that is still down (a refused connection) is a
        "not yet", not a failure."""

        def tolerant() -> Any:
            try:
                return check()
            except (httpx.HTTPError, OSError):
                return None

        return super().until(what, tolerant, timeout_s)

    def invariant(self, name: str, ok: bool, detail: Any = "") -> None:
        assert ok, f"{name}: {detail}"
        REPORT["invariants"].append(name)


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Private]:
    p = Private(tmp_path / "run")
    try:  # a stack that fails half-way up is still taken down (it would hold the ports)
        p.up()
        p.http.headers["Authorization"] = f"Bearer {p.admin_token}"
        yield p
    finally:
        with contextlib.suppress(Exception):
            p.down()
        p.stack.down()
        print(f"\nfaults injected: {REPORT['faults']}\ninvariants checked: {REPORT['invariants']}")


def _volume(seed: int, site: str = "clinical-a") -> tuple[bytes, bytes]:
    ph = generate_phantom(site, seed, "tiny")
    return nifti_gz_bytes(ph.image, ph.affine), nifti_gz_bytes(ph.label, ph.affine)


def _upload(p: Private, vid: str, dataset: str, seed: int) -> httpx.Response:
    image, label = _volume(seed, "public" if dataset == "public" else "clinical-a")
    files = {"file": ("ct.nii.gz", image, "application/gzip")}
    if dataset == "public":
        files["label"] = ("label.nii.gz", label, "application/gzip")
    site = "pub" if dataset == "public" else "hosp"
    return p.http.post(
        "/v1/volumes",
        files=files,
        data={"site_id": site, "dataset": dataset, "volume_id": vid},
    )


def _events(settings: Settings, topic: Topic) -> dict[str, Counter[str]]:
    """Subject -> event id -> how many records carry it on ``topic``. Delivery is at least
    once (a record may be sent again after a broker failure); consumers deduplicate by id."""
    consumer = KafkaConsumer(
        **client_config(settings),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=3000,
    )
    parts = [TopicPartition(str(topic), n) for n in consumer.partitions_for_topic(str(topic))]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    events: dict[str, Counter[str]] = {}
    for record in consumer:
        headers = dict(record.headers)
        subject = headers.get("ce_subject", b"").decode()
        events.setdefault(subject, Counter())[headers.get("ce_id", b"").decode()] += 1
    consumer.close()
    return events


def _lag(settings: Settings, group: str, topics: list[Topic]) -> int:
    admin = KafkaAdminClient(**client_config(settings))
    consumer = KafkaConsumer(**client_config(settings))
    try:
        committed = admin.list_group_offsets({group: None}).get(group, {})
        parts = [
            TopicPartition(str(t), n)
            for t in topics
            for n in consumer.partitions_for_topic(str(t)) or ()
        ]
        ends = consumer.end_offsets(parts)
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in parts)
    finally:
        consumer.close()
        admin.close()


def _repo_keys(p: Private, store: ObjectStore) -> list[str]:
    s = p.settings
    return store.list_keys(s.s3.model_bucket, f"{s.triton.model_prefix}/")


def _s3_down_refuses_uploads(p: Private) -> None:
    """S3 gateway down: an upload is refused with 503 + Retry-After, nothing is recorded; it
    recovers by itself once the gateway is back."""
    p.kill("s3")
    r = _upload(p, "down-s3", "clinical", 1)
    p.invariant(
        "503 with Retry-After while S3 is down",
        r.status_code == 503 and r.headers.get("retry-after") and r.json()["code"] == "unavailable",
        r.text,
    )
    p.invariant("readyz says not ready", p.http.get("/readyz").status_code == 503)
    p.stack.up()
    p.until("ingest ready again", lambda: p.http.get("/readyz").status_code == 200)
    with session_scope(p.settings.database_url) as db:
        p.invariant("a refused upload left no row", db.get(Volume, "down-s3") is None)


def _kafka_down_keeps_uploads(p: Private) -> None:
    """Kafka down: uploads are still accepted (the outbox keeps their events) and announced
    once the broker is back."""
    p.kill("kafka")
    r = _upload(p, "during-kafka", "clinical", 2)
    p.invariant("upload accepted while Kafka is down", r.status_code == 201, r.text)
    p.stack.up()
    p.until(
        "the outbox to deliver",
        lambda: "during-kafka" in _events(p.settings, Topic.VOLUME_INGESTED),
        180,
    )


def _training_killed_mid_round(p: Private) -> None:
    """Training killed in the middle of the igniter's round (recovered after the restart)."""
    s = p.settings

    def round_running() -> bool:
        with session_scope(s.database_url) as db:
            return bool(db.scalar(select(TrainingRound).where(TrainingRound.status == "running")))

    for i in range(3):  # the public volumes start the igniter's round
        assert _upload(p, f"pub-{i}", "public", 10 + i).status_code == 201
    p.until("the igniter round to start", round_running, 180)
    time.sleep(2)
    p.kill("training")
    p.up()


def _inference_killed_mid_pre_annotation(p: Private) -> None:
    """Inference killed while it pre-annotates: every clinical volume ends up pre-annotated."""
    s = p.settings
    for i in range(3):
        assert _upload(p, f"cli-{i}", "clinical", 20 + i).status_code == 201
    time.sleep(2)
    p.kill("inference")
    p.up()

    def all_predicted() -> bool:
        with session_scope(s.database_url) as db:
            clinical = list(db.scalars(select(Volume.id).where(Volume.dataset == "clinical")))
            done = set(db.scalars(select(Prediction.volume_id)))
            return set(clinical) <= done

    p.until("every clinical volume pre-annotated", all_predicted, 300)


def _triton_down_keeps_the_api(p: Private) -> None:
    """Triton killed: inference says it is not ready, the API keeps answering, and it
    recovers."""
    p.kill("triton")
    inference = httpx.Client(base_url=p.inference_api, timeout=10)
    p.until("inference not ready", lambda: inference.get("/readyz").status_code == 503, 60)
    p.invariant(
        "the API answers while Triton is down", p.http.get("/v1/volumes").status_code == 200
    )
    r = _upload(p, "during-triton", "clinical", 30)
    p.invariant("uploads accepted while Triton is down", r.status_code == 201, r.text)
    p.stack.up()
    p.until("inference ready again", lambda: inference.get("/readyz").status_code == 200, 180)
    p.until(
        "the volume that came while Triton was down pre-annotated",
        lambda: p.http.get("/v1/volumes/during-triton/prediction").status_code == 200,
        300,
    )


def _ingest_killed_mid_upload(p: Private) -> None:
    """Ingest killed in the middle of an upload: the volume is either wholly there or absent,
    and the same upload afterwards succeeds."""
    big, _ = _volume(99)
    payload = big + b""

    def slow_upload() -> None:
        with contextlib.suppress(httpx.HTTPError):
            p.http.post(
                "/v1/volumes",
                files={"file": ("ct.nii.gz", payload, "application/gzip")},
                data={"site_id": "hosp", "dataset": "clinical", "volume_id": "mid-upload"},
            )

    t = threading.Thread(target=slow_upload)
    t.start()
    time.sleep(0.05)
    p.kill("ingest")
    t.join(timeout=60)
    p.up()
    r = p.http.post(
        "/v1/volumes",
        files={"file": ("ct.nii.gz", payload, "application/gzip")},
        data={"site_id": "hosp", "dataset": "clinical", "volume_id": "mid-upload"},
    )
    p.invariant("the upload succeeds after the restart", r.status_code in (200, 201), r.text)


def _annotation_submitted(p: Private) -> None:
    _image, label = _volume(20)
    r = p.http.post(
        "/v1/volumes/cli-0/annotations",
        files={"mask": ("m.nii.gz", label, "application/gzip")},
        data={"minutes": "5"},
    )
    assert r.status_code == 201, r.text


def _stores_agree(p: Private, store: ObjectStore) -> list[Volume]:
    """Every SQL row has its blob in S3, one pre-annotation per model version; the volumes."""
    s = p.settings
    with session_scope(s.database_url) as db:
        vols = list(db.scalars(select(Volume)))
        anns = list(db.scalars(select(AnnotationRevision)))
        dup_preds = db.execute(
            select(Prediction.volume_id, Prediction.model, Prediction.version, func.count())
            .group_by(Prediction.volume_id, Prediction.model, Prediction.version)
            .having(func.count() > 1)
        ).all()
    p.invariant(
        "every volume row has its image in S3",
        all(store.exists(s.s3.bucket, v.s3_key) for v in vols),
    )
    p.invariant(
        "every annotation has its mask in S3",
        all(store.exists(s.s3.bucket, a.s3_key) for a in anns),
    )
    p.invariant("one pre-annotation per volume and model version", not dup_preds, dup_preds)
    return vols


def _announced_once(p: Private, vols: list[Volume]) -> None:
    """Every volume and the annotation announced by exactly one event (deduplicated by id)."""
    s = p.settings

    def announced_once() -> bool:
        events = _events(s, Topic.VOLUME_INGESTED)
        return set(events) == {v.id for v in vols} and all(len(e) == 1 for e in events.values())

    p.until("every volume announced by exactly one event", announced_once, 120)
    REPORT["invariants"].append("every accepted volume announced by exactly one event")
    redelivered = {k: dict(v) for k, v in _events(s, Topic.VOLUME_INGESTED).items()
                   if max(v.values()) > 1}  # fmt: skip
    print(f"\nevents delivered more than once (deduplicated by id): {redelivered}")
    events = _events(s, Topic.ANNOTATION_SUBMITTED)
    p.invariant("the annotation announced by one event", len(events.get("cli-0", {})) == 1)


def _no_half_published_version(p: Private, store: ObjectStore) -> None:
    keys = lambda: _repo_keys(p, store)  # noqa: E731
    versions = [k for k in keys() if k.endswith("/manifest.json") and "/igniter/" in f"/{k}"]
    igniter_dirs = {k.rsplit("/", 2)[0] + "/" + k.rsplit("/", 2)[1] for k in versions}
    weights = [k for k in keys() if "/igniter/" in f"/{k}" and k.endswith("weights.pt")]
    p.invariant(
        "no half-published or duplicated model version",
        len(igniter_dirs) == len(versions) == len(weights) >= 1,
        (versions, weights),
    )


def _consumer_lag_drains(p: Private) -> None:
    s = p.settings
    p.until(
        "the consumer lag to drain",
        lambda: (
            _lag(s, "inference", [Topic.VOLUME_INGESTED, Topic.MODEL_PUBLISHED]) == 0
            and _lag(s, "training", [Topic.VOLUME_INGESTED, Topic.ANNOTATION_SUBMITTED]) == 0
        ),
        180,
    )
    REPORT["invariants"].append("consumer lag drained to zero")


@pytest.mark.timeout(1800)
def test_faults_lose_nothing_and_the_platform_recovers(private: Private):
    p = private
    _s3_down_refuses_uploads(p)
    _kafka_down_keeps_uploads(p)
    _training_killed_mid_round(p)

    # After the restart the round is recovered and the igniter is published exactly once,
    # never half.
    store = ObjectStore(p.settings)
    p.until(
        "the igniter published after the restart",
        lambda: any(k.endswith("/1/manifest.json") for k in _repo_keys(p, store)),
        600,
    )

    _inference_killed_mid_pre_annotation(p)
    _triton_down_keeps_the_api(p)
    _ingest_killed_mid_upload(p)

    # An annotation, then a last check of every invariant from the stores.
    _annotation_submitted(p)
    vols = _stores_agree(p, store)
    _announced_once(p, vols)
    _no_half_published_version(p, store)
    _consumer_lag_drains(p)
