"""``python -m services.metrics``: per-round Dice and minutes from every topic; Prometheus and
gRPC. Its state is rebuilt from the topics on every start (a fresh consumer group reads them
from the beginning)."""

from __future__ import annotations

import os
import time
import uuid

import grpc

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts.topics import Topic
from ctloop.log import configure_logging
from ctloop.service import ServiceRuntime
from ctloop.settings import get_settings
from ctloop.storage import ObjectStore
from ctloop.v1 import common_pb2, metrics_pb2, metrics_pb2_grpc
from services.metrics.state import MetricsState


class MetricsService(metrics_pb2_grpc.MetricsServicer):
    def __init__(self, state: MetricsState) -> None:
        self.state = state

    def GetReport(
        self, request: metrics_pb2.GetReportRequest, context: grpc.ServicerContext
    ) -> metrics_pb2.Report:
        return report_message(self.state)


def report_message(state: MetricsState) -> metrics_pb2.Report:
    return metrics_pb2.Report(
        events_seen=state.events_seen,
        rounds=[
            metrics_pb2.RoundReport(
                model=common_pb2.ModelVersionRef(model=r["model"], version=r["version"]),
                round=r["round"],
                volumes_annotated=r["volumes_annotated"],
                minutes_per_ct=r["minutes_per_ct"],
                mean_dice=r["mean_dice"],
                organ_dice=[
                    metrics_pb2.OrganDice(organ=o, dice=d) for o, d in r["organ_dice"].items()
                ],
            )
            for r in state.report()
        ],
    )


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    state = MetricsState(ObjectStore(settings), settings.s3.bucket)
    producer = EventProducer(settings, client_id="metrics")
    # A fresh group reads every topic from its beginning: the state is rebuilt at each start.
    group = f"metrics-{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
    topics = [t for t in Topic if t != Topic.DEAD_LETTER]
    ep = settings.services.metrics
    runtime = ServiceRuntime("metrics", settings.services.host, ep.http_port, ep.grpc_port)
    started = time.monotonic()

    def events() -> tuple[bool, str]:
        return True, f"{state.events_seen} events in {time.monotonic() - started:.0f}s"

    app = runtime.health_app({"events": events})

    @app.get("/v1/report")
    def report() -> dict[str, object]:
        return {"rounds": state.report(), "events_seen": state.events_seen}

    metrics_pb2_grpc.add_MetricsServicer_to_server(MetricsService(state), runtime.grpc_server())
    runtime.add_consumer(EventConsumer(settings, group, topics, state.handle, producer), producer)
    runtime.serve(settings.services.shutdown_grace_s)


if __name__ == "__main__":
    main()
