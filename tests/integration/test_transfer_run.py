"""The main job on its tiny preset, end to end: ``ctloop run`` brings up its own platform on the
real stack, simulated annotators at two sites work through the API for two rounds, sustainers
train, and the metrics service writes the report. The report's numbers are then checked against
what was really stored (annotation minutes in the workflow database, prediction masks in S3
against the phantoms' truth), not recomputed with the report's own code."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from ctloop.contracts import keys
from ctloop.core.organs import ORGAN_IDS
from ctloop.core.phantom import generate_phantom
from ctloop.platform import instance_env
from ctloop.settings import REPO_ROOT, Settings
from ctloop.storage import ObjectStore
from ctloop.transfer.annotator import Strategy, TimeModel, plan_correction
from ctloop.transfer.presets import PRESETS, SITES
from tests.helpers.proc import run_logged

# the run below may take its subprocess timeout (1200 s) on a loaded 2-core machine
pytestmark = pytest.mark.timeout(1500)
PORT_BASE = 28940


def _dice(pred: np.ndarray, truth: np.ndarray, k: int) -> float | None:
    p, t = pred == k, truth == k
    total = int(p.sum() + t.sum())
    return None if total == 0 else 2.0 * float((p & t).sum()) / total


@pytest.fixture
def run_env(tmp_path: Path):
    env = {**os.environ, "CTLOOP_RUNS_DIR": str(tmp_path / "runs")}
    yield env
    # The run leaves its services up (--keep-services): stop them as their platform instance
    # (the run's env: its folder, ports and tag, "-" + the run id).
    for platform in (tmp_path / "runs").glob("*/platform"):
        down = {**env, **instance_env(platform, PORT_BASE, f"-{platform.parent.name}")}
        subprocess.run(
            [sys.executable, "-m", "ctloop.cli", "services", "down"],
            cwd=REPO_ROOT,
            env=down,
            capture_output=True,
            timeout=120,
        )


def _run_the_tiny_preset(run_env: dict[str, str]) -> None:
    """`ctloop run --preset tiny` succeeds and prints its progress."""
    proc = run_logged(
        [
            sys.executable,
            "-m",
            "ctloop.cli",
            "run",
            "--preset",
            "tiny",
            "--port-base",
            str(PORT_BASE),
            "--keep-services",
        ],
        log_dir=Path(run_env["CTLOOP_RUNS_DIR"]).parent / "run-output",
        cwd=REPO_ROOT,
        env=run_env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.tail()
    assert "time model calibrated" in proc.stdout and "round 2/2" in proc.stdout  # progress


def _latest_report_is_written(runs: Path) -> dict:
    """runs/latest points at the run, with its JSON report, two PNG plots and the Markdown."""
    latest = runs / "latest"
    assert latest.is_symlink()
    report = json.loads((latest / "report.json").read_text())
    for name in ("dice_by_round.png", "minutes_by_round.png"):
        assert (latest / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (latest / "report.md").read_text()
    assert "+19.7 %" in md and "13.87" in md and "| round | model |" in md
    assert "## What the annotators delivered" in md
    return report


def _rounds_follow_the_preset(report: dict) -> None:
    """Structure: igniter first, then one sustainer per round; the paper beside ours."""
    preset = PRESETS["tiny"]
    rounds = report["rounds"]
    assert [r["role"] for r in rounds] == ["igniter"] + ["sustainer"] * preset.rounds
    assert [r["version"] for r in rounds] == [1, *range(1, preset.rounds + 1)]
    assert report["paper"]["first_round_minutes_per_ct"] == 13.87
    assert sum(r["volumes_annotated"] for r in rounds) == preset.rounds * preset.batch
    for r in rounds:
        assert 0.0 <= r["dice"]["mean"] <= 1.0 and r["dice"]["volumes"] == preset.n_evaluation
        # the public site's held-out volumes, scored apart (forgetting)
        assert r["public_test_dice"]["volumes"] == preset.n_public_test
    ours = report["igniter_vs_final"]
    assert ours["public_test_change_points"] == pytest.approx(
        rounds[-1]["public_test_dice"]["mean"] - rounds[0]["public_test_dice"]["mean"]
    )
    # The time model is calibrated on the first round: its mean is the paper's.
    assert rounds[0]["minutes_per_ct"] == pytest.approx(13.87, abs=0.01)


def _minutes_are_the_submitted_ones(runs: Path, report: dict) -> None:
    """Minutes per round = the minutes the annotators really submitted (workflow database)."""
    rounds = report["rounds"]
    db = sqlite3.connect(runs / report["run_id"] / "platform" / "workflow.db")
    stored: dict[tuple[str, int], list[float]] = {}
    for (detail,) in db.execute("SELECT detail FROM annotation_revisions"):
        d = json.loads(detail)
        ref = (d["from_model"]["model"], d["from_model"]["version"])
        stored.setdefault(ref, []).append(d["minutes"])
    for r in rounds:
        minutes = stored.get((r["model"], r["version"]))
        if minutes:
            assert r["minutes_per_ct"] == pytest.approx(float(np.mean(minutes)), abs=1e-6)
            assert r["volumes_annotated"] == len(minutes)
            # what the annotators delivered: the same submissions, as the run measured them
            d = r["delivered"]
            assert d["volumes"] == len(minutes)
            assert d["minutes_per_ct"] == pytest.approx(float(np.mean(minutes)), abs=1e-3)
            assert d["trusted_organ_slices_per_ct"] > 0 and 0.0 < d["submitted_dice"] <= 1.0
        else:
            assert r["delivered"] is None
    # Annotators from both sites took part.
    authors = {a for (a,) in db.execute("SELECT author FROM annotation_revisions")}
    assert any(a.startswith("a-") for a in authors) and any(a.startswith("b-") for a in authors)


def _dice_is_the_stored_predictions_against_truth(report: dict) -> None:
    """Dice = the stored pre-annotations of the evaluation volumes against the phantoms' truth."""
    preset = PRESETS["tiny"]
    run_id = report["run_id"]
    settings = Settings()
    store = ObjectStore(settings)
    truths = [
        generate_phantom("clinical-a", 20_000 + i, preset.size).label
        for i in range(preset.n_evaluation)
    ]
    for r in report["rounds"]:
        per_volume = []
        for i, truth in enumerate(truths):
            key = keys.prediction_mask(f"r{run_id}-eval-{i:03d}", r["model"], r["version"])
            raw = store.get_bytes(settings.s3.bucket, key)
            pred = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)
            organs = [k for k in ORGAN_IDS.values() if k and np.any(truth == k)]
            per_volume.append(np.mean([_dice(pred, truth, k) or 0.0 for k in organs]))
        assert r["dice"]["mean"] == pytest.approx(float(np.mean(per_volume)), abs=1e-6)


