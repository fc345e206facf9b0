"""Inference: MONAI sliding-window segmentation back on the volume's own grid.

The same :class:`Segmenter` runs in-process and inside Triton's python backend, so both give the
same mask for the same weights and volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from numpy.typing import NDArray
from scipy import ndimage

from ctloop.core.model import ModelConfig, load_checkpoint, preprocess_transforms

# Voxels whose foreground probability exceeds this count towards the uncertainty score.
UNCERTAINTY_REGION_P = 0.05


@dataclass
class Segmentation:
    label: NDArray[np.uint8]  # canonical organ ids on the input grid
    uncertainty: float  # mean normalised entropy over the (possibly) foreground region


class Segmenter:
    """Loads a checkpoint once; segments volumes given in HU on any grid."""

    def __init__(
        self,
        checkpoint: Path | bytes,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        sw_overlap: float | None = None,
    ) -> None:
        cfg, net, meta = load_checkpoint(checkpoint)
        self.cfg: ModelConfig = cfg
        self.meta = meta
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.sw_batch_size = sw_batch_size or cfg.sw_batch_size
        self.sw_overlap = cfg.sw_overlap if sw_overlap is None else sw_overlap
        self.pre = preprocess_transforms(cfg, with_label=False)

    @torch.inference_mode()
    def __call__(self, image: NDArray, affine: NDArray) -> Segmentation:
        """``image`` (x, y, z) in HU with its voxel->mm ``affine``."""
        if image.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {image.shape}")
        src = MetaTensor(
            torch.as_tensor(np.asarray(image, dtype=np.float32))[None],
            affine=torch.as_tensor(affine, dtype=torch.float64),
        )
        x = self.pre({"image": src})["image"]
        model_affine = np.asarray(x.affine, dtype=np.float64)
        logits = sliding_window_inference(  # one tensor: the predictor returns one
            x[None].as_tensor().to(self.device),
            roi_size=self.cfg.patch,
            sw_batch_size=self.sw_batch_size,
            predictor=self.net,
            overlap=self.sw_overlap,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()  # (C, x, y, z)
        uncertainty = _mean_entropy(probs)
        label = _resample_argmax(probs, model_affine, np.asarray(affine), image.shape)
        return Segmentation(label=label, uncertainty=uncertainty)


def _mean_entropy(probs: NDArray) -> float:
    """Mean entropy / log(C) over voxels that may be foreground; 1.0 if the model sees none."""
    region = (1.0 - probs[0]) > UNCERTAINTY_REGION_P
    if not region.any():
        return 1.0
    p = np.clip(probs[:, region], 1e-8, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0) / np.log(probs.shape[0])
    return float(entropy.mean())


def _resample_argmax(
    probs: NDArray, src_affine: NDArray, dst_affine: NDArray, dst_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
    """Argmax of the class probabilities resampled (trilinear) onto the destination grid.

    One class at a time keeps memory at a few volumes' worth even for 512x512x300 grids.
    """
    # destination voxel -> source voxel
    m = np.linalg.inv(src_affine) @ dst_affine
    best = np.full(dst_shape, -1.0, dtype=np.float32)
    label = np.zeros(dst_shape, dtype=np.uint8)
    for c in range(probs.shape[0]):
        p = ndimage.affine_transform(
            probs[c], m[:3, :3], offset=m[:3, 3], output_shape=dst_shape, order=1, mode="nearest"
        )
        better = p > best
        best[better] = p[better]
        label[better] = c
    return label
