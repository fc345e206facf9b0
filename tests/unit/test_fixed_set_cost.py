"""Cost on a fixed set (ctloop/transfer/fixed_set.py) and the report's section built from stored
masks (services/metrics/fixed_set_section.py), on small synthetic masks whose edit units can be
counted by hand: the annotators' own review prices every model's pre-annotation of the same
volumes, the igniter → final ratios follow, and the sensitivity table is recomputed from the
same masks with ``k`` re-anchored per setting."""

from __future__ import annotations

import numpy as np
import pytest

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.transfer import fixed_set as fs
from ctloop.transfer.annotator import Strategy, TimeModel, plan_correction, slice_confusion
from services.metrics.fixed_set_section import fixed_set_section
from services.metrics.report import RunInfo, build_report, render_markdown
from services.metrics.snapshot_format import PredictionDoc, ScoreDoc, StateDoc
from services.metrics.state import MetricsState
from tests.helpers.masks import LIVER, SPLEEN, three_organ_truth

STRATEGY = Strategy()
SHIFTED = 100 / 150  # changed / union on a slice of a 10x10 square drawn 5 voxels off


def _shifted_liver(truth: np.ndarray) -> np.ndarray:
    """The liver 5 voxels off on every slice: Dice 0.5, corrected under both rules."""
    pred = truth.copy()
    pred[pred == LIVER] = 0
    pred[7:17, 2:12] = LIVER
    return pred


def _thin_spleen(truth: np.ndarray) -> np.ndarray:
    """The spleen drawn 10x8 (Dice 0.889, IoU 0.8): skipped when flexible, corrected in full."""
    pred = truth.copy()
    pred[2:12, 25:27][pred[2:12, 25:27] == SPLEEN] = 0
    return pred


def _nudged_liver(truth: np.ndarray) -> np.ndarray:
    """The liver one voxel off (IoU 0.82 per slice, Dice 0.9): accepted when flexible,
    corrected in full review where slice_ok is 0.9, but good enough on every slice at 0.8."""
    pred = truth.copy()
    pred[pred == LIVER] = 0
    pred[3:13, 2:12] = LIVER
    return pred


@pytest.mark.parametrize("flexible", [True, False])
def test_the_fixed_set_cost_is_the_annotators_own_plan(flexible: bool):
    """No copied logic: a fixed-set cost is what the annotator would have charged."""
    time = TimeModel(k=0.42)
    truth = three_organ_truth()
    for pred in (truth.copy(), _shifted_liver(truth), _thin_spleen(truth), _nudged_liver(truth)):
        plan = plan_correction("v", "m:1", pred, truth, np.eye(4), flexible, STRATEGY, time)
        cost = fs.cost_volume(slice_confusion(pred, truth), flexible, STRATEGY, time)
        assert cost.edit_units == plan.edit_units
        assert cost.organs_looked_at == plan.organs_looked_at
        assert cost.minutes == time.minutes(plan)


def test_edit_units_and_minutes_per_ct_per_rule_counted_by_hand():
    time = TimeModel(k=0.5)
    truth = three_organ_truth()
    confs = {
        "a": slice_confusion(_shifted_liver(truth), truth),
        "b": slice_confusion(_thin_spleen(truth), truth),
    }
    cost = fs.model_cost(confs, STRATEGY, time)
    flex, full = cost["flexible"]["volumes"], cost["full"]["volumes"]
    assert flex["a"]["edit_units"] == pytest.approx(8 * (0.25 + SHIFTED))  # reviewed slices only
    assert full["a"]["edit_units"] == pytest.approx(16 * (0.25 + SHIFTED))
    assert flex["b"]["edit_units"] == 0.0  # skipped: a look, no edits
    assert full["b"]["edit_units"] == pytest.approx(16 * (0.25 + 0.2))  # IoU 0.8 < 0.9
    assert flex["b"]["minutes"] == pytest.approx(1.0 + 3 * 0.1)
    assert full["a"]["minutes"] == pytest.approx(1.3 + 0.5 * 16 * (0.25 + SHIFTED))
    for rule in fs.RULES:
        per = cost[rule]["volumes"].values()
        assert cost[rule]["edit_units_per_ct"] == pytest.approx(
            np.mean([v["edit_units"] for v in per])
        )
        assert cost[rule]["minutes_per_ct"] == pytest.approx(np.mean([v["minutes"] for v in per]))
    assert fs.model_cost(confs, STRATEGY, TimeModel())["full"]["minutes_per_ct"] is None


