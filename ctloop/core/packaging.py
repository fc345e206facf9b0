"""A trained checkpoint as a Triton model-repository version (pure: files, config, manifest).

The python-backend ``model.py`` (:mod:`ctloop.core.triton_model`) loads ``weights.pt`` and runs
the same sliding-window network as in-process code, on CPU or GPU: model-grid volume in; given
the scanner grid too, the labels on that grid and the uncertainty out (resampled back where the
network ran, on the GPU in a GPU deployment), else class probabilities on the model grid (see
:class:`ctloop.triton_serving.TritonSegmenter`).
Publishing the package into S3 is :meth:`ctloop.model_repository.ModelRepository.publish_version`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctloop.contracts import keys
from ctloop.contracts.triton import ModelSpec, TensorSpec
from ctloop.core.model import load_checkpoint
from ctloop.core.runtimes import ExportRejected, export_onnx

log = logging.getLogger("ctloop.packaging")

# Read, never imported here: they import triton_python_backend_utils, which only Triton has.
TRITON_MODEL_PY = Path(__file__).with_name("triton_model.py")
TRITON_NETWORK_PY = Path(__file__).with_name("triton_network.py")
NETWORK_PY = "network.py"  # a version's network alone (interface 4)

INPUTS = (
    TensorSpec("INPUT", "TYPE_FP32", (-1, -1, -1)),
    # the scanner grid, to answer labels on it (interface 3; a request without them gets
    # probabilities, and an interface-2 model.py never reads them)
    TensorSpec("MODEL_AFFINE", "TYPE_FP64", (4, 4), optional=True),
    TensorSpec("AFFINE", "TYPE_FP64", (4, 4), optional=True),
    TensorSpec("SHAPE", "TYPE_INT64", (3,), optional=True),
)
OUTPUTS = (
    TensorSpec("PROBABILITIES", "TYPE_FP32", (-1, -1, -1, -1)),
    TensorSpec("LABELS", "TYPE_UINT8", (-1, -1, -1)),  # (z, y, x): NIfTI's memory order
    TensorSpec("UNCERTAINTY", "TYPE_FP32", (1,)),
    TensorSpec("STAGES", "TYPE_FP64", (2,)),  # seconds: network, resample
)
# What a version's model.py takes and gives; in its manifest, checked before it is used.
# 3: model-grid input and the scanner grid; labels on that grid, uncertainty and stage seconds
#    out (probabilities when the grid is left out). 2: model-grid input, probabilities out (the
#    caller resampled 300 MB of them for a 512 x 512 CT). 1, the first, took the scanner-grid CT.
# 4: as 3, plus ``network.py``: the network alone, one batch of windows per request (WINDOWS
#    in, LOGITS out), which CPU deployments load as the version while the long-lived pipeline
#    model (model.py in its pipeline role) runs the rest and calls it; GPU deployments load
#    model.py as in 3 (:func:`version_spec`).
# One model config (the union above) serves 2 and 3: the client asks each for its own outputs.
INTERFACE = 4
SUPPORTED_INTERFACES = (2, 3, 4)

WINDOWS = TensorSpec("WINDOWS", "TYPE_FP32", (-1, 1, -1, -1, -1))
LOGITS = TensorSpec("LOGITS", "TYPE_FP32", (-1, -1, -1, -1, -1))
# What the pipeline takes besides a version's inputs: which version, and its model config.
PIPELINE_INPUTS = (
    TensorSpec("NETWORK", "TYPE_UINT8", (-1,)),  # the model's name, UTF-8
    TensorSpec("VERSION", "TYPE_INT64", (1,)),
    TensorSpec("MODEL_CONFIG", "TYPE_UINT8", (-1,)),  # JSON
)
PIPELINE_ROLE = "pipeline"  # the config parameter ``role`` of the pipeline model


@dataclass(frozen=True)
class TritonPackage:
    spec: ModelSpec
    files: dict[str, bytes]
    manifest: dict[str, Any]


def segmentation_spec(
    name: str,
    gpu: bool = False,
    instance_count: int = 1,
    sw_batch_size: int | None = None,
    sw_overlap: float | None = None,
    cpu_runtime: str = "onnxruntime",
) -> ModelSpec:
    """``cpu_runtime``: what runs the network on a CPU instance, "onnxruntime" (the version's
    ``model.onnx``; torch where a version has none) or "torch"; a GPU instance runs torch."""
    params = [("cpu_runtime", cpu_runtime)]
    if sw_batch_size is not None:
        params.append(("sw_batch_size", str(sw_batch_size)))
    if sw_overlap is not None:
        params.append(("sw_overlap", str(sw_overlap)))
    return ModelSpec(
        name=name,
        inputs=INPUTS,
        outputs=OUTPUTS,
        instance_count=instance_count,
        instance_kind="KIND_GPU" if gpu else "KIND_CPU",
        parameters=tuple(params),
    )


def network_spec(name: str, instance_count: int = 1, cpu_runtime: str = "onnxruntime") -> ModelSpec:
    """A version of interface 4 served as its network alone (``network.py``), on CPU."""
    return ModelSpec(
        name=name,
        inputs=(WINDOWS,),
        outputs=(LOGITS,),
        instance_count=instance_count,
        parameters=(("cpu_runtime", cpu_runtime),),
        default_model_filename=NETWORK_PY,
    )


def pipeline_spec(
    name: str,
    instance_count: int = 1,
    sw_batch_size: int | None = None,
    sw_overlap: float | None = None,
) -> ModelSpec:
    """The long-lived pipeline model (CPU): a version's inputs and outputs, plus which version
    segments the request (:data:`PIPELINE_INPUTS`)."""
    full = segmentation_spec(
        name, instance_count=instance_count, sw_batch_size=sw_batch_size, sw_overlap=sw_overlap
    )
    required = tuple(
        TensorSpec(t.name, t.data_type, t.dims)
        for t in INPUTS  # the grid too: labels out
    )
    return ModelSpec(
        name=name,
        inputs=required + PIPELINE_INPUTS,
        outputs=tuple(t for t in OUTPUTS if t.name != "PROBABILITIES"),
        instance_count=instance_count,
        parameters=(("role", PIPELINE_ROLE), *full.parameters),
    )


def pipeline_files() -> dict[str, bytes]:
    """What a version of the pipeline model holds: ``model.py`` (in its pipeline role)."""
    return {"model.py": TRITON_MODEL_PY.read_bytes()}


def package_checkpoint(
    checkpoint: Path,
    spec: ModelSpec,
    parent_version: int | None = None,
    metrics: dict[str, Any] | None = None,
    onnx: bool = True,
    onnx_template: bytes | None = None,
) -> TritonPackage:
    """Files and manifest of one model version built from ``checkpoint``: the weights, the
    python-backend model, and (``onnx``) the network exported for ONNX Runtime when the export
    computes what torch does (else the manifest says why not, and CPUs run torch).
    ``onnx_template``: the parent version's ``model.onnx``, whose graph takes the new weights
    when it fits (see :func:`ctloop.core.runtimes.export_onnx`)."""
    weights = checkpoint.read_bytes()
    cfg, net, meta = load_checkpoint(weights)  # refuse a checkpoint that does not load
    files = {
        "model.py": TRITON_MODEL_PY.read_bytes(),
        NETWORK_PY: TRITON_NETWORK_PY.read_bytes(),
        keys.MODEL_WEIGHTS: weights,
    }
    runtimes: dict[str, Any] = {"torch": keys.MODEL_WEIGHTS}
    if onnx:
        try:
            files[keys.MODEL_ONNX] = export_onnx(net, cfg, template=onnx_template)
            runtimes["onnxruntime"] = keys.MODEL_ONNX
        except ExportRejected as exc:
            log.warning(
                "no ONNX for this version: CPUs will run it with torch", extra={"reason": str(exc)}
            )
            runtimes["onnxruntime_refused"] = str(exc)
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "parent_version": parent_version,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "training": meta,
        "metrics": metrics or {},
        "model_config": cfg.model_dump(mode="json"),
        "interface": INTERFACE,
        "inputs": [t.name for t in spec.inputs],
        "outputs": [t.name for t in spec.outputs],
        "runtimes": runtimes,
    }
    return TritonPackage(spec=spec, files=files, manifest=manifest)
