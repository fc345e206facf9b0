"""Serving published model versions on the Triton replicas: the spec each load pins for this
deployment (:func:`serving_spec`), loads and queries over gRPC (:class:`TritonModels`), and a
volume segmented by a served version (:class:`TritonSegmenter`).

What a version is and how it is published and checked: :mod:`ctloop.model_repository`. Serving
a version means an explicit Triton load whose config pins exactly that version, on every Triton
replica, with the version's files in the load request, each checked against its manifest
(:meth:`ctloop.model_repository.ModelRepository.verified_files`); a failed load (on any
replica) leaves the old version serving.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from ctloop.contracts import keys
from ctloop.contracts.triton import ModelSpec
from ctloop.core.infer import PreparedVolume, Preprocessor, Segmentation, finish
from ctloop.core.model import ModelConfig
from ctloop.core.packaging import (
    INTERFACE,
    NETWORK_PY,
    SUPPORTED_INTERFACES,
    network_spec,
    pipeline_spec,
    segmentation_spec,
)
from ctloop.model_repository import ModelLoadFailed, ModelRepository
from ctloop.settings import Settings
from ctloop.timing import Laps
from ctloop.triton_replicas import Resolver, TritonReplicas, resolve_all

# A status question (what a replica serves) answers in well under a second; a replica that
# does not answer in this long is treated as down rather than holding up the others.
STATUS_TIMEOUT_S = 10.0

log = logging.getLogger("ctloop.triton_serving")


def split_serving(settings: Settings, interface: int) -> bool:
    """Whether a version of ``interface`` is served as its network alone, beside the pipeline
    model: interface 4 and up on CPU replicas (GPU replicas run the whole model.py)."""
    return interface >= 4 and settings.triton.instance_kind == "cpu"


def serving_spec(settings: Settings, model: str, interface: int = INTERFACE) -> ModelSpec:
    """A segmentation model's Triton spec for this deployment: a GPU instance group when the
    Triton replicas have GPUs (``settings.triton.instance_kind``), a CPU one otherwise; on CPU,
    a version of interface 4 loads as its network alone (:func:`split_serving`). Both the
    published ``config.pbtxt`` and the config each load pins come from here."""
    t = settings.triton
    if split_serving(settings, interface):
        return network_spec(model, instance_count=t.instance_count, cpu_runtime=t.cpu_runtime)
    return segmentation_spec(
        model,
        gpu=t.instance_kind == "gpu",
        instance_count=t.instance_count,
        cpu_runtime=t.cpu_runtime,
    )


def serving_pipeline_spec(settings: Settings) -> ModelSpec:
    t = settings.triton
    return pipeline_spec(t.pipeline_model, instance_count=t.instance_count)


@dataclass(frozen=True)
class ReplicaLoad:
    """What reconciling did on one replica: loaded the version, or could not (``error``):
    the replica refused it, or did not answer (down, restarting)."""

    replica: str
    error: str | None = None
    refused: bool = False


class TritonModels:
    """Loads and queries models on the Triton replicas over gRPC.

    Inference requests go through ``settings.triton.grpc_url`` (a Service balances them over
    the replicas); loads and what serves are per replica (:mod:`ctloop.triton_replicas`).
    """

    def __init__(self, settings: Settings, resolve: Resolver = resolve_all) -> None:
        self.client = triton_grpc.InferenceServerClient(settings.triton.grpc_url)
        self.replicas = TritonReplicas(settings, resolve)

    def serve_version(
        self, spec: ModelSpec, version: int, files: dict[str, bytes] | None = None
    ) -> None:
        """Load exactly ``version`` on every replica. If one refuses (or does not answer), the
        replicas that took it go back to what they served, so the previous version keeps
        serving everywhere, and :class:`ModelLoadFailed` names the replica. ``files``: the
        version's files, sent with the load (see :meth:`load_on`)."""
        replicas = self.replicas.addresses()
        if not replicas:
            raise ModelLoadFailed(
                f"{spec.name} v{version}: no Triton replica ({self.replicas.describe()})"
            )
        # What each replica serves now, to go back to: the last one is never gone back on.
        before = {r: self._before_load(r, spec, version) for r in replicas[:-1]}
        done: list[str] = []
        for replica in replicas:
            try:
                self.load_on(replica, spec, version, files)
            except ModelLoadFailed:
                self._put_back(spec, {r: before[r] for r in done})
                raise
            done.append(replica)

    def load_on(
        self, replica: str, spec: ModelSpec, version: int, files: dict[str, bytes] | None = None
    ) -> None:
        """Load exactly ``version`` on one replica; its previous version serves if this fails.

        ``files`` (name -> bytes): the version folder, sent with the load request; Triton then
        loads exactly those bytes (the ones checked against the manifest) instead of
        downloading the model's whole folder from S3, every version of it (Triton 2.51 copies
        ``<model>/`` whole before each load: it grew by a version's files every round)."""
        override = None
        if files is not None:
            override = {f"file:{version}/{name}": data for name, data in files.items()}
        try:
            client = self.replicas.client(replica)
            client.load_model(spec.name, config=json.dumps(spec.config(version)), files=override)
        except InferenceServerException as exc:
            raise ModelLoadFailed(
                f"{spec.name} v{version} on Triton {replica}: {exc.message()}"
            ) from exc

    def load_where_missing(
        self,
        spec: ModelSpec,
        version: int,
        verify: Callable[[], dict[str, bytes] | None] | None = None,
    ) -> list[ReplicaLoad]:
        """Load ``version`` on each replica that does not serve it READY (one that started
        since, or restarted, has nothing loaded). A replica that is down or refuses does not
        stop the others; the list says what happened on each replica that lacked it.
        ``verify`` (e.g. :meth:`ModelRepository.verified_files`) runs before the first load and
        may refuse it with :class:`ModelLoadFailed`; the files it returns (if any) are sent
        with each load. Nothing calls it when no replica lacks the version."""
        done: list[ReplicaLoad] = []
        verified = verify is None
        files: dict[str, bytes] | None = None
        for replica in self.replicas.addresses():
            try:
                if not self.replica_serves(replica, spec.name, version):
                    if not verified and verify is not None:
                        files = verify()
                        verified = True
                    self.load_on(replica, spec, version, files)
                    done.append(ReplicaLoad(replica))
            except InferenceServerException as exc:
                done.append(ReplicaLoad(replica, f"did not answer: {exc.message()}"))
            except ModelLoadFailed as exc:
                done.append(ReplicaLoad(replica, str(exc), refused=True))
        return done

    def serving_versions(self, model: str) -> list[int]:
        """Versions READY on every replica (a version some replica lacks does not serve)."""
        ready = [set(self.replica_versions(r, model)) for r in self.replicas.addresses()]
        return sorted(set.intersection(*ready)) if ready else []

    def replica_serves(self, replica: str, model: str, version: int) -> bool:
        """Whether one replica has ``version`` READY (asks no more: it lists no repository)."""
        client = self.replicas.client(replica)
        return bool(client.is_model_ready(model, str(version), client_timeout=STATUS_TIMEOUT_S))

    def replica_versions(self, replica: str, model: str) -> list[int]:
        """Versions of ``model`` READY on one replica."""
        client = self.replicas.client(replica)
        index = client.get_model_repository_index(as_json=True, client_timeout=STATUS_TIMEOUT_S)
        return sorted(
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == model and m.get("state") == "READY" and m.get("version")
        )

    def _before_load(self, replica: str, spec: ModelSpec, version: int) -> list[int]:
        try:
            return self.replica_versions(replica, spec.name)
        except InferenceServerException as exc:
            raise ModelLoadFailed(
                f"{spec.name} v{version}: Triton {replica} did not answer: {exc.message()}"
            ) from exc

    def _put_back(self, spec: ModelSpec, before: dict[str, list[int]]) -> None:
        """Best effort (the inference service's reconciling repairs what this cannot): each
        replica back to the version it served, or to none."""
        for replica, versions in before.items():
            with contextlib.suppress(InferenceServerException, ModelLoadFailed):
                if versions:
                    self.load_on(replica, spec, max(versions))
                else:
                    self.replicas.client(replica).unload_model(spec.name)

    def probabilities(self, model: str, version: int, x: np.ndarray) -> np.ndarray:
        """Class probabilities (C, x, y, z) of a model-grid volume from a served segmentation
        model (inputs and outputs as in :mod:`ctloop.core.packaging`)."""
        request = triton_grpc.InferInput("INPUT", list(x.shape), "FP32")
        request.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        result = self.client.infer(model, [request], model_version=str(version))
        probs = result.as_numpy("PROBABILITIES")
        if probs is None:
            raise RuntimeError(f"{model} v{version} answered without PROBABILITIES")
        return probs  # a read-only view of the response: nothing writes to it

    def labels(
        self,
        model: str,
        version: int,
        x: np.ndarray,
        model_affine: np.ndarray,
        affine: np.ndarray,
        shape: tuple[int, ...],
        via: tuple[str, int, ModelConfig] | None = None,
    ) -> tuple[np.ndarray, float, dict[str, float]]:
        """Labels on the scanner grid (``affine``, ``shape``) of a model-grid volume (grid
        ``model_affine``), the uncertainty, and the served model's seconds of network and
        resample (interface 3: the probabilities stay where the network ran).

        ``via``: the pipeline model (name, version) that runs ``model`` ``version``'s network,
        served alone, with that version's config (interface 4 on CPU)."""
        arrays: list[tuple[str, np.ndarray, str]] = [
            ("INPUT", np.ascontiguousarray(x, dtype=np.float32), "FP32"),
            ("MODEL_AFFINE", np.asarray(model_affine, dtype=np.float64), "FP64"),
            ("AFFINE", np.asarray(affine, dtype=np.float64), "FP64"),
            ("SHAPE", np.asarray(shape, dtype=np.int64), "INT64"),
        ]
        target, target_version = model, version
        if via is not None:
            target, target_version, cfg = via
            arrays += [
                ("NETWORK", np.frombuffer(model.encode(), dtype=np.uint8), "UINT8"),
                ("VERSION", np.asarray([version], dtype=np.int64), "INT64"),
                ("MODEL_CONFIG", np.frombuffer(cfg.model_dump_json().encode(), np.uint8), "UINT8"),
            ]
        tensors = []
        for name, array, dtype in arrays:
            tensor = triton_grpc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        wanted = [triton_grpc.InferRequestedOutput(n) for n in ("LABELS", "UNCERTAINTY", "STAGES")]
        result = self.client.infer(
            target, tensors, model_version=str(target_version), outputs=wanted
        )
        label, uncertainty, stages = (
            result.as_numpy(n) for n in ("LABELS", "UNCERTAINTY", "STAGES")
        )
        if label is None or uncertainty is None or stages is None:
            raise RuntimeError(f"{model} v{version} answered without LABELS/UNCERTAINTY/STAGES")
        label = label.T  # (z, y, x) on the wire: (x, y, z) here, in NIfTI's order, no copy
        if tuple(label.shape) != tuple(shape):
            raise RuntimeError(f"{model} v{version} answered labels {label.shape}, not {shape}")
        return (
            label,
            float(uncertainty[0]),
            {"network": float(stages[0]), "resample": float(stages[1])},
        )

    def close(self) -> None:
        self.client.close()
        self.replicas.close()


