"""``ctloop study``: the aggregation over seeds, report.md, the study folder, the command line.

No real transfer run here: each seed's run is a stand-in that returns a hand-made report."""

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ctloop.transfer import RunFailed
from ctloop.transfer.study import (
    Study,
    StudyFailed,
    interval,
    render_markdown,
    seed_summary,
    study_record,
)

T_975_DF2 = 4.302652729696142  # Student t 97.5 % quantile, 2 degrees of freedom (tables: 4.303)
T_975_DF1 = 12.706204736432095  # ... 1 degree of freedom (tables: 12.706)


def _report(run_id: str, gain: float, ratio: float, fixed: float | None, dice: list[float]) -> dict:
    ours: dict[str, Any] = {
        "igniter_dice": dice[0],
        "final_sustainer_dice": dice[-1],
        "dice_gain_points": gain,
        "dice_gain_pct": 100 * gain / dice[0],
        "minutes_ratio": ratio,
    }
    if fixed is not None:
        ours["fixed_set_edit_work_ratio"] = fixed
    rounds = [{"round": i, "dice": {"mean": d}} for i, d in enumerate(dice, 1)]
    rounds.append({"round": len(dice) + 1, "dice": None})  # an unscored version is skipped
    return {"run_id": run_id, "igniter_vs_final": ours, "rounds": rounds}


