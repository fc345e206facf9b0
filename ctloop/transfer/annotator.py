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
            + check_min * organs looked at              # accepted, corrected or skipped
            + k * sum over corrected organs and reviewed slices that need an edit of
                  (slice_base + min(1, changed voxels / voxels of pred or truth in the slice))

A skipped organ costs its look (the look is what decided to skip it) and no edits. A slice
needs an edit when the organ's outline in it is visibly off: the overlap of prediction and truth
in the slice (intersection over union) is below ``slice_ok`` (0.9; a person does not redraw a
boundary that is a voxel out) and the organ covers at least ``min_voxels`` there. The effort of
an edited slice grows with how much of it is wrong. Slices not reviewed cost nothing and are
not changed.

``k`` (minutes per edit unit) is calibrated once, on the first round's volumes, so that their
mean equals the paper's 13.87 minutes per CT, and is fixed from then on (a second calibration
raises): every later round's minutes follow from the stored masks, from how much less the better
model leaves to edit. The **floor** is a perfect pre-annotation: ``open_min + check_min * organs
present`` (1.9 minutes for the 9 organs), so no model can cut the first round's minutes by more
than 13.87 / 1.9 = 7.3x (the **ceiling**).

The same review and cost (:func:`review`, :class:`TimeModel`) price any stored pre-annotation
without submitting anything: ``ctloop.transfer.fixed_set`` costs every model version on the
fixed evaluation set with them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from ctloop.core.blobs import nifti_from_gz, nifti_gz_bytes
from ctloop.core.organs import FOREGROUND, NUM_CLASSES, ORGAN_IDS

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
    """Minutes for one CT from what the review decided (see the module's docstring)."""

    open_min: float = 1.0
    check_min: float = 0.1
    slice_base: float = 0.25
    min_voxels: int = 3
    slice_ok: float = 0.9
    k: float | None = None  # minutes per edit unit; None until calibrated, then fixed
    calibrated_on: int = 0
    target_first_round: float = PAPER_FIRST_ROUND_MINUTES

    def fixed(self, organs_looked_at: int) -> float:
        """Open, scroll, save, and a look at each organ (accepted, corrected or skipped)."""
        return self.open_min + self.check_min * organs_looked_at

    def floor(self, organs_present: int) -> float:
        """A perfect pre-annotation's minutes: every organ accepted at a look, nothing edited."""
        return self.fixed(organs_present)

    def cost(self, organs_looked_at: int, edit_units: float) -> float:
        if self.k is None:
            raise RuntimeError("the time model is not calibrated yet")
        return self.fixed(organs_looked_at) + self.k * edit_units

    def minutes(self, plan: Plan) -> float:
        return self.cost(plan.organs_looked_at, plan.edit_units)

    def slice_edit_units(
        self, drawn: NDArray[np.int64], true: NDArray[np.int64], both: NDArray[np.int64]
    ) -> float:
        """One corrected organ's edit units over the reviewed slices, from its voxel counts
        per slice (drawn, true, drawn and true): ``slice_base + min(1, changed / union)`` on
        each slice whose overlap (IoU) is below ``slice_ok`` and that shows the organ."""
        changed, union = drawn + true - 2 * both, drawn + true - both
        need = (union >= self.min_voxels) & (changed > (1.0 - self.slice_ok) * union)
        share = np.minimum(1.0, changed[need] / np.maximum(union[need], 1))
        return float(np.sum(self.slice_base + share))

    def k_for_mean(self, looked: Sequence[int], units: Sequence[float], target: float) -> float:
        """The ``k`` that makes these volumes' mean minutes ``target`` (at least 0)."""
        mean_units = float(np.mean(units)) if len(units) else 0.0
        if mean_units <= 0:
            raise ValueError("these volumes need no edits: nothing to calibrate k on")
        fixed = float(np.mean([self.fixed(n) for n in looked]))
        return max(0.0, (target - fixed) / mean_units)

    def calibrate(self, plans: list[Plan]) -> float:
        """Set ``k`` once, on the first round's plans, so that their mean is the target. It is
        fixed from then on: every later minute follows from the masks, never from a refit."""
        if self.k is not None:
            raise RuntimeError(
                f"k is fixed after round 1 ({self.k:.4f} min per edit unit, calibrated on "
                f"{self.calibrated_on} volumes): it is never recalibrated"
            )
        looked = [p.organs_looked_at for p in plans]
        self.k = self.k_for_mean(looked, [p.edit_units for p in plans], self.target_first_round)
        self.calibrated_on = len(plans)
        return self.k

    def describe(self) -> dict[str, Any]:
        organs = len(FOREGROUND)
        floor = self.floor(organs)
        return {
            "formula": "open_min + check_min * organs_looked_at + k * edit_units",
            "organs_looked_at": "every organ drawn or present on the reviewed slices: "
            "accepted, corrected or skipped (a skipped organ costs its look and no edits)",
            "edit_unit": "per corrected organ and reviewed slice needing an edit: "
            "slice_base + min(1, changed / union)",
            "open_min": self.open_min,
            "check_min": self.check_min,
            "slice_base": self.slice_base,
            "min_voxels": self.min_voxels,
            "slice_ok": self.slice_ok,
            "k_minutes_per_unit": self.k,
            "k_fixed_after": "round 1: calibrated once on the first round's volumes, never again",
            "calibrated_on_volumes": self.calibrated_on,
            "calibration_target_minutes": self.target_first_round,
            "floor": "open_min + check_min * organs present: a perfect pre-annotation, every "
            "organ accepted at a look, nothing edited",
            "floor_minutes": {"organs": organs, "minutes": floor},
            "ceiling": "first-round mean minutes / floor: the most any model can save",
            "ceiling_ratio": self.target_first_round / floor if floor > 0 else None,
        }

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> TimeModel:
        """The time model a run described (:meth:`describe`), its calibrated ``k`` included."""
        base, k = cls(), d.get("k_minutes_per_unit")
        return cls(
            open_min=float(d.get("open_min", base.open_min)),
            check_min=float(d.get("check_min", base.check_min)),
            slice_base=float(d.get("slice_base", base.slice_base)),
            min_voxels=int(d.get("min_voxels", base.min_voxels)),
            slice_ok=float(d.get("slice_ok", base.slice_ok)),
            k=None if k is None else float(k),
            calibrated_on=int(d.get("calibrated_on_volumes", 0)),
            target_first_round=float(d.get("calibration_target_minutes", base.target_first_round)),
        )


