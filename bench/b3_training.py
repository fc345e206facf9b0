"""3. Training scaling: steps per second of ``python -m ctloop.core.train`` under ``torchrun``
with 1 process against 2 processes (DDP; gloo on CPU, NCCL on GPUs), same data and settings.

With more processes each step trains ``nproc`` x the batch, so the comparable number is
samples (patches) per second: the ratio is 2-process samples/s over 1-process samples/s
(2.0 would be linear scaling). On CPU the cores are split between the processes
(``OMP_NUM_THREADS`` = cores / nproc), so both runs use the same cores.
On a GPU machine: ``python -m bench --only training --device cuda --preset full``.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from bench.common import Context, interleaved, result
from ctloop.core.datasets import synthesize_dataset
from ctloop.core.train import DataSource, TrainConfig
from services.training.torchrun import torchrun_command

NAME = "3_training"


def train_once(ctx: Context, nproc: int, run: int) -> dict[str, Any]:
    """One torchrun; rank 0's summary plus the settings it ran with."""
    preset = ctx.preset
    folder = ctx.work / "b3"
    data = folder / "data"
    if not (data / "dataset.json").exists():
        synthesize_dataset(data, "public", 4, seed=300, size=preset.training_size)
    cfg = TrainConfig(
        model=preset.model_config(),
        sources=[DataSource(path=data)],
        out=folder / f"n{nproc}-{run}.pt",
        steps=preset.training_steps,
        log_every=max(1, preset.training_steps),
    )
    cfg_path = folder / f"n{nproc}-{run}.json"
    cfg_path.write_text(cfg.model_dump_json())
    env = dict(os.environ)
    if ctx.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    proc = subprocess.run(
        torchrun_command(cfg_path, nproc), env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun ({nproc}) failed: {proc.stderr[-2000:]}")
    summary = json.loads((folder / f"n{nproc}-{run}.ranks" / "rank-0.json").read_text())
    steps_per_s = summary["steps"] / summary["seconds"]
    samples = cfg.batch_size * cfg.samples_per_volume * nproc
    return {
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * samples,
        "omp_threads": env.get("OMP_NUM_THREADS"),
        "world_size": summary["world_size"],
    }


def run(ctx: Context) -> dict[str, Any]:
    repeats = max(1, ctx.preset.repeats - 1)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}

    def measure(nproc: int) -> Any:
        def side(i: int) -> float:
            out = train_once(ctx, nproc, i)
            runs[nproc].append(out)
            return float(out["samples_per_s"])

        return side

    two, one = interleaved(repeats, measure(2), measure(1))
    backend = "nccl" if ctx.device == "cuda" else "gloo"
    return result(
        NAME,
        "Training scaling",
        f"samples/s, torchrun 2 processes ({backend}) vs 1",
        "patches/s",
        two,
        one,
        {
            "device": ctx.device,
            "backend": backend,
            "steps": ctx.preset.training_steps,
            "phantom_size": ctx.preset.training_size,
            "model": ctx.preset.model_config().model_dump(mode="json"),
            "batch_per_rank": "1 volume x 2 patches",
            "omp_threads": {str(k): v[0]["omp_threads"] for k, v in runs.items() if v},
            "repeats": repeats,
        },
        baseline_name="1 process",
        higher_is_better=True,
        details={
            "steps_per_s": {str(k): [r["steps_per_s"] for r in v] for k, v in runs.items()},
            "note": "ratio = 2-process samples/s ÷ 1-process samples/s (2.0 = linear)",
        },
    )
