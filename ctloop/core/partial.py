"""Flexible labelling: what an annotator reviewed, and what the loss may therefore trust.

Per organ an annotator *accepts* the pre-annotation, *corrects* it or *skips* it; early rounds
may review only some axial slices. A label is ground truth only where it was reviewed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, Field, field_validator
from scipy import ndimage

from ctloop.core.organs import FOREGROUND, NUM_CLASSES, ORGAN_IDS, canonical_name

OrganStatus = Literal["accepted", "corrected", "skipped"]

# How far (voxels) around a skipped organ's pre-annotated region the label is not trusted:
# the organ's true extent may reach beyond what the model drew.
SKIP_MARGIN_VOXELS = 2
# the greatest slice index a review may name (far above any CT; keeps indices in SQL/JSON ints)
MAX_SLICE = 100_000


class PartialLabel(BaseModel):
    """What was reviewed. Organs not listed count as reviewed (``corrected``)."""

    organs: dict[str, OrganStatus] = Field(default_factory=dict)
    # Inclusive ranges of reviewed axial slices (index along the volume's 3rd axis);
    # None means every slice was reviewed.
    reviewed_slices: list[tuple[int, int]] | None = None

    @field_validator("organs")
    @classmethod
    def _known_organs(cls, v: dict[str, OrganStatus]) -> dict[str, OrganStatus]:
        out = {canonical_name(k): s for k, s in v.items()}
        if "background" in out:
            raise ValueError("background has no review status")
        return out

    @field_validator("reviewed_slices")
    @classmethod
    def _ordered(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if v is not None:
            for lo, hi in v:
                if lo < 0 or hi < lo or hi > MAX_SLICE:
                    raise ValueError(f"bad slice range ({lo}, {hi})")
        return v

    @property
    def is_full(self) -> bool:
        return self.reviewed_slices is None and "skipped" not in self.organs.values()

    def skipped(self) -> list[str]:
        return [o for o in FOREGROUND if self.organs.get(o) == "skipped"]

    def slice_mask(self, depth: int) -> NDArray[np.bool_]:
        if self.reviewed_slices is None:
            return np.ones(depth, dtype=bool)
        mask = np.zeros(depth, dtype=bool)
        for lo, hi in self.reviewed_slices:
            mask[lo : min(hi, depth - 1) + 1] = True
        return mask

    def loss_weights(
        self, label: NDArray[np.integer]
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """``(voxel_weight (1, x, y, z), class_weight (C,))`` for :class:`PartialDiceCELoss`."""
        voxel = np.broadcast_to(self.slice_mask(label.shape[-1]), label.shape).copy()
        classes = np.ones(NUM_CLASSES, dtype=np.float32)
        for organ in self.skipped():
            k = ORGAN_IDS[organ]
            classes[k] = 0.0
            region = label == k
            if region.any():
                region = ndimage.binary_dilation(region, iterations=SKIP_MARGIN_VOXELS)
            voxel &= ~region
        return voxel[None].astype(np.float32), classes
