import io

import numpy as np
import pytest
import torch

from ctloop.core.datasets import phantom_volume, write_decathlon
from ctloop.core.infer import ModelInput, PreparedVolume, Preprocessor, Segmenter
from ctloop.core.metrics import mean_dice, organ_dice, organ_surface_distance
from ctloop.core.model import TINY_MODEL, ModelConfig
from ctloop.core.organs import ORGAN_IDS
from ctloop.core.phantom import generate_phantom
from ctloop.core.train import DataSource, TrainConfig, train


def test_dice_of_identical_disjoint_and_half_masks():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = ORGAN_IDS["liver"]
    assert organ_dice(truth, truth) == {"liver": 1.0}
    shifted = np.roll(truth, 5, axis=0)
    assert organ_dice(shifted, truth) == {"liver": 0.0}
    half = truth.copy()
    half[2:4] = 0
    assert organ_dice(half, truth)["liver"] == pytest.approx(2 * 32 / (32 + 64))
    assert mean_dice(np.zeros_like(truth), truth) == 0.0  # a missed organ counts as 0


def test_surface_distance_is_in_millimetres():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = ORGAN_IDS["spleen"]
    pred = np.roll(truth, 1, axis=2)
    asd = organ_surface_distance(pred, truth, spacing=(1.0, 1.0, 3.0))["spleen"]
    assert 0.0 < asd <= 3.0
    assert organ_surface_distance(truth, truth, (1.0, 1.0, 1.0))["spleen"] == 0.0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    vols = [phantom_volume(generate_phantom("public", s, "tiny"), f"p{s}") for s in range(2)]
    write_decathlon(root / "ds", vols, "tiny")
    cfg = TrainConfig(
        model=ModelConfig(**TINY_MODEL),
        sources=[DataSource(path=root / "ds")],
        out=root / "tiny.pt",
        steps=3,
    )
    train(cfg)
    return root / "tiny.pt"


def test_segmentation_comes_back_on_the_input_grid(tiny_checkpoint):
    p = generate_phantom("clinical-b", 1, "tiny")
    seg = Segmenter(tiny_checkpoint)(p.image.astype(np.float32), p.affine)
    assert seg.label.shape == p.image.shape
    assert seg.label.dtype == np.uint8
    assert set(np.unique(seg.label)) <= set(ORGAN_IDS.values())
    assert 0.0 <= seg.uncertainty <= 1.0


@pytest.mark.parametrize("spacing", [(4.0, 4.0, 4.0), (3.0, 5.0, 6.0)])
def test_a_column_major_volume_gives_the_same_model_input(spacing):
    """NIfTI readers give column-major arrays; the preprocessor resamples them as their
    row-major transpose (several times faster) and must land on the very same model grid."""
    p = generate_phantom("clinical-b", 2, "small")
    pre = Preprocessor(ModelConfig(spacing=spacing))
    row_major = pre(p.image.astype(np.float32), p.affine)
    reversed_runs = []
    reversed_pre = pre.pre_reversed
    pre.pre_reversed = lambda data: reversed_runs.append(1) or reversed_pre(data)
    column_major = pre(np.asfortranarray(p.image.astype(np.int16)), p.affine)
    assert reversed_runs == [1]  # the transposed (fast) path, not a strided view
    assert column_major.image.flags.c_contiguous
    assert column_major.image.shape == row_major.image.shape
    np.testing.assert_allclose(column_major.image, row_major.image, atol=1e-6)
    np.testing.assert_allclose(column_major.affine, row_major.affine)


def test_segmenter_refuses_a_2d_image(tiny_checkpoint):
    with pytest.raises(ValueError, match="3-D"):
        Segmenter(tiny_checkpoint)(np.zeros((8, 8), np.float32), np.eye(4))


def test_a_fine_tune_keeps_its_parents_architecture_and_patches(tiny_checkpoint, tmp_path):
    """The sustainer's TrainConfig may name another network (the default one here, whose
    patches would not fit these small volumes): a fine-tune trains its parent's."""
    vols = [phantom_volume(generate_phantom("clinical-a", s, "tiny"), f"c{s}") for s in range(2)]
    write_decathlon(tmp_path / "ds", vols, "tiny")
    out = tmp_path / "child.pt"
    train(
        TrainConfig(
            sources=[DataSource(path=tmp_path / "ds")],
            out=out,
            init_from=tiny_checkpoint,
            steps=2,
        )
    )
    child = torch.load(out, map_location="cpu", weights_only=False)
    parent = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    assert child["config"] == parent["config"]


def test_a_prepared_volume_round_trips_and_anything_else_is_refused():
    x = ModelInput(np.random.default_rng(0).random((5, 6, 7), dtype=np.float32), np.eye(4) * 2)
    prepared = PreparedVolume(x, np.diag([0.7, 0.7, 1.5, 1.0]), (40, 41, 20))
    back = PreparedVolume.from_bytes(prepared.to_bytes())
    assert back.shape == (40, 41, 20)
    np.testing.assert_array_equal(back.input.image, x.image)
    np.testing.assert_array_equal(back.input.affine, x.affine)
    np.testing.assert_array_equal(back.affine, prepared.affine)
    wrong = io.BytesIO()
    np.savez(wrong, image=np.zeros((2, 2), np.float32))
    for data in (b"", b"PK\x03\x04 junk", wrong.getvalue()):
        with pytest.raises(ValueError, match="not a prepared volume"):
            PreparedVolume.from_bytes(data)


def test_the_preprocessing_digest_names_spacing_and_window():
    a = Preprocessor(ModelConfig(spacing=(4.0, 4.0, 4.0)))
    assert a.digest == Preprocessor(ModelConfig(spacing=(4.0, 4.0, 4.0))).digest
    assert a.digest != Preprocessor(ModelConfig(spacing=(4.0, 4.0, 5.0))).digest
    assert a.digest != Preprocessor(ModelConfig(hu_window=(-100.0, 200.0))).digest


@pytest.mark.parametrize("slab", [35, 1 << 18])
def test_the_uncertainty_is_the_mean_entropy_over_the_possible_foreground(slab, monkeypatch):
    """Slab by slab, the same number as the entropy of the gathered region (to float32
    rounding); 1.0 where no voxel may be foreground."""
    import math

    from ctloop.core import infer, resample

    monkeypatch.setattr(resample, "VOXEL_SLAB", slab)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((5, 8, 7, 6), generator=g) * 3
    logits[0, :3] += 12  # background-sure voxels: outside the region
    probs = torch.softmax(logits, dim=0)
    region = (1.0 - probs[0]) > infer.UNCERTAINTY_REGION_P
    assert 0 < int(region.sum()) < region.numel()
    p = probs[:, region].double().clamp(1e-8, 1.0)
    expected = float((-(p * p.log()).sum(dim=0) / math.log(5)).mean())
    assert infer._mean_entropy(probs) == pytest.approx(expected, rel=1e-6)
    sure = torch.zeros((5, 4, 3, 2))
    sure[0] = 1.0
    assert infer._mean_entropy(sure) == 1.0
