"""``python -m services.metrics``: per-round Dice and minutes from every topic; Prometheus and
gRPC. At start it restores its state from the newest snapshot in S3 and reads the topics on from
the offsets that snapshot covers (services/metrics/snapshot.py); without one, a fresh consumer
group reads them from the beginning."""

from __future__ import annotations

import hmac
import os
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import grpc
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import Response

from ctloop.bus import EventConsumer, EventProducer, cluster_id
from ctloop.contracts import keys
from ctloop.contracts.topics import Topic
from ctloop.log import configure_logging
from ctloop.paging import Page, one_page
from ctloop.retry import RetryPolicy
from ctloop.rpc_auth import accepted_digests, digest
from ctloop.service import ServiceRuntime
from ctloop.settings import Settings, get_settings
from ctloop.storage import ObjectStore
from ctloop.v1 import common_pb2, metrics_pb2, metrics_pb2_grpc
from services.metrics.report import (
    FILES,
    RunInfo,
    build_report,
    render_files,
    write_report,
)
from services.metrics.snapshot import SnapshotCheckpoint, SnapshotStore
from services.metrics.state import MetricsState


def _not_found(message: str) -> HTTPException:
    return HTTPException(404, detail={"code": "not_found", "message": message})


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


def restored_checkpoint(settings: Settings, state: MetricsState) -> SnapshotCheckpoint:
    """The state restored from its snapshot (if there is a usable one), and the checkpoint that
    starts the consumer where it left off. S3 or Kafka not answering is retried, then fatal:
    starting from nothing would later overwrite a good snapshot with less."""
    m = settings.metrics
    snapshots = SnapshotStore(ObjectStore(settings), settings.s3.bucket, m.snapshot_name)
    retry = RetryPolicy(attempts=5, max_delay_s=10.0)
    checkpoint = SnapshotCheckpoint(
        state,
        snapshots,
        retry.call(lambda: cluster_id(settings)),
        m.snapshot_every_events,
        m.snapshot_every_s,
    )
    retry.call(checkpoint.restore)
    return checkpoint


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    state = MetricsState(ObjectStore(settings), settings.s3.bucket)
    checkpoint = restored_checkpoint(settings, state)
    producer = EventProducer(settings, client_id="metrics")
    # A fresh group: where each partition starts is the snapshot's business, not the group's.
    group = f"metrics-{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
    topics = [t for t in Topic if t != Topic.DEAD_LETTER]
    ep = settings.services.metrics
    runtime = ServiceRuntime("metrics", settings.services.host, ep.http_port, ep.grpc_port)
    started = time.monotonic()

    def events() -> tuple[bool, str]:
        complete = "" if state.history()["complete"] else "; history incomplete"
        return True, f"{state.events_seen} events in {time.monotonic() - started:.0f}s{complete}"

    add_report_routes(runtime.health_app({"events": events}), settings, state)
    metrics_pb2_grpc.add_MetricsServicer_to_server(MetricsService(state), runtime.grpc_server())
    consumer = EventConsumer(settings, group, topics, state.handle, producer, checkpoint=checkpoint)
    runtime.add_consumer(consumer, producer)
    runtime.serve(settings.services.shutdown_grace_s)


def operator_only(settings: Settings) -> Callable[[str], None]:
    """A dependency: the request carries the operator's service token (``ctloop run``, an
    admin), checked against the digest this service holds for it (ctloop/rpc_auth.py), or
    is refused 401."""
    expected = accepted_digests(settings).get("operator", "")

    def check(authorization: Annotated[str, Header()] = "") -> None:
        scheme, _, token = authorization.partition(" ")
        valid = scheme.lower() == "bearer" and bool(token) and bool(expected)
        if not (valid and hmac.compare_digest(digest(token.strip()), expected)):
            raise HTTPException(
                401,
                detail={"code": "unauthenticated", "message": "send the operator's token"},
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def add_report_routes(app: FastAPI, settings: Settings, state: MetricsState) -> None:
    """``/v1/report`` (the state now) and ``/v1/runs`` (transfer-run reports, kept in S3)."""

    @app.get("/v1/report")
    def report() -> dict[str, object]:
        return {
            "rounds": state.report(),
            "evaluation": state.evaluation(),
            "public_test": state.evaluation("public-test"),
            "events_seen": state.events_seen,
            "history": state.history(),
        }

    _add_run_routes(app, settings, state)


def _add_run_routes(app: FastAPI, settings: Settings, state: MetricsState) -> None:
    """``/v1/runs``: transfer-run reports, written by the operator, kept in S3."""
    store, bucket = ObjectStore(settings), settings.s3.bucket

    def _run_id(run_id: str) -> str:
        if run_id == "latest":
            key = keys.report_latest()
            if not store.exists(bucket, key):
                raise _not_found("no run has a report yet")
            return store.get_bytes(bucket, key).decode()
        try:
            return keys.safe_id(run_id, "run id")
        except ValueError as exc:
            raise HTTPException(422, detail={"code": "bad_id", "message": str(exc)}) from exc

    @app.post(
        "/v1/runs/{run_id}/report",
        tags=["runs"],
        dependencies=[Depends(operator_only(settings))],
    )
    def write_run_report(run_id: str, info: RunInfo) -> dict[str, Any]:
        """Build a transfer run's report from the events seen so far and write it
        (``runs/<run-id>/`` and the object store); answers the report's JSON. Only the
        operator may (its service token, as on the gRPC API); reads are open."""
        rid = _run_id(run_id)
        built = build_report(rid, info, state)
        write_report(render_files(built), rid, settings.runs_dir, store, bucket)
        return built

    @app.get("/v1/runs", tags=["runs"])
    def list_runs(page: Page, request: Request, response: Response) -> list[str]:
        """Run ids in order (oldest first), a page at a time (``ctloop.paging``)."""
        runs = keys.report_runs(store.list_keys(bucket, keys.REPORTS_PREFIX))
        if (after := page.after_key(str)) is not None:
            runs = [r for r in runs if r > after[0]]
        return one_page(runs[: page.fetch], page, lambda r: [r], request, response)

    @app.get("/v1/runs/{run_id}/{name}", tags=["runs"])
    def get_run_file(run_id: str, name: str) -> Response:
        """One of a run's report files (``report.json``, ``report.md``, the PNG plots);
        ``latest`` names the newest run."""
        rid = _run_id(run_id)
        key = keys.report_file(rid, name)
        if name not in FILES or not store.exists(bucket, key):
            raise _not_found(f"run {rid} has no {name}")
        return Response(store.get_bytes(bucket, key), media_type=FILES[name])


if __name__ == "__main__":
    main()
