"""Segmentation quality: per-organ Dice and average surface distance (MONAI metrics).

The same functions measure a model against the truth and a pre-annotation against its
correction (how much the annotator had to change).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice
from monai.networks.utils import one_hot
from numpy.typing import NDArray

from ctloop.core.organs import FOREGROUND, NUM_CLASSES


def _onehot(label: NDArray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(label, dtype=np.int64))[None, None]
    return one_hot(t, num_classes=NUM_CLASSES)


def organ_dice(pred: NDArray, truth: NDArray) -> dict[str, float]:
    """Dice per organ; organs absent from both are left out (no evidence either way)."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    dice = compute_dice(_onehot(pred), _onehot(truth), include_background=False, ignore_empty=False)
    present = [(np.any(pred == k) or np.any(truth == k)) for k in range(1, NUM_CLASSES)]
    return {
        organ: float(dice[0, i])
        for i, organ in enumerate(FOREGROUND)
        if present[i] and not math.isnan(float(dice[0, i]))
    }


def mean_dice(pred: NDArray, truth: NDArray) -> float:
    """Mean over the organs present in the truth (a missed organ counts as 0)."""
    per = organ_dice(pred, truth)
    organs = [FOREGROUND[k - 1] for k in range(1, NUM_CLASSES) if np.any(truth == k)]
    if not organs:
        return float("nan")
    return float(np.mean([per.get(o, 0.0) for o in organs]))


def organ_surface_distance(
    pred: NDArray, truth: NDArray, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """Symmetric average surface distance in mm per organ present in both masks."""
    out = {}
    for k, organ in enumerate(FOREGROUND, start=1):
        p, t = pred == k, truth == k
        if not (p.any() and t.any()):
            continue
        asd = compute_average_surface_distance(
            _binary(p), _binary(t), include_background=False, symmetric=True, spacing=spacing
        )
        out[organ] = float(asd[0, 0])
    return out


def _binary(mask: NDArray) -> torch.Tensor:
    """(1, 2, x, y, z) one-hot of a boolean mask: channel 1 is the organ."""
    t = torch.as_tensor(mask)[None, None]
    return torch.cat([~t, t], dim=1).float()
