"""A transfer run's report, from the metrics service's state (that is, from the events):
``report.json`` for machines, ``report.md`` for people, PNG plots of Dice and minutes per CT by
round. Written to ``<runs_dir>/<run-id>/`` (``latest`` points at the newest) and kept in the
object store under ``reports/<run-id>/`` so the API can serve it from any replica."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pydantic import BaseModel, Field

from ctloop.contracts import keys
from ctloop.files import repoint_link
from ctloop.storage import ObjectStore
from services.metrics.fixed_set_section import (
    fixed_set_headline,
    fixed_set_headline_rows,
    fixed_set_markdown,
    fixed_set_section,
)
from services.metrics.state import MetricsState

log = logging.getLogger("ctloop.metrics.report")

# Ma et al. 2022, the headline this platform reproduces.
PAPER = {
    "dice_gain_pct": 19.7,
    "first_round_minutes_per_ct": 13.87,
    "last_round_minutes_per_ct": 1.51,
    "minutes_ratio": round(13.87 / 1.51, 2),
}
FILES = {
    "report.json": "application/json",
    "report.md": "text/markdown; charset=utf-8",
    "dice_by_round.png": "image/png",
    "minutes_by_round.png": "image/png",
}


class RunInfo(BaseModel):
    """What the run tells the metrics service about itself."""

    preset: str = "custom"
    igniter: str = Field(description="the igniter's model name")
    sustainer: str = Field(description="the sustainer's model name")
    started_at: datetime | None = None
    volumes: dict[str, int] = Field(default_factory=dict, description="per dataset/site")
    annotators: list[str] = Field(default_factory=list)
    time_model: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    delivered: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="model:version -> what the annotators submitted on its pre-annotations "
        "(ctloop/transfer/delivered.py): trusted organ-slices, minutes, submitted Dice",
    )


def build_report(run_id: str, info: RunInfo, state: MetricsState) -> dict[str, Any]:
    rounds = _rounds(info, state)
    ours, trends = _headline(rounds)
    fixed = fixed_set_section(info.time_model, rounds, state)
    ours |= fixed_set_headline(fixed)
    return {
        "run_id": run_id,
        "generated_at": datetime.now(UTC).isoformat(),
        "run": info.model_dump(mode="json"),
        "rounds": rounds,
        "igniter_vs_final": ours,
        # Every model costed on the same evaluation volumes: the headline edit-work ratio.
        "fixed_set": fixed,
        "paper": PAPER,
        "trends": trends,
        "events_seen": state.events_seen,
        # Not complete when Kafka deleted events before the metrics snapshot covered them.
        "history": state.history(),
    }


def _rounds(info: RunInfo, state: MetricsState) -> list[dict[str, Any]]:
    """One entry per model version of this run, igniter first: its evaluation Dice and the
    annotation minutes of the volumes it pre-annotated."""
    scored = {(e["model"], e["version"]): e for e in state.evaluation()}
    public = {(e["model"], e["version"]): e for e in state.evaluation("public-test")}
    annotated = {(r["model"], r["version"]): r for r in state.report()}
    names = {info.igniter: "igniter", info.sustainer: "sustainer"}
    refs = sorted(
        {ref for ref in [*scored, *annotated] if ref[0] in names},
        key=lambda ref: (ref[0] != info.igniter, ref[1]),
    )
    rounds = []
    for n, ref in enumerate(refs, start=1):
        e, a, pt = scored.get(ref), annotated.get(ref), public.get(ref)
        rounds.append(
            {
                "round": n,
                "model": ref[0],
                "role": names[ref[0]],
                "version": ref[1],
                "dice": (
                    {"mean": e["mean_dice"], "organs": e["organ_dice"], "volumes": e["volumes"]}
                    if e
                    else None
                ),
                # the public site's held-out volumes: what fine-tuning forgot of it
                "public_test_dice": (
                    {"mean": pt["mean_dice"], "organs": pt["organ_dice"], "volumes": pt["volumes"]}
                    if pt
                    else None
                ),
                "volumes_annotated": a["volumes_annotated"] if a else 0,
                "minutes_per_ct": a["minutes_per_ct"] if a and a["volumes_annotated"] else None,
                "agreement_dice": a["mean_dice"] if a else None,
                "delivered": info.delivered.get(f"{ref[0]}:{ref[1]}"),
            }
        )
    return rounds


def _headline(rounds: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The igniter against the final sustainer, and the trends over the rounds."""
    with_dice = [r for r in rounds if r["dice"]]
    with_minutes = [r for r in rounds if r["minutes_per_ct"] is not None]
    igniter = next((r for r in with_dice if r["role"] == "igniter"), None)
    final = next((r for r in reversed(with_dice) if r["role"] == "sustainer"), None)
    ours: dict[str, Any] = {}
    if igniter and final:
        a, b = igniter["dice"]["mean"], final["dice"]["mean"]
        ours |= {
            "igniter_dice": a,
            "final_sustainer_dice": b,
            "dice_gain_points": b - a,
            "dice_gain_pct": 100.0 * (b - a) / a if a > 0 else None,
        }
    if igniter and final and igniter["public_test_dice"] and final["public_test_dice"]:
        a, b = igniter["public_test_dice"]["mean"], final["public_test_dice"]["mean"]
        # forgetting: what the final sustainer lost (negative: gained) on the public site
        ours |= {"public_test_igniter_dice": a, "public_test_final_dice": b}
        ours |= {"public_test_change_points": b - a}
    if with_minutes:
        first, last = with_minutes[0]["minutes_per_ct"], with_minutes[-1]["minutes_per_ct"]
        ours |= {
            "first_round_minutes_per_ct": first,
            "last_round_minutes_per_ct": last,
            "minutes_ratio": first / last if last > 0 else None,
        }
    minutes = [r["minutes_per_ct"] for r in with_minutes]
    dice = [r["dice"]["mean"] for r in with_dice]
    trends = {
        "minutes_per_ct": minutes,
        "mean_dice": dice,
        "minutes_fall_every_round": len(minutes) > 1
        and all(b < a for a, b in itertools.pairwise(minutes)),
        "final_dice_above_igniter": bool(ours.get("dice_gain_points", 0) > 0),
    }
    return ours, trends


