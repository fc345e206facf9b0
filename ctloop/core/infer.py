"""Inference: MONAI sliding-window segmentation back on the volume's own grid.

Three parts, so the platform can place each where it is cheapest and still run the same code:

- :class:`Preprocessor` resamples a volume (any grid, HU) to the model's grid and windows it;
- :class:`Network` runs the sliding window and gives class probabilities on that grid;
- :func:`finish` scores the uncertainty and resamples the argmax back onto the input grid
  (:mod:`ctloop.core.resample`).

:class:`Segmenter` chains them in-process. The platform runs the preprocessing and the finish
in the inference service and only the network in Triton (:mod:`ctloop.core.triton_model`), so
what crosses to Triton is the model-grid volume (a few MB) instead of the scanner-grid one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose
from numpy.typing import NDArray
from torch import nn

from ctloop.core.model import ModelConfig, load_checkpoint, preprocess_transforms
from ctloop.core.resample import resample_argmax, voxel_slabs
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
        # Names what this preprocessing gives (spacing, HU window, the MONAI that resamples
        # and in which precision): model versions that share it share their inputs.
        spec = {
            "spacing": cfg.spacing,
            "hu_window": cfg.hu_window,
            "monai": monai.__version__,
            "resample_dtype": "float32",
        }
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
        net: nn.Module | None,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        sw_overlap: float | None = None,
        predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.net = net.to(self.device).eval() if net is not None else None
        # What runs each batch of windows: the module, or another runtime's session over the
        # same network (ONNX Runtime on a CPU: :mod:`ctloop.core.runtimes`), or another
        # process's (the Triton pipeline's calls to a version's network.py).
        chosen = predictor if predictor is not None else self.net
        if chosen is None:
            raise ValueError("a Network needs its module or a predictor")
        self.predictor: Callable[[torch.Tensor], torch.Tensor] = chosen
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
            predictor=self.predictor,
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
    uncertainty = _mean_entropy(p)
    label = resample_argmax(p, np.asarray(model_affine), np.asarray(affine), tuple(shape))
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


def _mean_entropy(probs: torch.Tensor) -> float:
    """Mean entropy / log(C) over voxels that may be foreground; 1.0 if the model sees none.
    On the probabilities' device (a GPU's, inside Triton), a cache-sized slab of voxels at a
    time (gathering the region's voxels of the whole volume first took 0.9-2.2 s of a
    realistic CT's finish, this 0.25 s)."""
    total, count = 0.0, 0
    for x in voxel_slabs(tuple(probs.shape)):
        q = probs[:, x]
        region = (1.0 - q[0]) > UNCERTAINTY_REGION_P
        p = q.clamp(1e-8, 1.0)
        total += float(torch.xlogy(p, p).sum(dim=0).mul_(region).sum(dtype=torch.float64))
        count += int(region.sum())
    if count == 0:
        return 1.0
    return -total / count / math.log(probs.shape[0])
