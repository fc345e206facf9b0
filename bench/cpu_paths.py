"""``python -m bench.cpu_paths``: the realistic network's CPU paths, measured on this machine
(issue 21: keep the fastest one whose masks match fp32 torch).

The network is the ``full`` run preset's (1.5 x 1.5 x 2 mm grid, channels 32-256, patch
128 x 128 x 96), trained briefly on phantoms (speed, not accuracy: its masks only have to be
masks a trained network makes). The CT is a 512 x 512 x ~260 phantom, resampled once to the
model grid; each candidate runs MONAI's sliding window over that input, ABAB-interleaved with
the fp32 baseline (the same input, the same weights), and is compared with it:

- ``fp32``: torch as the platform runs it today (the baseline);
- ``channels_last``: weights and each window in ``channels_last_3d``;
- ``bf16``: autocast to bfloat16 (only fast where the CPU has AVX-512 BF16 or AMX; on this
  machine, AVX2 only, torch ran it on one core and one pass had not ended after 8 min against
  18 s for fp32, so the recorded run leaves it out);
- ``compile``: ``torch.compile`` (its compile time is reported apart);
- ``batch1`` / ``batch4``: the sliding window's batch of windows (the platform's is 2);
- ``overlap0.1``: less window overlap (0.25 today): fewer windows, other masks;
- ``onnxruntime``: the network exported to ONNX (torch's dynamo exporter, the window batch
  dynamic), run by ONNX Runtime's CPU provider with as many threads as torch (what Triton's
  CPU instances run); ``onnxruntime_batch1`` / ``onnxruntime_batch4``: with other window batches;
- ``openvino`` / ``openvino_f32``: the same ONNX file compiled by OpenVINO for the CPU, with its
  own precision choice / held to f32 (``INFERENCE_PRECISION_HINT``).

The export and compile times are reported apart (``compile s``): a model version pays them once,
when it is published or loaded.

Per candidate: the median seconds of the network stage, the ratio to fp32 in the same run, and
the per-organ Dice of its mask against fp32's (organs fp32 finds; the issue's bar is 0.999).
Results: ``bench/results/cpu_paths.json`` and ``.md`` (with the machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from bench.common import RESULTS_DIR, machine, median
from bench.workload import phantom_ct
from ctloop.core.datasets import synthesize_dataset
from ctloop.core.infer import Preprocessor
from ctloop.core.model import ModelConfig, load_checkpoint
from ctloop.core.organs import FOREGROUND, ORGAN_IDS
from ctloop.core.runtimes import export_onnx, onnx_predictor
from ctloop.core.train import DataSource, TrainConfig, train
from ctloop.transfer.presets import PRESETS as RUN_PRESETS

log = logging.getLogger("ctloop.bench")
CANDIDATES = (
    "fp32",
    "channels_last",
    "bf16",
    "compile",
    "batch1",
    "batch4",
    "overlap0.1",
    "onnxruntime",
    "onnxruntime_batch1",
    "onnxruntime_batch4",
    "openvino",
    "openvino_f32",
)
RUNTIMES = ("onnxruntime", "onnxruntime_batch1", "onnxruntime_batch4", "openvino", "openvino_f32")


def realistic_checkpoint(work: Path, steps: int) -> Path:
    """The ``full`` run preset's network trained ``steps`` steps on three phantoms (cached)."""
    out = work / f"full-{steps}" / "model.pt"
    if out.exists():
        return out
    data = work / "data"
    if not data.exists():
        synthesize_dataset(data, "public", 3, seed=900, size="small")
    cfg = TrainConfig(
        model=ModelConfig.model_validate(RUN_PRESETS["full"].model),
        sources=[DataSource(path=data)],
        out=out,
        steps=steps,
        log_every=1,
        meta={"name": "bench-cpu-paths"},
    )
    t0 = time.perf_counter()
    train(cfg)
    print(f"[cpu-paths] trained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _predictor(net: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "channels_last":
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        return lambda x: net(x.contiguous(memory_format=torch.channels_last_3d)).float()
    if kind == "bf16":

        def bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x).float()

        return bf16
    return net