def test_interval_is_mean_sd_and_student_t_around_the_mean():
    stat = interval([1.0, 2.0, 3.0])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(2.0) and stat["sd"] == pytest.approx(1)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # 2.4841
    assert stat["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    two = interval([0.1, 0.3])  # sd = 0.1414, half width = 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert two["ci95"] == pytest.approx([0.2 - T_975_DF1 / 10, 0.2 + T_975_DF1 / 10])


def test_one_seed_has_no_interval_and_no_seed_has_no_mean():
    assert interval([0.3]) == {"n": 1, "mean": 0.3, "sd": None, "ci95": None}
    assert interval([]) == {"n": 0, "mean": None, "sd": None, "ci95": None}


def test_aggregate_over_seeds_tolerates_a_report_without_the_fixed_set():
    seeds = [
        seed_summary(0, _report("r0", 0.30, 2.0, 10.0, [0.4, 0.6, 0.7])),
        seed_summary(1, _report("r1", 0.20, 3.0, None, [0.5, 0.7])),
        seed_summary(2, _report("r2", 0.10, 4.0, 14.0, [0.6, 0.65, 0.7])),
    ]
    assert seeds[1]["headline"]["fixed_set_edit_work_ratio"] is None
    assert seeds[0]["dice_by_round"] == [0.4, 0.6, 0.7]
    agg = study_record(seeds, {"preset": "tiny"})["aggregate"]
    gain = agg["headline"]["dice_gain_points"]
    assert gain["mean"] == pytest.approx(0.2) and gain["sd"] == pytest.approx(0.1)
    assert gain["ci95"][1] - gain["mean"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    fixed = agg["headline"]["fixed_set_edit_work_ratio"]  # over the two seeds that have it
    assert fixed["n"] == 2 and fixed["mean"] == pytest.approx(12.0)
    assert fixed["ci95"] == pytest.approx([12 - T_975_DF1 * 2, 12 + T_975_DF1 * 2])
    assert agg["headline"]["fixed_set_minutes_ratio"]["n"] == 0
    by_round = agg["dice_by_round"]  # round 3: only the seeds that reached it
    assert [r["n"] for r in by_round] == [3, 3, 2]
    assert by_round[0]["mean"] == pytest.approx(0.5)


def test_study_md_lists_each_seed_and_the_intervals():
    seeds = [
        seed_summary(0, _report("r0", 0.30, 2.0, 10.0, [0.4, 0.7])),
        seed_summary(1, _report("r1", 0.10, 4.0, None, [0.6, 0.7])),
    ]
    md = render_markdown(study_record(seeds, {"preset": "tiny"}))
    assert "# ctloop study: 2 seed(s)" in md
    assert "| 0 | r0 | +0.3000 |" in md and "| 1 | r1 | +0.1000 |" in md
    low, high = 0.2 - T_975_DF1 * 0.1, 0.2 + T_975_DF1 * 0.1
    assert f"| Dice gain (points) | +0.2000 | 0.1414 | [{low:+.4f}, {high:+.4f}] | 2 |" in md
    assert "| fixed set: edit-work ratio, full review | 10.00x | - | undefined (n < 2) | 1 |" in md
    assert "![mean Dice per round](dice_by_round.png)" in md


class _FakeRun:
    """A seed's run: writes its report.json like the metrics service, or fails."""

    def __init__(self, runs_dir: Path, seed: int, fail: bool) -> None:
        self.run_id, self.fail = f"run-{seed}", fail
        self.folder = runs_dir / self.run_id
        self.seed = seed

    def run(self) -> dict[str, Any]:
        if self.fail:
            raise RunFailed("training round failed")
        report = _report(self.run_id, 0.1 * (self.seed + 1), 2.0, 8.0, [0.5, 0.6])
        self.folder.mkdir(parents=True)
        (self.folder / "report.json").write_text(json.dumps(report))
        return {"run_id": "not read: report.json is"}


def test_study_writes_its_folder_and_points_latest_study_at_it(tmp_path):
    echoed: list[str] = []
    study = Study([0, 1], lambda s: _FakeRun(tmp_path, s, False), tmp_path, {}, echoed.append)
    folder = study.run()
    assert (tmp_path / "latest-study").resolve() == folder.resolve()
    record = json.loads((folder / "report.json").read_text())
    assert [s["run_id"] for s in record["seeds"]] == ["run-0", "run-1"]
    assert record["aggregate"]["headline"]["dice_gain_points"]["mean"] == pytest.approx(0.15)
    assert (folder / "dice_by_round.png").read_bytes()[:4] == b"\x89PNG"
    assert "# ctloop study" in (folder / "report.md").read_text()
    assert echoed[0] == "study: seed 0 (1/2): run run-0"


def test_a_failed_seed_stops_the_study_and_names_its_run_folder(tmp_path):
    study = Study([0, 1, 2], lambda s: _FakeRun(tmp_path, s, s == 1), tmp_path, {}, lambda _: None)
    with pytest.raises(StudyFailed) as failed:
        study.run()
    message = str(failed.value)
    assert "seed 1 failed" in message and str(tmp_path / "run-1") in message
    assert "seed 0: run-0" in message and "training round failed" in message
    assert (tmp_path / "run-0" / "report.json").is_file()  # the finished seed's report stays
    assert not (tmp_path / "latest-study").exists() and not (tmp_path / "run-2").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctloop.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_study_help_names_the_seeds_and_their_default():
    result = _cli("study", "--help")
    assert result.returncode == 0, result.stderr
    assert "--seeds SEED [SEED ...]" in result.stdout and "default: 0 1 2" in result.stdout


def test_study_takes_the_run_options_and_defaults_to_three_seeds(monkeypatch):
    from ctloop import cli, cli_run

    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli_run, "_study", lambda args: seen.setdefault("args", args) and 0)
    argv = ["study", "--preset", "tiny", "--annotators", "1", "--port-base", "30500"]
    assert cli.main([*argv, "--clinical-site", "clinical-b", "--flexible-rounds", "9"]) == 0
    args = seen.pop("args")
    assert args.seeds == [0, 1, 2] and args.preset == "tiny" and args.annotators == 1
    assert args.port_base == 30500 and args.clinical_site == ["clinical-b"]
    assert args.flexible_rounds == 9 and args.keep_services is False
    assert cli.main([*argv, "--seeds", "4", "7"]) == 0 and seen["args"].seeds == [4, 7]


def test_sustainer_steps_change_only_the_sustainers_schedule(monkeypatch, tmp_path):
    from ctloop import cli
    from ctloop.transfer.presets import PRESETS
    from ctloop.transfer.run import TransferRun

    monkeypatch.setenv("CTLOOP_RUNS_DIR", str(tmp_path))
    run = TransferRun("small", sustainer_steps=300)
    env = run.policy_env()
    assert env["CTLOOP_TRAINING__SUSTAINER_STEPS"] == "300"
    assert env["CTLOOP_TRAINING__IGNITER_STEPS"] == str(PRESETS["small"].igniter_steps)
    assert run.preset.flexible_rounds == PRESETS["small"].flexible_rounds
    assert TransferRun("small").preset.sustainer_steps == PRESETS["small"].sustainer_steps
    with pytest.raises(SystemExit) as refused:
        cli.main(["study", "--sustainer-steps", "0"])
    assert refused.value.code == 2


@pytest.fixture
def runs_dir(monkeypatch, tmp_path):
    """``tmp_path`` as the runs folder of the settings the command line reads (cached)."""
    from ctloop.settings import get_settings

    monkeypatch.setenv("CTLOOP_RUNS_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _finished_run(runs_dir: Path, run_id: str, seed: int, gain: float, steps: int = 300) -> None:
    report = _report(run_id, gain, 2.0, 3.0, [0.5, 0.5 + gain])
    sites = {
        "public": {"name": "public"},
        "hospitals": {"hospital-a": {"name": "clinical-e"}},
        "evaluation": {"name": "clinical-e"},
    }
    settings = {"size": "small", "sustainer_steps": steps, "seed": seed, "sites": sites}
    report["run"] = {"settings": settings}
    (runs_dir / run_id).mkdir(parents=True)
    (runs_dir / run_id / "report.json").write_text(json.dumps(report))


def test_study_puts_finished_runs_together_as_its_seeds(runs_dir, capsys):
    """Seeds run side by side (``ctloop run --seed K`` each) make the same study as
    ``--seeds``: each run a seed, the settings they share, their intervals."""
    from ctloop import cli

    tmp_path = runs_dir
    for seed, gain in ((0, 0.30), (1, 0.20), (2, 0.25)):
        _finished_run(tmp_path, f"r{seed}", seed, gain)
    assert cli.main(["study", "--runs", "r0", "r1", "r2"]) == 0
    study = json.loads((tmp_path / "latest-study" / "report.json").read_text())
    assert [s["seed"] for s in study["seeds"]] == [0, 1, 2]
    assert [s["run_id"] for s in study["seeds"]] == ["r0", "r1", "r2"]
    assert study["aggregate"]["headline"]["dice_gain_points"]["mean"] == pytest.approx(0.25)
    assert study["settings"]["from_runs"] == ["r0", "r1", "r2"]
    assert study["settings"]["sustainer_steps"] == 300 and "seed" not in study["settings"]
    assert study["settings"]["sites"]["hospitals"] == {"hospital-a": "clinical-e"}
    assert "report.md" in capsys.readouterr().out


def test_runs_that_differ_in_more_than_their_seed_make_no_study(runs_dir, capsys):
    from ctloop import cli

    tmp_path = runs_dir
    _finished_run(tmp_path, "r0", 0, 0.3)
    _finished_run(tmp_path, "r1", 1, 0.2, steps=150)
    _finished_run(tmp_path, "r2", 0, 0.2)
    assert cli.main(["study", "--runs", "r0", "r1"]) == 2
    assert "differs from run r0 in sustainer_steps" in capsys.readouterr().err
    assert cli.main(["study", "--runs", "r0", "r2"]) == 2
    assert "same seed" in capsys.readouterr().err
    assert cli.main(["study", "--runs", "r0", "nope"]) == 2
    assert "no finished run nope" in capsys.readouterr().err
    assert not (tmp_path / "latest-study").exists()


def test_each_organs_final_dice_is_aggregated_and_held_to_its_inter_observer_level():
    def with_organs(run_id: str, igniter: dict[str, float], final: dict[str, float]) -> dict:
        report = _report(run_id, 0.2, 1.0, None, [0.5, 0.7])
        report["rounds"][0]["dice"]["organs"] = igniter
        report["rounds"][1]["dice"]["organs"] = final
        return report

    seeds = [
        seed_summary(
            0, with_organs("r0", {"pancreas": 0.2, "liver": 0.8}, {"pancreas": 0.80, "liver": 0.93})
        ),
        seed_summary(
            1, with_organs("r1", {"pancreas": 0.4, "liver": 0.9}, {"pancreas": 0.84, "liver": 0.94})
        ),
    ]
    assert seeds[0]["organs"]["final"] == {"pancreas": 0.80, "liver": 0.93}
    organs = study_record(seeds, {})["aggregate"]["organs"]
    assert organs["final"]["pancreas"]["mean"] == pytest.approx(0.82)
    assert organs["igniter"]["liver"]["mean"] == pytest.approx(0.85)
    assert organs["inter_observer"] == {"liver": 0.95, "pancreas": 0.81}
    md = render_markdown(study_record(seeds, {}))
    row = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert row["| pancreas"].endswith("| 0.81 | yes |")  # 0.82 >= 0.81
    assert row["| liver"].endswith("| 0.95 | no |")  # 0.94 < 0.95
    # a report from before per-organ output: no organ table, nothing made up
    old = seed_summary(0, _report("r", 0.1, 1.0, None, [0.5, 0.6]))
    assert old["organs"] == {"igniter": {}, "final": {}}
    assert "per organ" not in render_markdown(study_record([old], {}))
