"""``python -m ctloop.release_check``: is every part of a release answering through its Service?

The Helm chart's ``helm test`` hook runs this in a pod with the services' own settings (the same
``CTLOOP_*`` environment), so it dials exactly the addresses the services dial: each ctloop
service's HTTP readiness, gRPC health and refusal of calls without a service token, Triton's
readiness, Kafka's topics and the buckets (as a service's S3 identity: its grants, and a
refusal outside them). It holds no service token.
One line per check; exit status 1 when any fails (helm test then reports the pod failed).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Literal

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctloop import grpc_tls
from ctloop.contracts.topics import Topic
from ctloop.rpc_auth import method
from ctloop.settings import Settings, get_settings

ServiceName = Literal["ingest", "inference", "training", "metrics"]
SERVICES: tuple[ServiceName, ...] = ("ingest", "inference", "training", "metrics")


def http_ready(settings: Settings, name: ServiceName) -> str:
    ep = getattr(settings.services, name)
    url = f"http://{ep.address or settings.services.host}:{ep.http_port}/readyz"
    try:
        r = httpx.get(url, timeout=10)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise RuntimeError(f"GET {url}: {exc}") from exc
    return f"GET {url} {r.status_code}"


# A read-only method of each service, called without a token: it must be refused.
ANONYMOUS_PROBE: dict[ServiceName, str] = {
    "ingest": method("Workflow", "ListTrainingVolumes"),
    "inference": method("Inference", "GetModelStatus"),
    "training": method("Training", "ListRounds"),
    "metrics": method("Metrics", "GetReport"),
}


def grpc_serving(settings: Settings, name: ServiceName) -> str:
    """The service's gRPC health says SERVING (open to anyone) and its API refuses a caller
    without a service token (UNAUTHENTICATED). With gRPC TLS on (``grpc.tls_dir``) this check
    dials with its own pair (``release-check``) and a plain-text dial must get nothing."""
    target = settings.services.grpc_target(name)
    pair = grpc_tls.load(settings, "release-check")
    if pair is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc_tls.channel_credentials(pair))
    with channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{target} health is {answer.status}")
        probe = ANONYMOUS_PROBE[name]
        try:
            channel.unary_unary(probe)(b"", timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        else:
            raise RuntimeError(f"{target} answered {probe} without a service token")
    if pair is None:
        return f"gRPC health {target} SERVING, anonymous calls refused"
    with grpc.insecure_channel(target) as plain:
        try:
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            pass
        else:
            raise RuntimeError(f"{target} answers plain text although gRPC TLS is on")
    return f"gRPC health {target} SERVING over mutual TLS, plain text and anonymous calls refused"


def triton_ready(settings: Settings) -> str:
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(settings.triton.grpc_url)
    try:
        if not client.is_server_ready():
            raise RuntimeError(f"Triton at {settings.triton.grpc_url} is not ready")
    finally:
        client.close()
    return f"Triton {settings.triton.grpc_url} ready"


def kafka_topics(settings: Settings) -> str:
    from kafka import KafkaConsumer

    from ctloop.kafka_security import client_config

    bootstrap = settings.kafka.bootstrap_servers
    consumer = KafkaConsumer(request_timeout_ms=15000, **client_config(settings))
    try:
        present = consumer.topics()
    finally:
        consumer.close()
    missing = [t.value for t in Topic if t.value not in present]
    if missing:
        raise RuntimeError(f"topics missing on {bootstrap}: {missing}")
    return f"Kafka {bootstrap}: {len(list(Topic))} topics"


def buckets(settings: Settings) -> str:
    """Root (the local stack): both buckets are listed. A service identity (the chart's pods;
    ``helm test`` runs as metrics): its grants work (its buckets exist, its policy is in place)
    and a read outside them is refused, which shows the store holds it to its grants."""
    from minio.error import S3Error

    from ctloop.s3_grants import outside_read
    from ctloop.storage import ObjectStore

    store = ObjectStore(settings)
    wanted = [settings.s3.bucket, settings.s3.model_bucket]
    where = f"S3 {settings.s3.endpoint}"
    if store.identity is None:
        present = store.list_buckets()
        missing = [b for b in wanted if b not in present]
        if missing:
            raise RuntimeError(f"buckets missing at {settings.s3.endpoint}: {missing}")
        return f"{where}: buckets {', '.join(wanted)}"
    store.check_grants()
    bucket, key = outside_read(settings, store.identity)
    try:
        store.get_optional(bucket, key)
    except S3Error as exc:
        if exc.code == "AccessDenied":
            return f"{where} as {store.identity}: its grants work, {bucket}/{key} is refused"
        raise
    raise RuntimeError(
        f"{where}: identity {store.identity} may read {bucket}/{key}, outside its grants: "
        "the object store does not hold it to them (were its policies provisioned?)"
    )


def reason(exc: Exception) -> str:
    """One line: a gRPC error's code and details, otherwise the exception."""
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"gRPC {exc.code().name}: {exc.details()}"
    if isinstance(exc, RuntimeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def checks(settings: Settings) -> list[tuple[str, Callable[[], str]]]:
    found: list[tuple[str, Callable[[], str]]] = []
    for name in SERVICES:
        found.append((f"{name} http", partial(http_ready, settings, name)))
        found.append((f"{name} grpc", partial(grpc_serving, settings, name)))
    found += [
        ("triton", lambda: triton_ready(settings)),
        ("kafka", lambda: kafka_topics(settings)),
        ("s3", lambda: buckets(settings)),
    ]
    return found


def run(settings: Settings, attempts: int, wait_s: float) -> int:
    """Each check, retried ``attempts`` times (a pod that just restarted may need a moment)."""
    failed = 0
    for label, check in checks(settings):
        for attempt in range(1, attempts + 1):
            try:
                print(f"ok    {label:16} {check()}", flush=True)
                break
            except Exception as exc:  # any failure of the dialled component is the answer
                if attempt == attempts:
                    print(f"FAIL  {label:16} {reason(exc)}", flush=True)
                    failed += 1
                else:
                    time.sleep(wait_s)
    print(f"{'all checks passed' if not failed else f'{failed} checks failed'}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctloop.release_check", description=__doc__)
    parser.add_argument("--attempts", type=int, default=6)
    parser.add_argument("--wait", type=float, default=5.0, help="seconds between attempts")
    args = parser.parse_args(argv)
    return run(get_settings(), args.attempts, args.wait)


if __name__ == "__main__":
    sys.exit(main())
