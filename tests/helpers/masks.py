"""Hand-countable label volumes for the time-model and fixed-set tests: three organs apart from
each other, each a 10x10 square on every one of DEPTH slices (with 4-slice blocks, flexible
review covers slices 0-3 and 8-11)."""

from __future__ import annotations

import numpy as np

from ctloop.core.organs import ORGAN_IDS

DEPTH = 16
LIVER, SPLEEN, AORTA = ORGAN_IDS["liver"], ORGAN_IDS["spleen"], ORGAN_IDS["aorta"]


def three_organ_truth() -> np.ndarray:
    t = np.zeros((40, 40, DEPTH), dtype=np.uint8)
    t[2:12, 2:12] = LIVER
    t[2:12, 25:35] = SPLEEN
    t[25:35, 2:12] = AORTA
    return t
