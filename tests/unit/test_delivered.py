"""What the annotators delivered (ctloop/transfer/delivered.py), on hand-countable masks: three
10x10 organs on each of 16 slices; flexible review covers slices 0-3 and 8-11 (8 slices)."""

from __future__ import annotations

import numpy as np
import pytest

from ctloop.transfer.annotator import Strategy, TimeModel, plan_correction
from ctloop.transfer.delivered import Delivered, summarize, trusted_organ_slices
from services.metrics.report import RunInfo, build_report, render_markdown
from services.metrics.state import MetricsState
from tests.helpers.masks import DEPTH, LIVER, SPLEEN, three_organ_truth

AFFINE = np.eye(4)


def _plan(pred: np.ndarray, truth: np.ndarray, flexible: bool):  # type: ignore[no-untyped-def]
    return plan_correction(
        "v1", "sustainer:2", pred, truth, AFFINE, flexible, Strategy(), TimeModel()
    )


def test_full_review_of_a_perfect_prediction_trusts_every_organ_on_every_slice():
    truth = three_organ_truth()
    plan = _plan(truth.copy(), truth, flexible=False)
    assert set(plan.organs.values()) == {"accepted"}
    assert trusted_organ_slices(plan) == 3 * DEPTH


def test_flexible_review_trusts_only_reviewed_slices_and_no_skipped_organ():
    truth = three_organ_truth()
    pred = truth.copy()
    pred[2:12, 25:27][pred[2:12, 25:27] == SPLEEN] = 0  # spleen Dice 0.889: skipped when flexible
    plan = _plan(pred, truth, flexible=True)
    assert plan.organs["spleen"] == "skipped"
    # liver and aorta accepted, on the 8 reviewed slices; the spleen's slices are not trusted
    assert trusted_organ_slices(plan) == 2 * 8


def test_an_organ_missing_from_the_submitted_mask_adds_no_slice():
    truth = three_organ_truth()
    pred = truth.copy()
    pred[pred == LIVER] = 0
    plan = _plan(pred, truth, flexible=False)  # the liver is corrected: drawn on every slice
    assert plan.organs["liver"] == "corrected"
    assert trusted_organ_slices(plan) == 3 * DEPTH
    plan.mask[plan.mask == LIVER] = 0  # had it stayed empty, it would add nothing
    assert trusted_organ_slices(plan) == 2 * DEPTH


def test_a_round_summary_divides_total_minutes_by_total_slices():
    rows = [
        {"minutes": 10.0, "trusted_organ_slices": 40.0, "submitted_dice": 0.9},
        {"minutes": 2.0, "trusted_organ_slices": 8.0, "submitted_dice": 0.7},
    ]
    s = summarize(rows)
    assert s["volumes"] == 2 and s["minutes_per_ct"] == 6.0
    assert s["trusted_organ_slices_per_ct"] == 24.0
    assert s["minutes_per_trusted_organ_slice"] == pytest.approx(12.0 / 48.0)
    assert s["submitted_dice"] == pytest.approx(0.8)
    assert summarize([])["minutes_per_ct"] is None


def test_unreviewed_errors_lower_the_submitted_dice_and_reach_the_report(tmp_path):
    truth = three_organ_truth()
    pred = truth.copy()
    pred[pred == LIVER] = 0  # the liver missed on every slice
    delivered = Delivered()
    flexible = _plan(pred, truth, flexible=True)  # corrected on the 8 reviewed slices only
    full = _plan(pred, truth, flexible=False)
    delivered.add(flexible, truth, minutes=3.0)
    delivered.add(full, truth, minutes=5.0)
    got = delivered.describe()["sustainer:2"]
    assert got["volumes"] == 2 and got["minutes_per_ct"] == 4.0
    # whole-volume Dice: flexible leaves the liver half missing (2/3), full review fixes it
    liver_half = 2 * 8 / (8 + 16)
    assert got["submitted_dice"] == pytest.approx(((2 + liver_half) / 3 + 1.0) / 2)

    from ctloop.settings import Settings
    from ctloop.storage import ObjectStore

    state = MetricsState(ObjectStore(Settings()), "unused")  # no S3 call without events
    state._scores[("sustainer", 2)] = {"e1": (0.8, {"liver": 0.8})}
    info = RunInfo(igniter="igniter", sustainer="sustainer", delivered=delivered.describe())
    report = build_report("r1", info, state)
    (row,) = report["rounds"]
    assert row["delivered"] == got
    md = render_markdown(report)
    assert "## What the annotators delivered" in md
    assert "| 1 | sustainer | 2 | 2 | 4.00 |" in md
