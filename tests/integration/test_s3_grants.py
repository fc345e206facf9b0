"""Least privilege in the object store (issue 18, finding 4), on a private stack (Versity Gateway
and Triton on ports of their own, so the session's stack is left as it runs): each service's
credential, written by the gateway component, works inside its grant (ctloop/s3_grants.py) and
is refused outside it; Triton serves with its read-only credential; a model file changed in the
bucket after publishing is refused before Triton loads it.

On code without per-service identities every refused call below succeeds (everyone holds the
root key), so each test fails there."""

from __future__ import annotations

import contextlib
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from ctloop.contracts import keys
from ctloop.contracts.triton import ModelSpec, TensorSpec
from ctloop.model_repository import ModelRepository, TamperedModel
from ctloop.s3_grants import IDENTITIES, credential_file
from ctloop.settings import Settings
from ctloop.stack import LocalStack
from ctloop.storage import ObjectStore
from ctloop.triton_serving import TritonModels

PRIVATE_PORTS = {
    "s3": {"port": 27370},
    "triton": {"http_port": 28410, "grpc_port": 28411, "metrics_port": 28412},
}
MODEL_PY = b"""
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT").to_dlpack())
            y = pb_utils.Tensor.from_dlpack("OUTPUT", to_dlpack(x))
            out.append(pb_utils.InferenceResponse([y]))
        return out
"""


@pytest.fixture(autouse=True)
def _real_stack() -> None:
    """Not the session's stack: these tests bring up their own (below)."""


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The private stack's settings (S3 gateway with its accounts, Triton), as root."""
    run = tmp_path_factory.mktemp("s3-grants") / "run"
    settings = Settings(run_dir=run, **PRIVATE_PORTS)  # type: ignore[arg-type]
    stack = LocalStack(settings, echo=lambda _: None, only={"s3", "triton"})
    try:
        stack.up()
        yield settings
    finally:
        stack.down()


def as_identity(settings: Settings, identity: str | None) -> Settings:
    return settings.model_copy(update={"s3": settings.s3.model_copy(update={"identity": identity})})


def store(settings: Settings, identity: str | None) -> ObjectStore:
    return ObjectStore(as_identity(settings, identity))


