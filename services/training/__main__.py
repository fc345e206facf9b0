"""``python -m services.training``: rounds from events and on request, DDP under torchrun."""

from __future__ import annotations

from ctloop.bus import EventConsumer
from ctloop.contracts.topics import Topic
from ctloop.service import ServiceRuntime, database_check, start_service
from ctloop.v1 import training_pb2_grpc
from services.training.grpc_api import TrainingService
from services.training.worker import CONSUMER, TrainingWorker
from services.training.workflow import WorkflowClient


def main() -> None:
    settings, producer, relay = start_service(CONSUMER)
    svc = settings.services
    worker = TrainingWorker(settings, WorkflowClient(svc.grpc_target("ingest")), relay)

    runtime = ServiceRuntime("training", svc.host, svc.training.http_port, svc.training.grpc_port)
    runtime.health_app({"database": database_check(settings.database_url)})
    training_pb2_grpc.add_TrainingServicer_to_server(TrainingService(worker), runtime.grpc_server())
    topics = [Topic.VOLUME_INGESTED, Topic.ANNOTATION_SUBMITTED]
    runtime.add_consumer(
        EventConsumer(settings, CONSUMER, topics, worker.handle, producer), producer
    )
    runtime.add_worker("outbox", relay.run)
    runtime.add_worker("rounds", worker.run)
    runtime.serve(svc.shutdown_grace_s)


if __name__ == "__main__":
    main()
