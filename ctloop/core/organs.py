"""The canonical organ list and per-dataset label maps.

Every dataset declares its own ``organ name -> label id`` map (Decathlon ``labels``); on load
ctloop maps it onto the canonical ids below, so two datasets that number organs differently
train one network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Canonical label ids: index in this tuple. 0 is background.
ORGANS: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "pancreas",
    "gallbladder",
    "aorta",
    "ivc",
)
ORGAN_IDS: dict[str, int] = {name: i for i, name in enumerate(ORGANS)}
NUM_CLASSES = len(ORGANS)
FOREGROUND: tuple[str, ...] = ORGANS[1:]

# Names other datasets commonly use for the same structures.
ALIASES: dict[str, str] = {
    "bg": "background",
    "right kidney": "kidney_right",
    "left kidney": "kidney_left",
    "kidney_r": "kidney_right",
    "kidney_l": "kidney_left",
    "gall_bladder": "gallbladder",
    "gall bladder": "gallbladder",
    "inferior_vena_cava": "ivc",
    "inferior vena cava": "ivc",
    "postcava": "ivc",
}


# TotalSegmentator v2's ids ("total" task) of ctloop's organs: its label maps (117 structures)
# read with every other structure as background (:func:`from_totalsegmentator`).
TOTALSEGMENTATOR_IDS: dict[str, int] = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5,
    "stomach": 6, "pancreas": 7, "aorta": 52, "ivc": 63,
}  # fmt: skip


def from_totalsegmentator(label: NDArray[np.integer]) -> NDArray[np.uint8]:
    """A TotalSegmentator label map in canonical ids; its other structures are background."""
    values = np.asarray(label).astype(np.int64)
    if values.size and values.min() < 0:
        raise ValueError("a TotalSegmentator label map has no negative ids")
    lut = np.zeros(
        max(int(values.max(initial=0)), max(TOTALSEGMENTATOR_IDS.values())) + 1, np.uint8
    )
    for organ, value in TOTALSEGMENTATOR_IDS.items():
        lut[value] = ORGAN_IDS[organ]
    return lut[values]


class UnknownLabel(ValueError):
    """A label name or value that the dataset or the canonical list does not know."""


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key).replace(" ", "_")
    if key not in ORGAN_IDS:
        raise UnknownLabel(f"unknown organ {name!r}; known: {', '.join(ORGANS)}")
    return key


MAX_LABEL_ID = 65535  # label volumes are at most uint16; a larger id would size a huge table


class LabelMap:
    """A dataset's ``organ -> id`` map and its translation to canonical ids."""

    def __init__(self, organ_to_id: Mapping[str, int]) -> None:
        self.organ_to_id = {canonical_name(k): int(v) for k, v in organ_to_id.items()}
        if any(not 0 <= v <= MAX_LABEL_ID for v in self.organ_to_id.values()):
            raise UnknownLabel(f"label ids must be integers 0..{MAX_LABEL_ID}")
        ids = list(self.organ_to_id.values())
        if len(set(ids)) != len(ids):
            raise UnknownLabel(f"label map assigns one id to several organs: {organ_to_id}")
        self.organ_to_id.setdefault("background", 0)
        size = max(self.organ_to_id.values()) + 1
        self._lut = np.full(size, -1, dtype=np.int16)
        for organ, value in self.organ_to_id.items():
            self._lut[value] = ORGAN_IDS[organ]
        self._lut8 = np.where(self._lut < 0, 0, self._lut).astype(np.uint8)  # after the check
        # Every declared id is its own canonical id: a checked uint8 volume needs no mapping.
        self.is_identity = all(ORGAN_IDS[o] == v for o, v in self.organ_to_id.items())

    @classmethod
    def canonical(cls) -> LabelMap:
        return cls(ORGAN_IDS)

    @classmethod
    def from_decathlon(cls, labels: Mapping[str, str]) -> LabelMap:
        """From a Decathlon ``dataset.json`` ``labels`` block (``{"0": "background", ...}``)."""
        return cls({name: int(value) for value, name in labels.items()})

    def to_decathlon(self) -> dict[str, str]:
        return {str(v): k for k, v in sorted(self.organ_to_id.items(), key=lambda kv: kv[1])}

    def to_canonical(self, label: NDArray[np.integer]) -> NDArray[np.uint8]:
        """Map a label volume in this dataset's ids to canonical ids.

        Raises :class:`UnknownLabel` when the volume holds a value the map does not declare.
        """
        lo, hi = int(label.min()), int(label.max())
        if lo >= 0 and hi < len(self._lut) and bool(np.all(self._lut[lo : hi + 1] >= 0)):
            values: Any = ()  # every id from the least to the greatest is declared
        elif lo >= 0 and hi < len(self._lut) and label.dtype != np.uint64:
            # Which values occur: a count per value, not a sort (masks are ~10^7 voxels).
            values = np.flatnonzero(np.bincount(label.ravel(order="K"), minlength=hi + 1))
        else:
            values = np.unique(label)
        unknown = [int(v) for v in values if v < 0 or v >= len(self._lut) or self._lut[v] < 0]
        if unknown:
            raise UnknownLabel(f"label values {unknown} are not in the dataset's label map")
        if self.is_identity and label.dtype == np.uint8:
            return label.view(np.uint8)  # the values were just checked: already canonical
        return self._lut8[label]