def refused(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(S3Error) as err:
        call()
    assert err.value.code == "AccessDenied", err.value


def put(s: ObjectStore, bucket: str, key: str, data: bytes = b"x") -> str | None:
    return s.put_bytes(bucket, key, data).version_id


def test_each_identity_has_its_own_private_credential(private):
    root = as_identity(private, None)
    directory = root.run_dir / "s3-credentials"
    seen = set()
    for identity in IDENTITIES:
        path = credential_file(directory, identity)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        access, _ = as_identity(private, identity).s3_credential()
        assert access != root.s3.access_key
        seen.add(access)
    assert len(seen) == len(IDENTITIES)


def test_a_second_stack_up_keeps_every_credential_working(private):
    """``stack up`` on a running gateway provisions again: same keys, still held to grants."""
    before = {i: as_identity(private, i).s3_credential() for i in IDENTITIES}
    LocalStack(private, echo=lambda _: None, only={"s3"}).up()
    assert {i: as_identity(private, i).s3_credential() for i in IDENTITIES} == before
    annotation = keys.annotation_mask("site-a", "grants-again", 1)
    version = put(store(private, "ingest"), private.s3.bucket, annotation)
    refused(lambda: store(private, "ingest").delete_version(private.s3.bucket, annotation, version))
    # ... and the gateway still knows every secret once later requests have come and gone
    # (Versity v1.8.0's IAM cache kept a secret set again in a reused request buffer: the
    # local stack and the chart run it with --iam-cache-disable)
    time.sleep(2)  # what the failure needed here: the server's buffers pooled again
    root = store(private, None)
    for n in range(20):
        put(root, private.s3.bucket, keys.volume_image("site-a", f"grants-again-{n}"), b"y" * 4096)
    for identity in IDENTITIES:
        try:
            store(private, identity).get_bytes(private.s3.model_bucket, "models/none/1/model.py")
        except S3Error as err:
            assert err.code in {"AccessDenied", "NoSuchKey"}, (identity, err.code)


def test_triton_reads_models_only(private):
    s = as_identity(private, None)
    model_key = keys.model_file(s.triton.model_prefix, "probe", 1, "model.py")
    image = keys.volume_image("site-a", "grants-v1")
    root = store(private, None)
    put(root, s.s3.model_bucket, model_key, b"published")
    put(root, s.s3.bucket, image)
    triton = store(private, "triton")
    assert triton.get_bytes(s.s3.model_bucket, model_key) == b"published"
    assert model_key in triton.list_keys(s.s3.model_bucket, s.triton.model_prefix + "/")
    refused(lambda: put(triton, s.s3.model_bucket, model_key, b"changed"))
    refused(lambda: triton.get_bytes(s.s3.bucket, image))
    refused(lambda: triton.list_keys(s.s3.bucket, "volumes/"))


def test_inference_reads_volumes_writes_predictions_never_models(private):
    s = as_identity(private, None)
    image = keys.volume_image("site-a", "grants-v2")
    put(store(private, None), s.s3.bucket, image, b"ct")
    inference = store(private, "inference")
    assert inference.get_bytes(s.s3.bucket, image) == b"ct"
    put(inference, s.s3.bucket, keys.prediction_mask("grants-v2", "igniter", 1))
    put(inference, s.s3.bucket, keys.volume_model_input("site-a", "grants-v2", "pre1"))
    model_key = keys.model_file(s.triton.model_prefix, "probe", 2, "model.py")
    refused(lambda: put(inference, s.s3.model_bucket, model_key))
    refused(lambda: put(inference, s.s3.bucket, image, b"overwritten"))
    refused(lambda: put(inference, s.s3.bucket, keys.annotation_mask("site-a", "grants-v2", 1)))


def test_ingest_writes_revisions_but_cannot_delete_them(private):
    s = as_identity(private, None)
    ingest = store(private, "ingest")
    annotation = keys.annotation_mask("site-a", "grants-v3", 1)
    version = put(ingest, s.s3.bucket, annotation, b"revision 1")
    refused(lambda: ingest.delete_version(s.s3.bucket, annotation, version))
    refused(lambda: ingest.client.remove_object(s.s3.bucket, annotation))  # a delete marker
    assert ingest.get_bytes(s.s3.bucket, annotation, version) == b"revision 1"
    # An upload refused after its early write removes that version of its own image.
    image = keys.volume_image("site-a", "grants-v3")
    ingest.delete_version(s.s3.bucket, image, put(ingest, s.s3.bucket, image))
    refused(lambda: ingest.get_bytes(s.s3.model_bucket, keys.model_repository_readme("models")))


def test_training_publishes_models_but_not_predictions(private):
    s = as_identity(private, None)
    training = store(private, "training")
    model_key = keys.model_file(s.triton.model_prefix, "probe", 3, "model.py")
    version = put(training, s.s3.model_bucket, model_key)
    refused(lambda: training.delete_version(s.s3.model_bucket, model_key, version))
    refused(lambda: put(training, s.s3.bucket, keys.prediction_mask("grants-v4", "m", 1)))
    jobs = keys.training_job_prefix(s.training.kubernetes.s3_prefix, "round-1")
    put(training, s.s3.bucket, keys.training_input(jobs, "train.json"))
    assert training.list_keys(s.s3.bucket, jobs + "/") == [keys.training_input(jobs, "train.json")]
    # a finished round's folder is removed in one batch (services/training/round_files.py)
    batch = [DeleteObject(keys.training_input(jobs, "train.json"))]
    assert list(training.client.remove_objects(s.s3.bucket, batch)) == []
    assert training.list_keys(s.s3.bucket, jobs + "/") == []


def test_metrics_keeps_its_snapshot_and_reads_no_ct(private):
    s = as_identity(private, None)
    metrics = store(private, "metrics")
    snapshot = keys.metrics_snapshot("grants")
    first = put(metrics, s.s3.bucket, snapshot, b"{}")
    put(metrics, s.s3.bucket, snapshot, b"{}")
    metrics.delete_version(s.s3.bucket, snapshot, first)
    put(metrics, s.s3.bucket, keys.report_file("run-1", "report.json"), b"{}")
    image = keys.volume_image("site-a", "grants-v5")
    put(store(private, None), s.s3.bucket, image)
    refused(lambda: metrics.get_bytes(s.s3.bucket, image))
    refused(lambda: put(metrics, s.s3.bucket, keys.annotation_mask("site-a", "grants-v5", 1)))


def _spec(name: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("INPUT", "TYPE_FP32", (-1,)),),
        outputs=(TensorSpec("OUTPUT", "TYPE_FP32", (-1,)),),
    )


