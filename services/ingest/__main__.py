"""``python -m services.ingest``: the public REST API, and the relay of its events."""

from __future__ import annotations

from ctloop.auth import ensure_admin_token
from ctloop.bus import EventProducer
from ctloop.db import create_schema
from ctloop.log import configure_logging
from ctloop.outbox import OutboxRelay
from ctloop.service import ServiceRuntime
from ctloop.settings import get_settings
from ctloop.v1 import ingest_pb2_grpc
from services.ingest.app import create_app
from services.ingest.grpc_api import WorkflowService


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    create_schema(settings.database_url)
    svc = settings.services
    api = f"http://{svc.host}:{svc.ingest.http_port}"
    if ensure_admin_token(settings.database_url, settings.admin_token_file):
        print(f"ctloop API at {api}; the admin token is in {settings.admin_token_file}", flush=True)
    relay = OutboxRelay(settings.database_url, EventProducer(settings, client_id="ingest"))
    ep = settings.services.ingest
    runtime = ServiceRuntime("ingest", settings.services.host, ep.http_port, ep.grpc_port)
    runtime.app = create_app(settings, relay)
    ingest_pb2_grpc.add_WorkflowServicer_to_server(
        WorkflowService(
            settings.database_url, settings.s3.bucket, settings.services.review_required
        ),
        runtime.grpc_server(),
    )
    runtime.add_worker("outbox", relay.run)
    runtime.serve(settings.services.shutdown_grace_s)


if __name__ == "__main__":
    main()
