"""The Triton model repository in S3, and how a version is published and served.

Layout (keys from :mod:`ctloop.contracts.keys`)::

    <model_prefix>/<model>/config.pbtxt
    <model_prefix>/<model>/<version>/model.py, weights..., manifest.json

Versions are immutable: publishing a version that exists is refused. ``manifest.json`` is
written last, so a version without one is incomplete (a crash mid-publish) and never served.
Serving a version means an explicit Triton load whose config pins exactly that version, so
rollback is a load of an older one; a failed load leaves the old version serving.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from ctloop.contracts import keys
from ctloop.contracts.triton import ModelSpec
from ctloop.settings import Settings
from ctloop.storage import ObjectStore

MANIFEST = "manifest.json"


class VersionExists(RuntimeError):
    pass


class ModelLoadFailed(RuntimeError):
    pass


class ModelRepository:
    def __init__(self, settings: Settings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.store = store or ObjectStore(settings)
        self.bucket = settings.s3.model_bucket
        self.prefix = settings.triton.model_prefix

    def publish_version(
        self,
        spec: ModelSpec,
        version: int,
        files: dict[str, bytes],
        manifest: dict[str, Any],
    ) -> None:
        """Upload ``files`` as version ``version`` of ``spec.name``, then its manifest."""
        base = keys.model_version_prefix(self.prefix, spec.name, version)
        if self.store.exists(self.bucket, base + MANIFEST):
            raise VersionExists(f"{spec.name} version {version} is already published")
        self.store.put_bytes(
            self.bucket, keys.model_config(self.prefix, spec.name), spec.config_pbtxt().encode()
        )
        for name, data in files.items():
            self.store.put_bytes(self.bucket, base + keys.safe_id(name, "file name"), data)
        body = json.dumps({"model": spec.name, "version": version, **manifest}, indent=2)
        self.store.put_bytes(self.bucket, base + MANIFEST, body.encode(), "application/json")

    def published_versions(self, model: str) -> list[int]:
        """Complete (manifest-bearing) versions, ascending."""
        root = f"{self.prefix}/{keys.safe_id(model, 'model')}/"
        found = set()
        for key in self.store.list_keys(self.bucket, root):
            parts = key[len(root) :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and parts[0].isdigit():
                found.add(int(parts[0]))
        return sorted(found)

    def manifest(self, model: str, version: int) -> dict[str, Any]:
        key = keys.model_version_prefix(self.prefix, model, version) + MANIFEST
        return dict(json.loads(self.store.get_bytes(self.bucket, key)))


class TritonModels:
    """Loads and queries models on a Triton server over gRPC."""

    def __init__(self, settings: Settings) -> None:
        self.client = triton_grpc.InferenceServerClient(settings.triton.grpc_url)

    def serve_version(self, spec: ModelSpec, version: int) -> None:
        """Load exactly ``version``; on failure the previously loaded version keeps serving."""
        try:
            self.client.load_model(spec.name, config=json.dumps(spec.config(version)))
        except InferenceServerException as exc:
            raise ModelLoadFailed(f"{spec.name} v{version}: {exc.message()}") from exc

    def serving_versions(self, model: str) -> list[int]:
        index = self.client.get_model_repository_index(as_json=True)
        return sorted(
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == model and m.get("state") == "READY" and m.get("version")
        )

    def segment(
        self, model: str, image: np.ndarray, affine: np.ndarray, version: int | None = None
    ) -> tuple[np.ndarray, float]:
        """Labels and uncertainty of a volume from a served segmentation model
        (inputs and outputs as in :mod:`ctloop.core.packaging`)."""
        inputs = [
            triton_grpc.InferInput("IMAGE", list(image.shape), "FP32"),
            triton_grpc.InferInput("AFFINE", [4, 4], "FP64"),
        ]
        inputs[0].set_data_from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        inputs[1].set_data_from_numpy(np.ascontiguousarray(affine, dtype=np.float64))
        result = self.client.infer(
            model, inputs, model_version="" if version is None else str(version)
        )
        labels = result.as_numpy("LABELS")
        uncertainty = result.as_numpy("UNCERTAINTY")
        if labels is None or uncertainty is None:
            raise RuntimeError(f"{model} answered without LABELS/UNCERTAINTY")
        return labels, float(uncertainty[0])

    def close(self) -> None:
        self.client.close()
