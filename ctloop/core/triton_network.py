"""Triton python-backend model: a version's network alone (``<model>/<version>/network.py``).

Interface 4, on CPU deployments (:mod:`ctloop.core.packaging`): the version runs only its
network, one batch of sliding windows per request; the sliding window, the uncertainty and the
resampling back run in the long-lived pipeline model (:mod:`ctloop.core.triton_model` in its
pipeline role), which calls this one per batch (Triton's business logic scripting, BLS). With
ONNX Runtime (the version's ``model.onnx``, ``cpu_runtime: onnxruntime``) this file imports
numpy and onnxruntime only: a new version loads in a fraction of a second, where importing
torch and MONAI took ~2.9 s of every round (issue 21). Without a ``model.onnx`` (or with
``cpu_runtime: torch``) it runs the weights with torch.

Inputs:  WINDOWS FP32 (N, 1, *patch): a batch of windows of the model-grid volume
Outputs: LOGITS FP32 (N, C, *patch)

Tensors cross the backend boundary as DLPack, never through the stub's numpy path (built
against numpy 1: it hands numpy 2 garbage).
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The names of :mod:`ctloop.contracts.keys` (not imported: this file imports nothing it can
# do without, and a test checks the two agree).
WEIGHTS = "weights.pt"
ONNX = "model.onnx"
INPUT_NAME = "image"  # the exported graph's (ctloop.core.runtimes)
OUTPUT_NAME = "logits"


def _threads() -> int:
    """What the torch default would be (OMP_NUM_THREADS, else the CPUs this process may use),
    without importing torch."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


def _quiet_consumed_capsules() -> None:
    """The stub takes numpy's DLPack capsule and renames it in a way numpy's capsule destructor
    does not expect, which then prints an "unraisable" ValueError for every response (the data
    is copied and freed correctly: measured, no growth over 25 requests of 50 MB). Only that
    message is dropped; any other unraisable error is reported as before."""
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, ValueError) and "PyCapsule_GetPointer" in str(exc):
            return
        default(unraisable)

    sys.unraisablehook = hook


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        gpu = args.get("model_instance_kind") == "GPU"
        self._onnx = None
        self._torch: Any = None
        if not gpu and params.get("cpu_runtime") == "onnxruntime" and (folder / ONNX).exists():
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = _threads()
            opts.inter_op_num_threads = 1
            # No spin-waiting after a batch: its threads would take the cores from the
            # pipeline process, which aggregates the windows and resamples meanwhile (quick
            # network, 8 calls each: 0.43-0.50 s a volume instead of 0.59-0.68 s).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3  # errors only: its warnings name every graph optimisation
            model = (folder / ONNX).read_bytes()
            self._onnx = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            runtime, device = "onnxruntime", "cpu"
            _quiet_consumed_capsules()
        else:
            import torch

            from ctloop.core.model import load_checkpoint

            device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
            _, net, _ = load_checkpoint(folder / WEIGHTS)
            self._torch = net.to(device).eval()
            runtime = "torch"
            self._device = torch.device(device)
        pb_utils.Logger.log_info(
            f"ctloop: {args['model_name']} v{args['model_version']} network runs with "
            f"{runtime} on {device}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                windows = pb_utils.get_input_tensor_by_name(request, "WINDOWS")
                out = self._logits(windows)
                responses.append(pb_utils.InferenceResponse([out]))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _logits(self, windows: Any) -> Any:
        if self._onnx is not None:
            x = np.from_dlpack(windows)
            if x.ndim != 5 or x.shape[1] != 1:
                raise ValueError(f"WINDOWS must be (N, 1, x, y, z), got {x.shape}")
            logits = self._onnx.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x)})[0]
            return pb_utils.Tensor.from_dlpack("LOGITS", np.ascontiguousarray(logits))
        import torch
        from torch.utils.dlpack import from_dlpack, to_dlpack

        t = from_dlpack(windows.to_dlpack())
        if t.ndim != 5 or t.shape[1] != 1:
            raise ValueError(f"WINDOWS must be (N, 1, x, y, z), got {tuple(t.shape)}")
        with torch.inference_mode():
            logits = self._torch(t.to(self._device)).float().contiguous()
        return pb_utils.Tensor.from_dlpack("LOGITS", to_dlpack(logits))

    def finalize(self) -> None:
        self._onnx = None
        self._torch = None
