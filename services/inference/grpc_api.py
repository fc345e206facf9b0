"""The inference service's gRPC API (proto/ctloop/v1/inference.proto)."""

from __future__ import annotations

import grpc
from sqlalchemy import select

from ctloop.contracts.payloads import ModelRef
from ctloop.db import Prediction, Volume, session_scope
from ctloop.model_repository import ModelRepository
from ctloop.service import abort
from ctloop.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.worker import InferenceWorker


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, worker: InferenceWorker, repository: ModelRepository) -> None:
        self.worker = worker
        self.repository = repository

    def Segment(
        self, request: inference_pb2.SegmentRequest, context: grpc.ServicerContext
    ) -> inference_pb2.SegmentResponse:
        volume_id = request.volume.volume_id
        with session_scope(self.worker.db) as s:
            vol = s.get(Volume, volume_id)
            if vol is None:
                abort(context, grpc.StatusCode.NOT_FOUND, f"no volume {volume_id!r}")
            site = vol.site_id
        if request.model.model:
            model = ModelRef(model=request.model.model, version=request.model.version)
        else:
            serving = self.worker.serving()
            if serving is None:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no model is serving yet")
            model = serving
        result = self.worker.predict(volume_id, model)
        with session_scope(self.worker.db) as s:
            row = s.scalars(
                select(Prediction).where(
                    Prediction.volume_id == volume_id,
                    Prediction.model == model.model,
                    Prediction.version == model.version,
                )
            ).one()
            key, uncertainty, seconds = row.s3_key, row.uncertainty, row.seconds
        return inference_pb2.SegmentResponse(
            volume=common_pb2.VolumeRef(volume_id=volume_id, site_id=site),
            model=common_pb2.ModelVersionRef(model=model.model, version=model.version),
            mask=common_pb2.ObjectRef(
                bucket=self.worker.bucket,
                key=key,
                version_id=(result.mask.version_id or "") if result else "",
            ),
            uncertainty=uncertainty,
            seconds=seconds,
        )

    def GetModelStatus(
        self, request: inference_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ModelStatus:
        serving = self.worker.serving()
        name = request.model or (serving.model if serving else "")
        status = inference_pb2.ModelStatus(
            published_versions=self.repository.published_versions(name) if name else []
        )
        if serving is not None and serving.model == name:
            status.serving.CopyFrom(
                common_pb2.ModelVersionRef(model=serving.model, version=serving.version)
            )
        return status
