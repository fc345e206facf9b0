"""Load: concurrent simulated annotators and uploaders for a bounded time against ingest running
as a real process (HTTP over TCP) on the real stack. No 5xx, no lost work, no volume held by two
annotators; latency percentiles are printed (not asserted: machines here are noisy).

``CTLOOP_RELIABILITY_LONG=1`` runs longer with more clients (``make test-reliability LONG=1``)."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.phantom import generate_phantom
from ctloop.db import AnnotationRevision, Volume, session_scope
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from tests.helpers.platform import run_platform

PORTS = {"INGEST": 29520, "INFERENCE": 29522, "TRAINING": 29524, "METRICS": 29526}
LONG = os.environ.get("CTLOOP_RELIABILITY_LONG") == "1"
DURATION_S = 300.0 if LONG else 20.0
ANNOTATORS, UPLOADERS = (8, 4) if LONG else (4, 2)


@pytest.fixture
def platform(tmp_path: Path):
    with run_platform(tmp_path, PORTS) as running:
        yield running


def _load_users(admin: httpx.Client) -> dict[str, str]:
    """The site "load" with its annotators and uploaders; their API tokens by user."""
    assert admin.post("/v1/sites", json={"id": "load"}).status_code == 201
    tokens = {}
    for n in range(ANNOTATORS + UPLOADERS):
        user, role = (f"ann{n}", "annotator") if n < ANNOTATORS else (f"up{n}", "integration")
        r = admin.post("/v1/users", json={"id": user, "role": role, "sites": ["load"]})
        assert r.status_code == 201, r.text
        tokens[user] = admin.post(f"/v1/users/{user}/tokens", json={}).json()["token"]
    return tokens


class _Load:
    """The simulated clients and what they saw: latencies and statuses per operation, the
    uploads and annotations accepted, the claims (annotator, volume)."""

    def __init__(self, api: str, tokens: dict[str, str], unique: str) -> None:
        self.api, self.tokens, self.unique = api, tokens, unique
        ph = generate_phantom("clinical-a", 1, "tiny")
        self.image = ph.image.astype(np.int16)
        self.affine = ph.affine
        self.mask = nifti_gz_bytes(ph.label, ph.affine)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, list[int]] = defaultdict(list)
        self.accepted_uploads: list[str] = []
        self.accepted_annotations: list[str] = []
        self.claims: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.stop = time.monotonic() + DURATION_S

    def volume_bytes(self, n: int) -> bytes:
        varied = self.image.copy()
        varied.flat[n % varied.size] += 1  # other bytes: another volume, not a repeat
        return nifti_gz_bytes(varied, self.affine)

    def client(self, user: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.api, timeout=60, headers={"Authorization": f"Bearer {self.tokens[user]}"}
        )

    def timed(self, op: str, send) -> httpx.Response:
        t0 = time.perf_counter()
        r = send()
        with self.lock:
            self.latencies[op].append(time.perf_counter() - t0)
            self.statuses[op].append(r.status_code)
        return r

    def uploader(self, user: str, n0: int) -> None:
        c = self.client(user)
        n = n0
        while time.monotonic() < self.stop:
            vid = f"ld-{self.unique}-{n}"
            r = self.timed(
                "upload",
                lambda vid=vid, n=n: c.post(
                    "/v1/volumes",
                    files={"file": ("ct.nii.gz", self.volume_bytes(n), "application/gzip")},
                    data={"site_id": "load", "dataset": "clinical", "volume_id": vid},
                ),
            )
            if r.status_code == 201:
                with self.lock:
                    self.accepted_uploads.append(vid)
            n += 1000

    def annotator(self, user: str) -> None:
        c = self.client(user)
        while time.monotonic() < self.stop:
            r = self.timed("claim", lambda: c.post("/v1/tasks/next", json={"strategy": "random"}))
            if r.status_code == 404:
                time.sleep(0.2)
                continue
            if r.status_code != 200:
                continue
            vid = r.json()["volume_id"]
            with self.lock:
                self.claims.append((user, vid))
            self.timed("image", lambda vid=vid: c.get(f"/v1/volumes/{vid}/image"))
            r = self.timed(
                "annotate",
                lambda vid=vid: c.post(
                    f"/v1/volumes/{vid}/annotations",
                    files={"mask": ("m.nii.gz", self.mask, "application/gzip")},
                    data={"minutes": "2"},
                ),
            )
            if r.status_code == 201:
                with self.lock:
                    self.accepted_annotations.append(vid)

    def run(self) -> None:
        """Every uploader and annotator in its own thread until the time is up."""
        threads = [
            threading.Thread(target=self.uploader, args=(f"up{ANNOTATORS + i}", i))
            for i in range(UPLOADERS)
        ] + [threading.Thread(target=self.annotator, args=(f"ann{i}",)) for i in range(ANNOTATORS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _print_latencies(load: _Load) -> None:
    print(f"\nload for {DURATION_S:.0f}s, {ANNOTATORS} annotators, {UPLOADERS} uploaders")
    for op, values in sorted(load.latencies.items()):
        p50, p95, p99 = np.percentile(values, [50, 95, 99]) * 1000
        print(
            f"  {op:<9} n={len(values):<5} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  p99 {p99:7.1f} ms"
        )


def _nothing_lost(platform, load: _Load) -> None:
    """Nothing lost: every accepted upload and annotation is in SQL and S3; no volume was
    claimed by two annotators; every annotated volume was claimed by its annotator."""
    settings = Settings().model_copy(
        update={"db": Settings().db.model_copy(update={"url": platform["env"]["CTLOOP_DB__URL"]})}
    )
    store = ObjectStore(settings)
    with session_scope(settings.database_url) as s:
        volumes = {v.id: v.s3_key for v in s.scalars(select(Volume))}
        revisions = list(s.scalars(select(AnnotationRevision)))
    assert set(load.accepted_uploads) <= set(volumes)
    assert all(store.exists(settings.s3.bucket, volumes[v]) for v in load.accepted_uploads)
    annotated = [r.volume_id for r in revisions]
    assert sorted(annotated) == sorted(load.accepted_annotations)
    assert all(store.exists(settings.s3.bucket, r.s3_key) for r in revisions)
    claimed = [vid for _, vid in load.claims]
    assert len(claimed) == len(set(claimed)), "a volume was handed to two annotators"
    authors = {r.volume_id: r.author for r in revisions}
    assert {(authors[v], v) for v in annotated} <= set(load.claims), "annotated without a claim"


@pytest.mark.timeout(900 if LONG else 300)
def test_concurrent_annotators_and_uploads(platform, unique):
    api = platform["api"]
    admin = httpx.Client(
        base_url=api, timeout=60, headers={"Authorization": f"Bearer {platform['admin_token']}"}
    )
    load = _Load(api, _load_users(admin), unique)
    load.run()

    _print_latencies(load)
    server_errors = {op: [s for s in v if s >= 500] for op, v in load.statuses.items()}
    assert not any(server_errors.values()), server_errors
    assert load.accepted_uploads and load.accepted_annotations, dict(load.statuses)
    _nothing_lost(platform, load)
