"""The network exported for ONNX Runtime computes what torch computes, or is not kept."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from ctloop.contracts import keys
from ctloop.core import runtimes
from ctloop.core.infer import Network
from ctloop.core.model import TINY_MODEL, ModelConfig, build_network, save_checkpoint
from ctloop.core.packaging import (
    NETWORK_PY,
    TRITON_NETWORK_PY,
    network_spec,
    package_checkpoint,
    segmentation_spec,
)
from ctloop.core.runtimes import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportRejected,
    export_onnx,
    onnx_predictor,
)

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
    assert set(package.files) == {"model.py", NETWORK_PY, keys.MODEL_WEIGHTS, keys.MODEL_ONNX}
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


def test_a_fine_tune_s_export_is_its_parent_s_graph_with_the_new_weights(
    monkeypatch: pytest.MonkeyPatch,
):
    torch.manual_seed(6)
    parent = build_network(CFG).eval()
    template = export_onnx(parent, CFG)
    child = build_network(CFG).eval()  # other weights, the same architecture
    exports: list[str] = []
    real_export = runtimes._export
    monkeypatch.setattr(runtimes, "_export", lambda n, c: exports.append("x") or real_export(n, c))

    model = export_onnx(child, CFG, template=template)
    assert exports == []  # the exporter did not run: the template took the weights
    windows = torch.rand(2, 1, *CFG.patch)
    with torch.inference_mode():
        ours, child_s, parent_s = onnx_predictor(model, 1)(windows), child(windows), parent(windows)
    assert float((ours - child_s).abs().max()) < 1e-4
    assert float((ours - parent_s).abs().max()) > 1e-2  # not the parent's answer


def test_a_template_of_another_architecture_or_no_onnx_at_all_means_a_full_export(
    monkeypatch: pytest.MonkeyPatch,
):
    wider = ModelConfig(**{**TINY_MODEL, "channels": [c * 2 for c in CFG.channels]})
    template = export_onnx(build_network(wider).eval(), wider)
    net = build_network(CFG).eval()
    with pytest.raises(runtimes.TemplateMismatch, match="is \\("):
        runtimes.with_weights(template, net)
    with pytest.raises(runtimes.TemplateMismatch, match="not an ONNX model"):
        runtimes.with_weights(b"not a model", net)
    exports: list[str] = []
    real_export = runtimes._export
    monkeypatch.setattr(runtimes, "_export", lambda n, c: exports.append("x") or real_export(n, c))
    for bad in (template, b"not a model"):
        model = export_onnx(net, CFG, template=bad)
        x = torch.rand(1, 1, *CFG.patch)
        with torch.inference_mode():
            assert float((onnx_predictor(model, 1)(x) - net(x)).abs().max()) < 1e-4
    assert exports == ["x", "x"]


def test_a_template_whose_graph_computes_something_else_is_rejected_by_the_check():
    """A template is trusted for nothing: a graph of the right weights that computes
    another function fails the check against torch."""
    torch.manual_seed(7)
    net = build_network(CFG).eval()

    class _Doubled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2.0

    doubled = _Doubled(build_network(CFG).eval()).eval()
    graph = runtimes._export(doubled, CFG)
    # its initializers are named inner.<...>: rename them to fit ``net``'s state dict
    import onnx

    m = onnx.load_from_string(graph)
    for init in m.graph.initializer:
        init.name = init.name.removeprefix("inner.")
    for node in m.graph.node:
        node.input[:] = [i.removeprefix("inner.") for i in node.input]
    with pytest.raises(ExportRejected, match="differ from torch's"):
        export_onnx(net, CFG, template=m.SerializeToString())


def test_the_network_alone_imports_no_torch_and_names_the_files_and_tensors_a_version_has():
    """network.py (a version of interface 4 on CPU replicas) is read by Triton, not imported
    here; its file and tensor names are those of the package and of the ONNX export, and on
    the ONNX Runtime path it imports neither torch nor MONAI (what made every load take ~3 s)."""
    source = TRITON_NETWORK_PY.read_text()
    tree = ast.parse(source)
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"json", "os", "sys", "pathlib", "typing", "numpy", "triton_python_backend_utils"}
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    assert constants["WEIGHTS"] == keys.MODEL_WEIGHTS and constants["ONNX"] == keys.MODEL_ONNX
    assert constants["INPUT_NAME"] == INPUT_NAME and constants["OUTPUT_NAME"] == OUTPUT_NAME
    spec = network_spec("m")
    assert spec.default_model_filename == NETWORK_PY
    assert [t.name for t in spec.inputs] == ["WINDOWS"] and [t.name for t in spec.outputs] == [
        "LOGITS"
    ]
    assert 'default_model_filename: "network.py"' in spec.config_pbtxt()
