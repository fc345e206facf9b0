"""The inference service's handlers and gRPC API against the real Triton, S3, Kafka and SQL."""

from __future__ import annotations

import gzip
import json
import uuid
from concurrent import futures

import grpc
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from ctloop.bus import EventProducer
from ctloop.contracts import keys
from ctloop.contracts.payloads import (
    ModelRef,
    PredictionCompleted,
    model_published,
    payload_for,
)
from ctloop.contracts.topics import Topic
from ctloop.core.datasets import synthesize_dataset
from ctloop.core.infer import PreparedVolume, Segmenter
from ctloop.core.model import TINY_MODEL, ModelConfig
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.core.train import DataSource, TrainConfig, train
from ctloop.db import OutboxEvent, Prediction, session_scope
from ctloop.kafka_security import client_config
from ctloop.model_repository import ModelRepository
from ctloop.outbox import OutboxRelay
from ctloop.storage import ObjectStore
from ctloop.triton_serving import TritonModels
from ctloop.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.grpc_api import InferenceService
from services.inference.worker import InferenceWorker
from services.ingest.app import create_app
from tests.helpers.events import wait_for_events
from tests.helpers.volumes import nifti, phantom

TINY = ModelConfig(**TINY_MODEL)


@pytest.fixture(scope="module")
def env(svc_settings, tmp_path_factory, admin_headers):
    """Settings with model names of this module's own, a trained tiny checkpoint, the pieces."""
    tag = uuid.uuid4().hex[:8]
    services = svc_settings.services.model_copy(
        update={"igniter_model": f"igniter{tag}", "sustainer_model": f"sustainer{tag}"}
    )
    settings = svc_settings.model_copy(update={"services": services})
    root = tmp_path_factory.mktemp("model")
    synthesize_dataset(root / "public", "public", 2, seed=0, size="tiny")
    ckpt = root / "tiny.pt"
    train(TrainConfig(model=TINY, sources=[DataSource(path=root / "public")], out=ckpt, steps=10))
    producer = EventProducer(settings, client_id="inference-test")
    relay = OutboxRelay(settings.database_url, producer)
    triton = TritonModels(settings)
    worker = InferenceWorker(settings, triton, relay)
    with TestClient(create_app(settings, relay), headers=admin_headers) as api:
        yield {
            "settings": settings,
            "ckpt": ckpt,
            "relay": relay,
            "worker": worker,
            "api": api,
            "triton": triton,
            "producer": producer,
        }
    for model in (services.igniter_model, services.sustainer_model):
        if triton.client.is_model_ready(model):
            triton.client.unload_model(model)
    triton.close()
    producer.close()


def _publish(env, model: str, version: int, broken: bool = False):
    """What the training service does: a version into the repository, then the event."""
    settings = env["settings"]
    spec = segmentation_spec(model)
    package = package_checkpoint(env["ckpt"], spec)
    files = dict(package.files)
    if broken:  # what either runtime reads (a CPU replica runs model.onnx, a GPU the weights)
        files[keys.MODEL_WEIGHTS] = b"not a checkpoint"
        files[keys.MODEL_ONNX] = b"not an ONNX model"
    repo = ModelRepository(settings)
    repo.publish_version(spec, version, files, package.manifest)
    return model_published(
        "/tests",
        model=ModelRef(model=model, version=version),
        manifest=repo.manifest_ref(model, version),
    )


def _ingest(env, volume_id: str, seed: int):
    p = phantom("clinical-b", seed)
    r = env["api"].post(
        "/v1/volumes",
        data={"site_id": "site-c", "dataset": "clinical", "volume_id": volume_id},
        files={"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")},
    )
    assert r.status_code == 201, r.text
    env["relay"].flush()
    (event,) = wait_for_events(
        env["settings"], Topic.VOLUME_INGESTED, lambda e: e.subject == volume_id
    )
    return p, event


