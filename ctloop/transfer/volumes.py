"""What a transfer run works on: synthetic phantoms of the preset's size, or the user's folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctloop.core.datasets import DecathlonDataset, Volume
from ctloop.core.phantom import generate_phantom
from ctloop.transfer import RunFailed
from ctloop.transfer.presets import SITES, RunPreset
from ctloop.transfer.sites import RunSites


@dataclass
class Volumes:
    """The run's data: id -> (site, image, affine, label or None).

    ``truth`` holds the clinical volumes' reference labels when they are known (phantoms, or a
    labelled clinical folder): the simulated annotators correct against it. It is never
    uploaded: it reaches training only through the annotators' corrections.
    """

    public: dict[str, tuple[NDArray[Any], NDArray[np.float64], NDArray[np.uint8]]]
    clinical: dict[str, tuple[str, NDArray[Any], NDArray[np.float64]]]
    evaluation: dict[str, tuple[NDArray[Any], NDArray[np.float64], NDArray[np.uint8]]]
    truth: dict[str, NDArray[np.uint8]] = field(default_factory=dict)  # clinical, if known
    # labelled public-site volumes never trained on: Dice on the public site (forgetting)
    public_test: dict[str, tuple[NDArray[Any], NDArray[np.float64], NDArray[np.uint8]]] = field(
        default_factory=dict
    )


def synthetic_volumes(
    preset: RunPreset, seed: int, prefix: str = "", sites: RunSites | None = None
) -> Volumes:
    """Phantoms of the run's sites; each set has its own seed range, so no patient repeats."""
    sites = sites or RunSites.resolve()
    public, clinical, evaluation, truth = {}, {}, {}, {}
    for i in range(preset.n_public):
        p = generate_phantom(sites.public, seed + i, preset.size)
        public[f"{prefix}pub-{i:03d}"] = (p.image, p.affine, p.label)
    n = 0
    for site, profile in sites.hospitals.items():
        for _ in range(preset.clinical_per_site):
            p = generate_phantom(profile, seed + 10_000 + n, preset.size)
            vid = f"{prefix}cli-{n:03d}"
            clinical[vid] = (site, p.image, p.affine)
            truth[vid] = p.label
            n += 1
    for i in range(preset.n_evaluation):
        p = generate_phantom(sites.evaluation, seed + 20_000 + i, preset.size)
        evaluation[f"{prefix}eval-{i:03d}"] = (p.image, p.affine, p.label)
    public_test = {}
    for i in range(preset.n_public_test):
        p = generate_phantom(sites.public, seed + 30_000 + i, preset.size)
        public_test[f"{prefix}ptest-{i:03d}"] = (p.image, p.affine, p.label)
    return Volumes(public, clinical, evaluation, truth, public_test)


def folder_volumes(public: Path, clinical: Path, evaluation: Path | None) -> Volumes:
    """The user's data: Decathlon folders (``dataset.json``, ``imagesTr/``, ``labelsTr/``).

    The public and evaluation folders need a label for every volume. The clinical folder's
    labels are optional, but all or none: with them they become the simulated annotators'
    truth; without them people annotate.
    """
    pub = {v.id: (v.image, v.affine, _label(v)) for v in _load(public, labelled=True)}
    cli_vols = _load(clinical, labelled=False)
    unlabelled = [v.id for v in cli_vols if v.label is None]
    if unlabelled and len(unlabelled) < len(cli_vols):
        raise RunFailed(
            f"{clinical}: {len(unlabelled)} of {len(cli_vols)} volumes have no label "
            f"(e.g. {unlabelled[0]}); label all of them (the simulated annotators' truth) or none"
        )
    cli = {v.id: (SITES[i % len(SITES)], v.image, v.affine) for i, v in enumerate(cli_vols)}
    truth = {v.id: _label(v) for v in cli_vols if v.label is not None}
    ev = (
        {v.id: (v.image, v.affine, _label(v)) for v in _load(evaluation, labelled=True)}
        if evaluation
        else {}
    )
    return Volumes(pub, cli, ev, truth)


def _load(folder: Path, labelled: bool) -> list[Volume]:
    vols = list(DecathlonDataset.open(folder))
    if labelled and any(v.label is None for v in vols):
        raise RunFailed(f"{folder}: every volume needs a label")
    return vols


def _label(v: Volume) -> NDArray[np.uint8]:
    assert v.label is not None
    return v.label
