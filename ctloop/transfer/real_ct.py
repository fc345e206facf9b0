"""How far phantoms carry: a run's models scored on a real CT (issue 20).

``ctloop real-ct [--run RUN_ID]`` takes every model version of a finished run's report (the
igniter, then each round's sustainer), segments a real labelled CT with it in-process (the
published weights from the model repository) and reports Dice per organ against the CT's
labels: ``runs/<run>/real-ct.json`` and ``real-ct.md``.

The default CT is the one ``make setup`` unpacks from TotalSegmentator 2.18.0's source
distribution (``.ctloop/real-ct/``): 20 contrast-enhanced upper-abdomen slices, whose labels are
TotalSegmentator's output. They are a reference, not expert truth: a Dice against them says how
close ctloop's phantom-trained models come to a published model's reading of one real patient,
nothing about accuracy on a population.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctloop.core.datasets import load_dicom_series
from ctloop.core.metrics import organ_dice
from ctloop.core.organs import FOREGROUND, ORGAN_IDS, from_totalsegmentator
from ctloop.settings import REPO_ROOT, Settings

DEFAULT_CT = REPO_ROOT / ".ctloop" / "real-ct"
CAVEAT = (
    "The reference labels are TotalSegmentator's output on one real patient (its 2.18.0 test "
    "data), not an expert's: the numbers say how close models trained on phantoms come to a "
    "published network's reading of a real CT, not their accuracy on real patients."
)


class RealCtError(RuntimeError):
    """What is missing or wrong, said plainly (no models, no CT, another grid)."""


def load_case(series: Path, labels: Path, label_ids: str) -> dict[str, Any]:
    """The CT (RAS, HU) and its labels (canonical ids) on the same grid."""
    if not series.is_dir():
        raise RealCtError(f"no DICOM series at {series} (`make setup` unpacks the default one)")
    if not labels.is_file():
        raise RealCtError(f"no label map at {labels}")
    volume = load_dicom_series(sorted(p for p in series.iterdir() if p.is_file())).as_ras()
    img = nib.as_closest_canonical(nib.load(labels))
    raw = np.asarray(img.dataobj)
    truth = from_totalsegmentator(raw) if label_ids == "totalsegmentator" else raw.astype(np.uint8)
    if truth.shape != volume.image.shape or not np.allclose(img.affine, volume.affine, atol=1e-3):
        raise RealCtError(
            f"the labels' grid {truth.shape} is not the series' {volume.image.shape} "
            "(same voxels, same affine needed)"
        )
    return {"image": volume.image, "affine": volume.affine, "truth": truth}


def run_models(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (round, role, model, version) of a run's report, in round order."""
    return [
        {"round": r["round"], "role": r["role"], "model": r["model"], "version": r["version"]}
        for r in report["rounds"]
    ]


def score(
    settings: Settings,
    report: dict[str, Any],
    case: dict[str, Any],
    echo: Any = print,
) -> dict[str, Any]:
    """Each of the run's model versions on the case: Dice per organ present in the labels."""
    from ctloop.core.infer import Segmenter
    from ctloop.model_repository import ModelRepository

    repo = ModelRepository(settings)
    truth = case["truth"]
    organs = [o for o in FOREGROUND if (truth == ORGAN_IDS[o]).any()]
    rows = []
    for m in run_models(report):
        started = time.monotonic()
        try:
            weights = repo.weights(m["model"], m["version"])
        except Exception as exc:  # the store's own errors; the run's models may be gone
            raise RealCtError(
                f"{m['model']} v{m['version']} is not in the model repository ({exc}); "
                "score a run whose stack is still up"
            ) from exc
        label = Segmenter(weights)(case["image"], case["affine"]).label
        dice = organ_dice(label, truth)
        per = {o: dice.get(o, 0.0) for o in organs}
        rows.append({**m, "dice": per, "mean_dice": float(np.mean(list(per.values())))})
        echo(
            f"  round {m['round']} {m['role']} v{m['version']}: mean Dice "
            f"{rows[-1]['mean_dice']:.3f} ({time.monotonic() - started:.0f} s)"
        )
    return {"run_id": report["run_id"], "organs": organs, "models": rows, "caveat": CAVEAT}


def render(result: dict[str, Any], source: str) -> str:
    organs = result["organs"]
    lines = [
        f"# Run {result['run_id']} on a real CT",
        "",
        f"CT: {source}. {result['caveat']}",
        "",
        "| round | model | version | mean Dice | " + " | ".join(organs) + " |",
        "|---|---|---|---|" + "---|" * len(organs),
    ]
    for r in result["models"]:
        cells = " | ".join(f"{r['dice'][o]:.3f}" for o in organs)
        lines.append(
            f"| {r['round']} | {r['role']} | {r['version']} | {r['mean_dice']:.3f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main(
    settings: Settings, run: str, series: Path, labels: Path, label_ids: str, echo: Any = print
) -> Path:
    folder = settings.runs_dir / run
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise RealCtError(f"no finished run at {folder} (its report.json is missing)")
    report = json.loads(report_path.read_text())
    echo(f"real CT: {series} with labels {labels.name} ({label_ids} ids)")
    case = load_case(series, labels, label_ids)
    result = score(settings, report, case, echo)
    result["ct"] = {"series": str(series), "labels": str(labels), "label_ids": label_ids}
    (folder / "real-ct.json").write_text(json.dumps(result, indent=2))
    out = folder / "real-ct.md"
    out.write_text(render(result, f"`{series.name}` with `{labels.name}`"))
    echo(f"wrote {out}")
    return out