def _predictions(env, volume_id=None):
    with session_scope(env["settings"].database_url) as s:
        q = select(Prediction).order_by(Prediction.id)
        if volume_id:
            q = q.where(Prediction.volume_id == volume_id)
        return [(p.volume_id, p.model, p.version, p.uncertainty) for p in s.scalars(q)]


def _outbox_count(env):
    with session_scope(env["settings"].database_url) as s:
        return s.scalar(select(func.count()).select_from(OutboxEvent))


def _a_volume_before_any_model_waits(env, worker: InferenceWorker, vid: str):
    """A volume that arrives before any model waits."""
    p1, ingested1 = _ingest(env, vid, 1)
    worker.handle(ingested1)
    assert _predictions(env, vid) == []
    return p1


def _the_igniter_pre_annotates_the_waiting_volume(
    env, worker: InferenceWorker, igniter: str, vid: str
) -> None:
    """The igniter is published: loaded, and the waiting volume is pre-annotated."""
    worker.handle(_publish(env, igniter, 1))
    assert worker.serving() == ModelRef(model=igniter, version=1)
    preds = _predictions(env, vid)
    assert [(m, v) for _, m, v, _ in preds] == [(igniter, 1)]


def _the_stored_mask_is_the_in_process_one(env, p1, igniter: str, vid: str) -> None:
    """The mask in S3 is what in-process inference gives for the same weights."""
    env["relay"].flush()
    (done,) = wait_for_events(
        env["settings"], Topic.PREDICTION_COMPLETED, lambda e: e.subject == vid
    )
    completed = payload_for(done)
    assert isinstance(completed, PredictionCompleted)
    store = ObjectStore(env["settings"])
    info = json.loads(store.get_bytes(completed.mask.bucket, keys.prediction_info(vid, igniter, 1)))
    assert info["uncertainty"] == pytest.approx(completed.uncertainty)
    raw = store.get_bytes(completed.mask.bucket, completed.mask.key)
    served = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)
    local = Segmenter(env["ckpt"])(p1.image.astype(np.float32), p1.affine)
    assert np.mean(served != local.label) < 1e-4


def _a_new_volume_is_pre_annotated_once(env, worker: InferenceWorker, vid: str):
    """A volume that arrives now is pre-annotated at once; its event delivered twice, once.
    Returns the predictions and outbox count after it (nothing may change them later)."""
    _, ingested2 = _ingest(env, vid, 2)
    worker.handle(ingested2)
    before = (_predictions(env), _outbox_count(env))
    worker.handle(ingested2)
    assert (_predictions(env), _outbox_count(env)) == before
    assert len(_predictions(env, vid)) == 1
    return before


def _a_broken_version_leaves_v1_serving(
    env, worker: InferenceWorker, igniter: str, predictions_before
) -> None:
    """A broken igniter v2 fails to load: v1 keeps serving and nothing is re-predicted."""
    worker.handle(_publish(env, igniter, 2, broken=True))
    assert worker.serving() == ModelRef(model=igniter, version=1)
    assert env["triton"].serving_versions(igniter) == [1]
    assert _predictions(env) == predictions_before


def _waiting_volumes_are_most_uncertain_first(worker: InferenceWorker, predictions_before) -> None:
    """The first sustainer will re-predict the waiting volumes, most uncertain first."""
    uncertainty = {v: u for v, _, _, u in predictions_before}
    waiting = [v for v in worker.waiting_volumes() if v in uncertainty]
    assert waiting == sorted(uncertainty, key=lambda v: -uncertainty[v])


def _each_volume_keeps_its_model_input(
    env, worker: InferenceWorker, igniter: str, vids: tuple[str, str]
) -> dict[str, str]:
    """Each volume was decoded and resampled once; its model input is kept beside it.
    Returns each volume's kept-input key."""
    pre = worker.segmenter.preprocessor(igniter, 1)
    store = ObjectStore(env["settings"])
    bucket = env["settings"].s3.bucket
    kept = {v: keys.volume_model_input("site-c", v, pre.digest) for v in vids}
    for vid, key in kept.items():
        assert "decode" in _info(env, vid, igniter, 1)["stage_seconds"]
        prepared = PreparedVolume.from_bytes(store.get_bytes(bucket, key))
        assert prepared.shape == _mask(env, vid, igniter, 1).shape
    return kept


