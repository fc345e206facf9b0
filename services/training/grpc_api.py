"""The training service's gRPC API (proto/ctloop/v1/training.proto)."""

from __future__ import annotations

import json
import threading

import grpc
from sqlalchemy import select

from ctloop.contracts.payloads import ModelRef, model_published
from ctloop.db import RoundStatus, TrainingRound, session_scope
from ctloop.outbox import stage_event
from ctloop.service import abort
from ctloop.v1 import common_pb2, training_pb2, training_pb2_grpc
from services.training.policy import NothingToTrain
from services.training.worker import SOURCE, RoundBusy, TrainingWorker


def round_message(r: TrainingRound, progress: tuple[int, int] = (0, 0)) -> training_pb2.Round:
    return training_pb2.Round(
        step=progress[0],
        steps=progress[1],
        round=r.id,
        model=r.model,
        status=r.status,
        version=r.version or 0,
        volumes=r.volumes.get("train", []),
        candidate_dice=r.metrics.get("candidate_dice") or 0.0,
        serving_dice=r.metrics.get("serving_dice") or 0.0,
        reason=r.reason,
        attempts=r.attempts,
    )


class TrainingService(training_pb2_grpc.TrainingServicer):
    def __init__(self, worker: TrainingWorker) -> None:
        self.worker = worker

    def StartRound(
        self, request: training_pb2.StartRoundRequest, context: grpc.ServicerContext
    ) -> training_pb2.Round:
        model = request.model or None
        if model and model not in (self.worker.igniter, self.worker.sustainer):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown model {model!r}")
        started: dict[str, TrainingRound] = {}
        errors: list[Exception] = []

        def run() -> None:
            try:
                started["round"] = self.worker.run_round(model)
            except Exception as exc:
                errors.append(exc)

        # The round runs in the background; answer once it is registered (or refused).
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=5.0)
        if errors:
            code = grpc.StatusCode.FAILED_PRECONDITION
            if isinstance(errors[0], RoundBusy | NothingToTrain):
                abort(context, code, str(errors[0]))
            abort(context, grpc.StatusCode.INTERNAL, repr(errors[0]))
        with session_scope(self.worker.db) as s:
            latest = s.scalars(select(TrainingRound).order_by(TrainingRound.id.desc())).first()
            if latest is None:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no round could start")
            return round_message(latest)

    def ListRounds(
        self, request: training_pb2.ListRoundsRequest, context: grpc.ServicerContext
    ) -> training_pb2.RoundList:
        with session_scope(self.worker.db) as s:
            rows = s.scalars(select(TrainingRound).order_by(TrainingRound.id))
            return training_pb2.RoundList(
                rounds=[
                    round_message(
                        r, self.worker.progress(r.id) if r.status == RoundStatus.RUNNING else (0, 0)
                    )
                    for r in rows
                ]
            )

    def ListModelVersions(
        self, request: training_pb2.ListModelVersionsRequest, context: grpc.ServicerContext
    ) -> training_pb2.ModelVersionList:
        repo = self.worker.repo
        return training_pb2.ModelVersionList(
            versions=[
                training_pb2.ModelVersion(
                    ref=common_pb2.ModelVersionRef(model=request.model, version=v),
                    manifest_json=json.dumps(repo.manifest(request.model, v)),
                )
                for v in repo.published_versions(request.model)
            ]
        )

    def Rollback(
        self, request: training_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelVersionRef:
        model, version = request.to.model, int(request.to.version)
        if version not in self.worker.repo.published_versions(model):
            abort(context, grpc.StatusCode.NOT_FOUND, f"{model} v{version} is not published")
        event = model_published(
            SOURCE,
            model=ModelRef(model=model, version=version),
            manifest=self.worker.repo.manifest_ref(model, version),
            rollback=True,
        )
        with session_scope(self.worker.db) as s:
            stage_event(s, event)
        self.worker._notify()
        return common_pb2.ModelVersionRef(model=model, version=version)
