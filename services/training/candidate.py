"""What becomes of a round's candidate: its Dice on the held-out volumes against the model it
started from, the decision, and its publication as the model's next version (manifest last, so
a version is never half-published)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctloop.contracts.payloads import ModelRef
from ctloop.core.datasets import DecathlonDataset
from ctloop.core.infer import Segmenter
from ctloop.core.metrics import mean_dice
from ctloop.core.packaging import package_checkpoint
from ctloop.model_repository import ModelRepository
from ctloop.triton_serving import serving_spec


def holdout_dice(checkpoint: Path, folder: Path) -> float | None:
    """Mean Dice of ``checkpoint`` on the labelled volumes of a Decathlon folder."""
    ds = DecathlonDataset.open(folder)
    if len(ds) == 0:
        return None
    seg = Segmenter(checkpoint)
    scores = [mean_dice(seg(v.image, v.affine).label, v.label) for v in ds if v.label is not None]
    return float(np.mean(scores)) if scores else None


def validate(
    candidate: Path,
    started_from: Path | None,
    holdout: Path,
    holdout_ids: list[str],
    tolerance: float,
) -> tuple[dict[str, Any], str]:
    """The round's metrics, and why the candidate is rejected ("" when it may be published:
    its held-out Dice is not worse than the model it started from, less ``tolerance``)."""
    metrics: dict[str, Any] = {"holdout": holdout_ids}
    metrics["candidate_dice"] = holdout_dice(candidate, holdout)
    if started_from is not None and holdout_ids:
        metrics["serving_dice"] = holdout_dice(started_from, holdout)
    mine, serving = metrics["candidate_dice"], metrics.get("serving_dice")
    if serving is None or mine is None or mine >= serving - tolerance:
        return metrics, ""
    return metrics, f"held-out Dice {mine:.4f} < serving {serving:.4f}"


def publish_candidate(
    repo: ModelRepository,
    model: str,
    candidate: Path,
    round_number: int,
    parent: ModelRef | None,
    metrics: dict[str, Any],
) -> int:
    """Package ``candidate`` and publish it as ``model``'s next version; that version."""
    version = max(repo.published_versions(model), default=0) + 1
    spec = serving_spec(repo.settings, model)
    # A fine-tune keeps its parent's graph: its export takes the new weights (seconds saved).
    template = repo.onnx(parent.model, parent.version) if parent else None
    package = package_checkpoint(
        candidate,
        spec,
        parent_version=parent.version if parent else None,
        metrics=metrics,
        onnx_template=template,
    )
    manifest = {
        **package.manifest,
        "round": round_number,
        "parent": parent.model_dump() if parent else None,
    }
    repo.publish_version(spec, version, package.files, manifest)
    return version
