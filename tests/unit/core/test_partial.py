"""Partial labels: what was not reviewed must not teach the network anything."""

import json

import numpy as np
import torch

from ctloop.core.datasets import phantom_volume, write_decathlon
from ctloop.core.model import PartialDiceCELoss
from ctloop.core.organs import NUM_CLASSES, ORGAN_IDS
from ctloop.core.partial import PartialLabel
from ctloop.core.phantom import generate_phantom
from ctloop.core.train import DataSource, TrainConfig, train


def _loss_and_grad(target, weights, logits):
    """Loss and d(loss)/d(logits) for one volume; ``weights`` from ``PartialLabel.loss_weights``."""
    voxel_w, class_w = weights
    logits = logits.clone().requires_grad_(True)
    loss = PartialDiceCELoss()(
        logits,
        torch.as_tensor(target[None, None].astype(np.int64)),
        torch.as_tensor(voxel_w[None]),
        torch.as_tensor(class_w[None]),
    )
    loss.backward()
    return float(loss.detach()), logits.grad[0].numpy()


def test_skipped_organs_and_unreviewed_slices_give_no_gradient():
    label = generate_phantom("public", 4, "small").label
    partial = PartialLabel(organs={"spleen": "skipped", "liver": "accepted"},
                           reviewed_slices=[(10, 30)])  # fmt: skip
    torch.manual_seed(0)
    logits = torch.randn(1, NUM_CLASSES, *label.shape)
    weights = partial.loss_weights(label)
    kept = weights[0][0]
    loss_a, grad = _loss_and_grad(label, weights, logits)

    depth = label.shape[2]
    unreviewed = np.ones(depth, bool)
    unreviewed[10:31] = False
    assert np.all(grad[:, :, :, unreviewed] == 0)
    spleen = label == ORGAN_IDS["spleen"]
    assert np.all(grad[:, spleen] == 0)
    assert np.abs(grad[:, kept > 0]).sum() > 0  # what was reviewed does teach

    # Whatever the label says where it was not reviewed, the loss and its gradient are the same.
    scrambled = label.copy()
    rng = np.random.default_rng(0)
    scrambled[:, :, unreviewed] = rng.integers(0, NUM_CLASSES, size=label[:, :, unreviewed].shape)
    scrambled[spleen] = ORGAN_IDS["liver"]
    loss_b, grad_b = _loss_and_grad(scrambled, weights, logits)
    assert np.isclose(loss_a, loss_b, rtol=1e-5)
    assert np.allclose(grad, grad_b, atol=1e-7)


def test_full_review_keeps_every_voxel_and_organ():
    label = generate_phantom("public", 4, "tiny").label
    voxel_w, class_w = PartialLabel().loss_weights(label)
    assert voxel_w.min() == 1.0 and class_w.min() == 1.0
    assert PartialLabel().is_full


def test_training_on_partial_labels_learns(tmp_path):
    vols = [phantom_volume(generate_phantom("public", s, "tiny"), f"p{s}") for s in range(2)]
    write_decathlon(tmp_path / "ds", vols, "partial")
    spec = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    spec["training"][0]["partial"] = {"organs": {"spleen": "skipped"}, "reviewed_slices": [[5, 20]]}
    spec["training"][1]["partial"] = {"organs": {"liver": "accepted", "kidney_left": "skipped"}}
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(spec))
    from ctloop.core.model import ModelConfig

    cfg = TrainConfig(
        model=ModelConfig(
            spacing=(8.0, 8.0, 8.0), patch=(32, 32, 32), channels=(8, 16, 32), strides=(2, 2)
        ),
        sources=[DataSource(path=tmp_path / "ds")],
        out=tmp_path / "partial.pt",
        steps=40,
        lr=5e-3,
        log_every=10,
    )
    summary = train(cfg)
    losses = summary["losses"]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert (tmp_path / "partial.pt").exists()
