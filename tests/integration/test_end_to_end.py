"""The platform end to end, every service a real process on the real stack:

public volumes with labels and clinical volumes without are uploaded -> the igniter trains and
is published -> clinical volumes get pre-annotations -> corrections are submitted -> a round
trains a sustainer under torchrun with two processes -> it is published, loaded by Triton, and
the volume still waiting is re-predicted with it -> the metrics service reports the round.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.phantom import generate_phantom
from ctloop.platform import until
from ctloop.v1 import training_pb2, training_pb2_grpc
from tests.helpers.platform import run_platform

PORTS = {"INGEST": 28700, "INFERENCE": 28702, "TRAINING": 28704, "METRICS": 28706}
API = f"http://127.0.0.1:{PORTS['INGEST']}"


@pytest.fixture
def platform(tmp_path: Path):
    with run_platform(tmp_path, PORTS) as running:
        yield running


def _upload(client: httpx.Client, volume_id: str, site: str, dataset: str, seed: int):
    p = generate_phantom("public" if dataset == "public" else "clinical-a", seed, "tiny")
    files = {"file": ("ct.nii.gz", nifti_gz_bytes(p.image, p.affine), "application/gzip")}
    if dataset == "public":
        files["label"] = ("label.nii.gz", nifti_gz_bytes(p.label, p.affine), "application/gzip")
    r = client.post(
        "/v1/volumes",
        files=files,
        data={"site_id": site, "dataset": dataset, "volume_id": volume_id},
    )
    assert r.status_code == 201, r.text
    return p


def _predicted_by(client: httpx.Client, model: str, volume_ids) -> bool:
    for vid in volume_ids:
        r = client.get(f"/v1/volumes/{vid}/prediction")
        if r.status_code != 200 or r.json()["model"] != model:
            return False
    return True


def _volumes_uploaded(client: httpx.Client, tag: str) -> dict:
    """Three public volumes with labels, four clinical ones without (their phantoms, by id)."""
    for i in range(3):
        _upload(client, f"pub{i}-{tag}", "public-site", "public", seed=100 + i)
    return {
        f"cli{i}-{tag}": _upload(client, f"cli{i}-{tag}", "hospital-a", "clinical", 200 + i)
        for i in range(4)
    }


def _igniter_pre_annotates(client: httpx.Client, igniter: str, clinical: dict, tag: str, logs):
    """The igniter trains on the public volumes, is published, and pre-annotates the clinical
    ones."""
    until("igniter pre-annotations", lambda: _predicted_by(client, igniter, clinical), 300, logs)
    pred = client.get(f"/v1/volumes/cli0-{tag}/prediction").json()
    assert pred["version"] == 1 and 0.0 <= pred["uncertainty"] <= 1.0
    mask = client.get(f"/v1/volumes/cli0-{tag}/prediction/mask")
    assert mask.status_code == 200 and mask.content[:2] == b"\x1f\x8b"


def _annotators_correct(client: httpx.Client, igniter: str, clinical: dict) -> list[str]:
    """Annotators correct three of them (the phantom truth stands in for their work)."""
    corrected = list(clinical)[:3]
    for n, vid in enumerate(corrected):
        p = clinical[vid]
        r = client.post(
            f"/v1/volumes/{vid}/annotations",
            files={"mask": ("m.nii.gz", nifti_gz_bytes(p.label, p.affine), "application/gzip")},
            data={
                "minutes": str(10.0 + n),
                "from_model": f"{igniter}:1",
                "organs": json.dumps({"pancreas": "skipped"} if n == 0 else {}),
            },
        )
        assert r.status_code == 201, r.text
    return corrected


def _sustainer_round_published(platform, igniter: str, sustainer: str, corrected: list[str]):
    """A sustainer round runs under torchrun with two processes and is published."""
    logs = platform["logs"]
    channel = platform["grpc_channel"](f"127.0.0.1:{PORTS['TRAINING'] + 1}")  # as the operator
    training = training_pb2_grpc.TrainingStub(channel)

    def sustainer_round():
        rounds = training.ListRounds(training_pb2.ListRoundsRequest()).rounds
        done = [r for r in rounds if r.model == sustainer and r.status in ("published", "failed")]
        return done[0] if done else None

    rnd = until("a published sustainer round", sustainer_round, 300, logs)
    assert rnd.status == "published" and rnd.version == 1, rnd
    assert set(rnd.volumes) == {corrected[0], corrected[1]}  # every 3rd is held out
    versions = training.ListModelVersions(training_pb2.ListModelVersionsRequest(model=sustainer))
    manifest = json.loads(versions.versions[0].manifest_json)
    assert manifest["training"]["world_size"] == 2
    assert manifest["parent_version"] == 1 and manifest["round"] == rnd.round
    rounds = training.ListRounds(training_pb2.ListRoundsRequest()).rounds
    assert [(r.model, r.status) for r in rounds][:1] == [(igniter, "published")]


def _metrics_report_the_round(platform, igniter: str, logs) -> dict:
    """The metrics service reports the round the annotators worked on, over HTTP and gRPC."""
    metrics = httpx.Client(base_url=f"http://127.0.0.1:{PORTS['METRICS']}", timeout=30)

    def igniter_round():
        for r in metrics.get("/v1/report").json()["rounds"]:
            if r["model"] == igniter and r["volumes_annotated"] == 3:
                return r
        return None

    report = until("the round in the metrics report", igniter_round, 120, logs)
    assert report["version"] == 1 and report["round"] == 0
    assert report["minutes_per_ct"] == pytest.approx(11.0)
    assert 0.0 < report["mean_dice"] <= 1.0
    assert "pancreas" in report["organ_dice"]  # skipped once, reviewed twice
    assert "ctloop_round_mean_dice" in metrics.get("/metrics").text
    from ctloop.v1 import metrics_pb2, metrics_pb2_grpc

    with platform["grpc_channel"](f"127.0.0.1:{PORTS['METRICS'] + 1}") as ch:
        grpc_report = metrics_pb2_grpc.MetricsStub(ch).GetReport(metrics_pb2.GetReportRequest())
    (row,) = [r for r in grpc_report.rounds if r.model.model == igniter]
    assert row.volumes_annotated == 3 and row.mean_dice == pytest.approx(report["mean_dice"])
    status = platform["ctloop"]("services", "status")
    assert status.returncode == 0, status.stdout
    return report


def _metrics_rebuilt_from_topics(igniter: str, report: dict, tag: str, logs) -> None:
    """The metrics state is rebuilt from the topics alone: a fresh reader gets the same round."""
    from ctloop.bus import EventConsumer, EventProducer
    from ctloop.contracts.topics import Topic
    from ctloop.settings import Settings
    from ctloop.storage import ObjectStore
    from services.metrics.state import MetricsState

    settings = Settings()
    rebuilt = MetricsState(ObjectStore(settings), settings.s3.bucket)
    producer = EventProducer(settings, client_id="test-rebuild")
    topics = [t for t in Topic if t != Topic.DEAD_LETTER]
    consumer = EventConsumer(settings, f"rebuild-{tag}", topics, rebuilt.handle, producer)
    try:

        def same_round():
            consumer.poll_once(500)
            again = [r for r in rebuilt.report() if r["model"] == igniter]
            return (
                len(again) == 1
                and {k: again[0][k] for k in ("version", "round", "volumes_annotated")}
                == {k: report[k] for k in ("version", "round", "volumes_annotated")}
                and again[0]["mean_dice"] == pytest.approx(report["mean_dice"])
                and again[0]["minutes_per_ct"] == pytest.approx(report["minutes_per_ct"])
            )

        until("the rebuilt metrics", same_round, 120, logs)
    finally:
        consumer.close()
        producer.close()


def test_transfer_loop_end_to_end(platform):
    tag, logs = platform["tag"], platform["logs"]
    igniter, sustainer = f"igniter{tag}", f"sustainer{tag}"
    token = (logs.parent / "admin-token").read_text().strip()
    client = httpx.Client(base_url=API, timeout=60, headers={"Authorization": f"Bearer {token}"})
    clinical = _volumes_uploaded(client, tag)
    _igniter_pre_annotates(client, igniter, clinical, tag, logs)
    corrected = _annotators_correct(client, igniter, clinical)
    _sustainer_round_published(platform, igniter, sustainer, corrected)

    # Triton serves it and the volume still waiting for annotation is re-predicted with it.
    waiting = [v for v in clinical if v not in corrected]
    until("sustainer pre-annotation", lambda: _predicted_by(client, sustainer, waiting), 180, logs)

    report = _metrics_report_the_round(platform, igniter, logs)
    _metrics_rebuilt_from_topics(igniter, report, tag, logs)