def slice_confusion(pred: NDArray[np.integer], truth: NDArray[np.integer]) -> NDArray[np.int64]:
    """``(depth, C, C)`` voxel counts: ``[z, i, j]`` voxels of axial slice ``z`` drawn as label
    ``i`` and truly ``j`` (``C`` canonical labels). Everything the annotator's review decides
    follows from these counts, so one pass over the masks serves any rule or threshold."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    c = NUM_CLASSES
    if pred.size and (int(pred.max()) >= c or int(truth.max()) >= c):
        raise ValueError(f"labels must be canonical ids below {c}")
    depth = pred.shape[2]
    out = np.zeros((depth, c, c), dtype=np.int64)
    for z in range(depth):  # a slice at a time: no volume-sized temporaries
        code = pred[:, :, z].astype(np.intp) * c + truth[:, :, z]
        out[z] = np.bincount(code.ravel(), minlength=c * c).reshape(c, c)
    return out


@dataclass(frozen=True)
class Review:
    """What a person decides looking at one pre-annotation, and the edit work it leaves."""

    organs: dict[str, str]  # organ -> accepted | skipped | corrected (every organ looked at)
    corrected: list[int]  # label ids of the corrected organs
    rows: NDArray[np.bool_]  # the axial slices reviewed
    reviewed_slices: list[tuple[int, int]] | None  # None: every slice
    edit_units: float
    pre_dice: dict[str, float]

    @property
    def organs_looked_at(self) -> int:
        return len(self.organs)


@dataclass
class Plan:
    """What the annotator will submit for one volume, and what it costs."""

    volume_id: str
    from_model: str
    mask: NDArray[np.uint8]
    affine: NDArray[np.float64]
    organs: dict[str, str]
    reviewed_slices: list[tuple[int, int]] | None
    organs_looked_at: int  # accepted, corrected or skipped: each cost a look
    edit_units: float
    pre_dice: dict[str, float] = field(default_factory=dict)


def reviewed_blocks(depth: int, block: int) -> list[tuple[int, int]]:
    """Every other block of ``block`` axial slices: half the volume, spread over all of it."""
    return [(z, min(z + block, depth) - 1) for z in range(0, depth, 2 * block)]


def review(
    confusion: NDArray[np.int64], flexible: bool, strategy: Strategy, time: TimeModel
) -> Review:
    """Per organ: accept, skip or correct (from its Dice on the reviewed slices), and the edit
    units of the corrected organs' reviewed slices (``confusion``: :func:`slice_confusion`)."""
    depth = confusion.shape[0]
    blocks = reviewed_blocks(depth, strategy.block_slices) if flexible else None
    rows = np.zeros(depth, dtype=bool)
    for lo, hi in blocks or [(0, depth - 1)]:
        rows[lo : hi + 1] = True
    seen = confusion[rows]
    drawn, true = seen.sum(axis=2), seen.sum(axis=1)  # (slices, C)
    both = np.diagonal(seen, axis1=1, axis2=2)
    accept = strategy.accept_early if flexible else strategy.accept_late
    organs: dict[str, str] = {}
    corrected: list[int] = []
    dice: dict[str, float] = {}
    units = 0.0
    for organ in FOREGROUND:
        k = ORGAN_IDS[organ]
        total = int(drawn[:, k].sum() + true[:, k].sum())
        if total == 0:
            continue  # neither drawn nor there: nothing to look at
        d = 2.0 * float(both[:, k].sum()) / total
        dice[organ] = d
        if d >= accept:
            organs[organ] = "accepted"
        elif flexible and d >= strategy.skip_early:
            organs[organ] = "skipped"
        else:
            organs[organ] = "corrected"
            corrected.append(k)
            units += time.slice_edit_units(drawn[:, k], true[:, k], both[:, k])
    return Review(organs, corrected, rows, blocks, units, dice)


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
    """The reviewed slices of the corrected organs are redrawn as the truth; nothing else
    changes (accepted and skipped organs, slices not reviewed)."""
    r = review(slice_confusion(pred, truth), flexible, strategy, time)
    mask = pred.copy()
    if r.corrected:
        sel = np.isin(truth, r.corrected) | np.isin(pred, r.corrected)
        sel &= r.rows[None, None, :]
        mask[sel] = truth[sel]
    return Plan(
        volume_id=volume_id,
        from_model=from_model,
        mask=mask,
        affine=affine,
        organs=r.organs,
        reviewed_slices=r.reviewed_slices,
        organs_looked_at=r.organs_looked_at,
        edit_units=r.edit_units,
        pre_dice=r.pre_dice,
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
