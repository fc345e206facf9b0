"""``python -m services.ingest``: the public REST API, and the relay of its events."""

from __future__ import annotations

from ctloop.auth import ensure_admin_token
from ctloop.service import ServiceRuntime, start_service
from ctloop.v1 import ingest_pb2_grpc
from services.ingest import label_sessions
from services.ingest.app import create_app
from services.ingest.grpc_api import WorkflowService


def main() -> None:
    settings, _, relay = start_service("ingest")
    svc = settings.services
    api = f"http://{svc.host}:{svc.ingest.http_port}"
    given = settings.auth.bootstrap_admin_token
    if ensure_admin_token(
        settings.database_url,
        settings.admin_token_file,
        given.get_secret_value() if given is not None else None,
    ):
        print(f"ctloop API at {api}; the admin token is in {settings.admin_token_file}", flush=True)
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
    runtime.add_worker("label-sessions", label_sessions.sweeper(settings))
    runtime.serve(settings.services.shutdown_grace_s)


if __name__ == "__main__":
    main()
