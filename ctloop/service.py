"""What every ctloop service shares: health and metrics endpoints, the gRPC server with the
standard health service, background workers, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn

import grpc
import uvicorn
from fastapi import APIRouter, FastAPI, Response
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ctloop import grpc_tls
from ctloop.bus import EventConsumer, EventProducer
from ctloop.db import create_schema, ping
from ctloop.kafka_security import produced_topics
from ctloop.log import bind, configure_logging
from ctloop.outbox import OutboxRelay
from ctloop.rpc_auth import server_interceptor
from ctloop.settings import Settings, get_settings

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


def start_service(client_id: str) -> tuple[Settings, EventProducer, OutboxRelay]:
    """What a service that writes workflow state does first: its settings, JSON logs, the
    workflow schema migrated, its event producer and the outbox relay that publishes what it
    stages (the caller runs the relay as a worker)."""
    settings = get_settings()
    configure_logging(settings.log_level)
    create_schema(settings.database_url)
    producer = EventProducer(settings, client_id=client_id)
    relay = OutboxRelay(settings.database_url, producer, topics=produced_topics(settings))
    return settings, producer, relay


def database_check(url: str) -> Check:
    def check() -> tuple[bool, str]:
        ping(url)
        return True, "answers"

    return check


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End a gRPC call with ``code`` (``context.abort`` raises; this tells the type checker)."""
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def health_router(service: str, checks: dict[str, Check]) -> APIRouter:
    """``/healthz`` (the process answers), ``/readyz`` (its dependencies do), ``/metrics``."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"service": service, "status": "ok"}

    @router.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        results = {}
        for name, check in checks.items():
            try:
                ok, detail = check()
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            results[name] = {"ok": ok, "detail": detail}
        ready = all(r["ok"] for r in results.values())
        response.status_code = 200 if ready else 503
        return {"service": service, "ready": ready, "checks": results}

    @router.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


class ServiceRuntime:
    """Runs one service's HTTP app, gRPC server and workers until told to stop."""

    def __init__(self, name: str, host: str, http_port: int, grpc_port: int | None = None) -> None:
        self.name = name
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.stop = threading.Event()
        self.app: FastAPI | None = None
        self._grpc: grpc.Server | None = None
        self._grpc_tls: grpc_tls.TlsPair | None = None
        self._health = health.HealthServicer()
        self._workers: list[tuple[str, Callable[[threading.Event], None]]] = []
        self._closers: list[Callable[[], None]] = []

    def health_app(self, checks: dict[str, Check]) -> FastAPI:
        """An HTTP app with only the health and metrics endpoints (services without an API)."""
        self.app = FastAPI(title=f"ctloop {self.name}")
        self.app.include_router(health_router(self.name, checks))
        return self.app

    def add_consumer(self, consumer: EventConsumer, producer: EventProducer | None = None) -> None:
        """Run ``consumer`` as a worker; close it (and its dead-letter producer) at the end."""
        self.add_worker("consumer", consumer.run)
        self._closers.append(consumer.close)
        if producer is not None:
            self._closers.append(producer.close)

    def grpc_server(self, settings: Settings | None = None) -> grpc.Server:
        """The service's gRPC server: the standard health service (open to probes) and, for
        every other method, only callers that prove their service token and may call it
        (ctloop/rpc_auth.py)."""
        if self._grpc is None:
            settings = settings or get_settings()
            auth = server_interceptor(settings)
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[auth])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            # mutual TLS when grpc.tls_dir is set (ctloop/grpc_tls.py): this service's own pair
            self._grpc_tls = grpc_tls.load(settings, self.name)
        return self._grpc

    def add_worker(self, name: str, target: Callable[[threading.Event], None]) -> None:
        self._workers.append((name, target))

    def serve(self, grace_s: float = 20.0) -> None:
        with bind(service=self.name):
            try:
                self._serve(grace_s)
            finally:
                for close in self._closers:
                    close()

    def _serve(self, grace_s: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        threads = [
            threading.Thread(target=self._guard(name, fn), name=name, daemon=True)
            for name, fn in self._workers
        ]
        server = None
        if self.app is not None:
            server = uvicorn.Server(
                uvicorn.Config(
                    self.app,
                    host=self.host,
                    port=self.http_port,
                    log_config=None,
                    access_log=False,
                    # httptools parses request bodies in C: a 90 MB upload arrives in 0.05 s,
                    # where h11 (uvicorn's pure-Python fallback) takes 0.2 s.
                    http="httptools",
                )
            )
            threads.append(threading.Thread(target=server.run, name="http", daemon=True))
        if self._grpc is not None and self.grpc_port is not None:
            address = f"{self.host}:{self.grpc_port}"
            if self._grpc_tls is not None:
                self._grpc.add_secure_port(address, grpc_tls.server_credentials(self._grpc_tls))
            else:
                self._grpc.add_insecure_port(address)
            self._grpc.start()
            self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        for t in threads:
            t.start()
        log.info(
            "service started", extra={"http_port": self.http_port, "grpc_port": self.grpc_port}
        )
        self.stop.wait()
        log.info("stopping: finishing the work in hand")
        self._health.enter_graceful_shutdown()
        if server is not None:
            server.should_exit = True
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()
        for t in threads:
            t.join(timeout=grace_s)
        log.info("service stopped")

    def _guard(self, name: str, fn: Callable[[threading.Event], None]) -> Callable[[], None]:
        """A worker that dies takes the service down (a supervisor restarts it) rather than
        leaving it half-alive."""

        def run() -> None:
            try:
                fn(self.stop)
            except Exception:
                log.exception("worker crashed", extra={"worker": name})
                self.stop.set()

        return run
