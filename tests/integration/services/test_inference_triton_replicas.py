"""Several Triton replicas in explicit model-control mode: a version is loaded on every one,
what serves is what every one serves, and the inference service's reconciling loads what serves
on a replica that came up with nothing loaded.

Two real tritonservers of their own (the local stack's Triton component on other ports and run
folders), reading the session stack's S3 model repository. The versions are the tiny python
models of ``test_triton_models`` under the segmentation spec the inference service loads with:
loading needs no more (nothing is inferred here).
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc

from ctloop.core.infer import Segmenter
from ctloop.core.model import TINY_MODEL, ModelConfig, build_network, save_checkpoint
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.core.phantom import generate_phantom
from ctloop.db import ServingModel, session_scope
from ctloop.model_repository import ModelLoadFailed, ModelRepository
from ctloop.settings import Settings
from ctloop.stack import LocalStack
from ctloop.stack.components import TritonServer
from ctloop.triton_serving import TritonModels, TritonSegmenter, serving_spec
from services.inference.worker import InferenceWorker
from tests.integration.test_triton_models import _model_py

HTTP_PORTS = {"a": 28510, "b": 28520}  # gRPC on the next port, metrics on the one after
REFUSE = "CTLOOP_TEST_REFUSE_LOADS"  # set on replica b: the models that check it fail there
REFUSING_INIT = (
    f"if __import__('os').environ.get('{REFUSE}'): raise RuntimeError('refused on this replica')"
)


class Replica(TritonServer):
    """One Triton replica: its own ports and run folder, the session stack's S3 repository."""

    def __init__(self, settings: Settings, run_dir: Path, http_port: int, refuses: bool) -> None:
        t = settings.triton.model_copy(
            update={
                "http_port": http_port,
                "grpc_port": http_port + 1,
                "metrics_port": http_port + 2,
                "external_url": None,
            }
        )
        super().__init__(settings.model_copy(update={"run_dir": run_dir, "triton": t}))
        self.refuses = refuses
        self.stack = LocalStack(self.settings, echo=lambda _: None, components=[self])

    @property
    def address(self) -> str:
        return self.settings.triton.grpc_url

    def env(self) -> dict[str, str]:
        return {**super().env(), **({REFUSE: "1"} if self.refuses else {})}

    def restart_empty(self) -> None:
        """What a restarted Triton pod is: the same server with nothing loaded."""
        self.stack.down()
        self.stack.up()

    def ready_versions(self, model: str) -> list[int]:
        client = triton_grpc.InferenceServerClient(self.address)
        try:
            return [v for v in (1, 2, 3) if client.is_model_ready(model, str(v))]
        finally:
            client.close()


@pytest.fixture(scope="module")
def replicas(svc_settings, tmp_path_factory) -> Iterator[dict[str, Replica]]:
    run = tmp_path_factory.mktemp("triton-replicas")
    servers = {
        name: Replica(svc_settings, run / name, port, refuses=name == "b")
        for name, port in HTTP_PORTS.items()
    }
    with ExitStack() as stop:
        for server in servers.values():
            stop.callback(server.stack.down)  # also when one fails half-way up
            server.stack.up()
        yield servers


@pytest.fixture
def settings_both(svc_settings, replicas) -> Settings:
    """The inference service's view: requests to replica a (the Service), loads on both; b is
    named "localhost" so the real resolver (getaddrinfo) finds it."""
    a, b = replicas["a"], replicas["b"]
    b_port = b.settings.triton.grpc_port
    t = svc_settings.triton.model_copy(
        update={"external_url": a.address, "replicas": f"{a.address},localhost:{b_port}"}
    )
    return svc_settings.model_copy(update={"triton": t})


# The stand-in model.py is served whole (as interface 3 versions are, and every version on GPU
# replicas): these tests are about loading on replicas, not about what a version computes.
WHOLE = 3


def _publish(settings: Settings, model: str, version: int, refusing: bool = False) -> None:
    spec = serving_spec(settings, model, WHOLE)
    files = {"model.py": _model_py(float(version), init=REFUSING_INIT if refusing else "pass")}
    manifest = {"note": f"v{version}", "interface": WHOLE}
    ModelRepository(settings).publish_version(spec, version, files, manifest)


