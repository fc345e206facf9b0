"""Inference: MONAI sliding-window segmentation back on the volume's own grid.

Three parts, so the platform can place each where it is cheapest and still run the same code:

- :class:`Preprocessor` resamples a volume (any grid, HU) to the model's grid and windows it;
- :class:`Network` runs the sliding window and gives class probabilities on that grid;
- :func:`finish` scores the uncertainty and resamples the argmax back onto the input grid.

:class:`Segmenter` chains them in-process. The platform runs the preprocessing and the finish
in the inference service and only the network in Triton (:mod:`ctloop.core.triton_model`), so
what crosses to Triton is the model-grid volume (a few MB) instead of the scanner-grid one.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose
from numpy.typing import NDArray
from scipy import ndimage
from torch import nn

from ctloop.core.model import ModelConfig, load_checkpoint, preprocess_transforms
from ctloop.timing import Laps

# Voxels whose foreground probability exceeds this count towards the uncertainty score.
UNCERTAINTY_REGION_P = 0.05


@dataclass
class Segmentation:
    label: NDArray[np.uint8]  # canonical organ ids on the input grid
    uncertainty: float  # mean normalised entropy over the (possibly) foreground region
    # Seconds per stage: preprocess (resample + window), network (sliding window), resample.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInput:
    """A volume on the model's grid, windowed to [0, 1], and that grid's voxel->mm affine."""

    image: NDArray[np.float32]  # (x, y, z)
    affine: NDArray[np.float64]


@dataclass(frozen=True)
class PreparedVolume:
    """A volume ready for the network: its model-grid input, and its own grid (where the label
    goes back). What the inference service keeps per volume and preprocessing, so a volume is
    decoded and resampled once however many model versions segment it."""

    input: ModelInput
    affine: NDArray[np.float64]  # the volume's voxel->mm
    shape: tuple[int, ...]  # (x, y, z)

    def to_bytes(self) -> bytes:
        """An uncompressed ``.npz`` (numbers only, no pickles): ~2 MB for a full CT's input."""
        out = io.BytesIO()
        np.savez(
            out,
            image=self.input.image,
            model_affine=self.input.affine,
            affine=self.affine,
            shape=np.asarray(self.shape, dtype=np.int64),
        )
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PreparedVolume:
        """Raises ``ValueError`` for anything but what :meth:`to_bytes` writes."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                image, model_affine = z["image"], z["model_affine"]
                affine, shape = z["affine"], tuple(int(d) for d in z["shape"])
        except Exception as exc:  # zip, npy and key errors alike
            raise ValueError(f"not a prepared volume ({exc})") from exc
        if image.ndim != 3 or image.dtype != np.float32 or len(shape) != 3:
            raise ValueError(f"not a prepared volume (image {image.shape} {image.dtype})")
        if model_affine.shape != (4, 4) or affine.shape != (4, 4):
            raise ValueError("not a prepared volume (affines must be 4 x 4)")
        return cls(ModelInput(image, model_affine), affine, shape)


class Preprocessor:
    """Resamples a volume in HU on any grid to the model's spacing and windows it."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        # Names what this preprocessing gives (spacing, HU window, the MONAI that resamples):
        # model versions that share it share their inputs.
        spec = {"spacing": cfg.spacing, "hu_window": cfg.hu_window, "monai": monai.__version__}
        self.digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        self.pre = preprocess_transforms(cfg, with_label=False)
        # For column-major volumes (what NIfTI readers give): the same, axes reversed.
        flipped = cfg.model_copy(update={"spacing": tuple(reversed(cfg.spacing))})
        self.pre_reversed = preprocess_transforms(flipped, with_label=False)

    def __call__(self, image: NDArray, affine: NDArray) -> ModelInput:
        """``image`` (x, y, z) in HU with its voxel->mm ``affine``, in either memory order."""
        if image.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {image.shape}")
        volume = np.asarray(image).astype(np.float32, order="K", copy=False)
        affine = np.asarray(affine, dtype=np.float64)
        if volume.flags.c_contiguous or not volume.flags.f_contiguous:
            return self._run(self.pre, volume, affine)
        # A column-major (x, y, z) array is a row-major (z, y, x) one: resampled as that (with
        # the affine's axes reversed), it needs no reordering copy and runs several times faster
        # than through a strided view; the small model-grid result is turned back.
        rev = self._run(self.pre_reversed, volume.T, affine[:, [2, 1, 0, 3]])
        return ModelInput(
            image=np.ascontiguousarray(rev.image.T), affine=rev.affine[:, [2, 1, 0, 3]]
        )

    @staticmethod
    def _run(pre: Compose, volume: NDArray[np.float32], affine: NDArray) -> ModelInput:
        src = MetaTensor(
            _read_only_tensor(volume)[None], affine=torch.as_tensor(affine, dtype=torch.float64)
        )
        x = pre({"image": src})["image"]
        return ModelInput(
            image=np.ascontiguousarray(x.as_tensor()[0].numpy(), dtype=np.float32),
            affine=np.asarray(x.affine, dtype=np.float64),
        )


