"""The report's fixed-set section: every model version the metrics service scored on the
evaluation set, its stored pre-annotations of those volumes costed against their reference
labels with the simulated annotators' rules and the run's calibrated ``k``
(``ctloop.transfer.fixed_set``), nothing submitted; the floor and ceiling of the time model;
and the sensitivity table, recomputed from the same stored masks.

The run tells the metrics service its time model (``RunInfo.time_model``: ``k``, the constants
and the strategy); the masks come from S3, found through the events this service folded in
(evaluation labels from ``volume.ingested``, pre-annotations from ``prediction.completed``)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctloop.core.blobs import nifti_array_from_gz
from ctloop.transfer import fixed_set as fs
from ctloop.transfer.annotator import Strategy, TimeModel, slice_confusion
from services.metrics.snapshot_format import Blob
from services.metrics.state import MetricsState

log = logging.getLogger("ctloop.metrics.fixed_set")

Ref = tuple[str, int]


def fixed_set_section(
    time_model: Mapping[str, Any], rounds: list[dict[str, Any]], state: MetricsState
) -> dict[str, Any]:
    """The section for ``report.json`` (``rounds``: the report's rows, igniter first)."""
    try:
        time = TimeModel.from_description(time_model)
        strategy = Strategy(**time_model.get("strategy", {}))
    except (TypeError, ValueError) as exc:
        return {"error": f"the run's time model cannot be read: {exc}"}
    scored = [r for r in rounds if r["dice"]]
    confusions = _confusions(state, [(r["model"], r["version"]) for r in scored])
    models = [
        {k: r[k] for k in ("round", "role", "model", "version")}
        | {"volumes": len(c)}
        | fs.model_cost(c, strategy, time)
        for r in scored
        if (c := confusions.get((r["model"], r["version"])))
    ]
    volumes = {v: c for per in confusions.values() for v, c in per.items()}
    section: dict[str, Any] = {
        "what": "every model version's pre-annotations of the evaluation volumes, costed "
        "with the annotators' review and time model (the run's k), nothing submitted",
        "k_minutes_per_unit": time.k,
        "headline_rule": fs.HEADLINE_RULE,
        "volumes": len(volumes),
        "floor": fs.floor(volumes, strategy, time),
        "models": models,
    }
    igniter = next((m for m in models if m["role"] == "igniter"), None)
    final = next((m for m in reversed(models) if m["role"] == "sustainer"), None)
    if igniter and final:
        a = confusions[(igniter["model"], igniter["version"])]
        b = confusions[(final["model"], final["version"])]
        section["igniter_vs_final"] = fs.compare(a, b, strategy, time)
        section["sensitivity"] = fs.sensitivity(a, b, strategy, time)
    first = next((r["minutes_per_ct"] for r in rounds if r["minutes_per_ct"] is not None), None)
    section["ceiling"] = _ceiling(section, first)
    return section


def fixed_set_headline(section: dict[str, Any]) -> dict[str, Any]:
    """The fixed-set numbers for the report's igniter-versus-final headline (full review is
    the headline rule; the flexible rule beside it)."""
    vs, floor = section.get("igniter_vs_final"), section.get("floor")
    out: dict[str, Any] = {}
    if vs:
        full, flexible = vs[fs.HEADLINE_RULE], vs["flexible"]
        out |= {
            "fixed_set_edit_units_per_ct": full["edit_units_per_ct"],
            "fixed_set_minutes_per_ct": full["minutes_per_ct"],
            "fixed_set_edit_work_ratio": full["edit_work_ratio"],
            "fixed_set_minutes_ratio": full["minutes_ratio"],
            "fixed_set_edit_work_ratio_flexible": flexible["edit_work_ratio"],
            "fixed_set_minutes_ratio_flexible": flexible["minutes_ratio"],
        }
    if floor:
        out |= {
            "floor_minutes_per_ct": floor["full"]["minutes_per_ct"],
            "ceiling_first_round_over_floor": section["ceiling"]["first_round_as_annotated"],
        }
    return out


def _ceiling(section: dict[str, Any], first_round: float | None) -> dict[str, Any]:
    """How many times less than the first round (as annotated) and than the igniter on the
    fixed set a perfect model could cost: the most the loop can show."""
    floor = section["floor"]
    igniter = next((m for m in section["models"] if m["role"] == "igniter"), None)
    return {
        "first_round_as_annotated": fs.ratio(first_round, floor["full"]["minutes_per_ct"]),
        "igniter_fixed_set": {
            rule: fs.ratio(igniter[rule]["minutes_per_ct"], floor[rule]["minutes_per_ct"])
            if igniter
            else None
            for rule in fs.RULES
        },
    }


def _confusions(state: MetricsState, refs: list[Ref]) -> dict[Ref, dict[str, NDArray[np.int64]]]:
    """Per model version: the slice confusion of its pre-annotation of each evaluation volume
    against the volume's label (each label read once; masks one at a time)."""
    doc = state.export()
    wanted = set(refs)
    masks: dict[str, dict[Ref, Blob]] = defaultdict(dict)
    for p in doc.predictions:
        evaluation = p.volume_id in doc.evaluation and p.volume_id not in doc.scored_datasets
        if (p.model, p.version) in wanted and evaluation:  # public-test volumes are not costed
            masks[p.volume_id][(p.model, p.version)] = p.mask
    out: dict[Ref, dict[str, NDArray[np.int64]]] = defaultdict(dict)
    for vid, preds in sorted(masks.items()):
        truth = _mask(state, doc.evaluation[vid])
        for ref, blob in preds.items():
            out[ref][vid] = slice_confusion(_mask(state, blob), truth)
    return out


def _mask(state: MetricsState, blob: Blob) -> NDArray[np.uint8]:
    voxels, _ = nifti_array_from_gz(state.store.get_bytes(*blob))
    return np.asarray(voxels, dtype=np.uint8)


def _f(x: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if x is None else pattern.format(x)


def fixed_set_markdown(section: dict[str, Any] | None) -> list[str]:
    """``report.md``'s fixed-set section: floor and ceiling, per model, igniter → final."""
    if not section:
        return []
    lines = ["", "## Fixed set: every model on the same evaluation volumes", ""]
    if "error" in section:
        return [*lines, f"Not computed: {section['error']}."]
    if not section["models"]:
        return [
            *lines,
            "No model version of this run has pre-annotated a labelled evaluation volume.",
        ]
    floor, ceiling = section["floor"], section["ceiling"]
    lines += [
        f"Each model version's pre-annotations of the {section['volumes']} evaluation volumes, "
        "costed with the annotators' rules and the run's k = "
        f"{_f(section['k_minutes_per_unit'], '{:.4f}')} min per edit unit (fixed in round 1), "
        "nothing submitted. Flexible: half the slices reviewed, nearly-right organs skipped; "
        "full review: every slice. The headline is full review.",
        "",
        f"Floor (a perfect pre-annotation: open_min + check_min * organs present): "
        f"{_f(floor['full']['minutes_per_ct'])} min per CT "
        f"({_f(floor['full']['organs_per_ct'], '{:.1f}')} organs). Ceiling it implies: first "
        f"round as annotated / floor = {_f(ceiling['first_round_as_annotated'], '{:.2f}x')}; "
        f"igniter on the fixed set / floor = "
        f"{_f(ceiling['igniter_fixed_set']['full'], '{:.2f}x')} (full review), "
        f"{_f(ceiling['igniter_fixed_set']['flexible'], '{:.2f}x')} (flexible).",
        "",
        "| round | model | version | flexible: edit units | flexible: min per CT "
        "| full: edit units | full: min per CT |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in section["models"]:
        fl, fu = m["flexible"], m["full"]
        lines.append(
            f"| {m['round']} | {m['role']} | {m['version']} | {_f(fl['edit_units_per_ct'])} | "
            f"{_f(fl['minutes_per_ct'])} | {_f(fu['edit_units_per_ct'])} | "
            f"{_f(fu['minutes_per_ct'])} |"
        )
    if vs := section.get("igniter_vs_final"):
        for rule in fs.RULES:
            r = vs[rule]
            lines.append(
                f"\nIgniter → final sustainer, {rule} ({vs['volumes']} volumes): edit units "
                f"{_f(r['edit_units_per_ct'][0])} → {_f(r['edit_units_per_ct'][1])} "
                f"({_f(r['edit_work_ratio'], '{:.2f}x')}), minutes "
                f"{_f(r['minutes_per_ct'][0])} → {_f(r['minutes_per_ct'][1])} "
                f"({_f(r['minutes_ratio'], '{:.2f}x')})."
            )
    return lines + sensitivity_markdown(section.get("sensitivity"))


def fixed_set_headline_rows(ours: dict[str, Any]) -> list[str]:
    """Rows of ``report.md``'s headline table (``ours``: the report's igniter_vs_final)."""
    if "fixed_set_edit_work_ratio" not in ours and "floor_minutes_per_ct" not in ours:
        return []
    units = ours.get("fixed_set_edit_units_per_ct") or [None, None]
    minutes = ours.get("fixed_set_minutes_per_ct") or [None, None]
    return [
        f"| fixed set: edit units per CT, igniter → final (full review) | {_f(units[0])} → "
        f"{_f(units[1])} | |",
        f"| fixed set: minutes per CT, igniter → final (full review) | {_f(minutes[0])} → "
        f"{_f(minutes[1])} | |",
        f"| fixed set: edit-work ratio, full review (flexible) | "
        f"{_f(ours.get('fixed_set_edit_work_ratio'), '{:.2f}x')} "
        f"({_f(ours.get('fixed_set_edit_work_ratio_flexible'), '{:.2f}x')}) | |",
        f"| fixed set: minutes ratio, full review (flexible) | "
        f"{_f(ours.get('fixed_set_minutes_ratio'), '{:.2f}x')} "
        f"({_f(ours.get('fixed_set_minutes_ratio_flexible'), '{:.2f}x')}) | |",
        f"| floor: a perfect pre-annotation, min per CT | "
        f"{_f(ours.get('floor_minutes_per_ct'))} | |",
        f"| ceiling: first round as annotated / floor | "
        f"{_f(ours.get('ceiling_first_round_over_floor'), '{:.2f}x')} | |",
    ]


def sensitivity_markdown(table: dict[str, Any] | None) -> list[str]:
    """Rows: slice threshold x open minutes; columns: look minutes; cells: the fixed-set
    minutes ratio igniter → final, full review (flexible)."""
    if not table or not table["rows"]:
        return []
    lines = [
        "",
        "## Sensitivity of the fixed-set minutes ratio (recomputed from the stored masks)",
        "",
        f"Cells: igniter → final minutes ratio, full review (flexible). {table['calibration']}.",
        "",
        "| slice IoU ok | open min | " + " | ".join(f"look {c:g} min" for c in fs.CHECK_MIN) + " |",
        "|---|---|" + "---|" * len(fs.CHECK_MIN),
    ]
    cells = {(r["slice_ok"], r["open_min"], r["check_min"]): r for r in table["rows"]}
    for s in fs.SLICE_OK:
        for o in fs.OPEN_MIN:
            row = [cells.get((s, o, c)) for c in fs.CHECK_MIN]
            text = [
                f"{_f(r['full']['minutes_ratio'], '{:.2f}x')} "
                f"({_f(r['flexible']['minutes_ratio'], '{:.2f}x')})"
                if r
                else "-"
                for r in row
            ]
            lines.append(f"| {s} | {o:g} | " + " | ".join(text) + " |")
    units = {r["slice_ok"]: r for r in table["rows"]}  # the same at every open and look minutes
    lines.append(
        "\nEdit-work ratio igniter → final by slice threshold, full review (flexible): "
        + "; ".join(
            f"{s}: {_f(r['full']['edit_work_ratio'], '{:.2f}x')} "
            f"({_f(r['flexible']['edit_work_ratio'], '{:.2f}x')})"
            for s, r in units.items()
        )
        + "."
    )
    return lines
