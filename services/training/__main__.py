"""``python -m services.training``: rounds from events and on request, DDP under torchrun."""

from __future__ import annotations

from fastapi import FastAPI

from ctloop.bus import EventConsumer, EventProducer
from ctloop.contracts.topics import Topic
from ctloop.db import create_schema, ping
from ctloop.log import configure_logging
from ctloop.outbox import OutboxRelay
from ctloop.service import ServiceRuntime, health_router
from ctloop.settings import get_settings
from ctloop.v1 import training_pb2_grpc
from services.training.grpc_api import TrainingService
from services.training.worker import CONSUMER, TrainingWorker
from services.training.workflow import WorkflowClient


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    create_schema(settings.database_url)
    producer = EventProducer(settings, client_id=CONSUMER)
    relay = OutboxRelay(settings.database_url, producer)
    svc = settings.services
    workflow = WorkflowClient(f"{svc.host}:{svc.ingest.grpc_port}")
    worker = TrainingWorker(settings, workflow, relay)
    consumer = EventConsumer(
        settings,
        CONSUMER,
        [Topic.VOLUME_INGESTED, Topic.ANNOTATION_SUBMITTED],
        worker.handle,
        producer,
    )
    ep = settings.services.training
    runtime = ServiceRuntime("training", settings.services.host, ep.http_port, ep.grpc_port)
    app = FastAPI(title="ctloop training")

    def db_ready() -> tuple[bool, str]:
        ping(settings.database_url)
        return True, "answers"

    app.include_router(health_router("training", {"database": db_ready}))
    runtime.app = app
    training_pb2_grpc.add_TrainingServicer_to_server(TrainingService(worker), runtime.grpc_server())
    runtime.add_worker("consumer", consumer.run)
    runtime.add_worker("outbox", relay.run)
    runtime.add_worker("rounds", worker.run)
    try:
        runtime.serve(settings.services.shutdown_grace_s)
    finally:
        consumer.close()
        producer.close()


if __name__ == "__main__":
    main()
