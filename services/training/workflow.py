"""The training service's view of the workflow state, asked of ingest over gRPC."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ctloop.contracts.payloads import BlobRef
from ctloop.rpc_auth import service_channel
from ctloop.settings import Settings, get_settings
from ctloop.v1 import ingest_pb2, ingest_pb2_grpc


@dataclass(frozen=True)
class TrainingVolume:
    volume_id: str
    image: BlobRef
    label: BlobRef
    since: datetime
    updated: datetime
    review: dict[str, Any] = field(default_factory=dict)


class WorkflowClient:
    """Ingest's ``Workflow`` API, called with the training service's token (from ``settings``,
    default: the process's)."""

    def __init__(
        self, target: str, timeout_s: float = 30.0, settings: Settings | None = None
    ) -> None:
        self.channel = service_channel(settings or get_settings(), "training", target)
        self.stub = ingest_pb2_grpc.WorkflowStub(self.channel)
        self.timeout_s = timeout_s

    def training_volumes(self, dataset: str, wait: bool = True) -> list[TrainingVolume]:
        """The dataset's labelled volumes. ``wait``: while ingest restarts (a rolled or deleted
        pod, no replica ready yet) the call waits for it, up to its deadline, instead of
        failing at once with UNAVAILABLE and costing a round one of its attempts (make
        test-cluster saw a round fail twice so while every pod was deleted mid-round). The
        policy's tick asks without waiting: a tick that finds ingest down is simply skipped
        (waiting would hold the service's shutdown for the deadline)."""
        reply = self.stub.ListTrainingVolumes(
            ingest_pb2.ListTrainingVolumesRequest(dataset=dataset),
            timeout=self.timeout_s,
            wait_for_ready=wait,
        )
        return [
            TrainingVolume(
                volume_id=v.volume.volume_id,
                image=BlobRef(
                    bucket=v.image.bucket, key=v.image.key, version_id=v.image.version_id or None
                ),
                label=BlobRef(
                    bucket=v.label.bucket, key=v.label.key, version_id=v.label.version_id or None
                ),
                since=datetime.fromisoformat(v.since),
                updated=datetime.fromisoformat(v.updated),
                review=json.loads(v.review_json) if v.review_json else {},
            )
            for v in reply.volumes
        ]

    def close(self) -> None:
        self.channel.close()