class IncompatibleModel(RuntimeError):
    """A published version whose model.py speaks another interface than this code."""


class TritonSegmenter:
    """Segments volumes with a served model: resampling to the model grid and back here, the
    network in Triton (the same three steps as :class:`ctloop.core.infer.Segmenter`).

    Each version's preprocessing (spacing, HU window) comes from its manifest, read once.
    """

    def __init__(self, triton: TritonModels, repository: ModelRepository) -> None:
        self.triton = triton
        self.repository = repository
        self.settings = repository.settings
        self._preprocessors: dict[tuple[str, int], tuple[Preprocessor, int]] = {}
        self._pipeline: int | None = None  # the pipeline version loaded on every replica
        self._manifests: dict[tuple[str, int], dict[str, Any]] = {}

    def preprocessor(self, model: str, version: int) -> Preprocessor:
        return self._version(model, version)[0]

    def spec(self, model: str, version: int) -> ModelSpec:
        """How this deployment loads ``version``: by the interface it was published with."""
        return serving_spec(self.settings, model, self.interface(model, version))

    def interface(self, model: str, version: int) -> int:
        """The interface ``version`` was published with (its manifest; 1 when it says none)."""
        return int(self._manifest(model, version).get("interface", 1))

    def _manifest(self, model: str, version: int) -> dict[str, Any]:
        """A version's manifest, read once (versions are immutable; what a load sends is
        checked against the digests read afresh: :meth:`ModelRepository.verified_files`)."""
        found = self._manifests.get((model, version))
        if found is None:
            found = self._manifests[(model, version)] = self.repository.manifest(model, version)
        return found

    def split(self, model: str, version: int) -> bool:
        """Whether ``version`` serves as its network alone, beside the pipeline model
        (:func:`split_serving`)."""
        return split_serving(self.settings, self.interface(model, version))

    def serve_version(self, model: str, version: int) -> None:
        """Load ``version`` on every replica (:meth:`TritonModels.serve_version`), with the
        pipeline model first where the version needs it."""
        if self.split(model, version):
            failed = [d.error for d in self.ensure_pipeline() if d.error is not None]
            if failed:
                raise ModelLoadFailed(f"{model} v{version} not loaded: {'; '.join(failed)}")
        files = self.files(model, version)
        self.triton.serve_version(self.spec(model, version), version, files)

    def files(self, model: str, version: int) -> dict[str, bytes]:
        """What a load of ``version`` sends to Triton, checked against its manifest: on CPU
        replicas a version of interface 4 needs only ``network.py`` and what it runs
        (``model.onnx`` under ONNX Runtime, else the weights); otherwise every file."""
        names = None
        if self.split(model, version):
            manifest = self._manifest(model, version)
            onnx = (manifest.get("runtimes") or {}).get("onnxruntime")
            runs = onnx if self.settings.triton.cpu_runtime == "onnxruntime" and onnx else None
            names = [NETWORK_PY, runs or keys.MODEL_WEIGHTS]
        return self.repository.verified_files(model, version, names)

    def ensure_pipeline(self) -> list[ReplicaLoad]:
        """Load the pipeline model (the latest published version, checked against its
        manifest) on every replica that lacks it; what happened on each that did."""
        version = self.repository.pipeline_version()
        if version is None:
            raise ModelLoadFailed(
                f"no {self.settings.triton.pipeline_model} is published: publish a model "
                "version with this ctloop (it publishes the pipeline first)"
            )
        name = self.settings.triton.pipeline_model
        verify = functools.partial(self.repository.verified_files, name, version, None)
        done = self.triton.load_where_missing(serving_pipeline_spec(self.settings), version, verify)
        failed = [d for d in done if d.error is not None]
        if not failed:
            self._pipeline = version
        return done

    def _version(self, model: str, version: int) -> tuple[Preprocessor, int]:
        """A version's preprocessing and the interface its model.py speaks."""
        found = self._preprocessors.get((model, version))
        if found is None:
            manifest = self._manifest(model, version)
            interface = manifest.get("interface", 1)
            if interface not in SUPPORTED_INTERFACES:
                speaks = " and ".join(str(i) for i in SUPPORTED_INTERFACES)
                raise IncompatibleModel(
                    f"{model} v{version} was packaged for model interface "
                    f"{interface}, this platform speaks {speaks}: "
                    "publish the checkpoint again as a new version"
                )
            cfg = ModelConfig.model_validate(manifest["model_config"])
            found = self._preprocessors[(model, version)] = (Preprocessor(cfg), interface)
        return found

    def __call__(
        self, model: str, version: int, image: np.ndarray, affine: np.ndarray
    ) -> Segmentation:
        """``image`` (x, y, z) in HU with its voxel->mm ``affine``; timings: preprocess,
        triton (the network and the transfer), resample."""
        laps = Laps()
        prepared = self.prepare(model, version, image, affine)
        laps.lap("preprocess")
        seg = self.segment(model, version, prepared)
        laps.extend(seg.timings)
        return Segmentation(label=seg.label, uncertainty=seg.uncertainty, timings=laps.seconds)

    def prepare(
        self, model: str, version: int, image: np.ndarray, affine: np.ndarray
    ) -> PreparedVolume:
        """``image`` (x, y, z) in HU with its voxel->mm ``affine``, on this version's grid."""
        x = self.preprocessor(model, version)(image, affine)
        return PreparedVolume(x, np.asarray(affine, dtype=np.float64), image.shape)

    def segment(self, model: str, version: int, volume: PreparedVolume) -> Segmentation:
        """A volume already on this version's model grid (:meth:`preprocessor`). Timings:
        network, resample (in Triton) and transfer (the rest of the call: the tensors to and
        from Triton); a version of interface 2 answers probabilities, resampled here: triton
        (network and transfer) and resample."""
        if self._version(model, version)[1] == 2:
            laps = Laps()
            probs = self.triton.probabilities(model, version, volume.input.image)
            laps.lap("triton")
            label, uncertainty = finish(probs, volume.input.affine, volume.affine, volume.shape)
            laps.lap("resample")
            return Segmentation(label=label, uncertainty=uncertainty, timings=laps.seconds)
        via = None
        preprocessor, interface = self._version(model, version)
        if split_serving(self.settings, interface):
            if self._pipeline is None:
                self.ensure_pipeline()
            if self._pipeline is None:
                raise ModelLoadFailed(f"{self.settings.triton.pipeline_model} is not loaded")
            via = (self.settings.triton.pipeline_model, self._pipeline, preprocessor.cfg)
        t0 = time.perf_counter()
        label, uncertainty, stages = self.triton.labels(
            model,
            version,
            volume.input.image,
            volume.input.affine,
            volume.affine,
            volume.shape,
            via=via,
        )
        stages["transfer"] = max(0.0, time.perf_counter() - t0 - sum(stages.values()))
        return Segmentation(label=label, uncertainty=uncertainty, timings=stages)
