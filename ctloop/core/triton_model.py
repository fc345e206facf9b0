"""Triton python-backend model: the file published as ``<model>/<version>/model.py``.

It loads ``weights.pt`` from its version folder and runs :class:`ctloop.core.infer.Network`, the
same sliding-window code as in-process inference, on CPU or on the GPU Triton assigns to the
instance (on CPU, when the config's ``cpu_runtime`` is "onnxruntime" and the version has a
``model.onnx``, ONNX Runtime runs each batch of windows: :mod:`ctloop.core.runtimes`), and
then :func:`ctloop.core.infer.finish` (the uncertainty and the resampling back to the scanner
grid) on the same device. Resampling *to* the model grid happens in the caller (the
inference service keeps that input for re-predictions, :class:`ctloop.triton_serving.
TritonSegmenter`). Tensors cross the backend boundary as DLPack (torch), never through the
stub's numpy path. Interface 3 (:mod:`ctloop.core.packaging`).

Inputs:  INPUT FP32 (x, y, z): the volume on the model grid, windowed to [0, 1]
         MODEL_AFFINE, AFFINE FP64 (4, 4), SHAPE INT64 (3): the model grid's and the scanner
         grid's voxel -> mm affines and the scanner grid's shape (optional, all three or none)
Outputs: with the scanner grid: LABELS UINT8 (z, y, x) on it (axes reversed: the memory order
         of a NIfTI volume), UNCERTAINTY FP32 (1),
         STAGES FP64 (2): seconds of the network and of the finish;
         without: PROBABILITIES FP32 (C, x, y, z), class probabilities on the model grid

The pipeline role (config parameter ``role: pipeline``; interface 4 on CPU deployments): the
same file, published once as the long-lived model ``triton.pipeline_model``, holds torch and
MONAI and no weights. Each request also names the version that segments it: NETWORK UINT8 (the
model's name, UTF-8), VERSION INT64 (1) and MODEL_CONFIG UINT8 (the version's model config,
JSON); every batch of windows goes to that version's ``network.py``
(:mod:`ctloop.core.triton_network`) through BLS, and the rest runs here. A new version then
loads without importing torch and MONAI again.
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from ctloop.contracts import keys
from ctloop.core.infer import Network, finish
from ctloop.core.model import ModelConfig, load_checkpoint
from ctloop.core.packaging import PIPELINE_INPUTS, PIPELINE_ROLE
from ctloop.core.runtimes import onnx_predictor

GRID = ("MODEL_AFFINE", "AFFINE", "SHAPE")


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args['model_instance_device_id']}"
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.device = device
        self.sw_batch_size = int(params["sw_batch_size"]) if "sw_batch_size" in params else None
        self.sw_overlap = float(params["sw_overlap"]) if "sw_overlap" in params else None
        self.network: Network | None = None
        if params.get("role") == PIPELINE_ROLE:
            pb_utils.Logger.log_info(
                f"ctloop: {args['model_name']} v{args['model_version']} is the pipeline: each "
                f"version's network runs in its own model, the rest here on {device} "
                f"({torch.get_num_threads()} threads)"
            )
            return
        cfg, net, _ = load_checkpoint(Path(folder) / keys.MODEL_WEIGHTS)
        predictor, runtime = None, "torch"
        onnx = Path(folder) / keys.MODEL_ONNX
        if device == "cpu" and params.get("cpu_runtime") == "onnxruntime" and onnx.exists():
            predictor = onnx_predictor(onnx.read_bytes(), threads=torch.get_num_threads())
            runtime = "onnxruntime"
        self.network = Network(
            cfg,
            net,
            device=device,
            sw_batch_size=self.sw_batch_size,
            sw_overlap=self.sw_overlap,
            predictor=predictor,
        )
        pb_utils.Logger.log_info(
            f"ctloop: {args['model_name']} v{args['model_version']} runs its network with "
            f"{runtime} on {device} ({torch.get_num_threads()} threads)"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._answer(request)))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _answer(self, request: Any) -> list[Any]:
        import numpy as np
        import torch

        x = from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT").to_dlpack())
        grid = [pb_utils.get_input_tensor_by_name(request, n) for n in GRID]
        if any(g is None for g in grid) and not all(g is None for g in grid):
            raise ValueError(f"give all of {', '.join(GRID)} or none of them")
        t0 = time.perf_counter()
        probs = self._network(request)(x)
        if grid[0] is None:
            return [_out("PROBABILITIES", probs.cpu())]
        if probs.is_cuda:  # the network's seconds, not those of its launch
            torch.cuda.synchronize(probs.device)
        # DLPack here too: this stub's numpy path (as_numpy, Tensor(numpy)) was built against
        # numpy 1 and hands numpy 2 garbage (every element the first one).
        model_affine, affine, shape = (from_dlpack(g.to_dlpack()).numpy() for g in grid)
        if model_affine.shape != (4, 4) or affine.shape != (4, 4) or shape.shape != (3,):
            raise ValueError("MODEL_AFFINE and AFFINE must be 4 x 4, SHAPE 3 integers")
        network_s = time.perf_counter() - t0
        label, uncertainty = finish(probs, model_affine, affine, tuple(int(s) for s in shape))
        del probs
        stages = [network_s, time.perf_counter() - t0 - network_s]
        return [
            # (z, y, x): the order the resampling writes and NIfTI stores, so neither side copies
            _out("LABELS", torch.from_numpy(np.ascontiguousarray(label.T))),
            _out("UNCERTAINTY", torch.tensor([uncertainty], dtype=torch.float32)),
            _out("STAGES", torch.tensor(stages, dtype=torch.float64)),
        ]

    def _network(self, request: Any) -> Network:
        """This version's network, or (the pipeline) the one the request names, run by BLS."""
        if self.network is not None:
            return self.network
        names = [t.name for t in PIPELINE_INPUTS]
        named = [pb_utils.get_input_tensor_by_name(request, n) for n in names]
        if any(t is None for t in named):
            raise ValueError(f"the pipeline needs {', '.join(names)}")
        name, version, config = (from_dlpack(t.to_dlpack()).numpy() for t in named)
        model = bytes(name).decode()
        cfg = ModelConfig.model_validate_json(bytes(config))
        return Network(
            cfg,
            None,
            device=self.device,
            sw_batch_size=self.sw_batch_size,
            sw_overlap=self.sw_overlap,
            predictor=_bls_predictor(model, int(version.reshape(-1)[0])),
        )

    def finalize(self) -> None:
        self.network = None


def _bls_predictor(model: str, version: int) -> Any:
    """A batch of windows to ``model`` ``version``'s network (network.py) in this server; its
    logits, on the windows' device, read in place (no copy)."""

    def predict(windows: Any) -> Any:
        request = pb_utils.InferenceRequest(
            model_name=model,
            model_version=version,
            requested_output_names=["LOGITS"],
            inputs=[pb_utils.Tensor.from_dlpack("WINDOWS", to_dlpack(windows.contiguous()))],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model} v{version}: {response.error().message()}")
        logits = pb_utils.get_output_tensor_by_name(response, "LOGITS")
        return from_dlpack(logits.to_dlpack()).to(windows.device)

    return predict


def _out(name: str, tensor: Any) -> Any:
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor.contiguous()))
