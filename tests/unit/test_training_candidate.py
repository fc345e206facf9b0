"""The held-out Dice of a round's candidate and of the model it started from
(services/training/candidate.py): a mask the model already predicted is used only when it fits."""

from __future__ import annotations

import numpy as np
import pytest

from ctloop.core.datasets import Volume, write_decathlon
from ctloop.core.infer import Segmenter
from ctloop.core.metrics import mean_dice
from ctloop.core.model import TINY_MODEL, ModelConfig, build_network, save_checkpoint
from services.training.candidate import holdout_dice, validate
from tests.helpers.volumes import phantom


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("candidate")
    cfg = ModelConfig.model_validate(TINY_MODEL)
    save_checkpoint(root / "model.pt", cfg, build_network(cfg))
    p = phantom("clinical-a", 7)
    write_decathlon(
        root / "holdout", [Volume(id="v1", image=p.image, affine=p.affine, label=p.label)], "h"
    )
    return root, p


def test_a_stored_mask_that_fits_is_scored_instead_of_segmenting(held_out):
    root, p = held_out
    dice, reused = holdout_dice(root / "model.pt", root / "holdout", {"v1": p.label}.get)
    assert (dice, reused) == (pytest.approx(1.0), 1)


def test_without_one_or_with_one_of_another_shape_the_volume_is_segmented(held_out):
    root, p = held_out
    segmented = mean_dice(Segmenter(root / "model.pt")(p.image, p.affine).label, p.label)
    assert holdout_dice(root / "model.pt", root / "holdout") == (pytest.approx(segmented), 0)
    wrong = {"v1": np.zeros((3, 3, 3), np.uint8)}.get
    assert holdout_dice(root / "model.pt", root / "holdout", wrong) == (
        pytest.approx(segmented),
        0,
    )
    nothing = {}.get
    assert holdout_dice(root / "model.pt", root / "holdout", nothing)[1] == 0


def test_the_started_from_masks_decide_and_are_counted(held_out):
    root, p = held_out
    metrics, why = validate(
        root / "model.pt", root / "model.pt", root / "holdout", ["v1"], 0.0, {"v1": p.label}.get
    )
    assert metrics["serving_dice"] == pytest.approx(1.0)
    assert metrics["serving_dice_from_predictions"] == 1
    assert metrics["candidate_dice"] < 1.0 and why.startswith("held-out Dice")
