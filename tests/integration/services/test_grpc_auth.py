"""gRPC between the services is authenticated and least-privilege (issue 18, finding 7): the
four services as real processes on the real stack; a call without a token, with a wrong one,
or with another service's token to a method that service may not use is refused, and the
designed calls (and the health checks probes use) still answer."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from ctloop.rpc_auth import CALLER_HEADER, channel, method, read_tokens_file
from ctloop.settings import Settings
from tests.helpers.platform import run_platform

PORTS = {"INGEST": 29300, "INFERENCE": 29302, "TRAINING": 29304, "METRICS": 29306}
TARGET = {name.lower(): f"127.0.0.1:{port + 1}" for name, port in PORTS.items()}
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    extra = {"CTLOOP_TRAINING__ROUND_MIN_NEW": "1000"}  # no round unless asked for
    with run_platform(tmp_path_factory.mktemp("grpc-auth"), PORTS, extra) as running:
        yield running


@pytest.fixture(scope="module")
def tokens(platform: dict[str, Any]) -> dict[str, str]:
    return read_tokens_file(Path(platform["env"]["CTLOOP_RUN_DIR"]) / "grpc-tokens.json")


def call(service: str, rpc: str, metadata: list[tuple[str, str]] | None = None) -> grpc.StatusCode:
    """The status of one raw call (an empty request) to ``service``'s ``rpc``."""
    with grpc.insecure_channel(TARGET[service]) as ch:
        try:
            ch.unary_unary(rpc)(b"", timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def as_caller(caller: str, token: str) -> list[tuple[str, str]]:
    return [(CALLER_HEADER, caller), ("authorization", f"Bearer {token}")]


RPCS = {
    "ingest": method("Workflow", "ListTrainingVolumes"),
    "inference": method("Inference", "GetModelStatus"),
    "training": method("Training", "ListRounds"),
    "metrics": method("Metrics", "GetReport"),
}


def test_the_tokens_file_is_the_owners_alone(platform, tokens):
    path = Path(platform["env"]["CTLOOP_RUN_DIR"]) / "grpc-tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(tokens) == {"ingest", "training", "operator"}
    assert len(set(tokens.values())) == 3


@pytest.mark.parametrize("service", sorted(RPCS))
def test_a_call_without_a_token_or_with_a_wrong_one_is_unauthenticated(service, tokens):
    assert call(service, RPCS[service]) == grpc.StatusCode.UNAUTHENTICATED
    forged = as_caller("operator", "ctg_" + "x" * 43)
    assert call(service, RPCS[service], forged) == grpc.StatusCode.UNAUTHENTICATED
    # A real token under another caller's name is no proof either.
    swapped = as_caller("operator", tokens["ingest"])
    assert call(service, RPCS[service], swapped) == grpc.StatusCode.UNAUTHENTICATED
    nobody = as_caller("mallory", tokens["operator"])
    assert call(service, RPCS[service], nobody) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("caller", "service", "rpc"),
    [
        ("training", "inference", method("Inference", "Segment")),
        ("training", "training", method("Training", "StartRound")),
        ("ingest", "training", method("Training", "Rollback")),
        ("ingest", "metrics", method("Metrics", "GetReport")),
        ("ingest", "ingest", method("Workflow", "ListTrainingVolumes")),
        ("operator", "ingest", method("Workflow", "ListTrainingVolumes")),
    ],
)
def test_a_service_token_is_refused_outside_its_callers_grant(caller, service, rpc, tokens):
    assert call(service, rpc, as_caller(caller, tokens[caller])) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


@pytest.mark.parametrize(
    ("caller", "service"),
    [
        ("training", "ingest"),
        ("ingest", "inference"),
        ("ingest", "training"),
        ("operator", "inference"),
        ("operator", "training"),
        ("operator", "metrics"),
    ],
)
def test_the_designed_calls_are_answered(caller, service, tokens):
    metadata = as_caller(caller, tokens[caller])
    assert call(service, RPCS[service], metadata) in ANSWERS


@pytest.mark.parametrize("service", sorted(RPCS))
def test_health_stays_open_for_probes(service, platform):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(TARGET[service]) as ch:
        answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_ingest_reaches_training_with_its_own_token(platform):
    """MONAI Label's train status goes ingest -> training ListRounds: no round yet is a 404
    (refused by training it would be a 502)."""
    headers = {"Authorization": f"Bearer {platform['admin_token']}"}
    r = httpx.get(f"{platform['api']}/train/", headers=headers, timeout=60)
    assert r.status_code == 404 and r.json()["code"] == "no_rounds", r.text


def test_the_operator_channel_of_a_platform_carries_its_token(platform):
    from ctloop.v1 import training_pb2, training_pb2_grpc

    with platform["grpc_channel"](TARGET["training"]) as ch:
        rounds = training_pb2_grpc.TrainingStub(ch).ListRounds(training_pb2.ListRoundsRequest())
    assert list(rounds.rounds) == []


def test_a_server_given_digests_accepts_only_those_callers(platform, tokens, settings: Settings):
    """The chart's way: a server that holds only its callers' digests; here a Workflow server
    (ingest's) built from settings that name training alone, in this process."""
    from concurrent import futures

    from ctloop.rpc_auth import digest, server_interceptor
    from ctloop.settings import GrpcAuthSettings
    from ctloop.v1 import ingest_pb2, ingest_pb2_grpc

    given = settings.model_copy(
        update={"grpc": GrpcAuthSettings(callers={"training": digest(tokens["training"])})}
    )

    class Workflow(ingest_pb2_grpc.WorkflowServicer):
        def ListTrainingVolumes(self, request, context):
            return ingest_pb2.TrainingVolumeList()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[server_interceptor(given)]
    )
    ingest_pb2_grpc.add_WorkflowServicer_to_server(Workflow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rpc = method("Workflow", "ListTrainingVolumes")
        target = f"127.0.0.1:{port}"
        with channel(target, "training", tokens["training"]) as ch:
            ch.unary_unary(rpc)(b"", timeout=30)
        with (
            channel(target, "ingest", tokens["ingest"]) as ch,
            pytest.raises(grpc.RpcError) as refused,
        ):
            ch.unary_unary(rpc)(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    finally:
        server.stop(0)
