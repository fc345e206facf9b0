"""The inputs every side of a benchmark shares: phantom CTs and one trained checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from bench.common import Context
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.datasets import synthesize_dataset
from ctloop.core.phantom import generate_phantom
from ctloop.core.train import DataSource, TrainConfig, train

log = logging.getLogger("ctloop.bench")

# The thin-slice site: at size "full" its CTs are 512 x 512 x ~260, like a routine abdomen.
SITE = "public"


@dataclass(frozen=True)
class CT:
    image: NDArray[np.float32]  # HU, float (as a scanner's rescaled series)
    affine: NDArray[np.float64]
    label: NDArray[np.uint8]
    nifti_gz: bytes  # what a client uploads

    @property
    def megabytes(self) -> float:
        return self.image.nbytes / 1e6


@lru_cache(maxsize=8)
def phantom_ct(size: str, seed: int) -> CT:
    p = generate_phantom(SITE, seed, size)
    image = p.image.astype(np.float32)
    return CT(image, p.affine, p.label, nifti_gz_bytes(image, p.affine))


def checkpoint(ctx: Context) -> Path:
    """A checkpoint of the preset's model, trained briefly on a few phantoms (made once per run):
    the same weights serve in the platform and in-process."""
    out = ctx.work / "checkpoint" / "model.pt"
    if out.exists():
        return out
    data = ctx.work / "checkpoint" / "data"
    synthesize_dataset(
        data, SITE, 3, seed=900, size="small" if ctx.preset.name != "smoke" else "tiny"
    )
    cfg = TrainConfig(
        model=ctx.preset.model_config(),
        sources=[DataSource(path=data)],
        out=out,
        steps=ctx.preset.train_steps,
        meta={"name": "bench"},
    )
    train(cfg)
    log.info("bench checkpoint trained", extra={"steps": cfg.steps})
    return out
