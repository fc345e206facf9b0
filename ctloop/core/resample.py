"""Label resampling: the argmax of model-grid class probabilities, on the volume's own grid.

:func:`resample_argmax` gives the label trilinear interpolation of every class would give, but
interpolates only where it can change the answer: on a grid that differs from the model's by a
per-axis scale and shift (what ``Spacingd`` produces), voxels whose source cell holds one class
take that class, and only the voxels on a class boundary are interpolated. Any other mapping
takes the general, slower path through ``scipy.ndimage``.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

# Per destination index along one axis: lower source index, upper source index, upper weight.
Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# Marks a destination voxel whose source cell holds more than one class (labels are < this).
MIXED = 255
# Destination voxels per slab of the resampling: 4 M (16 slices of 512 x 512); larger slabs
# are no faster.
SLAB_ELEMENTS = 1 << 22
# Boundary voxels interpolated at once: their class probabilities stay under ~40 MB.
MIXED_CHUNK = 1 << 20
# Above this share of boundary voxels a slab is resampled in full: per voxel, the separable
# resampling costs ~0.4x what gathering a boundary voxel's 8 neighbours does.
DENSE_FRACTION = 0.3
# Class probabilities per pass of the full separable resampling (64 MiB of float32).
SEPARABLE_ELEMENTS = 1 << 24
# Voxels per slab of the per-voxel passes over all classes (the model-grid argmax here, the
# uncertainty in :mod:`ctloop.core.infer`): 256 K, so a slab's temporaries stay in cache.
# Measured on the realistic network's probabilities (10 x 246 x 246 x 128, 2 cores): the
# argmax 0.15 s instead of torch's 0.73 s over the class axis of the whole volume.
VOXEL_SLAB = 1 << 18


def resample_argmax(
    probs: torch.Tensor, src_affine: NDArray, dst_affine: NDArray, dst_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
    """Argmax of the class probabilities resampled (trilinear, edges clamped) onto the
    destination grid.

    The model grid differs from the input grid only by its spacing (``Spacingd`` keeps the
    orientation), so destination voxel -> source voxel is a per-axis scale and shift. A
    trilinear value is a convex combination of the 8 source voxels around it, so where those 8
    share their argmax the resampled argmax is that class too (first-max ties included), and
    nothing needs interpolating: the label is read off the model-grid argmax. Only voxels
    whose source cell straddles a class boundary (a few percent of a CT) get their class
    probabilities interpolated, with the same per-axis lerps in the same order as the full
    separable resampling, so the label is the one that gives. A slab where most voxels are on
    a boundary (an unsure model, a grid hardly finer than the model's) is resampled in full,
    separably, which is then cheaper per voxel. Runs in torch on the probabilities' device, a
    slab of destination slices at a time. Any other mapping takes the general (slower, CPU)
    path.
    """
    m = np.linalg.inv(src_affine) @ dst_affine  # destination voxel -> source voxel
    lin = m[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6):
        return _resample_argmax_affine(probs.float().cpu().numpy(), m, dst_shape)
    p = probs.float()
    n_classes = p.shape[0]
    if n_classes > MIXED:
        raise ValueError(f"at most {MIXED} classes fit a uint8 label, got {n_classes}")
    tx, ty, tz = (
        _linear_taps(m[d, d], m[d, 3], dst_shape[d], p.shape[d + 1], p.device) for d in range(3)
    )
    return _scaled_argmax(p, (tx, ty, tz), dst_shape)


def _scaled_argmax(
    p: torch.Tensor, taps: tuple[Taps, Taps, Taps], dst_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
    """The argmax of class probabilities ``p`` (C, x, y, z) at the destination voxels whose
    source coordinates ``taps`` gives per axis: read off the uniform model-grid cells, the
    boundary voxels interpolated (or a slab mostly on boundaries resampled in full)."""
    tx, ty, tz = taps
    n_classes = p.shape[0]
    # Model-grid cells, (z, y, x) like the label: their class where all 8 corners agree.
    cells = _uniform_cells(class_argmax(p)).permute(2, 1, 0)
    cells = cells.index_select(1, ty[0]).index_select(2, tx[0]).contiguous()  # (Z, Yd, Xd)
    rows = p.permute(1, 2, 3, 0).reshape(-1, n_classes)  # source voxel (x, y, z) -> classes
    strides = (p.shape[2] * p.shape[3], p.shape[3], 1)
    # Filled as (z, y, x): its transpose is the (x, y, z) label in NIfTI's column-major order,
    # so writing the mask needs no reordering copy.
    label_zyx = torch.empty(tuple(reversed(dst_shape)), dtype=torch.uint8, device=p.device)
    slab = max(1, SLAB_ELEMENTS // (dst_shape[0] * dst_shape[1]))
    by_slice: torch.Tensor | None = None  # (z, C, x, y): for slabs resampled in full
    for z0 in range(0, dst_shape[2], slab):
        z = slice(z0, min(dst_shape[2], z0 + slab))
        taps_z = (tz[0][z], tz[1][z], tz[2][z])
        out = label_zyx[z]
        torch.index_select(cells, 0, taps_z[0], out=out)
        mixed = out == MIXED
        n_mixed = int(mixed.sum())
        if n_mixed > DENSE_FRACTION * out.numel():
            if by_slice is None:
                by_slice = p.permute(3, 0, 1, 2).contiguous()
            _separable_argmax(by_slice, tx, ty, taps_z, out)
            continue
        _interpolate_mixed(out, mixed, rows, strides, (tx, ty, taps_z))
    return label_zyx.cpu().numpy().T


def _interpolate_mixed(
    out: torch.Tensor,
    mixed: torch.Tensor,
    rows: torch.Tensor,
    strides: tuple[int, int, int],
    taps: tuple[Taps, Taps, Taps],
) -> None:
    """Sets the boundary voxels (``mixed``) of the slab ``out`` (z, y, x) to the argmax of their
    interpolated class probabilities, :data:`MIXED_CHUNK` voxels at a time."""
    tx, ty, tz = taps
    for part in mixed.nonzero().split(MIXED_CHUNK):  # (n, 3): z within the slab, y, x
        zi, yi, xi = part.unbind(1)
        out[zi, yi, xi] = _interpolated_argmax(
            rows,
            strides,
            (tx[0][xi], tx[1][xi], tx[2][xi]),
            (ty[0][yi], ty[1][yi], ty[2][yi]),
            (tz[0][zi], tz[1][zi], tz[2][zi]),
        )


def _separable_argmax(
    by_slice: torch.Tensor,
    tx: Taps,
    ty: Taps,
    tz: Taps,
    out: torch.Tensor,
) -> None:
    """Fills ``out`` (z, y, x) with the argmax of the class probabilities ``by_slice``
    (z, C, x, y) resampled at the taps: per axis, coarse axes first, each step gathering along
    the outermost axis (contiguous rows) and moving the next one out, (z, C, x, y) ->
    (y, z, C, x) -> (x, y, z, C), so the argmax runs over the last axis."""
    n_x, n_y = len(tx[0]), len(ty[0])
    step = max(1, SEPARABLE_ELEMENTS // (by_slice.shape[1] * n_x * n_y))
    for z0 in range(0, len(tz[0]), step):
        z = slice(z0, min(len(tz[0]), z0 + step))
        pz = _lerp(by_slice, tz[0][z], tz[1][z], tz[2][z])  # (s, C, X, Y)
        py = _lerp(pz.permute(3, 0, 1, 2).contiguous(), *ty)  # (y, s, C, X)
        px = _lerp(py.permute(3, 0, 1, 2).contiguous(), *tx)  # (x, y, s, C)
        out[z] = px.argmax(dim=3).to(torch.uint8).permute(2, 1, 0)  # first max wins ties


def _lerp(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``t`` along its first axis at taps ``lo``/``hi``, weight ``w``."""
    w = w.reshape(-1, *[1] * (t.ndim - 1))
    return t[lo].lerp_(t[hi], w)  # (indexing, not index_select: far faster on CPU threads)


def voxel_slabs(shape: tuple[int, ...], voxels: int | None = None) -> list[slice]:
    """Slices of the first spatial axis of a (C, x, y, z) volume, ~``voxels`` each (default
    :data:`VOXEL_SLAB`)."""
    per = max(1, (voxels or VOXEL_SLAB) // (shape[2] * shape[3]))
    return [slice(x0, min(shape[1], x0 + per)) for x0 in range(0, shape[1], per)]


def class_argmax(p: torch.Tensor) -> torch.Tensor:
    """``p.argmax(dim=0)`` of class scores (C, x, y, z) as uint8, the first maximum winning
    ties as torch's does: a running maximum over the classes, a cache-sized slab at a time
    (reducing over the outermost axis of the whole volume at once is ~5x slower on CPU)."""
    out = torch.zeros(p.shape[1:], dtype=torch.uint8, device=p.device)
    for x in voxel_slabs(tuple(p.shape)):
        q, label = p[:, x], out[x]
        best = q[0].clone()
        for c in range(1, q.shape[0]):
            label.masked_fill_(q[c] > best, c)
            torch.maximum(best, q[c], out=best)
    return out


def _uniform_cells(argmax: torch.Tensor) -> torch.Tensor:
    """Per source voxel (x, y, z): the class shared by the 8 corners of the cell it opens
    (indices clamped at the far edges, as the taps are), or :data:`MIXED`."""

    def next_along(t: torch.Tensor, d: int) -> torch.Tensor:  # t[i + 1], the last one kept
        n = t.shape[d]
        return torch.cat([t.narrow(d, 1, n - 1), t.narrow(d, n - 1, 1)], dim=d)

    same = torch.ones_like(argmax, dtype=torch.bool)
    for d in range(3):
        same = same & next_along(same, d) & (argmax == next_along(argmax, d))
    return torch.where(same, argmax, torch.full_like(argmax, MIXED))


def _interpolated_argmax(
    rows: torch.Tensor,
    strides: tuple[int, int, int],
    x: Taps,
    y: Taps,
    z: Taps,
) -> torch.Tensor:
    """Argmax of the trilinear class probabilities at given voxels, from their taps per axis
    ((lower, upper, weight) each): z first, then y, then x, as the separable resampling."""

    def at(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        base = xs * strides[0] + ys * strides[1]
        return rows[base + z[0]].lerp_(rows[base + z[1]], z[2][:, None])

    lo_x = at(x[0], y[0]).lerp_(at(x[0], y[1]), y[2][:, None])
    hi_x = at(x[1], y[0]).lerp_(at(x[1], y[1]), y[2][:, None])
    return lo_x.lerp_(hi_x, x[2][:, None]).argmax(dim=1).to(torch.uint8)


def _linear_taps(scale: float, shift: float, n_out: int, n_in: int, device: torch.device) -> Taps:
    """Lower and upper source index and upper weight of each destination index along one axis
    (coordinates clamped to the source: scipy's ``mode="nearest"`` for order 1)."""
    src = np.clip(scale * np.arange(n_out, dtype=np.float64) + shift, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)

    def on(a: NDArray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return on(lo), on(hi), on(w)


def _resample_argmax_affine(
    probs: NDArray, m: NDArray, dst_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
    """The general path: one class at a time through ``scipy.ndimage.affine_transform``."""
    best = np.full(dst_shape, -1.0, dtype=np.float32)
    label = np.zeros(dst_shape, dtype=np.uint8)
    for c in range(probs.shape[0]):
        p = ndimage.affine_transform(
            probs[c], m[:3, :3], offset=m[:3, 3], output_shape=dst_shape, order=1, mode="nearest"
        )
        better = p > best
        best[better] = p[better]
        label[better] = c
    return label
