"""Cost on a fixed set: every model version's pre-annotations of the *same* evaluation volumes,
priced with the simulated annotators' own review and time model (``annotator.review``,
``TimeModel``, the run's calibrated ``k``), without submitting anything.

The minutes of the rounds as annotated mix model progress with case selection (each round costs
other volumes, the most uncertain first). Here only the model changes: edit units and minutes
per CT for each model version under both rules, the flexible one (half the slices reviewed,
nearly-right organs skipped) and full review (every slice, every organ not at acceptance
corrected). The headline is full review: it is the work a complete label needs, and skipping
cannot hide any of it.

Everything is computed from per-slice confusion counts (``annotator.slice_confusion``) of each
stored pre-annotation against the volume's reference label, so the sensitivity table (other
slice thresholds, open and look minutes) is recomputed from the stored masks, no re-training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctloop.transfer.annotator import Review, Strategy, TimeModel, review

Confusions = Mapping[str, NDArray[np.int64]]  # volume id -> slice confusion vs its truth

RULES: dict[str, bool] = {"flexible": True, "full": False}  # rule -> flexible review
HEADLINE_RULE = "full"
# The sensitivity grid, as issue 19 pre-registered it (before any run).
SLICE_OK = (0.8, 0.9, 0.95)
OPEN_MIN = (0.0, 1.0, 3.0)
CHECK_MIN = (0.0, 0.1, 0.3)
# k per setting keeps the igniter's fixed-set minutes under this rule (the first round's rule)
# at what the run's own time model gives them.
ANCHOR_RULE = "flexible"
SENSITIVITY_CALIBRATION = (
    "k recalibrated per setting so that the igniter's fixed-set minutes per CT under the "
    "flexible rule (the first round's rule) stay what the run's time model gives them: the "
    "igniter's fixed-set cost stands in for the first round, whose truth the platform does not "
    "store (clinical volumes arrive unlabelled), and the pre-registered setting's row equals "
    "the headline"
)


@dataclass(frozen=True)
class VolumeCost:
    edit_units: float
    organs_looked_at: int
    minutes: float | None  # None while k is not calibrated


def cost_volume(
    confusion: NDArray[np.int64], flexible: bool, strategy: Strategy, time: TimeModel
) -> VolumeCost:
    r = review(confusion, flexible, strategy, time)
    minutes = None if time.k is None else time.cost(r.organs_looked_at, r.edit_units)
    return VolumeCost(r.edit_units, r.organs_looked_at, minutes)


def perfect(confusion: NDArray[np.int64]) -> NDArray[np.int64]:
    """The confusion of a perfect pre-annotation of the same volume (its truth drawn exactly)."""
    out = np.zeros_like(confusion)
    labels = np.arange(confusion.shape[1])
    out[:, labels, labels] = confusion.sum(axis=1)
    return out


def _mean(xs: list[float | None]) -> float | None:
    """The mean, or None when there is nothing to average or a part is unknown."""
    known = [x for x in xs if x is not None]
    return float(np.mean(known)) if xs and len(known) == len(xs) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def model_cost(confusions: Confusions, strategy: Strategy, time: TimeModel) -> dict[str, Any]:
    """One model version, per rule: edit units and minutes per CT (means) and per volume."""
    out: dict[str, Any] = {}
    for rule, flexible in RULES.items():
        per = {v: cost_volume(c, flexible, strategy, time) for v, c in sorted(confusions.items())}
        out[rule] = {
            "edit_units_per_ct": _mean([c.edit_units for c in per.values()]),
            "minutes_per_ct": _mean([c.minutes for c in per.values()]),
            "volumes": {
                v: {"edit_units": c.edit_units, "organs": c.organs_looked_at, "minutes": c.minutes}
                for v, c in per.items()
            },
        }
    return out


def floor(confusions: Confusions, strategy: Strategy, time: TimeModel) -> dict[str, Any]:
    """Per rule: what perfect pre-annotations of these volumes would cost (every organ
    accepted at a look, nothing edited), and how many organs that is per CT."""
    out: dict[str, Any] = {}
    for rule, flexible in RULES.items():
        looked = [
            review(perfect(c), flexible, strategy, time).organs_looked_at
            for c in confusions.values()
        ]
        out[rule] = {
            "minutes_per_ct": _mean([time.floor(n) for n in looked]),
            "organs_per_ct": _mean([float(n) for n in looked]),
        }
    return out


def compare(
    igniter: Confusions, final: Confusions, strategy: Strategy, time: TimeModel
) -> dict[str, Any]:
    """The igniter against the final sustainer on the volumes both pre-annotated, per rule:
    edit units and minutes per CT, and how many times less the final model leaves."""
    common = sorted(set(igniter) & set(final))
    out: dict[str, Any] = {"volumes": len(common)}
    a = model_cost({v: igniter[v] for v in common}, strategy, time)
    b = model_cost({v: final[v] for v in common}, strategy, time)
    for rule in RULES:
        units = [a[rule]["edit_units_per_ct"], b[rule]["edit_units_per_ct"]]
        minutes = [a[rule]["minutes_per_ct"], b[rule]["minutes_per_ct"]]
        out[rule] = {
            "edit_units_per_ct": units,
            "edit_work_ratio": ratio(*units),
            "minutes_per_ct": minutes,
            "minutes_ratio": ratio(*minutes),
        }
    return out


def sensitivity(
    igniter: Confusions, final: Confusions, strategy: Strategy, time: TimeModel
) -> dict[str, Any]:
    """The igniter → final ratios for every setting of the pre-registered grid (slice
    threshold x open minutes x look minutes), ``k`` recalibrated per setting
    (:data:`SENSITIVITY_CALIBRATION`)."""
    common = sorted(set(igniter) & set(final))
    head: dict[str, Any] = {"calibration": SENSITIVITY_CALIBRATION, "anchor_rule": ANCHOR_RULE}
    anchor = _mean(
        [cost_volume(igniter[v], RULES[ANCHOR_RULE], strategy, time).minutes for v in common]
    )
    if anchor is None:
        return head | {"rows": [], "note": "no calibrated k or no volume both models scored"}
    rows = []
    for slice_ok in SLICE_OK:
        base = replace(time, slice_ok=slice_ok, k=None)
        seen = {
            (who, rule): [review(c[v], flexible, strategy, base) for v in common]
            for who, c in (("igniter", igniter), ("final", final))
            for rule, flexible in RULES.items()
        }
        for open_min in OPEN_MIN:
            for check_min in CHECK_MIN:
                setting = replace(base, open_min=open_min, check_min=check_min)
                rows.append(_sensitivity_row(setting, seen, anchor))
    return head | {"anchor_minutes_per_ct": anchor, "rows": rows}


def _sensitivity_row(
    setting: TimeModel, seen: dict[tuple[str, str], list[Review]], anchor: float
) -> dict[str, Any]:
    first = seen[("igniter", ANCHOR_RULE)]
    try:
        k: float | None = setting.k_for_mean(
            [r.organs_looked_at for r in first], [r.edit_units for r in first], anchor
        )
    except ValueError:  # the igniter leaves nothing to edit: k means nothing here
        k = None
    row: dict[str, Any] = {
        "slice_ok": setting.slice_ok,
        "open_min": setting.open_min,
        "check_min": setting.check_min,
        "k": k,
    }
    priced = replace(setting, k=k)
    for rule in RULES:
        ign, fin = seen[("igniter", rule)], seen[("final", rule)]
        units = [_mean([r.edit_units for r in rs]) for rs in (ign, fin)]
        minutes = [
            None
            if k is None
            else _mean([priced.cost(r.organs_looked_at, r.edit_units) for r in rs])
            for rs in (ign, fin)
        ]
        row[rule] = {
            "edit_work_ratio": ratio(*units),
            "minutes_per_ct": minutes,
            "minutes_ratio": ratio(*minutes),
        }
    return row
