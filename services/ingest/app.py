"""The ingest service's FastAPI app: error handlers, health, and the routers.

Every upload is validated in full before it is accepted; then the blob goes to S3 under an
immutable key, the workflow row and its event (outbox) commit in one SQL transaction, and the
outbox relay publishes the event (see :mod:`services.ingest.uploads`).
"""

from __future__ import annotations

from fastapi import FastAPI

from ctloop.log import keep_recent_lines
from ctloop.outbox import OutboxRelay
from ctloop.service import database_check, health_router
from ctloop.settings import Settings
from services.ingest.authfirst import AuthenticateFirst
from services.ingest.deps import IngestContext
from services.ingest.errors import install_error_handlers
from services.ingest.routers import (
    admin,
    monailabel,
    monailabel_datastore,
    monailabel_sessions,
    monailabel_tasks,
    pacs,
    tasks,
    volumes,
    workbench,
)
from services.ingest.routers import annotations as annotation_routes


def create_app(settings: Settings, relay: OutboxRelay | None = None) -> FastAPI:
    ctx = IngestContext(settings, relay)
    keep_recent_lines()  # MONAI Label's /logs/ answers from them
    app = FastAPI(
        title="ctloop ingest",
        version="1",
        description="Upload CT volumes and annotations; fetch pre-annotations.",
    )
    app.state.ingest = ctx
    install_error_handlers(app)
    # Credentials are checked from the headers before any route reads a body.
    app.add_middleware(AuthenticateFirst, ctx=ctx)

    def s3_ready() -> tuple[bool, str]:
        return ctx.store.client.bucket_exists(ctx.bucket), ctx.bucket

    checks = {"database": database_check(settings.database_url), "s3": s3_ready}
    app.include_router(health_router("ingest", checks))
    routers = (volumes, annotation_routes, admin, pacs, tasks, monailabel, monailabel_datastore)
    for module in (*routers, monailabel_sessions, monailabel_tasks, workbench):
        app.include_router(module.router)
    return app