def test_a_perfect_pre_annotation_is_the_floor():
    truth = three_organ_truth()
    conf = slice_confusion(_shifted_liver(truth), truth)
    assert np.array_equal(fs.perfect(conf), slice_confusion(truth, truth))
    floor = fs.floor({"a": conf}, STRATEGY, TimeModel(k=0.5))
    assert floor["full"] == {"minutes_per_ct": pytest.approx(1.3), "organs_per_ct": 3.0}


def test_igniter_against_final_on_the_volumes_both_pre_annotated():
    time = TimeModel(k=0.5)
    truth = three_organ_truth()
    bad, good, perfect = _shifted_liver(truth), _thin_spleen(truth), truth.copy()
    igniter = {"a": slice_confusion(bad, truth), "b": slice_confusion(bad, truth)}
    final = {"a": slice_confusion(good, truth), "c": slice_confusion(perfect, truth)}
    vs = fs.compare(igniter, final, STRATEGY, time)
    assert vs["volumes"] == 1  # only "a" was pre-annotated by both
    full = vs["full"]
    assert full["edit_units_per_ct"] == pytest.approx([16 * (0.25 + SHIFTED), 16 * 0.45])
    assert full["edit_work_ratio"] == pytest.approx((0.25 + SHIFTED) / 0.45)
    a_min, b_min = 1.3 + 0.5 * 16 * (0.25 + SHIFTED), 1.3 + 0.5 * 16 * 0.45
    assert full["minutes_per_ct"] == pytest.approx([a_min, b_min])
    assert full["minutes_ratio"] == pytest.approx(a_min / b_min)
    assert vs["flexible"]["edit_work_ratio"] is None  # the final model leaves no edit at all


def test_the_sensitivity_table_is_recomputed_with_k_anchored_on_the_igniter():
    time = TimeModel(k=0.5)
    truth = three_organ_truth()
    igniter = {"a": slice_confusion(_shifted_liver(truth), truth)}
    final = {"a": slice_confusion(_nudged_liver(truth), truth)}
    table = fs.sensitivity(igniter, final, STRATEGY, time)
    rows = table["rows"]
    assert len(rows) == 27 and table["anchor_rule"] == "flexible"
    anchor = 1.3 + 0.5 * 8 * (0.25 + SHIFTED)
    assert table["anchor_minutes_per_ct"] == pytest.approx(anchor)
    for r in rows:  # every setting keeps the igniter's flexible minutes at the anchor
        assert r["flexible"]["minutes_per_ct"][0] == pytest.approx(anchor)
    base = next(r for r in rows if (r["slice_ok"], r["open_min"], r["check_min"]) == (0.9, 1, 0.1))
    assert base["k"] == pytest.approx(time.k)
    headline = fs.compare(igniter, final, STRATEGY, time)
    assert base["full"]["minutes_ratio"] == pytest.approx(headline["full"]["minutes_ratio"])
    assert base["full"]["edit_work_ratio"] == pytest.approx((0.25 + SHIFTED) / (0.25 + 20 / 110))
    # At slice_ok 0.8 the nudged liver is good enough on every slice: no edit left.
    loose = next(r for r in rows if r["slice_ok"] == 0.8 and r["open_min"] == 1)
    assert loose["full"]["edit_work_ratio"] is None
    assert loose["full"]["minutes_per_ct"][1] == pytest.approx(1.0 + 3 * loose["check_min"])
    assert fs.sensitivity(igniter, final, STRATEGY, TimeModel())["rows"] == []


