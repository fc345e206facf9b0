"""The network exported for ONNX Runtime computes what torch computes, or is not kept."""

from pathlib import Path

import pytest
import torch
from torch import nn

from ctloop.contracts import keys
from ctloop.core.infer import Network
from ctloop.core.model import TINY_MODEL, ModelConfig, build_network, save_checkpoint
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.core.runtimes import ExportRejected, export_onnx, onnx_predictor

CFG = ModelConfig(**TINY_MODEL)


def test_the_exported_network_gives_torch_s_probabilities_for_any_batch_of_windows():
    torch.manual_seed(3)
    net = build_network(CFG).eval()
    predict = onnx_predictor(export_onnx(net, CFG), threads=1)
    with torch.inference_mode():
        for batch in (1, 3):  # the sliding window's batch is dynamic in the graph
            windows = torch.rand(batch, 1, *CFG.patch)
            ours, theirs = predict(windows), net(windows)
            assert ours.shape == theirs.shape == (batch, CFG.num_classes, *CFG.patch)
            assert float((ours - theirs).abs().max()) < 1e-4


def test_a_network_under_onnx_runtime_segments_like_torch_under_the_sliding_window():
    torch.manual_seed(4)
    net = build_network(CFG).eval()
    volume = torch.rand(50, 41, 37)  # not a multiple of the patch: windows overlap and pad
    by_torch = Network(CFG, net)(volume)
    by_onnx = Network(CFG, net, predictor=onnx_predictor(export_onnx(net, CFG), threads=1))(volume)
    assert float((by_torch - by_onnx).abs().max()) < 1e-4
    assert torch.equal(by_torch.argmax(0), by_onnx.argmax(0))


class _Noisy(nn.Module):
    """Not a function of its input: its export cannot agree with a second torch call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.rand_like(x)], dim=1)


def test_an_export_that_does_not_compute_what_torch_does_is_rejected():
    with pytest.raises(ExportRejected, match="differ from torch's"):
        export_onnx(_Noisy(), CFG)


def test_a_package_carries_the_onnx_network_and_says_which_runtimes_it_has(tmp_path: Path):
    checkpoint = tmp_path / "m.pt"
    torch.manual_seed(5)
    save_checkpoint(checkpoint, CFG, build_network(CFG), {"name": "m"})
    spec = segmentation_spec("m")
    assert ("cpu_runtime", "onnxruntime") in spec.parameters
    package = package_checkpoint(checkpoint, spec)
    assert set(package.files) == {"model.py", keys.MODEL_WEIGHTS, keys.MODEL_ONNX}
    assert package.manifest["runtimes"] == {
        "torch": keys.MODEL_WEIGHTS,
        "onnxruntime": keys.MODEL_ONNX,
    }
    predict = onnx_predictor(package.files[keys.MODEL_ONNX], threads=1)
    assert predict(torch.zeros(1, 1, *CFG.patch)).shape == (1, CFG.num_classes, *CFG.patch)

    without = package_checkpoint(
        checkpoint, segmentation_spec("m", cpu_runtime="torch"), onnx=False
    )
    assert keys.MODEL_ONNX not in without.files
    assert without.manifest["runtimes"] == {"torch": keys.MODEL_WEIGHTS}
    assert without.files[keys.MODEL_WEIGHTS] == package.files[keys.MODEL_WEIGHTS]
