"""A trained checkpoint, packaged as a Triton version, answers like in-process inference."""

import numpy as np

from ctloop.core.datasets import synthesize_dataset
from ctloop.core.infer import Segmenter
from ctloop.core.model import ModelConfig
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.core.phantom import generate_phantom
from ctloop.core.train import DataSource, TrainConfig, train
from ctloop.model_repository import ModelRepository, TritonModels


def test_exported_package_answers_through_triton_with_the_in_process_mask(
    settings, tmp_path, unique
):
    synthesize_dataset(tmp_path / "public", "public", 2, seed=0, size="tiny")
    checkpoint = tmp_path / "igniter.pt"
    train(
        TrainConfig(
            model=ModelConfig(
                spacing=(8.0, 8.0, 8.0), patch=(32, 32, 32), channels=(8, 16), strides=(2,)
            ),
            sources=[DataSource(path=tmp_path / "public")],
            out=checkpoint,
            steps=15,
            meta={"name": "igniter"},
        )
    )
    spec = segmentation_spec(f"igniter_{unique}", sw_batch_size=2)
    package = package_checkpoint(checkpoint, spec, metrics={"public_dice": 0.5})
    repo = ModelRepository(settings)
    repo.publish_version(spec, 1, package.files, package.manifest)
    manifest = repo.manifest(spec.name, 1)
    assert manifest["training"]["training_volumes"] == ["public_00000", "public_00001"]
    assert manifest["parent_version"] is None and manifest["metrics"] == {"public_dice": 0.5}

    triton = TritonModels(settings)
    triton.serve_version(spec, 1)
    try:
        phantom = generate_phantom("clinical-b", 11, "tiny")
        image = phantom.image.astype(np.float32)
        served, served_uncertainty = triton.segment(spec.name, image, phantom.affine)
        local = Segmenter(checkpoint)(image, phantom.affine)
        assert served.shape == image.shape and served.dtype == np.uint8
        # Same code, same weights: the same mask (bar a rare float tie under other threading).
        assert np.mean(served != local.label) < 1e-4
        assert abs(served_uncertainty - local.uncertainty) < 1e-4
    finally:
        triton.client.unload_model(spec.name)
        triton.close()