def _the_sustainer_repredicts_from_the_kept_inputs(
    env, worker: InferenceWorker, kept: dict[str, str], vids: tuple[str, str]
) -> None:
    """The first sustainer takes over and re-predicts the waiting volumes from their kept model
    input instead of the CT (w2's kept copy is broken: prepared again)."""
    names = env["settings"].services
    igniter, sustainer = names.igniter_model, names.sustainer_model
    w1, w2 = vids
    store = ObjectStore(env["settings"])
    bucket = env["settings"].s3.bucket
    store.put_bytes(bucket, kept[w2], b"PK\x03\x04 not an npz")
    worker.handle(_publish(env, sustainer, 1))
    assert worker.serving() == ModelRef(model=sustainer, version=1)
    for vid in vids:
        assert (sustainer, 1) in [(m, v) for _, m, v, _ in _predictions(env, vid)]
    stages = _info(env, w1, sustainer, 1)["stage_seconds"]
    assert "prepared" in stages and "decode" not in stages and "fetch" not in stages
    assert "decode" in _info(env, w2, sustainer, 1)["stage_seconds"]
    PreparedVolume.from_bytes(store.get_bytes(bucket, kept[w2]))  # readable again
    # The same weights (the test publishes one checkpoint) give the same mask from the kept input.
    for vid in vids:
        assert np.array_equal(_mask(env, vid, sustainer, 1), _mask(env, vid, igniter, 1))


def test_the_whole_pre_annotation_lifecycle(env, unique):
    worker: InferenceWorker = env["worker"]
    igniter = env["settings"].services.igniter_model
    vids = (f"w1-{unique}", f"w2-{unique}")
    p1 = _a_volume_before_any_model_waits(env, worker, vids[0])
    _the_igniter_pre_annotates_the_waiting_volume(env, worker, igniter, vids[0])
    _the_stored_mask_is_the_in_process_one(env, p1, igniter, vids[0])
    before = _a_new_volume_is_pre_annotated_once(env, worker, vids[1])
    _a_broken_version_leaves_v1_serving(env, worker, igniter, before[0])
    _waiting_volumes_are_most_uncertain_first(worker, before[0])
    kept = _each_volume_keeps_its_model_input(env, worker, igniter, vids)
    _the_sustainer_repredicts_from_the_kept_inputs(env, worker, kept, vids)


def _info(env, volume_id: str, model: str, version: int) -> dict:
    store = ObjectStore(env["settings"])
    key = keys.prediction_info(volume_id, model, version)
    return json.loads(store.get_bytes(env["settings"].s3.bucket, key))


def _mask(env, volume_id: str, model: str, version: int) -> np.ndarray:
    store = ObjectStore(env["settings"])
    raw = store.get_bytes(
        env["settings"].s3.bucket, keys.prediction_mask(volume_id, model, version)
    )
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)


