"""Ingest's internal gRPC API: the workflow queries the training service needs."""

from __future__ import annotations

import json

import grpc
from sqlalchemy import func, select

from ctloop.db import (
    AnnotationRevision,
    ReviewStatus,
    Volume,
    VolumeStatus,
    in_the_loop,
    session_scope,
)
from ctloop.service import abort
from ctloop.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc


class WorkflowService(ingest_pb2_grpc.WorkflowServicer):
    def __init__(self, database_url: str, bucket: str, review_required: bool = False) -> None:
        self.db = database_url
        self.bucket = bucket
        # Which revisions are ground truth: approved ones only, or any not sent back.
        self.usable = (
            (ReviewStatus.APPROVED,)
            if review_required
            else (ReviewStatus.PENDING, ReviewStatus.APPROVED)
        )

    def ListTrainingVolumes(
        self, request: ingest_pb2.ListTrainingVolumesRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.TrainingVolumeList:
        if request.dataset == "public":
            return ingest_pb2.TrainingVolumeList(volumes=self._labelled())
        if request.dataset == "clinical":
            return ingest_pb2.TrainingVolumeList(volumes=self._annotated())
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, "dataset must be public or clinical")

    def _ref(self, key: str, version: str | None) -> common_pb2.ObjectRef:
        return common_pb2.ObjectRef(bucket=self.bucket, key=key, version_id=version or "")

    def _labelled(self) -> list[ingest_pb2.TrainingVolume]:
        with session_scope(self.db) as s:
            rows = s.scalars(
                select(Volume)
                .where(Volume.dataset == "public", Volume.label_s3_key.is_not(None), in_the_loop())
                .order_by(Volume.created_at, Volume.id)
            )
            return [
                ingest_pb2.TrainingVolume(
                    volume=common_pb2.VolumeRef(volume_id=v.id, site_id=v.site_id),
                    image=self._ref(v.s3_key, v.s3_version_id),
                    label=self._ref(v.label_s3_key or "", None),
                    since=v.created_at.isoformat(),
                    updated=v.created_at.isoformat(),
                )
                for v in rows
            ]

    def _annotated(self) -> list[ingest_pb2.TrainingVolume]:
        with session_scope(self.db) as s:
            spans = s.execute(
                select(
                    AnnotationRevision.volume_id,
                    func.min(AnnotationRevision.created_at),
                    func.max(AnnotationRevision.revision),
                )
                .where(AnnotationRevision.review_status.in_(self.usable))
                .group_by(AnnotationRevision.volume_id)
                .order_by(func.min(AnnotationRevision.created_at), AnnotationRevision.volume_id)
            ).all()
            out = []
            for volume_id, first, latest_rev in spans:
                v = s.get(Volume, volume_id)
                latest = s.scalars(
                    select(AnnotationRevision).where(
                        AnnotationRevision.volume_id == volume_id,
                        AnnotationRevision.revision == latest_rev,
                    )
                ).one()
                if v is None or v.dataset != "clinical" or v.status == VolumeStatus.WITHDRAWN:
                    continue
                review = {k: latest.detail.get(k) for k in ("organs", "reviewed_slices")}
                out.append(
                    ingest_pb2.TrainingVolume(
                        volume=common_pb2.VolumeRef(volume_id=v.id, site_id=v.site_id),
                        image=self._ref(v.s3_key, v.s3_version_id),
                        label=self._ref(latest.s3_key, latest.detail.get("s3_version_id")),
                        revision=latest.revision,
                        review_json=json.dumps({k: r for k, r in review.items() if r}),
                        since=first.isoformat(),
                        updated=latest.created_at.isoformat(),
                    )
                )
            return out
