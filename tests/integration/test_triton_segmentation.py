"""A trained checkpoint, packaged as a Triton version, answers like in-process inference."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ctloop.contracts import keys
from ctloop.core.datasets import synthesize_dataset
from ctloop.core.infer import Segmenter
from ctloop.core.model import TINY_MODEL, ModelConfig, build_network, load_checkpoint
from ctloop.core.packaging import NETWORK_PY, package_checkpoint, segmentation_spec
from ctloop.core.phantom import generate_phantom
from ctloop.core.runtimes import export_onnx
from ctloop.core.train import DataSource, TrainConfig, train
from ctloop.model_repository import ModelLoadFailed, ModelRepository
from ctloop.triton_serving import IncompatibleModel, TritonModels, TritonSegmenter


def _trained(tmp_path: Path, name: str, volumes: int, steps: int) -> Path:
    """The tiny network trained ``steps`` steps on ``volumes`` public phantoms."""
    synthesize_dataset(tmp_path / "public", "public", volumes, seed=0, size="tiny")
    checkpoint = tmp_path / f"{name}.pt"
    train(
        TrainConfig(
            model=ModelConfig(**TINY_MODEL),
            sources=[DataSource(path=tmp_path / "public")],
            out=checkpoint,
            steps=steps,
            meta={"name": name},
        )
    )
    return checkpoint


def test_exported_package_answers_through_triton_with_the_in_process_mask(
    settings, tmp_path, unique
):
    checkpoint = _trained(tmp_path, "igniter", volumes=2, steps=15)
    spec = segmentation_spec(f"igniter_{unique}", sw_batch_size=2)
    package = package_checkpoint(checkpoint, spec, metrics={"public_dice": 0.5})
    repo = ModelRepository(settings)
    repo.publish_version(spec, 1, package.files, package.manifest)
    manifest = repo.manifest(spec.name, 1)
    assert manifest["training"]["training_volumes"] == ["public_00000", "public_00001"]
    assert manifest["parent_version"] is None and manifest["metrics"] == {"public_dice": 0.5}
    assert manifest["interface"] == 4 and NETWORK_PY in manifest["files"]
    assert manifest["inputs"] == ["INPUT", "MODEL_AFFINE", "AFFINE", "SHAPE"]
    assert manifest["runtimes"]["onnxruntime"] == keys.MODEL_ONNX  # what this CPU instance runs
    # The pipeline model was published before the version (its manifest last of all).
    assert repo.pipeline_version() is not None

    triton = TritonModels(settings)
    segmenter = TritonSegmenter(triton, repo)
    # On CPU replicas the version loads as its network alone, the pipeline beside it.
    segmenter.serve_version(spec.name, 1)
    assert segmenter.spec(spec.name, 1).default_model_filename == NETWORK_PY
    try:
        phantom = generate_phantom("clinical-b", 11, "tiny")
        image = phantom.image.astype(np.float32)
        served = segmenter(spec.name, 1, image, phantom.affine)
        local = Segmenter(checkpoint)(image, phantom.affine)
        assert served.label.shape == image.shape and served.label.dtype == np.uint8
        # Same weights (ONNX Runtime in Triton, torch here): the same mask, bar a rare float tie.
        assert np.mean(served.label != local.label) < 1e-4
        assert abs(served.uncertainty - local.uncertainty) < 1e-4
        # network and resample in Triton, the tensors' way there and back apart
        assert set(served.timings) == {"preprocess", "network", "resample", "transfer"}

        # The whole model.py (how GPU replicas serve a version): what crosses to Triton is the
        # model-grid volume and the scanner grid; labels on that grid come back. Without the
        # grid, probabilities on the model grid.
        triton.serve_version(spec, 1)
        x = segmenter.preprocessor(spec.name, 1)(image, phantom.affine)
        label, uncertainty, stages = triton.labels(
            spec.name, 1, x.image, x.affine, phantom.affine, image.shape
        )
        assert np.mean(label != served.label) < 1e-4
        assert abs(uncertainty - served.uncertainty) < 1e-4
        assert set(stages) == {"network", "resample"} and min(stages.values()) > 0
        probs = triton.probabilities(spec.name, 1, x.image)
        assert probs.shape == (len(manifest["model_config"]["organs"]), *x.image.shape)
        assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-4)
        # A wrong-rank input is refused by Triton with a clear error, not a crash.
        with pytest.raises(Exception, match=r"3-D|dims|shape"):
            triton.probabilities(spec.name, 1, x.image[0])
        # ... and so is a grid that is not one (a 3 x 4 affine is refused by its dims).
        with pytest.raises(Exception, match=r"AFFINE|dims|shape"):
            triton.labels(spec.name, 1, x.image, x.affine[:3], phantom.affine, image.shape)
    finally:
        triton.client.unload_model(spec.name)
        triton.close()


def test_the_pipeline_is_published_once_per_code_and_checked_before_it_loads(
    settings, tmp_path, unique
):
    """Every publisher of a version makes sure the pipeline model with its code is published
    (a new version only when the code differs); a pipeline whose model.py changed in the
    bucket after publishing is refused, like any version, and the serving version is not
    loaded without it."""
    own = settings.model_copy(
        update={"triton": settings.triton.model_copy(update={"pipeline_model": f"p_{unique}"})}
    )
    checkpoint = _trained(tmp_path, "pipe", volumes=1, steps=2)
    repo = ModelRepository(own)
    name = f"piped_{unique}"
    package = package_checkpoint(checkpoint, segmentation_spec(name))
    assert repo.pipeline_version() is None
    repo.publish_version(segmentation_spec(name), 1, package.files, package.manifest)
    repo.publish_version(segmentation_spec(name), 2, package.files, package.manifest)
    assert repo.published_versions(f"p_{unique}") == [1]
    assert repo.publish_pipeline() == 1
    pipeline = repo.manifest(f"p_{unique}", 1)
    assert pipeline["role"] == "pipeline" and set(pipeline["files"]) == {"model.py"}

    key = keys.model_file(own.triton.model_prefix, f"p_{unique}", 1, "model.py")
    repo.store.put_bytes(own.s3.model_bucket, key, b"import os  # not what was published\n")
    triton = TritonModels(own)
    segmenter = TritonSegmenter(triton, repo)
    try:
        with pytest.raises(ModelLoadFailed, match=r"model\.py changed after publish"):
            segmenter.serve_version(name, 1)
        assert triton.serving_versions(name) == []
        # What this code publishes next is a new pipeline version, which loads and serves.
        assert repo.publish_pipeline() == 2
        segmenter.serve_version(name, 2)
        assert triton.serving_versions(f"p_{unique}") == [2]
        phantom = generate_phantom("clinical-b", 14, "tiny")
        served = segmenter(name, 2, phantom.image.astype(np.float32), phantom.affine)
        assert served.label.shape == phantom.image.shape
    finally:
        for model in (name, f"p_{unique}"):
            triton.client.unload_model(model)
        triton.close()


def test_the_cpu_runtime_is_the_one_the_config_names_and_matches_torch(settings, tmp_path, unique):
    """On CPU instances ONNX Runtime runs the version's model.onnx (0.63x torch's time on the
    realistic network), with torch's mask; ``cpu_runtime: torch`` runs the weights. Shown with a
    version whose model.onnx is another network's: only the ONNX Runtime instance answers with
    that other network's mask."""
    checkpoint = _trained(tmp_path, "runtimes", volumes=1, steps=8)
    cfg, _, _ = load_checkpoint(checkpoint)
    torch.manual_seed(99)
    other = export_onnx(build_network(cfg), cfg)  # an untrained network of the same shape
    name = f"runtimes_{unique}"
    package = package_checkpoint(checkpoint, segmentation_spec(name))
    repo = ModelRepository(settings)
    files = {**package.files, keys.MODEL_ONNX: other}
    repo.publish_version(segmentation_spec(name), 1, files, package.manifest)
    phantom = generate_phantom("clinical-b", 13, "tiny")
    image = phantom.image.astype(np.float32)
    local = Segmenter(checkpoint)(image, phantom.affine).label
    triton = TritonModels(settings)
    try:
        masks = {}
        for runtime in ("torch", "onnxruntime"):
            t = settings.triton.model_copy(update={"cpu_runtime": runtime})
            # a deployment whose CPU instances run ``runtime``
            rt = settings.model_copy(update={"triton": t})
            segmenter = TritonSegmenter(triton, ModelRepository(rt))
            segmenter.serve_version(name, 1)
            masks[runtime] = segmenter(name, 1, image, phantom.affine).label
        assert np.mean(masks["torch"] != local) < 1e-4
        assert np.mean(masks["onnxruntime"] != local) > 0.01  # the other network answered
    finally:
        triton.client.unload_model(name)
        triton.close()


