"""``ctloop study``: the transfer run once per seed, and what the seeds agree on.

One seed is one run (its own run folder and report); the study reads each run's
``report.json`` and reports, for each headline number, the seeds' mean, standard deviation and
a 95 % Student t interval (n - 1 degrees of freedom) around the mean. The choice is
pre-registered (issue 19, before any study was run): every number, ratios included, is
averaged on its own scale (arithmetic mean of the per-seed values), and one seed has no
interval (``null``), not a made-up one.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from scipy.stats import t as student_t

from ctloop.files import repoint_link
from ctloop.transfer import RunFailed

CONFIDENCE = 0.95

# The headline numbers of a run's report (``igniter_vs_final``; the fixed-set keys are
# written by services/metrics/fixed_set_section.py and may be absent): key, label, format.
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("dice_gain_points", "Dice gain (points)", "{:+.4f}"),
    ("dice_gain_pct", "Dice gain (%)", "{:+.1f}"),
    ("final_sustainer_dice", "final sustainer Dice", "{:.3f}"),
    ("minutes_ratio", "minutes ratio, first / last round as annotated", "{:.2f}x"),
    ("fixed_set_edit_work_ratio", "fixed set: edit-work ratio, full review", "{:.2f}x"),
    ("fixed_set_minutes_ratio", "fixed set: minutes ratio, full review", "{:.2f}x"),
    ("public_test_change_points", "public site test Dice change (forgetting)", "{:+.4f}"),
)


# Published inter-observer Dice per organ: the level at which a second expert would disagree as
# much (../shared/time-model-sources.md; fixed 2026-12-02 from the literature, before the
# clinical-e seeds were run again with per-organ output): AbdomenAtlas-8K, two radiologists:
# above 0.90 overall, gallbladder 0.85, pancreas 0.81; liver about 0.95 (an MR study). The
# other organs have only the generic 0.90.
INTER_OBSERVER: dict[str, float] = {
    "liver": 0.95,
    "gallbladder": 0.85,
    "pancreas": 0.81,
}
INTER_OBSERVER_DEFAULT = 0.90


def inter_observer(organ: str) -> float:
    return INTER_OBSERVER.get(organ, INTER_OBSERVER_DEFAULT)


class StudyFailed(RuntimeError):
    """A seed's run failed; the study stops (finished seeds keep their run folders)."""


class SeedRun(Protocol):
    """What the study needs of a run (``TransferRun``)."""

    run_id: str
    folder: Path

    def run(self) -> dict[str, Any]: ...


