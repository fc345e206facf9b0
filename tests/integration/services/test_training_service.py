"""Training rounds against the real S3, Kafka, SQL and torchrun: retry, failure, publication,
one round at a time, recovery after a crash."""

from __future__ import annotations

import json
import uuid
from concurrent import futures

import grpc
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from ctloop.contracts import keys
from ctloop.core.model import TINY_MODEL as TINY
from ctloop.core.model import ModelConfig, build_network, save_checkpoint
from ctloop.core.packaging import package_checkpoint
from ctloop.db import OutboxEvent, TrainingRound, session_scope
from ctloop.model_repository import ModelRepository
from ctloop.triton_serving import serving_spec
from ctloop.v1 import ingest_pb2_grpc
from services.ingest.app import create_app
from services.ingest.grpc_api import WorkflowService
from services.training.decathlon import materialise
from services.training.worker import RoundBusy, TrainingWorker
from services.training.workflow import WorkflowClient
from tests.helpers.volumes import nifti, phantom


@pytest.fixture(scope="module")
def world(svc_settings, admin_headers):
    tag = uuid.uuid4().hex[:8]
    settings = svc_settings.model_copy(
        update={
            "services": svc_settings.services.model_copy(
                update={"igniter_model": f"igniter{tag}", "sustainer_model": f"sustainer{tag}"}
            ),
            "training": svc_settings.training.model_copy(
                update={
                    "igniter_min_volumes": 2,
                    "debounce_s": 0.0,
                    "holdout_every": 3,
                    "igniter_steps": 0,
                    "max_attempts": 2,
                    "model": TINY,
                }
            ),
        }
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ingest_pb2_grpc.add_WorkflowServicer_to_server(
        WorkflowService(settings.database_url, settings.s3.bucket), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    workflow = WorkflowClient(f"127.0.0.1:{port}")
    with TestClient(create_app(settings), headers=admin_headers) as api:
        for i in range(3):
            p = phantom("public", 40 + i)
            r = api.post(
                "/v1/volumes",
                data={"site_id": "pub", "dataset": "public", "volume_id": f"t{i}-{tag}"},
                files={
                    "file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip"),
                    "label": ("l.nii.gz", nifti(p.label, p.affine), "application/gzip"),
                },
            )
            assert r.status_code == 201, r.text
        yield {"settings": settings, "workflow": workflow, "tag": tag}
    workflow.close()
    server.stop(0)


def _events(settings, model: str) -> list[dict]:
    with session_scope(settings.database_url) as s:
        rows = s.scalars(
            select(OutboxEvent).where(OutboxEvent.key == model).order_by(OutboxEvent.id)
        )
        return [{"type": r.headers["ce_type"], **json.loads(r.value)} for r in rows]


def test_a_crashing_round_is_retried_then_failed_and_a_good_one_publishes(world):
    settings, workflow = world["settings"], world["workflow"]
    igniter = settings.services.igniter_model
    worker = TrainingWorker(settings, workflow)
    assert worker.due() == igniter

    first = worker.tick()  # torchrun dies (0 steps is not a schedule)
    assert first is not None and first.status == "retry" and "torchrun exited" in first.reason
    assert worker.due() == igniter  # a retry is due
    second = worker.tick()
    assert second is not None and second.status == "failed" and second.attempts == 2
    assert worker.due() is None  # a failed igniter round is not retried by itself
    completed = [
        e for e in _events(settings, igniter) if e["type"].endswith("training.completed.v1")
    ]
    assert [e["outcome"] for e in completed] == ["failed"]
    assert ModelRepository(settings).published_versions(igniter) == []

    good = settings.model_copy(
        update={"training": settings.training.model_copy(update={"igniter_steps": 4})}
    )
    worker = TrainingWorker(good, workflow)
    done = worker.run_round(igniter)  # as StartRound does
    assert done.status == "published" and done.version == 1
    assert done.volumes["holdout"] == [f"t2-{world['tag']}"]  # every 3rd volume
    assert done.metrics["candidate_dice"] is not None
    manifest = ModelRepository(good).manifest(igniter, 1)
    assert manifest["round"] == done.id and manifest["training"]["steps"] == 4
    published = [e for e in _events(good, igniter) if e["type"].endswith("model.published.v1")]
    assert [(e["model"]["version"], e["round"]) for e in published] == [(1, done.id)]

    # One round at a time.
    with session_scope(good.database_url) as s:
        s.add(TrainingRound(id=999, model=igniter, status="running"))
    with pytest.raises(RoundBusy):
        worker.run_round(igniter)

    # A crash after the manifest but before the round was closed: recovery completes it.
    with session_scope(good.database_url) as s:
        s.delete(s.get(TrainingRound, 999))
        s.get(TrainingRound, done.id).status = "running"
    worker.recover()
    with session_scope(good.database_url) as s:
        row = s.get(TrainingRound, done.id)
        assert (row.status, row.version) == ("published", 1)
        assert row.metrics["candidate_dice"] == done.metrics["candidate_dice"]


def test_partial_labels_reach_training_as_partial(world, tmp_path, admin_headers):
    """What the annotator skipped or did not review is carried into the round's dataset."""
    settings, workflow, tag = world["settings"], world["workflow"], world["tag"]
    with TestClient(create_app(settings), headers=admin_headers) as api:
        p = phantom("clinical-a", 80)
        vid = f"part-{tag}"
        r = api.post(
            "/v1/volumes",
            data={"site_id": "cli", "dataset": "clinical", "volume_id": vid},
            files={"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")},
        )
        assert r.status_code == 201
        r = api.post(
            f"/v1/volumes/{vid}/annotations",
            files={"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")},
            data={
                "minutes": "5",
                "organs": json.dumps({"spleen": "skipped"}),
                "reviewed_slices": json.dumps([[3, 12]]),
            },
        )
        assert r.status_code == 201, r.text
    worker = TrainingWorker(settings, workflow)
    materialise(worker.store, worker.workflow, tmp_path / "round", [vid])
    spec = json.loads((tmp_path / "round" / "dataset.json").read_text())
    assert spec["training"][0]["partial"] == {
        "organs": {"spleen": "skipped"},
        "reviewed_slices": [[3, 12]],
    }
    # ...and the training code turns it into loss weights that drop those voxels.
    from ctloop.core.train import DataSource, TrainConfig, load_items

    items = load_items(
        TrainConfig(sources=[DataSource(path=tmp_path / "round")], out=tmp_path / "x.pt")
    )
    weight = items[0]["weight"].numpy()[0]
    assert weight[:, :, 13:].max() == 0 and weight[:, :, 3:13].max() == 1
    assert float(items[0]["class_weight"][2]) == 0.0  # spleen


