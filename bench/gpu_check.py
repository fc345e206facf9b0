"""GPU check of the segmentation core (run on a machine with a CUDA GPU).

Trains the same tiny-preset model on CPU and on the GPU (bf16 autocast), runs the same training
under ``torchrun`` with NCCL, and checks that sliding-window inference gives the same mask on
GPU as on CPU for the same weights. Prints and writes a JSON summary::

    python bench/gpu_check.py --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctloop.core.datasets import synthesize_dataset
from ctloop.core.infer import Segmenter
from ctloop.core.model import ModelConfig
from ctloop.core.phantom import generate_phantom
from ctloop.core.train import DataSource, TrainConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = args.out
    synthesize_dataset(out / "public", "public", 6, seed=0, size="small")
    model = ModelConfig()
    result: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def run(device_env: dict[str, str], name: str) -> dict[str, object]:
        cfg = TrainConfig(model=model, sources=[DataSource(path=out / "public")],
                          out=out / f"{name}.pt", steps=args.steps, log_every=20)  # fmt: skip
        (out / f"{name}.json").write_text(cfg.model_dump_json())
        env = {**os.environ, **device_env}
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=1",
                "-m",
                "ctloop.core.train",
                str(out / f"{name}.json"),
            ],
            env=env,
            capture_output=True,
            text=True,
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

    result["cpu"] = run({"CUDA_VISIBLE_DEVICES": ""}, "cpu")
    result["gpu_nccl_bf16"] = run({}, "gpu")
    result["gpu_speedup"] = result["gpu_nccl_bf16"]["steps_per_s"] / result["cpu"]["steps_per_s"]  # type: ignore[index]

    phantom = generate_phantom("clinical-a", 3, "medium")
    image = phantom.image.astype(np.float32)
    timings = {}
    masks = {}
    for device in ("cpu", "cuda"):
        seg = Segmenter(out / "gpu.pt", device=device)
        seg(image, phantom.affine)  # warm-up
        t0 = time.monotonic()
        r = seg(image, phantom.affine)
        timings[device] = time.monotonic() - t0
        masks[device] = r.label
    result["inference_shape"] = list(image.shape)
    result["inference_s"] = timings
    result["inference_mask_agreement"] = float(np.mean(masks["cpu"] == masks["cuda"]))
    print(json.dumps(result, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
