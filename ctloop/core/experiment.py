"""The transfer experiment in one process: does the sustainer close the igniter's domain gap?

1. Synthesise a labelled public site and a clinical site (train and held-out test splits).
2. Train the igniter on public; measure Dice on the public and the clinical test splits.
3. Fine-tune the sustainer from the igniter on corrected clinical volumes (here the phantom truth
   stands for a full correction), replaying some public volumes; measure again.

``ctloop experiment transfer --preset small --out DIR`` writes ``DIR/result.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from ctloop.core.datasets import (
    DecathlonDataset,
    phantom_volume,
    synthesize_dataset,
    write_decathlon,
)
from ctloop.core.infer import Segmenter
from ctloop.core.metrics import mean_dice, organ_dice
from ctloop.core.model import ModelConfig
from ctloop.core.phantom import SITES, SiteProfile, generate_phantom
from ctloop.core.train import DataSource, TrainConfig, train

log = logging.getLogger("ctloop.experiment")


class Preset(BaseModel):
    size: str
    n_public: int
    n_public_test: int
    n_clinical: int
    n_clinical_test: int
    public_replay: int
    igniter_steps: int
    sustainer_steps: int
    model: ModelConfig


PRESETS: dict[str, Preset] = {
    # Seconds on 2 cores: a smoke test of the whole path, not a meaningful result.
    "tiny": Preset(
        size="tiny", n_public=3, n_public_test=1, n_clinical=2, n_clinical_test=1,
        public_replay=1, igniter_steps=30, sustainer_steps=20,
        model=ModelConfig(spacing=(8.0, 8.0, 8.0), patch=(32, 32, 32), channels=(8, 16, 32),
                          strides=(2, 2)),
    ),
    # A few minutes on 2 cores; the numbers in the README come from this preset.
    "small": Preset(
        size="small", n_public=10, n_public_test=4, n_clinical=8, n_clinical_test=4,
        public_replay=4, igniter_steps=400, sustainer_steps=250,
        model=ModelConfig(),
    ),
}  # fmt: skip


def evaluate(checkpoint: Path, dataset: DecathlonDataset) -> dict[str, Any]:
    """Mean and per-organ Dice of a checkpoint over a labelled dataset."""
    seg = Segmenter(checkpoint)
    per_volume: list[float] = []
    organs: dict[str, list[float]] = {}
    for vol in dataset:
        assert vol.label is not None
        pred = seg(vol.image, vol.affine).label
        per_volume.append(mean_dice(pred, vol.label))
        for organ, d in organ_dice(pred, vol.label).items():
            organs.setdefault(organ, []).append(d)
    return {
        "mean_dice": float(np.mean(per_volume)),
        "per_volume": per_volume,
        "per_organ": {o: float(np.mean(v)) for o, v in organs.items()},
    }


def run_transfer(
    preset_name: str,
    out: Path,
    public_site: SiteProfile | None = None,
    clinical_sites: Sequence[SiteProfile] = (),
    evaluation_site: SiteProfile | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the whole experiment under ``out``; the result is also written to ``out/result.json``.

    The sites default to ``public`` and ``clinical-a``; the clinical training set cycles
    through ``clinical_sites``, the clinical test set comes from ``evaluation_site`` (default:
    the first clinical site).
    """
    preset = PRESETS[preset_name]
    t0 = time.monotonic()
    data = out / "data"
    public = public_site or SITES["public"]
    clinical = list(clinical_sites) or [SITES["clinical-a"]]
    held_out = evaluation_site or clinical[0]
    sets = _synthesize(preset, data, public, clinical, held_out, seed)
    log.info("datasets ready", extra={k: len(v) for k, v in sets.items()})
    names = "+".join(p.name for p in clinical)
    igniter, sustainer = _train_both(preset, out, data, names, seed)
    result: dict[str, Any] = {
        "preset": preset_name,
        "clinical_site": names,
        "sites": {
            "public": public.model_dump(mode="json"),
            "clinical": [p.model_dump(mode="json") for p in clinical],
            "evaluation": held_out.model_dump(mode="json"),
        },
        "seed": seed,
        "igniter": {
            "public_test": evaluate(igniter, sets["public_test"]),
            "clinical_test": evaluate(igniter, sets["clinical_test"]),
        },
        "sustainer": {
            "public_test": evaluate(sustainer, sets["public_test"]),
            "clinical_test": evaluate(sustainer, sets["clinical_test"]),
        },
        "preset_settings": preset.model_dump(),
    }
    result["summary"] = _summary(result, t0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _synthesize(
    preset: Preset,
    data: Path,
    public: SiteProfile,
    clinical: list[SiteProfile],
    held_out: SiteProfile,
    seed: int,
) -> dict[str, DecathlonDataset]:
    """The four labelled splits under ``data``, each from its own seed range."""
    clinical_train = [
        phantom_volume(
            generate_phantom(clinical[i % len(clinical)], seed + 20_000 + i, preset.size),
            f"{clinical[i % len(clinical)].name}_{seed + 20_000 + i:05d}",
        )
        for i in range(preset.n_clinical)
    ]
    return {
        "public": synthesize_dataset(data / "public", public, preset.n_public, seed, preset.size),
        "public_test": synthesize_dataset(
            data / "public_test", public, preset.n_public_test, seed + 10_000, preset.size
        ),
        "clinical": write_decathlon(
            data / "clinical", clinical_train, name="ctloop-synth-clinical"
        ),
        "clinical_test": synthesize_dataset(
            data / "clinical_test",
            held_out,
            preset.n_clinical_test,
            seed + 30_000,
            preset.size,
        ),
    }


def _train_both(
    preset: Preset, out: Path, data: Path, clinical_site: str, seed: int
) -> tuple[Path, Path]:
    """The igniter on public, then the sustainer fine-tuned from it on clinical plus replay.

    Returns the two checkpoint paths.
    """
    igniter = out / "igniter.pt"
    train(
        TrainConfig(
            model=preset.model,
            sources=[DataSource(path=data / "public")],
            out=igniter,
            steps=preset.igniter_steps,
            seed=seed,
            meta={"name": "igniter", "site": "public"},
        )
    )
    sustainer = out / "sustainer.pt"
    train(
        TrainConfig(
            model=preset.model,
            sources=[
                DataSource(path=data / "clinical"),
                DataSource(path=data / "public", limit=preset.public_replay),
            ],
            out=sustainer,
            init_from=igniter,
            steps=preset.sustainer_steps,
            lr=1e-3,
            seed=seed + 1,
            meta={"name": "sustainer", "site": clinical_site},
        )
    )
    return igniter, sustainer


def _summary(result: dict[str, Any], t0: float) -> dict[str, Any]:
    """The headline numbers: Dice before and after, the domain gap and how much of it closed."""
    ig_pub = result["igniter"]["public_test"]["mean_dice"]
    ig_cli = result["igniter"]["clinical_test"]["mean_dice"]
    su_cli = result["sustainer"]["clinical_test"]["mean_dice"]
    gap = ig_pub - ig_cli
    return {
        "igniter_public_dice": ig_pub,
        "igniter_clinical_dice": ig_cli,
        "sustainer_clinical_dice": su_cli,
        "domain_gap": gap,
        "gap_closed_fraction": (su_cli - ig_cli) / gap if gap > 0 else None,
        "seconds": time.monotonic() - t0,
    }