def test_the_parent_is_scored_on_held_out_volumes_from_its_stored_pre_annotations(
    world, tmp_path, admin_headers
):
    """The model a round starts from has pre-annotated its held-out volumes already (the
    inference service's masks in S3): its Dice there comes from those masks, not from
    segmenting the volumes again, and it decides the round. Here each stored mask is the
    volume's own label, so the parent scores 1.0 and the candidate is rejected."""
    tag = uuid.uuid4().hex[:8]
    base = world["settings"]
    settings = base.model_copy(
        update={
            "services": base.services.model_copy(
                update={"igniter_model": f"ig{tag}", "sustainer_model": f"su{tag}"}
            ),
            "training": base.training.model_copy(update={"sustainer_steps": 2}),
        }
    )
    igniter, sustainer = settings.services.igniter_model, settings.services.sustainer_model
    cfg = ModelConfig.model_validate(TINY)
    save_checkpoint(tmp_path / "igniter.pt", cfg, build_network(cfg), {"name": igniter})
    spec = serving_spec(settings, igniter)
    package = package_checkpoint(tmp_path / "igniter.pt", spec)
    repo = ModelRepository(settings)
    repo.publish_version(spec, 1, package.files, package.manifest)
    with TestClient(create_app(settings), headers=admin_headers) as api:
        for i in range(3):
            p = phantom("clinical-a", 90 + i)
            vid = f"held-{tag}-{i}"
            r = api.post(
                "/v1/volumes",
                data={"site_id": "cli", "dataset": "clinical", "volume_id": vid},
                files={"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")},
            )
            assert r.status_code == 201, r.text
            r = api.post(
                f"/v1/volumes/{vid}/annotations",
                files={"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")},
                data={"minutes": "5"},
            )
            assert r.status_code == 201, r.text
    worker = TrainingWorker(settings, world["workflow"])
    for v in world["workflow"].training_volumes("clinical"):  # every round volume, any test's
        label = worker.store.get_bytes(v.label.bucket, v.label.key, v.label.version_id)
        worker.store.put_bytes(
            settings.s3.bucket, keys.prediction_mask(v.volume_id, igniter, 1), label
        )

    done = worker.run_round(sustainer)

    assert done.volumes["holdout"], "the round holds volumes out"
    assert done.metrics["serving_dice"] == pytest.approx(1.0)
    assert done.metrics["serving_dice_from_predictions"] == len(done.volumes["holdout"])
    assert done.metrics["candidate_dice"] < 1.0
    assert done.status == "rejected" and "< serving 1.0000" in done.reason
    assert repo.published_versions(sustainer) == []
