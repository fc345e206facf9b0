"""What a Triton model looks like to ctloop: its tensors and configuration (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton type, e.g. "TYPE_FP32"
    dims: tuple[int, ...]
    optional: bool = False  # an input a request may leave out (Triton's ``optional: true``)


@dataclass(frozen=True)
class ModelSpec:
    """What config.pbtxt says about a python-backend model."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"  # KIND_GPU in a GPU cluster
    parameters: tuple[tuple[str, str], ...] = ()  # read by model.py (e.g. sliding-window batch)
    # The python file Triton runs from the version folder (Triton's default: model.py).
    default_model_filename: str | None = None

    def config(self, version: int | None = None) -> dict[str, Any]:
        """The model configuration, pinned to ``version`` when given (Triton JSON form)."""
        cfg: dict[str, Any] = {
            "name": self.name,
            "backend": "python",
            "max_batch_size": self.max_batch_size,
            "input": [_tensor(t) for t in self.inputs],
            "output": [_tensor(t) for t in self.outputs],
            "instance_group": [{"kind": self.instance_kind, "count": self.instance_count}],
        }
        if self.default_model_filename:
            cfg["default_model_filename"] = self.default_model_filename
        if self.parameters:
            cfg["parameters"] = {k: {"string_value": v} for k, v in self.parameters}
        if version is not None:
            cfg["version_policy"] = {"specific": {"versions": [version]}}
        return cfg

    def config_pbtxt(self) -> str:
        def tensor(t: TensorSpec) -> str:
            dims = ", ".join(str(d) for d in t.dims)
            optional = ", optional: true" if t.optional else ""
            return f'  {{ name: "{t.name}", data_type: {t.data_type}, dims: [ {dims} ]{optional} }}'

        return "\n".join(
            [
                f'name: "{self.name}"',
                'backend: "python"',
                f"max_batch_size: {self.max_batch_size}",
                *(
                    [f'default_model_filename: "{self.default_model_filename}"']
                    if self.default_model_filename
                    else []
                ),
                "input [",
                ",\n".join(tensor(t) for t in self.inputs),
                "]",
                "output [",
                ",\n".join(tensor(t) for t in self.outputs),
                "]",
                "instance_group [ "
                f"{{ kind: {self.instance_kind}, count: {self.instance_count} }} ]",
                *(
                    f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                    for k, v in self.parameters
                ),
                "",
            ]
        )


def _tensor(t: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": t.name, "data_type": t.data_type, "dims": list(t.dims)}
    if t.optional:
        out["optional"] = True
    return out
