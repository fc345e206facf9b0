"""The network under ONNX Runtime: exported once when a version is published, run by Triton's
CPU instances (issue 21: 0.63x fp32 torch on the realistic network, every organ's Dice against
torch's mask >= 0.9996; ``python -m bench.cpu_paths``).

- :func:`export_onnx` turns a checkpoint's network into ONNX (torch's dynamo exporter, the batch
  of sliding windows dynamic) and checks it against torch on one window before it is kept;
- :func:`onnx_predictor` is an ONNX Runtime session over those bytes as a sliding-window
  predictor (:class:`ctloop.core.infer.Network` takes it in place of the torch module).

torch stays the network on GPUs and the fallback everywhere: a version published without ONNX
(an export that failed its check, or a version older than this) is served by torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctloop.core.model import ModelConfig

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Largest difference of class probabilities (softmax of the logits) between ONNX Runtime and
# torch on the check window for the export to be kept. Measured on the realistic network:
# ~1e-6, and masks with every organ's Dice >= 0.9996 on a whole CT.
PROBABILITY_TOLERANCE = 1e-3
# The largest batch of windows the exported graph accepts (the sliding window's sw_batch_size).
MAX_WINDOW_BATCH = 64

log = logging.getLogger("ctloop.runtimes")


class ExportRejected(RuntimeError):
    """The exported graph does not compute what torch computes (or could not be exported)."""


def export_onnx(
    net: nn.Module, cfg: ModelConfig, seed: int = 0, template: bytes | None = None
) -> bytes:
    """``net`` as an ONNX model, checked against torch on one random window (seeded).

    ``template``: an earlier export of the same architecture (the parent version's
    ``model.onnx``); its graph with ``net``'s weights put in is used when every weight fits,
    which takes a fraction of a second instead of the exporter's seconds (a round's fine-tune
    changes weights, never the graph). Whatever it came from, the model is checked.

    Raises :class:`ExportRejected` when the exporter fails or ONNX Runtime's probabilities
    differ from torch's by more than :data:`PROBABILITY_TOLERANCE`."""
    net = net.eval()
    model = None
    if template is not None:
        try:
            model = with_weights(template, net)
        except TemplateMismatch as exc:
            log.info("exporting the network again", extra={"reason": str(exc)})
    if model is None:
        model = _export(net, cfg)
    check_onnx(model, net, cfg, seed)
    return model


class TemplateMismatch(ValueError):
    """An ONNX template whose initializers do not fit a network's weights."""


def with_weights(template: bytes, net: nn.Module) -> bytes:
    """``template`` (an ONNX model exported unoptimised: its initializers carry the names of
    the network's state-dict entries) with ``net``'s weights in place of its own.

    Raises :class:`TemplateMismatch` when a floating-point weight of ``net`` has no
    initializer of its name, shape and type in the template."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load_from_string(template)
    except Exception as exc:  # DecodeError and friends: not an ONNX model
        raise TemplateMismatch(f"the template is not an ONNX model: {exc}") from exc
    inits = {init.name: init for init in graph.graph.initializer}
    for name, tensor in net.state_dict().items():
        if not tensor.is_floating_point():
            continue  # counters (num_batches_tracked) are not part of the graph
        init = inits.get(name)
        array = tensor.detach().cpu().float().numpy()
        if init is None:
            raise TemplateMismatch(f"no initializer {name!r} in the template")
        if tuple(init.dims) != array.shape or init.data_type != onnx.TensorProto.FLOAT:
            raise TemplateMismatch(
                f"initializer {name!r} is {tuple(init.dims)} (type {init.data_type}), "
                f"the weight {array.shape} float32"
            )
        init.CopyFrom(numpy_helper.from_array(array, name))
    return bytes(graph.SerializeToString())


def _export(net: nn.Module, cfg: ModelConfig) -> bytes:
    """torch's dynamo exporter, the window batch dynamic, unoptimised: initializers keep the
    state-dict names (a template for later versions) and ONNX Runtime optimises the graph at
    load as well (same speed measured on the realistic network: 1.10-1.21 s vs 1.15-1.28 s a
    window pair)."""
    example = torch.zeros(cfg.sw_batch_size, 1, *cfg.patch)
    batch = torch.export.Dim("windows", min=1, max=MAX_WINDOW_BATCH)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                net,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                optimize=False,
                verbose=False,
            )
        if program is None:
            raise RuntimeError("the exporter gave no program")
        with tempfile.TemporaryDirectory(prefix="ctloop-onnx-") as tmp:
            path = Path(tmp) / "model.onnx"
            program.save(path)  # one file: the initializers inline (far under protobuf's 2 GB)
            return path.read_bytes()
    except Exception as exc:  # the exporter raises many kinds; all mean "no ONNX"
        raise ExportRejected(f"torch.onnx.export failed: {exc}") from exc


def check_onnx(model: bytes, net: nn.Module, cfg: ModelConfig, seed: int = 0) -> None:
    """Raise :class:`ExportRejected` unless ONNX Runtime's class probabilities on one random
    window (seeded) are within :data:`PROBABILITY_TOLERANCE` of torch's."""
    window = torch.rand(1, 1, *cfg.patch, generator=torch.Generator().manual_seed(seed))
    try:
        predict = onnx_predictor(model, threads=torch.get_num_threads())
        with torch.inference_mode():
            ours = torch.softmax(predict(window), 1)
            theirs = torch.softmax(net.eval()(window).float(), 1)
    except Exception as exc:  # ONNX Runtime refusing the graph, or shapes that differ
        raise ExportRejected(f"ONNX Runtime could not run the model: {exc}") from exc
    diff = float((ours - theirs).abs().max())
    if not diff <= PROBABILITY_TOLERANCE:  # also NaN
        raise ExportRejected(
            f"ONNX Runtime's probabilities differ from torch's by {diff:.2e} "
            f"(tolerance {PROBABILITY_TOLERANCE:.0e})"
        )


def onnx_predictor(model: bytes, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime CPU session over ``model`` (what :func:`export_onnx` gives), as a
    predictor: a batch of windows (N, 1, *patch) in, logits (N, C, *patch) out."""
    import onnxruntime as ort  # only where ONNX runs (Triton's CPU instances, the export)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: its warnings name every graph optimisation
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def predict(windows: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    return predict


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about torchvision ops it cannot register and deprecated pytree
    spellings, prints its progress and logs every pass of its optimiser (onnx_ir,
    onnxscript): none of it is about this network."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