def _stored(store: ObjectStore, bucket: str, key: str) -> np.ndarray:
    raw = store.get_bytes(bucket, key)
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj, dtype=np.uint8)


def _fixed_set_follows_from_the_stored_masks(runs: Path, report: dict) -> None:
    """The fixed set: every scored model version's stored pre-annotations of the evaluation
    volumes, against the labels ingest stored, priced as the annotators would (the run's k,
    both rules), nothing submitted; the floor is open + look x the organs in each label."""
    preset = PRESETS["tiny"]
    settings = Settings()
    store, bucket = ObjectStore(settings), settings.s3.bucket
    fixed, tm = report["fixed_set"], report["run"]["time_model"]
    time, strategy = TimeModel.from_description(tm), Strategy(**tm["strategy"])
    assert fixed["k_minutes_per_unit"] == tm["k_minutes_per_unit"] and time.k and time.k > 0
    rows = [(r["role"], r["version"]) for r in report["rounds"]]
    assert [(m["role"], m["version"]) for m in fixed["models"]] == rows
    vids = [f"r{report['run_id']}-eval-{i:03d}" for i in range(preset.n_evaluation)]
    labels = {v: _stored(store, bucket, keys.volume_label(SITES[0], v)) for v in vids}
    for m in fixed["models"]:
        preds = {
            v: _stored(store, bucket, keys.prediction_mask(v, m["model"], m["version"]))
            for v in vids
        }
        for rule, flexible in (("flexible", True), ("full", False)):
            per = m[rule]["volumes"]
            assert sorted(per) == vids
            for v in vids:
                plan = plan_correction(
                    v, "", preds[v], labels[v], np.eye(4), flexible, strategy, time
                )
                assert per[v]["edit_units"] == pytest.approx(plan.edit_units)
                assert per[v]["minutes"] == pytest.approx(time.minutes(plan))
            minutes = [per[v]["minutes"] for v in vids]
            assert m[rule]["minutes_per_ct"] == pytest.approx(float(np.mean(minutes)))
    organs = [sum(1 for k in ORGAN_IDS.values() if k and np.any(labels[v] == k)) for v in vids]
    floor = time.open_min + time.check_min * float(np.mean(organs))
    assert fixed["floor"]["full"]["minutes_per_ct"] == pytest.approx(floor)
    ours, first, last = report["igniter_vs_final"], fixed["models"][0], fixed["models"][-1]
    a, b = first["full"]["edit_units_per_ct"], last["full"]["edit_units_per_ct"]
    assert ours["fixed_set_edit_work_ratio"] == (pytest.approx(a / b) if b > 0 else None)
    a, b = first["full"]["minutes_per_ct"], last["full"]["minutes_per_ct"]
    assert ours["fixed_set_minutes_ratio"] == pytest.approx(a / b)
    assert ours["ceiling_first_round_over_floor"] == pytest.approx(13.87 / floor, abs=0.01)
    assert len(fixed["sensitivity"]["rows"]) == 27
    md = (runs / "latest" / "report.md").read_text()
    assert "## Fixed set: every model on the same evaluation volumes" in md
    assert "## Sensitivity of the fixed-set minutes ratio" in md
    assert "first round as annotated" in md and "| floor: a perfect pre-annotation" in md