def test_grpc_segment_and_model_status(env, unique):
    worker: InferenceWorker = env["worker"]
    _ingest(env, f"g-{unique}", 3)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceService(worker, ModelRepository(env["settings"])), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            if worker.serving() is None:
                worker.handle(_publish(env, env["settings"].services.igniter_model, 1))
            reply = stub.Segment(
                inference_pb2.SegmentRequest(volume=common_pb2.VolumeRef(volume_id=f"g-{unique}"))
            )
            assert reply.volume.site_id == "site-c"
            assert reply.mask.key.startswith(f"predictions/g-{unique}/")
            assert 0.0 <= reply.uncertainty <= 1.0
            again = stub.Segment(
                inference_pb2.SegmentRequest(volume=common_pb2.VolumeRef(volume_id=f"g-{unique}"))
            )
            assert again.mask.key == reply.mask.key  # once per volume and model version
            status = stub.GetModelStatus(inference_pb2.GetModelStatusRequest())
            assert status.serving.version >= 1
            assert list(status.published_versions)
            with pytest.raises(grpc.RpcError) as missing:
                stub.Segment(
                    inference_pb2.SegmentRequest(volume=common_pb2.VolumeRef(volume_id="nope"))
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_consumer_killed_between_effect_and_commit_reprocesses_without_duplicates(env, unique):
    """The effect commits, the process dies before the offset does: the next member of the
    group gets the record again and must change nothing."""
    from kafka import KafkaConsumer

    from ctloop.bus import EventConsumer
    from ctloop.contracts.events import CloudEvent

    worker: InferenceWorker = env["worker"]
    if worker.serving() is None:
        worker.handle(_publish(env, env["settings"].services.igniter_model, 1))
    group = f"crash-{unique}"
    _, event = _ingest(env, f"k-{unique}", 4)

    first = KafkaConsumer(
        str(Topic.VOLUME_INGESTED),
        **client_config(env["settings"]),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=20000,
    )
    record = next(r for r in first if r.key == f"k-{unique}".encode())
    worker.handle(CloudEvent.from_kafka(record.value, record.headers))  # the effect commits
    first.close(autocommit=False)  # ...and the process dies before the offset commit
    after_effect = (_predictions(env, f"k-{unique}"), _outbox_count(env))
    assert len(after_effect[0]) == 1

    redelivered: list[str] = []

    def handler(e: CloudEvent) -> None:
        if e.subject == f"k-{unique}":
            redelivered.append(e.id)
        worker.handle(e)

    second = EventConsumer(
        env["settings"], group, [Topic.VOLUME_INGESTED], handler, env["producer"]
    )
    try:
        for _ in range(60):
            second.poll_once(500)
            if redelivered:
                break
    finally:
        second.close()
    assert redelivered == [event.id]
    assert (_predictions(env, f"k-{unique}"), _outbox_count(env)) == after_effect


def test_rollback_serves_an_older_version_again(env):
    worker: InferenceWorker = env["worker"]
    sustainer = env["settings"].services.sustainer_model
    repo = ModelRepository(env["settings"])
    if 1 not in repo.published_versions(sustainer):
        worker.handle(_publish(env, sustainer, 1))
    newer = max(repo.published_versions(sustainer)) + 1
    worker.handle(_publish(env, sustainer, newer))
    assert worker.serving() == ModelRef(model=sustainer, version=newer)

    rollback = model_published(
        "/tests",
        model=ModelRef(model=sustainer, version=1),
        manifest=repo.manifest_ref(sustainer, 1),
        rollback=True,
    )
    worker.handle(rollback)
    assert worker.serving() == ModelRef(model=sustainer, version=1)
    assert env["triton"].serving_versions(sustainer) == [1]


def test_pre_annotation_as_dicom_seg_referencing_the_series(env, unique, tmp_path):
    import io
    import zipfile

    import highdicom as hd
    import pydicom

    from ctloop.core.datasets import load_dicom_series
    from ctloop.core.organs import ORGAN_IDS

    worker: InferenceWorker = env["worker"]
    if worker.serving() is None:
        worker.handle(_publish(env, env["settings"].services.igniter_model, 1))
    _, event = _ingest(env, f"seg-{unique}", 7)
    worker.handle(event)
    api = env["api"]
    seg = api.get(f"/v1/volumes/seg-{unique}/prediction/seg")
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    series = api.get(f"/v1/volumes/seg-{unique}/series.zip")
    assert series.status_code == 200
    with zipfile.ZipFile(io.BytesIO(series.content)) as zf:
        zf.extractall(tmp_path)
    files = sorted(tmp_path.rglob("*.dcm"))
    volume = load_dicom_series(files).as_ras()
    datasets = [pydicom.dcmread(f) for f in files]

    back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg.content)))
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    mask = api.get(f"/v1/volumes/seg-{unique}/prediction/mask")
    stored = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(mask.content)).dataobj)
    assert stored.shape == volume.image.shape
    uids = [d.SOPInstanceUID for d in sorted(datasets, key=lambda d: d.InstanceNumber)]
    for description in back.SegmentSequence:
        frames = back.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[description.SegmentNumber]
        )
        got = np.transpose(frames[..., 0], (2, 1, 0)).astype(bool)
        assert np.array_equal(got, stored == ORGAN_IDS[description.SegmentLabel])


