"""gRPC clients of the inference and training services (what the MONAI Label layer calls),
and how their failures read as API errors."""

from __future__ import annotations

import json
from typing import Any

import grpc

from ctloop.rpc_auth import service_channel
from ctloop.settings import Settings, get_settings
from ctloop.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services.ingest.errors import ApiError

SEGMENT_TIMEOUT_S = 600.0


class Backends:
    """gRPC clients of the inference and training services, dialled on first use; every call
    carries ingest's service token (from ``settings``, default: the process's)."""

    def __init__(
        self, inference_target: str, training_target: str, settings: Settings | None = None
    ) -> None:
        self._targets = {"inference": inference_target, "training": training_target}
        self._settings = settings
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            settings = self._settings or get_settings()
            self._channels[name] = service_channel(settings, "ingest", self._targets[name])
        return self._channels[name]

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self._channel("inference"))

    @property
    def training(self) -> training_pb2_grpc.TrainingStub:
        return training_pb2_grpc.TrainingStub(self._channel("training"))


def rpc_error(service: str, exc: grpc.RpcError) -> ApiError:
    """A backend's gRPC status as the API error a client can act on."""
    code, detail = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError("not_found", detail, 404)
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        return ApiError("not_possible_now", detail, 409)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError("bad_request", detail, 422)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ApiError("unavailable", f"the {service} service is not answering", 503)
    return ApiError("backend_error", f"{service}: {code.name} {detail}", 502)


def serving_ref(backends: Backends, model: str) -> common_pb2.ModelVersionRef:
    """The version serving now: of ``model`` (409 ``not_serving`` when another model serves),
    or of whichever serves ("": 409 ``no_model`` when none does yet)."""
    serving = serving_model(backends, model)
    if not serving.model:
        raise ApiError("no_model", "no model is serving yet", 409)
    if model and serving.model != model:
        raise ApiError("not_serving", f"{model} is not serving (serving: {serving.model})", 409)
    return serving


def segment(backends: Backends, volume_id: str, site_id: str, model: str) -> Any:
    """The inference service's ``Segment`` of a stored volume by ``model`` ("": whichever
    serves now; a named model must be the one serving, else 409 ``not_serving``)."""
    ref = serving_ref(backends, model) if model else common_pb2.ModelVersionRef()
    try:
        return backends.inference.Segment(
            inference_pb2.SegmentRequest(
                volume=common_pb2.VolumeRef(volume_id=volume_id, site_id=site_id), model=ref
            ),
            timeout=SEGMENT_TIMEOUT_S,
        )
    except grpc.RpcError as exc:
        raise rpc_error("inference", exc) from exc


def segment_session(
    backends: Backends,
    session_id: str,
    site_id: str,
    image: common_pb2.ObjectRef,
    ref: common_pb2.ModelVersionRef,
) -> Any:
    """The inference service's ``SegmentSession``: a MONAI Label session's image by ``ref``."""
    try:
        return backends.inference.SegmentSession(
            inference_pb2.SegmentSessionRequest(
                session_id=session_id, site_id=site_id, image=image, model=ref
            ),
            timeout=SEGMENT_TIMEOUT_S,
        )
    except grpc.RpcError as exc:
        raise rpc_error("inference", exc) from exc


def start_round(backends: Backends, model: str) -> training_pb2.Round:
    """The training service's ``StartRound`` ("": the model the policy picks)."""
    try:
        started: training_pb2.Round = backends.training.StartRound(
            training_pb2.StartRoundRequest(model=model), timeout=60
        )
    except grpc.RpcError as exc:
        raise rpc_error("training", exc) from exc
    return started


def latest_round(backends: Backends) -> training_pb2.Round | None:
    """The newest training round the training service knows (None: none has run)."""
    try:
        rounds = backends.training.ListRounds(training_pb2.ListRoundsRequest(), timeout=30)
    except grpc.RpcError as exc:
        raise rpc_error("training", exc) from exc
    return max(rounds.rounds, key=lambda x: x.round, default=None)


def model_versions(backends: Backends, model: str) -> list[tuple[int, dict[str, Any]]]:
    """The training service's ``ListModelVersions``: (version, manifest) of ``model``'s
    published versions (ingest has no grant on the model repository itself)."""
    try:
        listed = backends.training.ListModelVersions(
            training_pb2.ListModelVersionsRequest(model=model), timeout=30
        )
    except grpc.RpcError as exc:
        raise rpc_error("training", exc) from exc
    return [(int(v.ref.version), json.loads(v.manifest_json or "{}")) for v in listed.versions]


def serving_model(backends: Backends, model: str) -> common_pb2.ModelVersionRef:
    """What the inference service serves (``model``: the one asked about, "" any)."""
    try:
        status = backends.inference.GetModelStatus(
            inference_pb2.GetModelStatusRequest(model=model), timeout=30
        )
    except grpc.RpcError as exc:
        raise rpc_error("inference", exc) from exc
    serving: common_pb2.ModelVersionRef = status.serving
    return serving
