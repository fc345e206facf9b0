"""Inference: MONAI sliding-window segmentation back on the volume's own grid.

The same :class:`Segmenter` runs in-process and inside Triton's python backend, so both give the
same mask for the same weights and volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
    # Seconds per stage: preprocess (resample + window), network (sliding window), resample.
    timings: dict[str, float] = field(default_factory=dict)


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
        t0 = time.perf_counter()
        src = MetaTensor(
            torch.as_tensor(np.asarray(image, dtype=np.float32))[None],
            affine=torch.as_tensor(affine, dtype=torch.float64),
        )
        x = self.pre({"image": src})["image"]
        model_affine = np.asarray(x.affine, dtype=np.float64)
        t1 = time.perf_counter()
        logits = sliding_window_inference(  # one tensor: the predictor returns one
            x[None].as_tensor().to(self.device),
            roi_size=self.cfg.patch,
            sw_batch_size=self.sw_batch_size,
            predictor=self.net,
            overlap=self.sw_overlap,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        probs = torch.softmax(logits.float(), dim=1)[0]  # (C, x, y, z) on the device
        uncertainty = _mean_entropy(probs.cpu().numpy())
        t2 = time.perf_counter()
        label = _resample_argmax(probs, model_affine, np.asarray(affine), image.shape)
        t3 = time.perf_counter()
        timings = {"preprocess": t1 - t0, "network": t2 - t1, "resample": t3 - t2}
        return Segmentation(label=label, uncertainty=uncertainty, timings=timings)


def _mean_entropy(probs: NDArray) -> float:
    """Mean entropy / log(C) over voxels that may be foreground; 1.0 if the model sees none."""
    region = (1.0 - probs[0]) > UNCERTAINTY_REGION_P
    if not region.any():
        return 1.0
    p = np.clip(probs[:, region], 1e-8, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0) / np.log(probs.shape[0])
    return float(entropy.mean())


def _resample_argmax(
    probs: torch.Tensor, src_affine: NDArray, dst_affine: NDArray, dst_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
    """Argmax of the class probabilities resampled (trilinear, edges clamped) onto the
    destination grid.

    The model grid differs from the input grid only by its spacing (``Spacingd`` keeps the
    orientation), so destination voxel -> source voxel is a per-axis scale and shift and the
    trilinear interpolation is separable: it runs per axis, coarse axes first, on slabs of
    destination slices, multi-threaded in torch. Memory stays at the label plus one slab of
    class probabilities, on the device the probabilities are on. Any other mapping takes the
    general (slower, CPU) path.
    """
    m = np.linalg.inv(src_affine) @ dst_affine  # destination voxel -> source voxel
    lin = m[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6):
        return _resample_argmax_affine(probs.float().cpu().numpy(), m, dst_shape)
    p = probs.float()
    tx, ty, tz = (
        _linear_taps(m[d, d], m[d, 3], dst_shape[d], p.shape[d + 1], p.device) for d in range(3)
    )
    label = torch.empty(tuple(dst_shape), dtype=torch.uint8, device=p.device)
    slab = max(1, SLAB_ELEMENTS // (p.shape[0] * dst_shape[0] * dst_shape[1]))
    # Each step gathers along the outermost axis (contiguous rows), then moves the next axis
    # out: (z, C, x, y) -> (y, z, C, x) -> (x, y, z, C), so the argmax runs over the last axis.
    pz_all = p.permute(3, 0, 1, 2).contiguous()
    for z0 in range(0, dst_shape[2], slab):
        z = slice(z0, min(dst_shape[2], z0 + slab))
        pz = _lerp(pz_all, tz[0][z], tz[1][z], tz[2][z])  # (s, C, X, Y)
        py = _lerp(pz.permute(3, 0, 1, 2).contiguous(), *ty)  # (y, s, C, X)
        px = _lerp(py.permute(3, 0, 1, 2).contiguous(), *tx)  # (x, y, s, C)
        label[:, :, z] = px.argmax(dim=3).to(torch.uint8)  # first maximum wins ties
    return label.cpu().numpy()


# Class probabilities per slab of the separable resampling (64 MiB of float32).
SLAB_ELEMENTS = 1 << 24


def _linear_taps(
    scale: float, shift: float, n_out: int, n_in: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper source index and upper weight of each destination index along one axis
    (coordinates clamped to the source: scipy's ``mode="nearest"`` for order 1)."""
    src = np.clip(scale * np.arange(n_out, dtype=np.float64) + shift, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)

    def on(a: NDArray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return on(lo), on(hi), on(w)


def _lerp(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``t`` along its first axis at taps ``lo``/``hi``, weight ``w``."""
    w = w.reshape(-1, *[1] * (t.ndim - 1))
    return t[lo].lerp_(t[hi], w)  # (indexing, not index_select: far faster on CPU threads)


def _resample_argmax_affine(
    probs: NDArray, m: NDArray, dst_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
    """The general path: one class at a time through ``scipy.ndimage.affine_transform``."""
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
