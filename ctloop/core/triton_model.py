"""Triton python-backend model: the file published as ``<model>/<version>/model.py``.

It loads ``weights.pt`` from its version folder and runs :class:`ctloop.core.infer.Network`, the
same sliding-window code as in-process inference, on CPU or on the GPU Triton assigns to the
instance. Resampling to and from the model grid happens in the caller (the inference service,
:class:`ctloop.model_repository.TritonSegmenter`), so only model-grid tensors cross to Triton.
Tensors cross the backend boundary as DLPack (torch), never through the stub's numpy path.

Inputs:  INPUT FP32 (x, y, z): the volume on the model grid, windowed to [0, 1]
Outputs: PROBABILITIES FP32 (C, x, y, z): class probabilities on the same grid
"""

import json
import os
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from ctloop.contracts import keys
from ctloop.core.infer import Network
from ctloop.core.model import load_checkpoint


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args['model_instance_device_id']}"
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        cfg, net, _ = load_checkpoint(Path(folder) / keys.MODEL_WEIGHTS)
        self.network = Network(
            cfg,
            net,
            device=device,
            sw_batch_size=int(params["sw_batch_size"]) if "sw_batch_size" in params else None,
            sw_overlap=float(params["sw_overlap"]) if "sw_overlap" in params else None,
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                x = from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT").to_dlpack())
                probs = self.network(x).cpu().contiguous()
                responses.append(
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor.from_dlpack("PROBABILITIES", to_dlpack(probs))]
                    )
                )
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self) -> None:
        del self.network