def _runtime_predictor(kind: str, onnx: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime's or OpenVINO's session over ``onnx``, as a sliding-window predictor."""
    if kind.startswith("onnxruntime"):  # what Triton's CPU instances run
        return onnx_predictor(onnx.read_bytes(), threads=torch.get_num_threads())
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY"}
    if kind == "openvino_f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(str(onnx), "CPU", config)
    request = compiled.create_infer_request()

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.numpy()})
        return torch.from_numpy(np.array(next(iter(out.values()))))

    return predict


class Candidate:
    def __init__(self, kind: str, cfg: ModelConfig, checkpoint: Path, work: Path) -> None:
        _, net, _ = load_checkpoint(checkpoint)
        self.kind, self.cfg = kind, cfg
        self.batch = {"batch1": 1, "batch4": 4}.get(kind.split("_")[-1], cfg.sw_batch_size)
        self.overlap = 0.1 if kind == "overlap0.1" else cfg.sw_overlap
        self.compile_s = 0.0
        if kind == "compile":
            t0 = time.perf_counter()
            net = torch.compile(net)  # type: ignore[assignment]
            with torch.inference_mode():
                net(torch.zeros(self.batch, 1, *cfg.patch))
            self.compile_s = time.perf_counter() - t0
        if kind in RUNTIMES:
            t0 = time.perf_counter()
            onnx = work / f"{checkpoint.parent.name}.onnx"
            if not onnx.exists():
                raise FileNotFoundError(f"{onnx}: export the network first (main does)")
            self.predict = _runtime_predictor(kind, onnx)
            with torch.inference_mode():
                self.predict(torch.zeros(self.batch, 1, *cfg.patch))
            self.compile_s = time.perf_counter() - t0
        else:
            self.predict = _predictor(net, kind)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Seconds of the network stage, and the argmax labels on the model grid."""
        t = torch.as_tensor(x, dtype=torch.float32)[None, None]
        t0 = time.perf_counter()
        logits = sliding_window_inference(
            t,
            roi_size=self.cfg.patch,
            sw_batch_size=self.batch,
            predictor=self.predict,
            overlap=self.overlap,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        labels = torch.argmax(logits, dim=1)[0].to(torch.uint8).numpy()
        return time.perf_counter() - t0, labels


def dice_per_organ(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice of each organ ``ref`` contains."""
    out = {}
    for organ in FOREGROUND:
        k = ORGAN_IDS[organ]
        r, o = ref == k, ours == k
        if r.any():
            out[organ] = float(2 * np.logical_and(r, o).sum() / (r.sum() + o.sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_paths", description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="brief training of the network")
    parser.add_argument("--size", default="full", help="the CT phantom's size (full: 512x512)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, ABAB")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES[1:]))
    parser.add_argument("--work", type=Path, default=Path(".ctloop/bench-cpu-paths"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.candidates) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidates {sorted(unknown)}; known: {', '.join(CANDIDATES)}")
    torch.manual_seed(0)
    ckpt = realistic_checkpoint(args.work, args.steps)
    cfg, _, _ = load_checkpoint(ckpt)
    ct = phantom_ct(args.size, 0)
    x = Preprocessor(cfg)(ct.image, ct.affine).image
    print(f"[cpu-paths] CT {ct.image.shape} -> model grid {x.shape}", flush=True)
    export_s = None
    if set(args.candidates) & set(RUNTIMES):
        t0 = time.perf_counter()
        onnx = export_onnx(load_checkpoint(ckpt)[1], cfg)  # as at publish, checked on a window
        (args.work / f"{ckpt.parent.name}.onnx").write_bytes(onnx)
        export_s = time.perf_counter() - t0
        print(f"[cpu-paths] exported to ONNX in {export_s:.0f} s", flush=True)
    fp32 = Candidate("fp32", cfg, ckpt, args.work)
    _, ref = fp32(x)  # warm-up, and the reference mask
    results: dict[str, Any] = {}
    for kind in args.candidates:
        cand = Candidate(kind, cfg, ckpt, args.work)
        ours_s: list[float] = []
        base_s: list[float] = []
        labels = ref
        for i in range(args.repeats):  # ABAB: load that comes and goes hits both
            for side in ("base", "ours") if i % 2 == 0 else ("ours", "base"):
                if side == "base":
                    base_s.append(fp32(x)[0])
                else:
                    s, labels = cand(x)
                    ours_s.append(s)
        dice = dice_per_organ(labels, ref)
        results[kind] = {
            "seconds_median": median(ours_s),
            "fp32_seconds_median": median(base_s),
            "ratio": median(ours_s) / median(base_s),
            "seconds": ours_s,
            "fp32_seconds": base_s,
            "compile_s": cand.compile_s,
            "dice_vs_fp32": dice,
            "min_dice": min(dice.values()) if dice else None,
            "sw_batch_size": cand.batch,
            "sw_overlap": cand.overlap,
        }
        r = results[kind]
        print(
            f"[cpu-paths] {kind}: {r['seconds_median']:.1f} s vs fp32 "
            f"{r['fp32_seconds_median']:.1f} s = {r['ratio']:.2f}x; min Dice vs fp32 "
            f"{r['min_dice'] if r['min_dice'] is None else round(r['min_dice'], 4)}",
            flush=True,
        )
    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "avx512": "avx512" in Path("/proc/cpuinfo").read_text(),
        "torch": torch.__version__,
        "runtimes": _runtime_versions(),
        "onnx_export_s": export_s,
        "threads": torch.get_num_threads(),
        "network": RUN_PRESETS["full"].model,
        "train_steps": args.steps,
        "ct_shape": list(ct.image.shape),
        "model_grid_shape": list(x.shape),
        "organs_in_fp32_mask": sorted(dice_per_organ(ref, ref)),
        "repeats": args.repeats,
        "candidates": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_paths.json").write_text(json.dumps(doc, indent=2))
    (args.out / "cpu_paths.md").write_text(render(doc))
    print(render(doc))
    return 0


def _runtime_versions() -> dict[str, str]:
    out = {}
    for module in ("onnxruntime", "openvino"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            continue
    return out


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"CPU paths of the realistic network ({doc['generated_at']}, {m['cpu']}, {m['cores']} "
        f"cores, AVX-512: {'yes' if doc['avx512'] else 'no'}, torch "
        f"{doc['torch']}, {doc['threads']} threads): CT {doc['ct_shape']} on the model grid "
        f"{doc['model_grid_shape']}, network trained {doc['train_steps']} steps; "
        f"{doc['repeats']} runs per side, ABAB with fp32."
        + (
            f" ONNX export (once per model version): {doc['onnx_export_s']:.0f} s; "
            f"runtimes {doc['runtimes']}."
            if doc.get("onnx_export_s") is not None
            else ""
        ),
        "",
        "| candidate | network s (median) | fp32 s, same run | ratio | min organ Dice vs fp32 "
        "| compile s |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in doc["candidates"].items():
        md = "-" if r["min_dice"] is None else f"{r['min_dice']:.4f}"
        lines.append(
            f"| {kind} | {r['seconds_median']:.1f} | {r['fp32_seconds_median']:.1f} | "
            f"{r['ratio']:.2f} | {md} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
