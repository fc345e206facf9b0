"""What becomes of a round's candidate: its Dice on the held-out volumes against the model it
started from, the decision, and its publication as the model's next version (manifest last, so
a version is never half-published).

The model it started from (the parent version) has usually pre-annotated a held-out volume
already: the inference service re-predicts every volume waiting for annotation with each new
version. Its Dice there is taken from that stored mask (``known``) instead of segmenting the
volume again (issue 21: half of a round's validation); a volume it never predicted is
segmented with the parent's weights as before."""

from __future__ import annotations

from collections.abc import Callable
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

# A volume id -> the mask a model version already predicted for it (scanner grid), or None.
KnownMasks = Callable[[str], np.ndarray | None]


def holdout_dice(
    checkpoint: Path, folder: Path, known: KnownMasks | None = None
) -> tuple[float | None, int]:
    """Mean Dice of ``checkpoint`` on the labelled volumes of a Decathlon folder, and how many
    of them were scored from a mask ``known`` had (the same version's prediction) rather than
    segmented here."""
    ds = DecathlonDataset.open(folder)
    seg: Segmenter | None = None
    scores, reused = [], 0
    for v in ds:
        if v.label is None:
            continue
        mask = known(v.id) if known is not None else None
        if mask is not None and mask.shape == v.label.shape:
            reused += 1
        else:
            seg = seg or Segmenter(checkpoint)
            mask = seg(v.image, v.affine).label
        scores.append(mean_dice(mask, v.label))
    return (float(np.mean(scores)) if scores else None), reused


def validate(
    candidate: Path,
    started_from: Path | None,
    holdout: Path,
    holdout_ids: list[str],
    tolerance: float,
    started_from_masks: KnownMasks | None = None,
) -> tuple[dict[str, Any], str]:
    """The round's metrics, and why the candidate is rejected ("" when it may be published:
    its held-out Dice is not worse than the model it started from, less ``tolerance``).
    ``started_from_masks``: the masks the model it started from already predicted."""
    metrics: dict[str, Any] = {"holdout": holdout_ids}
    metrics["candidate_dice"], _ = holdout_dice(candidate, holdout)
    if started_from is not None and holdout_ids:
        dice, reused = holdout_dice(started_from, holdout, started_from_masks)
        metrics["serving_dice"] = dice
        metrics["serving_dice_from_predictions"] = reused
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
