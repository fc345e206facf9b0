"""The inference service's gRPC API (proto/ctloop/v1/inference.proto)."""

from __future__ import annotations

import grpc
from minio.error import S3Error
from sqlalchemy import select

from ctloop.contracts import keys
from ctloop.contracts.payloads import BlobRef, ModelRef
from ctloop.db import Prediction, Volume, session_scope
from ctloop.model_repository import ModelRepository
from ctloop.service import abort
from ctloop.storage import MISSING
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
        model = self._model(request.model, context)
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

    def SegmentSession(
        self, request: inference_pb2.SegmentSessionRequest, context: grpc.ServicerContext
    ) -> inference_pb2.SegmentResponse:
        site, session_id = request.site_id, request.session_id
        try:
            expected = keys.session_image(site, session_id)
        except keys.InvalidKeyPart as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.image.key != expected or request.image.bucket != self.worker.bucket:
            # Only a session's own image: never a volume, a mask or another site's object.
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"the image must be {expected}")
        model = self._model(request.model, context)
        image = BlobRef(
            bucket=request.image.bucket,
            key=request.image.key,
            version_id=request.image.version_id or None,
        )
        try:
            result = self.worker.segment_session(site, session_id, image, model)
        except S3Error as exc:
            if exc.code not in MISSING:
                raise
            abort(context, grpc.StatusCode.NOT_FOUND, f"no image for session {session_id!r}")
        return inference_pb2.SegmentResponse(
            model=common_pb2.ModelVersionRef(model=model.model, version=model.version),
            mask=common_pb2.ObjectRef(
                bucket=result.mask.bucket,
                key=result.mask.key,
                version_id=result.mask.version_id or "",
            ),
            uncertainty=result.uncertainty,
            seconds=result.seconds,
        )

    def _model(self, ref: common_pb2.ModelVersionRef, context: grpc.ServicerContext) -> ModelRef:
        """The model version asked for, or the one serving (FAILED_PRECONDITION: none)."""
        if ref.model:
            return ModelRef(model=ref.model, version=ref.version)
        serving = self.worker.serving()
        if serving is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no model is serving yet")
        return serving

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
