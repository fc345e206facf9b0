"""What a transfer run works on: synthetic phantoms of the preset's size, or the user's folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctloop.core.datasets import DecathlonDataset
from ctloop.core.phantom import generate_phantom
from ctloop.transfer import RunFailed
from ctloop.transfer.presets import SITES, RunPreset


@dataclass
class Volumes:
    """The run's data: id -> (site, image, affine, label or None)."""

    public: dict[str, tuple[NDArray[Any], NDArray[np.float64], NDArray[np.uint8]]]
    clinical: dict[str, tuple[str, NDArray[Any], NDArray[np.float64]]]
    evaluation: dict[str, tuple[NDArray[Any], NDArray[np.float64], NDArray[np.uint8]]]
    truth: dict[str, NDArray[np.uint8]] = field(default_factory=dict)  # clinical, if known


def synthetic_volumes(preset: RunPreset, seed: int, prefix: str = "") -> Volumes:
    public, clinical, evaluation, truth = {}, {}, {}, {}
    for i in range(preset.n_public):
        p = generate_phantom("public", seed + i, preset.size)
        public[f"{prefix}pub-{i:03d}"] = (p.image, p.affine, p.label)
    n = 0
    for site in SITES:
        for _ in range(preset.clinical_per_site):
            p = generate_phantom("clinical-a", seed + 10_000 + n, preset.size)
            vid = f"{prefix}cli-{n:03d}"
            clinical[vid] = (site, p.image, p.affine)
            truth[vid] = p.label
            n += 1
    for i in range(preset.n_evaluation):
        p = generate_phantom("clinical-a", seed + 20_000 + i, preset.size)
        evaluation[f"{prefix}eval-{i:03d}"] = (p.image, p.affine, p.label)
    return Volumes(public, clinical, evaluation, truth)


def folder_volumes(public: Path, clinical: Path, evaluation: Path | None) -> Volumes:
    """The user's data: Decathlon folders (``dataset.json``) or plain NIfTI folders."""

    def load(folder: Path, labelled: bool) -> list[Any]:
        ds = DecathlonDataset.open(folder)
        vols = list(ds)
        if labelled and any(v.label is None for v in vols):
            raise RunFailed(f"{folder}: every volume needs a label")
        return vols

    pub = {v.id: (v.image, v.affine, v.label) for v in load(public, True)}
    cli = {
        v.id: (SITES[i % len(SITES)], v.image, v.affine)
        for i, v in enumerate(load(clinical, False))
    }
    ev = {v.id: (v.image, v.affine, v.label) for v in load(evaluation, True)} if evaluation else {}
    return Volumes(pub, cli, ev)
