"""A simulated annotator: a person's client in code, with the phantom's truth for eyes.

It claims a task through the public API, downloads the pre-annotation, corrects it against the
truth following the **flexible labelling strategy**, and submits the revision with the minutes a
person would have spent according to an explicit **time model**.

Flexible labelling (per organ, Dice of the pre-annotation on the slices reviewed):

* early rounds (``flexible``): only every other block of ``block_slices`` axial slices is
  reviewed (half the volume); an organ at or above ``accept_early`` is *accepted* as drawn, one
  between ``skip_early`` and ``accept_early`` is *skipped* (nearly right: not worth the time yet;
  training does not trust it), one below is *corrected* on the reviewed slices;
* later rounds (after the preset's ``flexible_rounds``): every slice is reviewed, organs at or
  above ``accept_late`` are accepted, every other organ is corrected.

Time model (minutes for one CT)::

    minutes = open_min                                  # load, scroll through, save
            + check_min * organs looked at              # accepted or corrected (not skipped)
            + k * sum over corrected organs and reviewed slices that need an edit of
                  (slice_base + min(1, changed voxels / voxels of pred or truth in the slice))

A slice needs an edit when the organ's outline in it is visibly off: the overlap of prediction
and truth in the slice (intersection over union) is below ``slice_ok`` (0.9; a person does not
redraw a boundary that is a voxel out) and the organ covers at least ``min_voxels`` there. The
effort of an edited slice grows with how much of it is wrong. ``k`` (minutes per edit unit) is
calibrated once, on the first round's volumes, so that their mean equals the paper's 13.87
minutes per CT; every later round's minutes follow from how much less the better model leaves
to edit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from ctloop.core.blobs import nifti_from_gz, nifti_gz_bytes
from ctloop.core.organs import FOREGROUND, ORGAN_IDS

log = logging.getLogger("ctloop.annotator")

PAPER_FIRST_ROUND_MINUTES = 13.87


@dataclass(frozen=True)
class Strategy:
    block_slices: int = 4
    accept_early: float = 0.90
    skip_early: float = 0.75
    accept_late: float = 0.95


@dataclass
class TimeModel:
    open_min: float = 1.0
    check_min: float = 0.1
    slice_base: float = 0.25
    min_voxels: int = 3
    slice_ok: float = 0.9
    k: float | None = None  # minutes per edit unit; None until calibrated
    calibrated_on: int = 0
    target_first_round: float = PAPER_FIRST_ROUND_MINUTES

    def fixed(self, plan: Plan) -> float:
        return self.open_min + self.check_min * plan.organs_checked

    def minutes(self, plan: Plan) -> float:
        if self.k is None:
            raise RuntimeError("the time model is not calibrated yet")
        return self.fixed(plan) + self.k * plan.edit_units

    def calibrate(self, plans: list[Plan]) -> float:
        """Set ``k`` so that the mean minutes of ``plans`` (the first round's) is the target."""
        units = float(np.mean([p.edit_units for p in plans]))
        fixed = float(np.mean([self.fixed(p) for p in plans]))
        if units <= 0:
            raise RuntimeError("the first round needs no edits: nothing to calibrate on")
        self.k = max(0.0, (self.target_first_round - fixed) / units)
        self.calibrated_on = len(plans)
        return self.k

    def describe(self) -> dict[str, Any]:
        return {
            "formula": "open_min + check_min * organs_checked + k * edit_units",
            "edit_unit": "per corrected organ and reviewed slice needing an edit: "
            "slice_base + min(1, changed / union)",
            "open_min": self.open_min,
            "check_min": self.check_min,
            "slice_base": self.slice_base,
            "min_voxels": self.min_voxels,
            "slice_ok": self.slice_ok,
            "k_minutes_per_unit": self.k,
            "calibrated_on_volumes": self.calibrated_on,
            "calibration_target_minutes": self.target_first_round,
        }


@dataclass
class Plan:
    """What the annotator will submit for one volume, and what it costs."""

    volume_id: str
    from_model: str
    mask: NDArray[np.uint8]
    affine: NDArray[np.float64]
    organs: dict[str, str]
    reviewed_slices: list[tuple[int, int]] | None
    organs_checked: int
    edit_units: float
    pre_dice: dict[str, float] = field(default_factory=dict)


def reviewed_blocks(depth: int, block: int) -> list[tuple[int, int]]:
    """Every other block of ``block`` axial slices: half the volume, spread over all of it."""
    return [(z, min(z + block, depth) - 1) for z in range(0, depth, 2 * block)]


def plan_correction(
    volume_id: str,
    from_model: str,
    pred: NDArray[np.uint8],
    truth: NDArray[np.uint8],
    affine: NDArray[np.float64],
    flexible: bool,
    strategy: Strategy,
    time: TimeModel,
) -> Plan:
    depth = pred.shape[2]
    blocks = reviewed_blocks(depth, strategy.block_slices) if flexible else None
    rows = np.zeros(depth, dtype=bool)
    for lo, hi in blocks or [(0, depth - 1)]:
        rows[lo : hi + 1] = True
    accept = strategy.accept_early if flexible else strategy.accept_late
    organs: dict[str, str] = {}
    corrected: list[int] = []
    dice: dict[str, float] = {}
    units = 0.0
    for organ in FOREGROUND:
        k = ORGAN_IDS[organ]
        p, t = pred[:, :, rows] == k, truth[:, :, rows] == k
        total = int(p.sum() + t.sum())
        if total == 0:
            continue  # neither drawn nor there: nothing to look at
        d = 2.0 * float(np.logical_and(p, t).sum()) / total
        dice[organ] = d
        if d >= accept:
            organs[organ] = "accepted"
        elif flexible and d >= strategy.skip_early:
            organs[organ] = "skipped"
        else:
            organs[organ] = "corrected"
            corrected.append(k)
            changed = np.logical_xor(p, t).sum(axis=(0, 1))
            union = np.logical_or(p, t).sum(axis=(0, 1))
            need = (union >= time.min_voxels) & (changed > (1.0 - time.slice_ok) * union)
            share = np.minimum(1.0, changed[need] / np.maximum(union[need], 1))
            units += float(np.sum(time.slice_base + share))
    mask = pred.copy()
    if corrected:
        sel = np.isin(truth, corrected) | np.isin(pred, corrected)
        sel &= rows[None, None, :]
        mask[sel] = truth[sel]
    return Plan(
        volume_id=volume_id,
        from_model=from_model,
        mask=mask,
        affine=affine,
        organs=organs,
        reviewed_slices=blocks,
        organs_checked=sum(1 for s in organs.values() if s != "skipped"),
        edit_units=units,
        pre_dice=dice,
    )


class SimulatedAnnotator:
    """One person: their user id, token and site, talking to the public API."""

    def __init__(
        self,
        user_id: str,
        site_id: str,
        api: str,
        token: str,
        truth: dict[str, NDArray[np.uint8]],
        strategy: Strategy,
        time: TimeModel,
    ) -> None:
        self.user_id = user_id
        self.site_id = site_id
        self.client = httpx.Client(
            base_url=api, timeout=120, headers={"Authorization": f"Bearer {token}"}
        )
        self.truth = truth
        self.strategy = strategy
        self.time = time

    def claim(self) -> dict[str, Any] | None:
        r = self.client.post("/v1/tasks/next", json={"strategy": "uncertainty"})
        if r.status_code == 404:
            return None
        r.raise_for_status()
        task: dict[str, Any] = r.json()
        return task

    def plan(self, task: dict[str, Any], flexible: bool) -> Plan:
        vid = task["volume_id"]
        info = self.client.get(f"/v1/volumes/{vid}/prediction")
        info.raise_for_status()
        raw = self.client.get(f"/v1/volumes/{vid}/prediction/mask")
        raw.raise_for_status()
        img = nifti_from_gz(raw.content)
        pred = np.asarray(img.dataobj, dtype=np.uint8)
        model = f"{info.json()['model']}:{info.json()['version']}"
        return plan_correction(
            vid,
            model,
            pred,
            self.truth[vid],
            np.asarray(img.affine),
            flexible,
            self.strategy,
            self.time,
        )

    def submit(self, plan: Plan) -> dict[str, Any]:
        minutes = round(self.time.minutes(plan), 3)
        data = {
            "minutes": str(minutes),
            "organs": json.dumps(plan.organs),
            "from_model": plan.from_model,
        }
        if plan.reviewed_slices is not None:
            data["reviewed_slices"] = json.dumps(plan.reviewed_slices)
        r = self.client.post(
            f"/v1/volumes/{plan.volume_id}/annotations",
            files={"mask": ("mask.nii.gz", nifti_gz_bytes(plan.mask, plan.affine))},
            data=data,
        )
        if r.status_code != 201:
            raise RuntimeError(f"{self.user_id}: submitting {plan.volume_id}: {r.text}")
        log.debug(
            "annotation submitted",
            extra={"user": self.user_id, "volume_id": plan.volume_id, "minutes": minutes},
        )
        out: dict[str, Any] = r.json()
        return out

    def close(self) -> None:
        self.client.close()
