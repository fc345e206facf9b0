"""Triton serving python-backend models from the S3 model repository, in explicit mode."""

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from ctloop.contracts.triton import ModelSpec, TensorSpec
from ctloop.model_repository import ModelLoadFailed, ModelRepository, VersionExists
from ctloop.triton_serving import TritonModels

# A python-backend model that multiplies its input by FACTOR. Tensors cross the stub boundary
# through DLPack (torch): the stub's numpy path is broken under numpy 2 (see README).
MODEL_PY = """
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

FACTOR = {factor}


class TritonPythonModel:
    def initialize(self, args):
        {init}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT").to_dlpack())
            y = pb_utils.Tensor.from_dlpack("OUTPUT", to_dlpack(x * FACTOR))
            responses.append(pb_utils.InferenceResponse([y]))
        return responses
"""


def _model_py(factor: float, init: str = "pass") -> bytes:
    return MODEL_PY.format(factor=factor, init=init).encode()


def _spec(name: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("INPUT", "TYPE_FP32", (-1,)),),
        outputs=(TensorSpec("OUTPUT", "TYPE_FP32", (-1,)),),
    )


def _infer(settings, model: str) -> np.ndarray:
    client = triton_grpc.InferenceServerClient(settings.triton.grpc_url)
    x = triton_grpc.InferInput("INPUT", [3], "FP32")
    x.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    try:
        return client.infer(model, [x]).as_numpy("OUTPUT")
    finally:
        client.close()


def test_loads_serves_upgrades_and_survives_a_broken_version(settings, unique):
    spec = _spec(f"scale_{unique}")
    repo = ModelRepository(settings)
    triton = TritonModels(settings)

    repo.publish_version(spec, 1, {"model.py": _model_py(2.0)}, {"note": "first"})
    assert not triton.client.is_model_ready(spec.name)  # explicit mode: nothing until asked
    triton.serve_version(spec, 1)
    np.testing.assert_allclose(_infer(settings, spec.name), [2.0, 4.0, 6.0])

    repo.publish_version(spec, 2, {"model.py": _model_py(3.0)}, {"parent": 1})
    triton.serve_version(spec, 2)
    np.testing.assert_allclose(_infer(settings, spec.name), [3.0, 6.0, 9.0])
    assert triton.serving_versions(spec.name) == [2]

    broken = _model_py(4.0, init="raise RuntimeError('corrupt weights')")
    repo.publish_version(spec, 3, {"model.py": broken}, {"parent": 2})
    with pytest.raises(ModelLoadFailed, match="corrupt weights"):
        triton.serve_version(spec, 3)
    np.testing.assert_allclose(_infer(settings, spec.name), [3.0, 6.0, 9.0])
    assert triton.serving_versions(spec.name) == [2]

    # Rollback is an explicit load of an older, still-published version.
    triton.serve_version(spec, 1)
    np.testing.assert_allclose(_infer(settings, spec.name), [2.0, 4.0, 6.0])
    triton.client.unload_model(spec.name)
    triton.close()


def test_versions_are_immutable_and_incomplete_ones_are_not_listed(settings, unique):
    spec = _spec(f"scale_{unique}")
    repo = ModelRepository(settings)
    repo.publish_version(spec, 1, {"model.py": _model_py(2.0)}, {"note": "first"})
    with pytest.raises(VersionExists):
        repo.publish_version(spec, 1, {"model.py": _model_py(5.0)}, {})
    # A crash mid-publish leaves files without a manifest: not a published version.
    repo.store.put_bytes(repo.bucket, f"{repo.prefix}/{spec.name}/2/model.py", _model_py(9.0))
    assert repo.published_versions(spec.name) == [1]
    assert repo.manifest(spec.name, 1)["note"] == "first"


def test_a_load_with_files_runs_those_bytes_not_the_bucket_s(settings, unique):
    """What the inference service checked against the manifest is what Triton loads: the files
    go in the load request, and the bucket's folder (every version of the model) is not read."""
    name = f"sent_{unique}"
    repo = ModelRepository(settings)
    repo.publish_version(_spec(name), 1, {"model.py": _model_py(2.0)}, {})
    triton = TritonModels(settings)
    try:
        sent = repo.verified_files(name, 1)
        assert sent == {"model.py": _model_py(2.0)}
        # a different model.py sent for the same version: Triton runs it, not the bucket's
        triton.serve_version(_spec(name), 1, {"model.py": _model_py(7.0)})
        assert np.allclose(_infer(settings, name), [7.0, 14.0, 21.0])
        repo.publish_version(_spec(name), 2, {"model.py": _model_py(3.0)}, {})
        triton.serve_version(_spec(name), 2, repo.verified_files(name, 2))
        assert np.allclose(_infer(settings, name), [3.0, 6.0, 9.0])
    finally:
        triton.client.unload_model(name)
        triton.close()