def interval(values: Iterable[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1) and the 95 % t interval of the mean."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf((1 + CONFIDENCE) / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def seed_summary(seed: int, report: dict[str, Any]) -> dict[str, Any]:
    """One seed's run id, its headline numbers (None where the report has none) and its
    per-round mean Dice on the evaluation volumes, and the igniter's and the final model's Dice
    per organ (empty where the report has none)."""
    ours = report.get("igniter_vs_final", {})
    scored = [r["dice"] for r in report.get("rounds", []) if r.get("dice")]
    return {
        "seed": seed,
        "run_id": report.get("run_id"),
        "headline": {key: ours.get(key) for key, _, _ in HEADLINE},
        "dice_by_round": [d["mean"] for d in scored],
        "organs": {
            "igniter": dict(scored[0].get("organs", {})) if scored else {},
            "final": dict(scored[-1].get("organs", {})) if scored else {},
        },
    }


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: each headline number's interval (over the seeds that have it) and each
    round's mean Dice interval (over the seeds that reached that round)."""
    headline = {
        key: interval(v for s in seeds if (v := s["headline"].get(key)) is not None)
        for key, _, _ in HEADLINE
    }
    rounds = max((len(s["dice_by_round"]) for s in seeds), default=0)
    dice = [
        interval(s["dice_by_round"][i] for s in seeds if i < len(s["dice_by_round"]))
        for i in range(rounds)
    ]
    organs: dict[str, Any] = {}
    for which in ("igniter", "final"):
        names = sorted({o for s in seeds for o in s.get("organs", {}).get(which, {})})
        organs[which] = {
            o: interval(
                v for s in seeds if (v := s.get("organs", {}).get(which, {}).get(o)) is not None
            )
            for o in names
        }
    organs["inter_observer"] = {o: inter_observer(o) for o in organs["final"]}
    return {"headline": headline, "dice_by_round": dice, "organs": organs}


def study_record(seeds: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """``report.json``: the settings every seed shared, each seed, and the aggregate."""
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "confidence": CONFIDENCE,
        "interval": "Student t, n - 1 degrees of freedom, around the mean of the seeds",
        "settings": settings,
        "seeds": seeds,
        "aggregate": aggregate(seeds),
    }


def from_runs(run_ids: list[str], runs_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Finished runs as the seeds of one study (``ctloop study --runs``, for seeds run side by
    side): their summaries, and the settings they share. They must differ in their seed and in
    nothing else their reports record (StudyFailed otherwise)."""
    seeds: list[dict[str, Any]] = []
    shared: dict[str, Any] | None = None
    for run_id in run_ids:
        path = runs_dir / run_id / "report.json"
        if not path.is_file():
            raise StudyFailed(f"no finished run {run_id} (no {path})")
        report = json.loads(path.read_text())
        settings = dict(report.get("run", {}).get("settings", {}))
        seed = settings.pop("seed", None)
        if seed is None:
            raise StudyFailed(f"run {run_id}'s report names no seed")
        if shared is None:
            shared = settings
        elif settings != shared:
            keys = sorted(
                k for k in settings.keys() | shared.keys() if settings.get(k) != shared.get(k)
            )
            raise StudyFailed(f"run {run_id} differs from run {run_ids[0]} in {', '.join(keys)}")
        seeds.append(seed_summary(int(seed), report))
    if len({s["seed"] for s in seeds}) != len(seeds):
        raise StudyFailed("two of the runs have the same seed")
    if shared is None:
        raise StudyFailed("no runs named")
    sites = shared.get("sites", {})
    summary = {k: v for k, v in shared.items() if k not in ("sites", "model")}
    summary["sites"] = {
        "public": sites.get("public", {}).get("name"),
        "hospitals": {h: p.get("name") for h, p in sites.get("hospitals", {}).items()},
        "evaluation": sites.get("evaluation", {}).get("name"),
    }
    summary["from_runs"] = list(run_ids)
    return seeds, summary


def _f(x: float | None, pattern: str) -> str:
    return "-" if x is None else pattern.format(x)


def _cell(stat: dict[str, Any], pattern: str) -> str:
    ci = stat["ci95"]
    span = "undefined (n < 2)" if ci is None else f"[{_f(ci[0], pattern)}, {_f(ci[1], pattern)}]"
    sd = _f(stat["sd"], pattern.replace("+", "").rstrip("x"))
    return f"{_f(stat['mean'], pattern)} | {sd} | {span} | {stat['n']}"


def render_markdown(study: dict[str, Any]) -> str:
    """``report.md``: the per-seed table and the mean, sd and 95 % interval of each number."""
    seeds, agg = study["seeds"], study["aggregate"]
    lines = [
        f"# ctloop study: {len(seeds)} seed(s)",
        "",
        f"Settings: {json.dumps(study['settings'], sort_keys=True)}",
        "",
        "## Per seed",
        "",
        "| seed | run | " + " | ".join(label for _, label, _ in HEADLINE) + " |",
        "|---|---|" + "---|" * len(HEADLINE),
    ]
    for s in seeds:
        cells = [_f(s["headline"].get(k), p) for k, _, p in HEADLINE]
        lines.append(f"| {s['seed']} | {s['run_id']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Across seeds ({study['interval']}, {round(100 * study['confidence'])} %)",
        "",
        "| number | mean | sd | 95 % interval | seeds |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {label} | {_cell(agg['headline'][k], p)} |" for k, label, p in HEADLINE]
    lines += ["", "## Mean Dice per round (evaluation volumes)", ""]
    lines += ["| round | mean | sd | 95 % interval | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {_cell(st, '{:.3f}')} |" for i, st in enumerate(agg["dice_by_round"], 1)]
    lines += ["", "![mean Dice per round](dice_by_round.png)", ""]
    lines += _organ_lines(agg.get("organs", {}))
    return "\n".join(lines)


def _organ_lines(organs: dict[str, Any]) -> list[str]:
    """The final sustainer's Dice per organ against the published inter-observer level."""
    final, igniter = organs.get("final", {}), organs.get("igniter", {})
    if not final:
        return []
    lines = [
        "## Dice per organ (evaluation volumes), against inter-observer agreement",
        "",
        "Level: the published Dice between two experts (liver 0.95, gallbladder 0.85, pancreas "
        "0.81, the rest 0.90; see ctloop/transfer/study.py). *At level*: the seeds' mean "
        "reaches it.",
        "",
        "| organ | igniter mean | final mean | sd | 95 % interval | seeds | level | at level |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for organ, stat in final.items():
        first = igniter.get(organ, {}).get("mean")
        level = organs.get("inter_observer", {}).get(organ, inter_observer(organ))
        reached = "-" if stat["mean"] is None else ("yes" if stat["mean"] >= level else "no")
        lines.append(
            f"| {organ} | {_f(first, '{:.4f}')} | {_cell(stat, '{:.4f}')} | {level:.2f} "
            f"| {reached} |"
        )
    return [*lines, ""]


def plot_dice(study: dict[str, Any]) -> bytes:
    """Each seed's mean Dice per round, and the seeds' mean with its 95 % interval."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for s in study["seeds"]:
        seed_xs = range(1, len(s["dice_by_round"]) + 1)
        ax.plot(seed_xs, s["dice_by_round"], marker=".", alpha=0.4, label=f"seed {s['seed']}")
    stats = study["aggregate"]["dice_by_round"]
    xs = list(range(1, len(stats) + 1))
    means = [st["mean"] for st in stats]
    err = [
        [st["mean"] - st["ci95"][0] if st["ci95"] else 0.0 for st in stats],
        [st["ci95"][1] - st["mean"] if st["ci95"] else 0.0 for st in stats],
    ]
    ax.errorbar(xs, means, yerr=err, color="black", marker="o", capsize=4, label="mean, 95 % CI")
    ax.set_xlabel("round (1: igniter)")
    ax.set_ylabel("mean Dice (evaluation)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_study(study: dict[str, Any], runs_dir: Path) -> Path:
    """``runs_dir/study-<timestamp>/`` with report.json, report.md and the plot; ``latest-study``
    re-pointed to it."""
    name = "study-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = runs_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(study, indent=2))
    (folder / "report.md").write_text(render_markdown(study))
    (folder / "dice_by_round.png").write_bytes(plot_dice(study))
    repoint_link(runs_dir / "latest-study", name)
    return folder


@dataclass
class Study:
    """The seeds, run one after another; ``make_run(seed)`` builds a seed's run."""

    seeds: list[int]
    make_run: Callable[[int], SeedRun]
    runs_dir: Path
    settings: dict[str, Any]
    echo: Callable[[str], None] = print

    def run(self) -> Path:
        done: list[dict[str, Any]] = []
        for n, seed in enumerate(self.seeds, start=1):
            run = self.make_run(seed)
            self.echo(f"study: seed {seed} ({n}/{len(self.seeds)}): run {run.run_id}")
            try:
                returned = run.run()
            except RunFailed as exc:
                finished = ", ".join(f"seed {s['seed']}: {s['run_id']}" for s in done) or "none"
                raise StudyFailed(
                    f"seed {seed} failed (run folder {run.folder}): {exc}; "
                    f"finished seeds keep their reports ({finished})"
                ) from exc
            path = run.folder / "report.json"
            report = json.loads(path.read_text()) if path.is_file() else returned
            done.append(seed_summary(seed, report))
        folder = write_study(study_record(done, self.settings), self.runs_dir)
        self.echo(f"study: {folder}/report.md (runs/latest-study -> {folder.name})")
        return folder