def _trends_and_headline_follow_from_the_rows(report: dict) -> None:
    """The report's trends and its igniter-versus-final headline follow from its rows."""
    rounds = report["rounds"]
    minutes = [r["minutes_per_ct"] for r in rounds if r["minutes_per_ct"] is not None]
    assert report["trends"]["minutes_per_ct"] == minutes
    falling = all(b < a for a, b in itertools.pairwise(minutes))
    assert report["trends"]["minutes_fall_every_round"] == falling
    ours = report["igniter_vs_final"]
    assert ours["igniter_dice"] == rounds[0]["dice"]["mean"]
    assert ours["final_sustainer_dice"] == rounds[-1]["dice"]["mean"]


def _metrics_service_serves_the_same_report(run_id: str) -> None:
    """The metrics service serves the same report over its API, and nothing outside the runs."""
    api = httpx.Client(base_url=f"http://127.0.0.1:{PORT_BASE + 6}", timeout=30)
    assert run_id in api.get("/v1/runs").json()
    served = api.get("/v1/runs/latest/report.json")
    assert served.status_code == 200 and served.json()["run_id"] == run_id
    assert api.get(f"/v1/runs/{run_id}/minutes_by_round.png").content[:4] == b"\x89PNG"
    assert api.get(f"/v1/runs/{run_id}/secrets.txt").status_code == 404
    assert api.get("/v1/runs/..%2F..%2Fetc/report.json").status_code in (404, 422)


def test_tiny_transfer_run_writes_a_report_from_real_events(run_env, tmp_path: Path):
    runs = tmp_path / "runs"
    _run_the_tiny_preset(run_env)
    report = _latest_report_is_written(runs)
    _rounds_follow_the_preset(report)
    _minutes_are_the_submitted_ones(runs, report)
    _dice_is_the_stored_predictions_against_truth(report)
    _fixed_set_follows_from_the_stored_masks(runs, report)
    _trends_and_headline_follow_from_the_rows(report)
    _metrics_service_serves_the_same_report(report["run_id"])