def test_a_version_of_interface_2_is_still_served_and_resampled_by_the_caller(
    settings, tmp_path, unique
):
    """Versions published before interface 3 (probabilities out) keep working after an upgrade:
    the caller asks them for probabilities and resamples them itself, the same mask."""
    checkpoint = _trained(tmp_path, "old", volumes=1, steps=3)
    spec = segmentation_spec(f"old2_{unique}")
    package = package_checkpoint(checkpoint, spec)
    repo = ModelRepository(settings)
    repo.publish_version(spec, 1, package.files, {**package.manifest, "interface": 2})
    repo.publish_version(spec, 2, package.files, package.manifest)
    triton = TritonModels(settings)
    segmenter = TritonSegmenter(triton, repo)
    segmenter.serve_version(spec.name, 1)
    try:
        phantom = generate_phantom("clinical-b", 12, "tiny")
        image = phantom.image.astype(np.float32)
        old = segmenter(spec.name, 1, image, phantom.affine)
        assert set(old.timings) == {"preprocess", "triton", "resample"}
        segmenter.serve_version(spec.name, 2)  # interface 4: its network, beside the pipeline
        new = segmenter(spec.name, 2, image, phantom.affine)
        assert "transfer" in new.timings
        assert np.mean(old.label != new.label) < 1e-4  # the same weights
        assert abs(old.uncertainty - new.uncertainty) < 1e-4
    finally:
        triton.client.unload_model(spec.name)
        triton.close()


def test_a_version_packaged_for_another_interface_is_refused_with_a_clear_error(settings, unique):
    """Versions published by an earlier ctloop (model.py taking the scanner-grid CT, no
    ``interface`` in the manifest) are not sent model-grid tensors: the error says what to do."""
    spec = segmentation_spec(f"old_{unique}")
    manifest = {"model_config": ModelConfig().model_dump(mode="json"), "inputs": ["IMAGE"]}
    repo = ModelRepository(settings)
    repo.publish_version(spec, 1, {"model.py": b"# an older model.py"}, manifest)
    triton = TritonModels(settings)
    try:
        with pytest.raises(
            IncompatibleModel, match=r"interface 1.*2 and 3 and 4.*publish the checkpoint"
        ):
            TritonSegmenter(triton, repo).preprocessor(spec.name, 1)
    finally:
        triton.close()
