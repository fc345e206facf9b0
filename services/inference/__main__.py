"""``python -m services.inference``: pre-annotation from events, ``Segment`` over gRPC."""

from __future__ import annotations

import logging
import threading

from ctloop.bus import EventConsumer
from ctloop.contracts.topics import Topic
from ctloop.model_repository import ModelRepository
from ctloop.service import ServiceRuntime, start_service
from ctloop.triton_serving import TritonModels
from ctloop.v1 import inference_pb2_grpc
from services.inference.grpc_api import InferenceService
from services.inference.worker import CONSUMER, InferenceWorker

log = logging.getLogger("ctloop.inference")


def main() -> None:
    settings, producer, relay = start_service(CONSUMER)
    triton = TritonModels(settings)
    repository = ModelRepository(settings)
    worker = InferenceWorker(settings, triton, relay, repository)
    worker.ensure_loaded()

    ep = settings.services.inference
    runtime = ServiceRuntime("inference", settings.services.host, ep.http_port, ep.grpc_port)

    def triton_ready() -> tuple[bool, str]:
        return bool(triton.client.is_server_ready()), settings.triton.grpc_url

    runtime.health_app({"triton": triton_ready})
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceService(worker, repository), runtime.grpc_server()
    )
    topics = [Topic.VOLUME_INGESTED, Topic.MODEL_PUBLISHED]
    runtime.add_consumer(
        EventConsumer(settings, CONSUMER, topics, worker.handle, producer), producer
    )
    runtime.add_worker("outbox", relay.run)

    def keep_loaded(stop: threading.Event) -> None:
        """At start, and every ``triton.reconcile_interval_s``, load what serves on each Triton
        replica that lacks it (a restarted or new one: its address is looked up again each
        time) and, after a load, pre-annotate what waits: volumes that arrived while Triton was
        down went to the dead letters, and a re-prediction pass cut short by a crash is not
        redone by its (already claimed) event."""
        pending = True
        every = settings.triton.reconcile_interval_s
        while not stop.wait(0.5 if pending else every):
            try:
                if worker.ensure_loaded() or pending:
                    worker.repredict_waiting()
                pending = False
            except Exception as exc:  # Triton down: try again on the next tick
                log.debug("models not reloaded yet", extra={"error": repr(exc)})

    runtime.add_worker("models", keep_loaded)
    runtime.serve(settings.services.shutdown_grace_s)


if __name__ == "__main__":
    main()
