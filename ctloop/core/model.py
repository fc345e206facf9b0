"""Network, preprocessing and the partial-label loss, all from MONAI parts.

Tensors are channel-first ``(C, x, y, z)`` per volume, ``(B, C, x, y, z)`` per batch, as in MONAI.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import MaskedDiceLoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from pydantic import BaseModel
from torch import nn
from torch.nn import functional as F

from ctloop.core.organs import ORGANS


class ModelConfig(BaseModel):
    """Everything needed to rebuild the network and its preprocessing (saved in checkpoints)."""

    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)  # mm, common training grid
    hu_window: tuple[float, float] = (-160.0, 240.0)  # abdominal window -> [0, 1]
    patch: tuple[int, int, int] = (64, 64, 48)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    organs: tuple[str, ...] = ORGANS
    sw_batch_size: int = 2
    sw_overlap: float = 0.25

    @property
    def num_classes(self) -> int:
        return len(self.organs)


# A network small enough to train in seconds on 2 cores (the tiny run preset, the benchmarks'
# smoke preset, the tests): overrides of ModelConfig's defaults, in the form the training
# settings take them (``CTLOOP_TRAINING__MODEL``); ``ModelConfig(**TINY_MODEL)`` builds it.
TINY_MODEL: dict[str, Any] = {
    "spacing": [8, 8, 8],
    "patch": [32, 32, 32],
    "channels": [8, 16],
    "strides": [2],
}


def build_network(cfg: ModelConfig) -> nn.Module:
    """A residual 3-D U-Net (MONAI ``UNet``): logits ``(B, num_classes, x, y, z)``."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=cfg.num_classes,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
    )


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    inner = getattr(net, "module", net)
    return inner if isinstance(inner, nn.Module) else net


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: Path, cfg: ModelConfig, net: nn.Module, meta: dict[str, Any] | None = None
) -> None:
    """Weights, config and provenance in one file (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": cfg.model_dump(), "state_dict": state, "meta": meta or {}}, tmp)
    tmp.replace(path)


def load_checkpoint(source: Path | bytes) -> tuple[ModelConfig, nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint file (or its bytes), in eval mode on CPU."""
    fobj: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    ckpt = torch.load(fobj, map_location="cpu", weights_only=True)
    cfg = ModelConfig.model_validate(ckpt["config"])
    net = build_network(cfg)
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    return cfg, net, dict(ckpt.get("meta", {}))


# ---------------------------------------------------------------- transforms
def preprocess_transforms(cfg: ModelConfig, with_label: bool = True) -> Compose:
    """Resample to the common spacing and window the HU (deterministic, cacheable)."""
    keys = ["image", "label", "weight"] if with_label else ["image"]
    modes = ["bilinear", "nearest", "nearest"][: len(keys)]
    lo, hi = cfg.hu_window
    steps: list[Any] = [
        # In float32: MONAI's default (float64) made a float64 copy of the whole scanner-grid
        # volume to resample it, 962 MB at the peak for a 274 MB CT instead of 207 MB, and
        # took ~1.3x as long; the inputs differ by at most 3e-5 of the HU window.
        Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes, dtype=np.float32),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if with_label:
        steps.append(SpatialPadd(keys=keys, spatial_size=cfg.patch))
    return Compose(steps)


def augment_transforms(cfg: ModelConfig, samples_per_volume: int) -> Compose:
    """Random patches (organ-centred 2:1) and intensity augmentation for a new site's scanner
    and contrast phase: scale and shift, gamma (contrast curve), a random monotone histogram
    shift, noise. Issue 19, chosen before any run with them and not tuned after: gamma
    0.7-1.5 and the histogram shift (5-10 control points) at p = 0.3, scale ±0.15 and shift
    ±0.1 at p = 0.5 (before: scale ±0.1, shift ±0.05, no gamma, no histogram shift).

    No left-right flips: they would swap the kidneys' sides.
    """
    keys = ["image", "label", "weight"]
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=cfg.patch,
                pos=2,
                neg=1,
                num_samples=samples_per_volume,
            ),
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            RandHistogramShiftd(keys="image", num_control_points=(5, 10), prob=0.3),
            RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]
    )


# ---------------------------------------------------------------- loss
class PartialDiceCELoss(nn.Module):
    """Dice + cross-entropy that ignores what the annotator did not review.

    ``voxel_weight`` (B, 1, x, y, z) is 0 where the label is not ground truth (unreviewed slices,
    the region of skipped organs); those voxels contribute neither term, so they produce no
    gradient. ``class_weight`` (B, C) is 0 for skipped organs, whose Dice term is dropped. MONAI's
    ``MaskedDiceLoss`` gives the masked Dice; the cross-entropy is averaged over kept voxels.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        self.dice = MaskedDiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, reduction="none"
        )
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weight: torch.Tensor,
        class_weight: torch.Tensor,
    ) -> torch.Tensor:
        w = voxel_weight.to(logits.dtype)
        ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none") * w[:, 0]
        ce_term = ce.sum() / w.sum().clamp_min(1.0)
        dice = self.dice(logits, target, mask=w).reshape(logits.shape[0], -1)  # (B, C-1)
        cw = class_weight[:, 1:].to(dice.dtype)
        dice_term = (dice * cw).sum() / cw.sum().clamp_min(1.0)
        return self.lambda_dice * dice_term + self.lambda_ce * ce_term