def _real_ct_ingested(env, volume_id: str, response) -> None:
    """An ingest answer, its event, and the worker's pre-annotation of it."""
    assert response.status_code == 201, response.text
    env["relay"].flush()
    (event,) = wait_for_events(
        env["settings"], Topic.VOLUME_INGESTED, lambda e: e.subject == volume_id
    )
    env["worker"].handle(event)


def _real_ct_in_pacs(api, orthanc: str, site: str) -> tuple[str, str, str]:
    """The real series, as a PACS holds it, in Orthanc, allowed for ``site``: (its DICOMweb
    URL, study UID, series UID)."""
    from ctloop.core.dicom import to_bytes
    from tests.helpers import real_ct
    from tests.helpers.orthanc import store_instances

    held = real_ct.as_a_pacs_holds_it(real_ct.series_files())
    pacs = f"{orthanc}/dicom-web"
    store_instances(pacs, [to_bytes(ds) for ds in held])
    assert api.post("/v1/sites", json={"id": site}).status_code == 201
    assert api.post(f"/v1/sites/{site}/dicomweb-sources", json={"url": pacs}).status_code == 201
    return pacs, str(held[0].StudyInstanceUID), str(held[0].SeriesInstanceUID)


def _zipped(files: list) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, f in enumerate(files):
            zf.writestr(f"ct/{i:03d}.dcm", f.read_bytes())
    return buf.getvalue()


def _assert_placed(seg_path, segments: list[str], stored) -> None:
    """highdicom (a second reader) puts each segment where the stored mask has the organ."""
    import highdicom as hd

    from ctloop.core.organs import ORGAN_IDS

    seg = hd.seg.segread(seg_path)
    for number, organ in enumerate(segments, start=1):
        placed = nib.as_closest_canonical(
            seg.get_volume(segment_numbers=[number], combine_segments=True).to_nibabel()
        )
        np.testing.assert_allclose(placed.affine, stored.affine, atol=1e-3)
        expected = np.asarray(stored.dataobj) == ORGAN_IDS[organ]
        assert np.array_equal(np.asarray(placed.dataobj) > 0, expected), organ