class Network:
    """The network of a checkpoint under MONAI's sliding window: model-grid volume in, class
    probabilities on the same grid out."""

    def __init__(
        self,
        cfg: ModelConfig,
        net: nn.Module,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        sw_overlap: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.sw_batch_size = sw_batch_size or cfg.sw_batch_size
        self.sw_overlap = cfg.sw_overlap if sw_overlap is None else sw_overlap

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor | NDArray) -> torch.Tensor:
        """``x`` (x, y, z) model-grid input; probabilities (C, x, y, z), float32, on the
        network's device."""
        t = torch.as_tensor(x, dtype=torch.float32)
        if t.ndim != 3:
            raise ValueError(f"expected a 3-D model-grid volume, got shape {tuple(t.shape)}")
        logits = sliding_window_inference(  # one tensor: the predictor returns one
            t[None, None].to(self.device),
            roi_size=self.cfg.patch,
            sw_batch_size=self.sw_batch_size,
            predictor=self.net,
            overlap=self.sw_overlap,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        return torch.softmax(logits.float(), dim=1)[0]


@torch.inference_mode()
def finish(
    probs: torch.Tensor | NDArray,
    model_affine: NDArray,
    affine: NDArray,
    shape: tuple[int, ...],
) -> tuple[NDArray[np.uint8], float]:
    """Labels on the input grid (``affine``, ``shape``) and the uncertainty score, from class
    probabilities (C, x, y, z) on the model grid."""
    p = _read_only_tensor(probs).float()
    uncertainty = _mean_entropy(p.cpu().numpy())
    label = _resample_argmax(p, np.asarray(model_affine), np.asarray(affine), tuple(shape))
    return label, uncertainty


def _read_only_tensor(data: torch.Tensor | NDArray) -> torch.Tensor:
    """A tensor over ``data`` without a copy, also when it is a read-only view of a decoded
    blob or of a gRPC response (torch warns about those; nothing here writes to them)."""
    if isinstance(data, torch.Tensor):
        return data
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(data)


class Segmenter:
    """Loads a checkpoint once; segments volumes given in HU on any grid, in-process."""

    def __init__(
        self,
        checkpoint: Path | bytes,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        sw_overlap: float | None = None,
    ) -> None:
        cfg, net, meta = load_checkpoint(checkpoint)
        self.cfg: ModelConfig = cfg
        self.meta = meta
        self.preprocess = Preprocessor(cfg)
        self.network = Network(cfg, net, device, sw_batch_size, sw_overlap)

    @property
    def sw_batch_size(self) -> int:
        return self.network.sw_batch_size

    @property
    def sw_overlap(self) -> float:
        return self.network.sw_overlap

    def __call__(self, image: NDArray, affine: NDArray) -> Segmentation:
        """``image`` (x, y, z) in HU with its voxel->mm ``affine``."""
        laps = Laps()
        x = self.preprocess(image, affine)
        laps.lap("preprocess")
        probs = self.network(x.image)
        laps.lap("network")
        label, uncertainty = finish(probs, x.affine, affine, image.shape)
        laps.lap("resample")
        return Segmentation(label=label, uncertainty=uncertainty, timings=laps.seconds)


def _mean_entropy(probs: NDArray) -> float:
    """Mean entropy / log(C) over voxels that may be foreground; 1.0 if the model sees none."""
    region = (1.0 - probs[0]) > UNCERTAINTY_REGION_P
    if not region.any():
        return 1.0
    p = np.clip(probs[:, region], 1e-8, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0) / np.log(probs.shape[0])
    return float(entropy.mean())


def _resample_argmax(
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
    # Model-grid cells, (z, y, x) like the label: their class where all 8 corners agree.
    cells = _uniform_cells(p.argmax(dim=0).to(torch.uint8)).permute(2, 1, 0)
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
        for part in mixed.nonzero().split(MIXED_CHUNK):  # (n, 3): z within the slab, y, x
            zi, yi, xi = part.unbind(1)
            out[zi, yi, xi] = _interpolated_argmax(
                rows,
                strides,
                (tx[0][xi], tx[1][xi], tx[2][xi]),
                (ty[0][yi], ty[1][yi], ty[2][yi]),
                (taps_z[0][zi], taps_z[1][zi], taps_z[2][zi]),
            )
    return label_zyx.cpu().numpy().T


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


def _separable_argmax(
    by_slice: torch.Tensor,
    tx: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ty: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tz: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
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
    x: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    y: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    z: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Argmax of the trilinear class probabilities at given voxels, from their taps per axis
    ((lower, upper, weight) each): z first, then y, then x, as the separable resampling."""

    def at(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        base = xs * strides[0] + ys * strides[1]
        return rows[base + z[0]].lerp_(rows[base + z[1]], z[2][:, None])

    lo_x = at(x[0], y[0]).lerp_(at(x[0], y[1]), y[2][:, None])
    hi_x = at(x[1], y[0]).lerp_(at(x[1], y[1]), y[2][:, None])
    return lo_x.lerp_(hi_x, x[2][:, None]).argmax(dim=1).to(torch.uint8)


def _linear_taps(
    scale: float, shift: float, n_out: int, n_in: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
