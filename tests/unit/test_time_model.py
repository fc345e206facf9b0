"""The annotation time model and the review it prices (ctloop/transfer/annotator.py), on small
synthetic masks whose costs can be worked out by hand: a perfect pre-annotation costs exactly
the floor, a skipped organ costs its look and no edits, only the reviewed slices of corrected
organs are charged and changed, and ``k`` is fixed after round 1 (the run's own round code
calibrates once; later minutes follow from the stored masks with that ``k``)."""

from __future__ import annotations

import re
import threading

import httpx
import numpy as np
import pytest

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.transfer.annotator import (
    SimulatedAnnotator,
    Strategy,
    TimeModel,
    plan_correction,
    reviewed_blocks,
)
from ctloop.transfer.presets import SITES
from ctloop.transfer.run import TransferRun
from tests.helpers.masks import DEPTH, LIVER, SPLEEN, three_organ_truth

REVIEWED = np.zeros(DEPTH, dtype=bool)
REVIEWED[0:4] = REVIEWED[8:12] = True


def _plan(pred: np.ndarray, truth: np.ndarray, flexible: bool, time: TimeModel):
    return plan_correction("v", "m:1", pred, truth, np.eye(4), flexible, Strategy(), time)


@pytest.mark.parametrize("flexible", [True, False])
def test_a_perfect_prediction_costs_exactly_the_floor(flexible: bool):
    time = TimeModel(k=0.37)
    truth = three_organ_truth()
    plan = _plan(truth.copy(), truth, flexible, time)
    assert set(plan.organs.values()) == {"accepted"} and len(plan.organs) == 3
    assert plan.edit_units == 0.0
    assert time.minutes(plan) == time.floor(3) == time.open_min + 3 * time.check_min
    assert np.array_equal(plan.mask, truth)


def test_the_floor_and_ceiling_are_stated():
    """Nine organs at a look each: 1 + 9 x 0.1 = 1.9 minutes; 13.87 / 1.9 = 7.3x at most."""
    d = TimeModel().describe()
    assert d["floor_minutes"] == {"organs": 9, "minutes": pytest.approx(1.9)}
    assert d["ceiling_ratio"] == pytest.approx(13.87 / 1.9)
    assert "floor" in d and "ceiling" in d


def test_a_skipped_organ_costs_its_look_and_no_edits():
    time = TimeModel(k=0.5)
    truth = three_organ_truth()
    pred = truth.copy()
    pred[2:12, 10:12][pred[2:12, 10:12] == LIVER] = 0  # liver drawn 10x8: Dice 0.889
    plan = _plan(pred, truth, True, time)
    assert plan.organs == {"liver": "skipped", "spleen": "accepted", "aorta": "accepted"}
    assert plan.organs_looked_at == 3
    assert plan.edit_units == 0.0
    assert time.minutes(plan) == pytest.approx(time.open_min + 3 * time.check_min)
    assert np.array_equal(plan.mask, pred)  # nothing redrawn
    # Under full review the same liver is below acceptance: corrected, and it costs edits.
    full = _plan(pred, truth, False, time)
    assert full.organs["liver"] == "corrected" and full.edit_units > 0


def test_only_reviewed_slices_of_corrected_organs_are_charged_and_changed():
    time = TimeModel(k=0.5)
    truth = three_organ_truth()
    pred = truth.copy()
    pred[pred == LIVER] = 0
    pred[7:17, 2:12] = LIVER  # shifted by 5: per slice 50 right, 150 in the union, Dice 0.5
    pred[2:12, 25:27][pred[2:12, 25:27] == SPLEEN] = 0  # spleen 10x8: skipped
    plan = _plan(pred, truth, True, time)
    assert plan.reviewed_slices == reviewed_blocks(DEPTH, 4) == [(0, 3), (8, 11)]
    assert plan.organs == {"liver": "corrected", "spleen": "skipped", "aorta": "accepted"}
    # 8 reviewed slices, each slice_base + 100 changed / 150 in the union; 8 unreviewed: free.
    assert plan.edit_units == pytest.approx(8 * (time.slice_base + 100 / 150))
    # The liver is the truth on the reviewed slices; everything else is the pre-annotation.
    assert np.array_equal(plan.mask[:, :, REVIEWED], _fix_liver(pred, truth)[:, :, REVIEWED])
    assert np.array_equal(plan.mask[:, :, ~REVIEWED], pred[:, :, ~REVIEWED])
    # Unreviewed slices do not count: leaving them empty changes neither cost nor decision.
    blank = pred.copy()
    blank[:, :, ~REVIEWED] = 0
    again = _plan(blank, truth, True, time)
    assert (again.organs, again.edit_units) == (plan.organs, plan.edit_units)