def test_the_real_ct_in_by_upload_and_dicomweb_and_its_seg_back_into_the_pacs(
    env, unique, orthanc, tmp_path
):
    """Issue 20: a real CT (TotalSegmentator's test series, a model's labels: not truth) held
    by the real Orthanc comes in over DICOMweb and as a zip upload, is pre-annotated through
    Triton, and its SEG, on the original series and with the patient as the PACS holds it, is
    stored back with STOW-RS; dciodvfy accepts what Orthanc then serves and highdicom places
    it where the stored pre-annotation is. The same series as published (its UIDs blanked) has
    no original to reference: its SEG is on ctloop's series.zip."""
    import io

    import pydicom

    from ctloop import dicomweb
    from ctloop.core.organs import ORGAN_IDS
    from tests.helpers import real_ct

    api, worker = env["api"], env["worker"]
    if worker.serving() is None:
        worker.handle(_publish(env, env["settings"].services.igniter_model, 1))
    site = f"real-{unique}"
    pacs, study, series = _real_ct_in_pacs(api, orthanc, site)
    pulled, published = f"real-dw-{unique}", f"real-up-{unique}"
    pull = {"url": pacs, "study_uid": study, "series_uid": series, "site_id": site}
    _real_ct_ingested(
        env, pulled, api.post("/v1/volumes/dicomweb", json={**pull, "volume_id": pulled})
    )
    form = {"site_id": site, "dataset": "clinical", "volume_id": published}
    upload = ("ct.zip", _zipped(real_ct.series_files()), "application/zip")
    _real_ct_ingested(env, published, api.post("/v1/volumes", data=form, files={"file": upload}))
    vol = api.get(f"/v1/volumes/{pulled}").json()
    assert vol["shape"] == [512, 512, 20]
    assert vol["spacing"] == pytest.approx([0.9766, 0.9766, 2.0], abs=1e-3)

    # The pre-annotation exists; the published series (UIDs blanked) has no original
    mask = api.get(f"/v1/volumes/{pulled}/prediction/mask")
    stored = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(mask.content)))
    organs = [o for o, i in ORGAN_IDS.items() if i and (np.asarray(stored.dataobj) == i).any()]
    assert organs, "the tiny model found no organ on the real CT"
    seg_url = f"/v1/volumes/{published}/prediction/seg"
    refused = api.get(seg_url, params={"reference": "original"})
    assert refused.status_code == 409 and refused.json()["code"] == "no_original_series"
    fallback = pydicom.dcmread(io.BytesIO(api.get(seg_url).content))
    assert fallback.ReferencedSeriesSequence[0].SeriesInstanceUID != series

    # Stored back: the SEG joins the original study in the PACS, with the patient it holds
    to_pacs = f"/v1/volumes/{pulled}/prediction/seg/pacs"
    assert api.post(to_pacs, json={"url": "http://127.0.0.1:9/dicom-web"}).status_code == 403
    sent = api.post(to_pacs, json={"url": pacs})
    assert sent.status_code == 201, sent.text
    out = sent.json()
    assert out["study_uid"] == study and out["referenced_series_uid"] == series
    assert sorted(out["segments"]) == sorted(organs)
    client = dicomweb.client(pacs)
    in_pacs = {
        s["0020000E"]["Value"][0]: s["00080060"]["Value"][0]
        for s in client.search_for_series(study_instance_uid=study)
    }
    assert in_pacs == {series: "CT", out["series_uid"]: "SEG"}
    (back,) = client.retrieve_series(study, out["series_uid"])
    path = tmp_path / "seg.dcm"
    back.save_as(path, enforce_file_format=True)
    assert real_ct.dciodvfy(path) == []
    assert back.PatientID == "TS-EXAMPLE-1" and str(back.PatientName) == "Example^Totalsegmentator"
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    _assert_placed(path, out["segments"], stored)


def test_a_runs_models_are_scored_on_the_real_ct(env, unique, tmp_path):
    """``ctloop real-ct``: each model version a run's report names, fetched from the real
    model repository, segments the real CT; Dice per organ of its reference labels."""
    from ctloop.transfer import real_ct as scoring
    from tests.helpers import real_ct

    settings = env["settings"].model_copy(update={"runs_dir": tmp_path})
    igniter, sustainer = f"igniter-score-{unique}", f"sustainer-score-{unique}"
    for model in (igniter, sustainer):
        _publish(env, model, 1)
    report = {
        "run_id": "r1",
        "rounds": [
            {"round": 1, "role": "igniter", "model": igniter, "version": 1},
            {"round": 2, "role": "sustainer", "model": sustainer, "version": 1},
        ],
    }
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "report.json").write_text(json.dumps(report))
    lines: list[str] = []
    out = scoring.main(
        settings, "r1", real_ct.SERIES, real_ct.LABELS, "totalsegmentator", lines.append
    )
    result = json.loads((tmp_path / "r1" / "real-ct.json").read_text())
    assert [m["model"] for m in result["models"]] == [igniter, sustainer]
    assert result["organs"] == ["liver", "spleen", "stomach", "pancreas", "aorta", "ivc"]
    for m in result["models"]:
        assert set(m["dice"]) == set(result["organs"])
        assert all(0.0 <= d <= 1.0 for d in m["dice"].values())
    assert "not an expert's" in out.read_text() and len(lines) == 4
    report["rounds"][1]["version"] = 99
    (tmp_path / "r1" / "report.json").write_text(json.dumps(report))
    with pytest.raises(scoring.RealCtError, match="not in the model repository"):
        scoring.main(settings, "r1", real_ct.SERIES, real_ct.LABELS, "totalsegmentator", print)