def _fmt(x: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if x is None else pattern.format(x)


def _incomplete_warning(report: dict[str, Any]) -> list[str]:
    gaps = report.get("history", {}).get("gaps", [])
    if not gaps:
        return []
    where = ", ".join(
        f"{g['topic']}/{g['partition']} offsets {g['first_missing']}-{g['first_kept'] - 1}"
        for g in gaps
    )
    return [
        f"**May be incomplete:** Kafka deleted events before the metrics service's snapshot "
        f"covered them ({where}).",
        "",
    ]


def _sites_line(settings: dict[str, Any]) -> list[str]:
    """Which site profiles the run drew its phantoms from, and its seed (nothing for a run on
    the user's own folders); the profiles themselves are in report.json."""
    sites = settings.get("sites")
    if not isinstance(sites, dict):
        return []
    hospitals = ", ".join(f"{h} `{p['name']}`" for h, p in sites["hospitals"].items())
    return [
        "",
        f"Sites: public `{sites['public']['name']}`; {hospitals}; evaluation "
        f"`{sites['evaluation']['name']}`; seed {settings.get('seed', '-')}.",
    ]


def render_markdown(report: dict[str, Any]) -> str:
    run, ours, paper = report["run"], report["igniter_vs_final"], report["paper"]
    organs = sorted({o for r in report["rounds"] if r["dice"] for o in r["dice"]["organs"]})
    lines = [
        f"# ctloop transfer run {report['run_id']}",
        "",
        f"Preset `{run['preset']}`; volumes {run['volumes']}; annotators "
        f"{', '.join(run['annotators']) or '-'}. Generated {report['generated_at']} from "
        f"{report['events_seen']} events.",
        *_sites_line(run.get("settings") or {}),
        "",
        *_incomplete_warning(report),
        "## Headline: ours beside the paper (Ma et al. 2022)",
        "",
        "| | ours | paper |",
        "|---|---|---|",
        f"| mean Dice, igniter → final sustainer | {_fmt(ours.get('igniter_dice'))} → "
        f"{_fmt(ours.get('final_sustainer_dice'))} | |",
        f"| Dice gain | {_fmt(ours.get('dice_gain_pct'), '{:+.1f} %')} "
        f"({_fmt(ours.get('dice_gain_points'), '{:+.3f}')} points) | +{paper['dice_gain_pct']} % |",
        f"| minutes per CT, first round as annotated | "
        f"{_fmt(ours.get('first_round_minutes_per_ct'), '{:.2f}')}"
        f" | {paper['first_round_minutes_per_ct']} |",
        f"| minutes per CT, last round as annotated | "
        f"{_fmt(ours.get('last_round_minutes_per_ct'), '{:.2f}')}"
        f" | {paper['last_round_minutes_per_ct']} |",
        f"| first / last as annotated | {_fmt(ours.get('minutes_ratio'), '{:.2f}x')} | "
        f"{paper['minutes_ratio']}x |",
        *fixed_set_headline_rows(ours),
        *_public_test_row(ours),
        "",
        "## Rounds",
        "",
        "Dice: the model's pre-annotations of the evaluation volumes (clinical, "
        "reference-labelled, never trained on) against their labels. Public test: the same on "
        "held-out volumes of the public site (forgetting). Minutes: what the annotators spent "
        "on the volumes this model pre-annotated. Agreement: pre-annotation vs correction on "
        "what was reviewed.",
        "",
        "| round | model | version | mean Dice | public test Dice | volumes annotated "
        "| minutes per CT | agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        public = r.get("public_test_dice")
        lines.append(
            f"| {r['round']} | {r['role']} | {r['version']} | "
            f"{_fmt(r['dice']['mean'] if r['dice'] else None)} | "
            f"{_fmt(public['mean'] if public else None)} | {r['volumes_annotated']} | "
            f"{_fmt(r['minutes_per_ct'], '{:.2f}')} | {_fmt(r['agreement_dice'])} |"
        )
    lines += [
        "",
        "## Dice per organ",
        "",
        "| organ | "
        + " | ".join(
            f"r{r['round']} {r['role']} v{r['version']}" for r in report["rounds"] if r["dice"]
        )
        + " |",
        "|---|" + "---|" * sum(1 for r in report["rounds"] if r["dice"]),
    ]
    for organ in organs:
        cells = [_fmt(r["dice"]["organs"].get(organ)) for r in report["rounds"] if r["dice"]]
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    lines += _delivered_markdown(report["rounds"])
    tm = run.get("time_model") or {}
    if tm:
        lines += ["", "## Time model", "", "```json", json.dumps(tm, indent=2), "```"]
    lines += fixed_set_markdown(report.get("fixed_set"))
    lines += ["", "Plots: `dice_by_round.png`, `minutes_by_round.png`.", ""]
    return "\n".join(lines)


def _public_test_row(ours: dict[str, Any]) -> list[str]:
    if ours.get("public_test_igniter_dice") is None:
        return []
    return [
        f"| public site test Dice, igniter → final sustainer (forgetting) | "
        f"{_fmt(ours['public_test_igniter_dice'])} → {_fmt(ours['public_test_final_dice'])} "
        f"({_fmt(ours['public_test_change_points'], '{:+.3f}')} points) | |"
    ]


def _delivered_markdown(rounds: list[dict[str, Any]]) -> list[str]:
    """What the annotators submitted per round (ctloop/transfer/delivered.py); none when no
    simulated annotator worked (people annotate, the run does not see the truth)."""
    done = [r for r in rounds if r.get("delivered")]
    if not done:
        return []
    lines = [
        "",
        "## What the annotators delivered",
        "",
        "Trusted organ-slices: the reviewed slices of organs accepted or corrected (not "
        "skipped) where the submitted mask has the organ, what the loss trusts. Submitted "
        "Dice: the submitted masks against the truth over the whole volume (unreviewed "
        "slices and skipped organs included).",
        "",
        "| round | model | version | volumes | minutes per CT | trusted organ-slices per CT "
        "| minutes per trusted organ-slice | submitted Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in done:
        d = r["delivered"]
        lines.append(
            f"| {r['round']} | {r['role']} | {r['version']} | {d['volumes']} | "
            f"{_fmt(d['minutes_per_ct'], '{:.2f}')} | "
            f"{_fmt(d['trusted_organ_slices_per_ct'], '{:.1f}')} | "
            f"{_fmt(d['minutes_per_trusted_organ_slice'], '{:.4f}')} | "
            f"{_fmt(d['submitted_dice'])} |"
        )
    return lines


def _plot(rounds: list[dict[str, Any]], key: str, ylabel: str, paper: list[float] | None) -> bytes:
    xs = [r["round"] for r in rounds]
    ys = [r["dice"]["mean"] if key == "dice" else r["minutes_per_ct"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(xs, ys, marker="o", label="ctloop")
    for x, y, r in zip(xs, ys, rounds, strict=True):
        ax.annotate(
            f"{r['role'][0]}{r['version']}",
            (x, y),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    if paper:
        ax.plot([xs[0], xs[-1]], paper, linestyle="--", color="grey", label="paper (first, last)")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_files(report: dict[str, Any]) -> dict[str, bytes]:
    files = {
        "report.json": json.dumps(report, indent=2).encode(),
        "report.md": render_markdown(report).encode(),
    }
    with_dice = [r for r in report["rounds"] if r["dice"]]
    with_minutes = [r for r in report["rounds"] if r["minutes_per_ct"] is not None]
    if with_dice:
        files["dice_by_round.png"] = _plot(with_dice, "dice", "mean Dice (evaluation)", None)
    if with_minutes:
        p = report["paper"]
        files["minutes_by_round.png"] = _plot(
            with_minutes,
            "minutes",
            "annotation minutes per CT",
            [p["first_round_minutes_per_ct"], p["last_round_minutes_per_ct"]],
        )
    return files


def write_report(
    files: dict[str, bytes], run_id: str, runs_dir: Path, store: ObjectStore, bucket: str
) -> Path:
    """Files under ``runs_dir/run_id`` (``latest`` re-pointed) and in the object store."""
    folder = runs_dir / run_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        store.put_bytes(bucket, keys.report_file(run_id, name), data)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
    repoint_link(runs_dir / "latest", run_id)
    store.put_bytes(bucket, keys.report_latest(), run_id.encode())
    log.info("report written", extra={"run_id": run_id, "folder": str(folder)})
    return folder