def _fix_liver(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    out = pred.copy()
    out[out == LIVER] = 0
    out[truth == LIVER] = LIVER
    return out


def test_k_is_calibrated_once_and_never_again():
    time = TimeModel()
    truth = three_organ_truth()
    bad = truth.copy()
    bad[bad == LIVER] = 0
    plans = [_plan(bad, truth, True, time), _plan(truth.copy(), truth, True, time)]
    k = time.calibrate(plans)
    assert np.mean([time.minutes(p) for p in plans]) == pytest.approx(13.87)
    with pytest.raises(RuntimeError, match="fixed after round 1"):
        time.calibrate([plans[0]])
    assert time.k == k and time.calibrated_on == 2
    assert TimeModel.from_description(time.describe()) == time


class _FakeApi:
    """The public API as the annotators see it: tasks, pre-annotations, submissions."""

    def __init__(self, preds: dict[str, np.ndarray]) -> None:
        self.preds, self.version = preds, 1
        self.waiting = sorted(preds)
        self.submitted: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/tasks/next":
            with self.lock:
                if not self.waiting:
                    return httpx.Response(404)
                return httpx.Response(200, json={"volume_id": self.waiting.pop(0)})
        vid = path.split("/")[3]
        if path.endswith("/prediction"):
            return httpx.Response(200, json={"model": "igniter", "version": self.version})
        if path.endswith("/prediction/mask"):
            return httpx.Response(200, content=nifti_gz_bytes(self.preds[vid], np.eye(4)))
        minutes = re.search(rb'name="minutes"\r\n\r\n([0-9.]+)\r\n', request.read())
        assert minutes is not None
        with self.lock:
            self.submitted[vid] = float(minutes.group(1))
        return httpx.Response(201, json={"volume_id": vid})


def test_the_run_calibrates_on_round_1_and_later_minutes_follow_from_the_masks():
    """The run's own round code: round 1's mean is the paper's 13.87 minutes; round 2 (a
    better model) is priced with round 1's k, from its stored masks, not refitted."""
    truth = three_organ_truth()
    worse, better = truth.copy(), truth.copy()
    worse[worse == LIVER] = 0
    worse[worse == SPLEEN] = 0
    better[7:9, 2:12] = LIVER  # a little too much liver
    truths = {f"v{i}": truth for i in range(4)}
    api = _FakeApi({"v0": worse, "v1": better, "v2": worse, "v3": better})
    run = TransferRun("tiny", annotators_per_site=1, echo=lambda _: None)
    team = []
    for site in SITES:
        person = SimulatedAnnotator(
            f"{site}-1", site, "http://api", "t", truths, run.strategy, run.time
        )
        person.client = httpx.Client(base_url="http://api", transport=httpx.MockTransport(api))
        team.append(person)
    per_round = run.preset.batch
    first = run.annotate_round(team, 1)
    k = run.time.k
    assert k is not None and len(first) == per_round
    assert np.mean([api.submitted[p.volume_id] for p in first]) == pytest.approx(13.87, abs=1e-3)
    api.version = 2
    second = run.annotate_round(team, 2)
    assert run.time.k == k and len(second) == per_round
    flexible = run.preset.flexible_rounds >= 2
    fixed_k = TimeModel(k=k)
    for p in second:
        again = _plan(api.preds[p.volume_id], truth, flexible, fixed_k)
        assert api.submitted[p.volume_id] == pytest.approx(fixed_k.minutes(again), abs=1e-3)
