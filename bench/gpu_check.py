"""GPU check of the segmentation core (run on a machine with a CUDA GPU).

Trains the default model on CPU and on the GPU (bf16 autocast), runs the same training
under ``torchrun`` with NCCL, and checks that sliding-window inference gives the same mask on
GPU as on CPU for the same weights. Prints and writes a JSON summary::

    python -m bench.gpu_check --out /tmp/gpu-check

(from the repository root; run as ``python bench/gpu_check.py`` the folder's ``platform.py``
would shadow the standard library's ``platform``)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctloop.core.datasets import synthesize_dataset
from ctloop.core.infer import Segmenter
from ctloop.core.model import ModelConfig
from ctloop.core.phantom import generate_phantom
from ctloop.core.train import DataSource, TrainConfig
from services.training.torchrun import torchrun_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = args.out
    synthesize_dataset(out / "public", "public", 6, seed=0, size="small")
    result: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cpu = _train(out, args.steps, {"CUDA_VISIBLE_DEVICES": ""}, "cpu")
    gpu = _train(out, args.steps, {}, "gpu")
    result["cpu"], result["gpu_nccl_bf16"] = cpu, gpu
    result["gpu_speedup"] = gpu["steps_per_s"] / cpu["steps_per_s"]
    result.update(_inference(out / "gpu.pt"))
    print(json.dumps(result, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return 0


def _train(out: Path, steps: int, device_env: dict[str, str], name: str) -> dict[str, Any]:
    """The default model trained for ``steps`` under ``torchrun`` (1 process) with
    ``device_env``; its speed and final loss from rank 0's summary."""
    cfg = TrainConfig(model=ModelConfig(), sources=[DataSource(path=out / "public")],
                      out=out / f"{name}.pt", steps=steps, log_every=20)  # fmt: skip
    (out / f"{name}.json").write_text(cfg.model_dump_json())
    env = {**os.environ, **device_env}
    t0 = time.monotonic()
    proc = subprocess.run(
        torchrun_command(out / f"{name}.json", 1), env=env, capture_output=True, text=True
    )
    summary = json.loads((out / f"{name}.ranks" / "rank-0.json").read_text())
    return {
        "rc": proc.returncode,
        "wall_s": time.monotonic() - t0,
        "train_s": summary["seconds"],
        "steps_per_s": summary["steps"] / summary["seconds"],
        "final_loss": float(np.mean(summary["losses"][-10:])),
        "stderr_tail": proc.stderr[-800:],
    }


def _inference(checkpoint: Path) -> dict[str, object]:
    """Sliding-window inference of one phantom on CPU and on the GPU: seconds after a warm-up,
    and the fraction of voxels whose label agrees."""
    phantom = generate_phantom("clinical-a", 3, "medium")
    image = phantom.image.astype(np.float32)
    timings = {}
    masks = {}
    for device in ("cpu", "cuda"):
        seg = Segmenter(checkpoint, device=device)
        seg(image, phantom.affine)  # warm-up
        t0 = time.monotonic()
        r = seg(image, phantom.affine)
        timings[device] = time.monotonic() - t0
        masks[device] = r.label
    return {
        "inference_shape": list(image.shape),
        "inference_s": timings,
        "inference_mask_agreement": float(np.mean(masks["cpu"] == masks["cuda"])),
    }


if __name__ == "__main__":
    sys.exit(main())
