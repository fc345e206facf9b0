"""Triton python-backend model: the file published as ``<model>/<version>/model.py``.

It loads ``weights.pt`` from its version folder and runs :class:`ctloop.core.infer.Segmenter`,
the same code as in-process inference, on CPU or on the GPU Triton assigns to the instance.
Tensors cross the backend boundary as DLPack (torch), never through the stub's numpy path.

Inputs:  IMAGE  FP32 (x, y, z) HU;  AFFINE FP64 (4, 4) voxel -> mm
Outputs: LABELS UINT8 (x, y, z) canonical organ ids;  UNCERTAINTY FP32 (1,)
"""

import json
import os
from pathlib import Path
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from ctloop.core.infer import Segmenter


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args['model_instance_device_id']}"
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.segmenter = Segmenter(
            Path(folder) / "weights.pt",
            device=device,
            sw_batch_size=int(params["sw_batch_size"]) if "sw_batch_size" in params else None,
            sw_overlap=float(params["sw_overlap"]) if "sw_overlap" in params else None,
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                image = from_dlpack(pb_utils.get_input_tensor_by_name(request, "IMAGE").to_dlpack())
                affine = from_dlpack(
                    pb_utils.get_input_tensor_by_name(request, "AFFINE").to_dlpack()
                )
                result = self.segmenter(image.numpy(), affine.numpy())
                labels = torch.from_numpy(result.label)
                uncertainty = torch.tensor([result.uncertainty], dtype=torch.float32)
                responses.append(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor.from_dlpack("LABELS", to_dlpack(labels)),
                            pb_utils.Tensor.from_dlpack("UNCERTAINTY", to_dlpack(uncertainty)),
                        ]
                    )
                )
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self) -> None:
        del self.segmenter