def test_a_version_serves_on_every_replica_or_on_none(settings_both, replicas):
    a, b = replicas["a"], replicas["b"]
    model = f"replicated{uuid.uuid4().hex[:8]}"
    spec = serving_spec(settings_both, model, WHOLE)
    triton = TritonModels(settings_both)
    assert triton.replicas.addresses() == [a.address, b.address]

    _publish(settings_both, model, 1)
    triton.serve_version(spec, 1)
    assert a.ready_versions(model) == [1] and b.ready_versions(model) == [1]
    assert triton.serving_versions(model) == [1]

    # Replica b refuses version 2 after a took it: a goes back, version 1 serves on both.
    _publish(settings_both, model, 2, refusing=True)
    with pytest.raises(ModelLoadFailed, match=re.escape(f"on Triton {b.address}")) as refused:
        triton.serve_version(spec, 2)
    assert "refused on this replica" in str(refused.value)
    assert a.ready_versions(model) == [1] and b.ready_versions(model) == [1]
    assert triton.serving_versions(model) == [1]
    triton.close()


def test_a_restarted_replica_gets_the_serving_version_back(
    settings_both, replicas, caplog: pytest.LogCaptureFixture
):
    a, b = replicas["a"], replicas["b"]
    model = f"replicated{uuid.uuid4().hex[:8]}"
    triton = TritonModels(settings_both)
    worker = InferenceWorker(settings_both, triton)
    _publish(settings_both, model, 1)
    triton.serve_version(serving_spec(settings_both, model, WHOLE), 1)
    with session_scope(settings_both.database_url) as s:  # what inference chose to serve
        s.add(ServingModel(model=model, version=1))
    assert worker.ensure_loaded() == 0  # every replica has it

    b.restart_empty()
    assert b.ready_versions(model) == [] and a.ready_versions(model) == [1]
    assert triton.serving_versions(model) == []  # b lacks it: not serving everywhere

    with caplog.at_level(logging.INFO, logger="ctloop.inference"):
        assert worker.ensure_loaded() == 1
    assert b.ready_versions(model) == [1] and a.ready_versions(model) == [1]
    assert triton.serving_versions(model) == [1]
    (line,) = [r for r in caplog.records if r.getMessage() == "serving version loaded on a replica"]
    assert vars(line)["replica"] == b.address
    assert worker.ensure_loaded() == 0
    triton.close()


def test_a_restarted_replica_gets_the_pipeline_and_the_version_s_network_back(
    settings_both, replicas, tmp_path
):
    """A version of interface 4 serves on CPU replicas as its network beside the pipeline
    model: a replica that restarts empty gets both back from the reconciling, and the
    segmentation answers on it."""
    a, b = replicas["a"], replicas["b"]
    model = f"split{uuid.uuid4().hex[:8]}"
    checkpoint = tmp_path / "tiny.pt"
    cfg = ModelConfig(**TINY_MODEL)
    torch.manual_seed(0)
    save_checkpoint(checkpoint, cfg, build_network(cfg), {"name": model})
    package = package_checkpoint(checkpoint, segmentation_spec(model))
    repo = ModelRepository(settings_both)
    repo.publish_version(serving_spec(settings_both, model), 1, package.files, package.manifest)
    pipeline = settings_both.triton.pipeline_model
    version = repo.pipeline_version()
    assert version is not None
    triton = TritonModels(settings_both)
    worker = InferenceWorker(settings_both, triton)
    worker.segmenter.serve_version(model, 1)
    with session_scope(settings_both.database_url) as s:
        s.add(ServingModel(model=model, version=1))

    def ready(replica: Replica, name: str, v: int) -> bool:
        client = triton_grpc.InferenceServerClient(replica.address)
        try:
            return bool(client.is_model_ready(name, str(v)))
        finally:
            client.close()

    try:
        assert all(ready(r, n, v) for r in (a, b) for n, v in ((pipeline, version), (model, 1)))
        b.restart_empty()
        assert not ready(b, pipeline, version) and not ready(b, model, 1)
        # the pipeline, then the version's network (and what earlier tests left serving)
        assert worker.ensure_loaded() >= 2
        assert ready(b, pipeline, version) and ready(b, model, 1)
        # b answers (requests go to a here: ask b itself)
        on_b = settings_both.triton.model_copy(update={"external_url": b.address})
        alone = settings_both.model_copy(update={"triton": on_b})
        b_triton = TritonModels(alone)
        phantom = generate_phantom("clinical-b", 3, "tiny")
        image = phantom.image.astype(np.float32)
        served = TritonSegmenter(b_triton, ModelRepository(alone))(model, 1, image, phantom.affine)
        local = Segmenter(checkpoint)(image, phantom.affine)
        assert np.mean(served.label != local.label) < 1e-4
        b_triton.close()
    finally:
        with contextlib.suppress(Exception):
            triton.client.unload_model(model)
        triton.close()