def test_triton_serves_with_its_read_only_credential(private):
    training = as_identity(private, "training")
    ModelRepository(training).publish_version(_spec("grants_echo"), 1, {"model.py": MODEL_PY}, {})
    triton = TritonModels(as_identity(private, None))
    try:
        triton.serve_version(_spec("grants_echo"), 1)  # Triton downloads it with its own key
        assert triton.serving_versions("grants_echo") == [1]
    finally:
        triton.close()
    env = (Path(as_identity(private, None).state_dir) / "triton.pid").read_text().strip()
    environ = Path(f"/proc/{env}/environ").read_bytes().split(b"\0")
    access = as_identity(private, "triton").s3_credential()[0]
    assert f"AWS_ACCESS_KEY_ID={access}".encode() in environ


def test_a_model_changed_after_publish_is_refused(private, caplog):
    s = as_identity(private, None)
    repo = ModelRepository(as_identity(private, "training"))
    spec = _spec("grants_tamper")
    repo.publish_version(spec, 1, {"model.py": MODEL_PY, "weights.pt": b"w" * 1000}, {})
    inference_repo = ModelRepository(as_identity(private, "inference"))
    inference_repo.verify_version(spec.name, 1)  # as published
    root = store(private, None)
    model_py = keys.model_file(s.triton.model_prefix, spec.name, 1, "model.py")
    put(root, s.s3.model_bucket, model_py, MODEL_PY + b"\nimport os; os.system('id')\n")
    with pytest.raises(TamperedModel, match=r"model\.py changed after publish"):
        inference_repo.verify_version(spec.name, 1)
    assert any("refused" in r.getMessage() for r in caplog.records)
    put(root, s.s3.model_bucket, model_py, MODEL_PY)  # back as published, but a file added
    extra = keys.model_file(s.triton.model_prefix, spec.name, 1, "torch.py")
    put(root, s.s3.model_bucket, extra, b"evil = 1")
    with pytest.raises(TamperedModel, match="files added"):
        inference_repo.verify_version(spec.name, 1)
    with contextlib.suppress(S3Error):
        root.client.remove_object(s.s3.model_bucket, extra)


def test_a_changed_onnx_file_is_never_a_template_for_the_next_version(private, caplog):
    """The training service builds a version's export on its parent's ``model.onnx``: only
    on the bytes that were published."""
    s = as_identity(private, None)
    repo = ModelRepository(as_identity(private, "training"))
    spec = _spec("grants_template")
    manifest = {"runtimes": {"torch": "weights.pt", "onnxruntime": keys.MODEL_ONNX}}
    files = {"model.py": MODEL_PY, "weights.pt": b"w", keys.MODEL_ONNX: b"graph"}
    repo.publish_version(spec, 1, files, manifest)
    repo.publish_version(spec, 2, {"model.py": MODEL_PY, "weights.pt": b"w"}, {})
    assert repo.onnx(spec.name, 1) == b"graph"
    assert repo.onnx(spec.name, 2) is None  # published without one
    onnx_key = keys.model_file(s.triton.model_prefix, spec.name, 1, keys.MODEL_ONNX)
    put(store(private, None), s.s3.model_bucket, onnx_key, b"another graph")
    assert repo.onnx(spec.name, 1) is None
    assert any("changed after publish" in r.getMessage() for r in caplog.records)


def test_service_identities_never_create_buckets(private):
    """A service's provisioning step only checks its grants (the chart's init containers)."""
    for identity in IDENTITIES:
        store(private, identity).ensure_buckets()  # its buckets are there, its grants work
    other = private.s3.model_copy(update={"bucket": "ctloop-other", "identity": "ingest"})
    fresh = private.model_copy(update={"s3": other})
    with pytest.raises(S3Error):
        ObjectStore(fresh).ensure_buckets()
    assert "ctloop-other" not in store(private, None).list_buckets()
