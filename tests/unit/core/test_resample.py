"""Label resampling (:mod:`ctloop.core.resample`): the fast paths give scipy's trilinear label."""

import numpy as np
import pytest
import torch

from ctloop.core import resample


def _grids() -> tuple[np.ndarray, np.ndarray]:
    """A model grid and a finer, shifted, anisotropic scanner grid (same orientation)."""
    model = np.diag([3.0, 2.5, 4.0, 1.0])
    model[:3, 3] = [-5.0, 2.0, 7.0]
    scanner = np.diag([0.9, 1.1, 2.0, 1.0])
    scanner[:3, 3] = [-6.0, 1.0, 6.0]
    return model, scanner


@pytest.mark.parametrize("dense", [0.3, 1.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_resampled_argmax_is_the_argmax_of_the_interpolated_probabilities(
    seed, dense, monkeypatch
):
    """Reading uniform cells off the model-grid argmax and interpolating only the mixed ones
    (or, where most are mixed, resampling the slab in full) gives the label that per-class
    trilinear interpolation (scipy, clamped edges) gives."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn((4, 12, 10, 8), generator=g) * 4, dim=0)
    model, scanner = _grids()
    shape = (44, 27, 19)
    monkeypatch.setattr(resample, "DENSE_FRACTION", dense)  # 1.1: never in full
    monkeypatch.setattr(resample, "SLAB_ELEMENTS", 44 * 27 * 4)  # several slabs
    full = []
    real = resample._separable_argmax
    monkeypatch.setattr(resample, "_separable_argmax", lambda *a: full.append(1) or real(*a))
    fast = resample.resample_argmax(probs, model, scanner, shape)
    assert bool(full) == (dense < 1)  # random classes: most voxels are on a boundary
    m = np.linalg.inv(model) @ scanner
    reference = resample._resample_argmax_affine(probs.numpy(), m, shape)
    assert fast.shape == shape and fast.flags.f_contiguous
    np.testing.assert_array_equal(fast, reference)


def test_only_voxels_on_a_class_boundary_are_interpolated(monkeypatch):
    probs = torch.zeros((3, 12, 10, 8))
    probs[1, :6] = 0.9  # class 1 in the lower x half, class 2 in the upper
    probs[2, 6:] = 0.9
    probs[0] = 0.1
    model, scanner = _grids()
    shape = (44, 27, 19)
    interpolated = []
    real = resample._interpolated_argmax

    def counting(rows, strides, x, y, z):
        interpolated.append(len(x[0]))
        return real(rows, strides, x, y, z)

    monkeypatch.setattr(resample, "_interpolated_argmax", counting)
    label = resample.resample_argmax(probs, model, scanner, shape)
    # Only destination x positions inside the source cell x in [5, 6] are mixed.
    src_x = np.clip(
        (scanner[0, 0] * np.arange(shape[0]) + scanner[0, 3] - model[0, 3]) / 3.0, 0, 11
    )
    mixed_x = int(((src_x >= 5) & (src_x < 6)).sum())
    assert sum(interpolated) == mixed_x * shape[1] * shape[2]
    assert set(np.unique(label)) == {1, 2}
    reference = resample._resample_argmax_affine(
        probs.numpy(), np.linalg.inv(model) @ scanner, shape
    )
    np.testing.assert_array_equal(label, reference)


@pytest.mark.parametrize("slab", [1, 37, 1 << 18])
def test_the_class_argmax_is_torchs_first_maximum_slab_by_slab(slab, monkeypatch):
    """The running maximum over classes, a slab at a time, gives torch's argmax, ties to the
    first class included (probabilities on a coarse lattice tie often)."""
    monkeypatch.setattr(resample, "VOXEL_SLAB", slab)
    g = torch.Generator().manual_seed(3)
    probs = torch.randint(0, 4, (6, 9, 7, 5), generator=g).float() / 4
    label = resample.class_argmax(probs)
    assert label.dtype == torch.uint8 and label.shape == (9, 7, 5)
    assert torch.equal(label, probs.argmax(dim=0).to(torch.uint8))
    assert [s.stop - s.start for s in resample.voxel_slabs((6, 9, 7, 5), 70)] == [2] * 4 + [1]