class _Store:
    """An object store's reads, from a dict."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, key: str, mask: np.ndarray) -> tuple[str, str, None]:
        self.blobs[key] = nifti_gz_bytes(mask, np.eye(4))
        return ("data", key, None)

    def get_bytes(self, bucket: str, key: str, version: str | None = None) -> bytes:
        return self.blobs[key]

    def exists(self, bucket: str, key: str) -> bool:
        return key in self.blobs


def _state_with_stored_masks() -> tuple[MetricsState, dict[tuple[str, int], dict[str, np.ndarray]]]:
    """Two evaluation volumes, the igniter and two sustainer versions' masks of each, as the
    metrics service knows them from the events (and one other run's model it must ignore)."""
    store, truth = _Store(), three_organ_truth()
    preds = {
        ("ign", 1): {"e0": _shifted_liver(truth), "e1": _shifted_liver(truth)},
        ("sus", 1): {"e0": _thin_spleen(truth), "e1": _shifted_liver(truth)},
        ("sus", 2): {"e0": _thin_spleen(truth), "e1": truth.copy()},
        ("other", 1): {"e0": truth.copy(), "e1": truth.copy()},
    }
    doc = StateDoc(
        events_seen=1,
        seen=[],
        predictions=[
            PredictionDoc(volume_id=v, model=m, version=n, mask=store.put(f"p/{m}{n}{v}", p))
            for (m, n), per in preds.items()
            for v, p in per.items()
        ],
        rounds=[],
        round_of=[],
        evaluation={v: store.put(f"label/{v}", truth) for v in ("e0", "e1")},
        scores=[
            ScoreDoc(model=m, version=n, volume_id=v, mean_dice=0.5, organ_dice={})
            for (m, n) in preds
            for v in ("e0", "e1")
        ],
    )
    state = MetricsState(store, "data")  # type: ignore[arg-type]
    state.restore(doc)
    return state, preds


def test_the_report_section_costs_the_stored_masks_of_every_scored_model():
    state, preds = _state_with_stored_masks()
    time = TimeModel(k=0.5)
    info = RunInfo(igniter="ign", sustainer="sus", time_model=time.describe())
    report = build_report("r1", info, state)
    section = report["fixed_set"]
    truth = three_organ_truth()
    assert section["volumes"] == 2 and section["k_minutes_per_unit"] == 0.5
    assert [(m["role"], m["version"]) for m in section["models"]] == [
        ("igniter", 1),
        ("sustainer", 1),
        ("sustainer", 2),
    ]
    for m in section["models"]:
        for rule, flexible in fs.RULES.items():
            expected = [
                plan_correction("v", "", p, truth, np.eye(4), flexible, STRATEGY, time)
                for p in preds[(m["model"], m["version"])].values()
            ]
            assert m[rule]["edit_units_per_ct"] == pytest.approx(
                np.mean([p.edit_units for p in expected])
            )
            assert m[rule]["minutes_per_ct"] == pytest.approx(
                np.mean([time.minutes(p) for p in expected])
            )
    vs = section["igniter_vs_final"]["full"]
    assert vs["edit_units_per_ct"] == [
        section["models"][0]["full"]["edit_units_per_ct"],
        section["models"][2]["full"]["edit_units_per_ct"],
    ]
    ours = report["igniter_vs_final"]
    assert ours["fixed_set_edit_work_ratio"] == vs["edit_work_ratio"]
    assert ours["fixed_set_minutes_ratio"] == vs["minutes_ratio"]
    assert ours["floor_minutes_per_ct"] == pytest.approx(1.3)
    assert len(section["sensitivity"]["rows"]) == 27
    md = render_markdown(report)
    assert "## Fixed set: every model on the same evaluation volumes" in md
    assert "| fixed set: edit-work ratio, full review (flexible) |" in md
    assert "| floor: a perfect pre-annotation, min per CT | 1.30 | |" in md
    assert "## Sensitivity of the fixed-set minutes ratio" in md
    assert md.count("\n| 0.95 | ") == 3  # one row per open_min at each slice threshold


def test_without_a_calibrated_k_the_section_has_edit_units_and_no_minutes():
    state, _ = _state_with_stored_masks()
    rounds = [
        {"round": 1, "role": "igniter", "model": "ign", "version": 1, "dice": {"mean": 0.5}},
        {"round": 2, "role": "sustainer", "model": "sus", "version": 2, "dice": {"mean": 0.9}},
    ]
    for r in rounds:
        r["minutes_per_ct"] = None
    section = fixed_set_section(TimeModel().describe(), rounds, state)
    assert section["igniter_vs_final"]["full"]["edit_work_ratio"] is not None
    assert section["igniter_vs_final"]["full"]["minutes_ratio"] is None
    assert section["sensitivity"]["rows"] == []
    bad = fixed_set_section({"open_min": "soon"}, rounds, state)
    assert "cannot be read" in bad["error"]
