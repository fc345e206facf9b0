"""What the annotators delivered, per round (issue 19): how much of what they submitted the
training may trust, what it cost, and how good it is against the truth over the whole volume.

Only the simulated annotators know the truth, so the run measures this at submission and tells
the metrics service (``RunInfo.delivered``), which puts it beside each round of the report.

Per submission:

* **trusted organ-slices**: for every organ the annotator accepted or corrected (not skipped),
  the reviewed axial slices in which the submitted mask has that organ; the loss trusts exactly
  these (``ctloop.core.partial``), so they measure what a round gives training;
* **minutes**: the time model's minutes for it (what the annotator reported);
* **submitted Dice**: the submitted mask against the truth over the whole volume, organs
  averaged, slices not reviewed and skipped organs included (what a user of the masks gets).

Per round (the model whose pre-annotations were corrected): volumes, minutes per CT, trusted
organ-slices per CT, minutes per trusted organ-slice (total minutes / total organ-slices) and
the mean submitted Dice.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctloop.core.metrics import mean_dice
from ctloop.core.organs import ORGAN_IDS
from ctloop.transfer.annotator import Plan


def trusted_organ_slices(plan: Plan) -> int:
    """Organ-slices the loss trusts: reviewed slices of organs accepted or corrected where the
    submitted mask has the organ."""
    depth = plan.mask.shape[2]
    rows = np.zeros(depth, dtype=bool)
    for lo, hi in plan.reviewed_slices or [(0, depth - 1)]:
        rows[lo : hi + 1] = True
    count = 0
    for organ, status in plan.organs.items():
        if status == "skipped":
            continue
        present = (plan.mask == ORGAN_IDS[organ]).any(axis=(0, 1))
        count += int((present & rows).sum())
    return count


def submission(plan: Plan, truth: NDArray[np.uint8], minutes: float) -> dict[str, float]:
    return {
        "minutes": float(minutes),
        "trusted_organ_slices": float(trusted_organ_slices(plan)),
        "submitted_dice": float(mean_dice(plan.mask, truth)),
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    """One round's submissions (see the module docstring)."""
    n = len(rows)
    minutes = sum(r["minutes"] for r in rows)
    slices = sum(r["trusted_organ_slices"] for r in rows)
    return {
        "volumes": n,
        "minutes_per_ct": minutes / n if n else None,
        "trusted_organ_slices_per_ct": slices / n if n else None,
        "minutes_per_trusted_organ_slice": minutes / slices if slices else None,
        "submitted_dice": float(np.mean([r["submitted_dice"] for r in rows])) if n else None,
    }


class Delivered:
    """Collects the run's submissions by the model that pre-annotated them (thread-safe: the
    annotators submit in parallel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, list[dict[str, float]]] = {}

    def add(self, plan: Plan, truth: NDArray[np.uint8], minutes: float) -> None:
        row = submission(plan, truth, minutes)
        with self._lock:
            self._rows.setdefault(plan.from_model, []).append(row)

    def describe(self) -> dict[str, dict[str, Any]]:
        """``model:version`` -> that round's summary."""
        with self._lock:
            return {ref: summarize(rows) for ref, rows in sorted(self._rows.items())}
