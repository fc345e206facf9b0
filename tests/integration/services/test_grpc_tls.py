"""Native mutual TLS on gRPC between the services (issue 18, finding 7; ctloop/grpc_tls.py):
the four services as real processes on the real stack with ``grpc.tls_dir`` set. Plain text,
TLS without a client certificate and certificates of another CA get nothing; the services call
each other over TLS; a token must come with its own service's certificate; the release check
(``helm test``) passes over TLS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctloop.grpc_tls import TlsPair, channel_credentials, write_pki
from ctloop.rpc_auth import channel, method, read_tokens_file
from ctloop.settings import REPO_ROOT
from tests.helpers.platform import run_platform

pytestmark = pytest.mark.integration

PORTS = {"INGEST": 29340, "INFERENCE": 29342, "TRAINING": 29344, "METRICS": 29346}
TARGET = {name.lower(): f"127.0.0.1:{port + 1}" for name, port in PORTS.items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pki(tmp_path_factory.mktemp("grpc-tls"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[dict[str, Any]]:
    extra = {"CTLOOP_GRPC__TLS_DIR": str(pki), "CTLOOP_TRAINING__ROUND_MIN_NEW": "1000"}
    with run_platform(tmp_path_factory.mktemp("grpc-tls-run"), PORTS, extra) as running:
        yield running


@pytest.fixture(scope="module")
def tokens(platform: dict[str, Any]) -> dict[str, str]:
    return read_tokens_file(Path(platform["env"]["CTLOOP_RUN_DIR"]) / "grpc-tokens.json")


def pair(folder: Path, name: str) -> TlsPair:
    return TlsPair(
        name,
        (folder / f"{name}.crt").read_bytes(),
        (folder / f"{name}.key").read_bytes(),
        (folder / "ca.crt").read_bytes(),
    )


def health(ch: grpc.Channel) -> Any:
    stub = health_pb2_grpc.HealthStub(ch)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=15).status


def refused(ch: grpc.Channel) -> grpc.StatusCode:
    with ch, pytest.raises(grpc.RpcError) as err:
        health(ch)
    return err.value.code()  # type: ignore[no-any-return, attr-defined]


@pytest.mark.parametrize("service", sorted(TARGET))
def test_only_a_client_certificate_of_the_release_ca_gets_a_connection(
    service, platform, pki, tmp_path
):
    target = TARGET[service]
    assert refused(grpc.insecure_channel(target)) == grpc.StatusCode.UNAVAILABLE
    server_only = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    assert refused(grpc.secure_channel(target, server_only)) == grpc.StatusCode.UNAVAILABLE
    # a pair from another CA, trusting ours: the server refuses the client certificate
    other = pair(write_pki(tmp_path / "other"), "operator")
    foreign = TlsPair("operator", other.cert, other.key, (pki / "ca.crt").read_bytes())
    assert refused(grpc.secure_channel(target, channel_credentials(foreign))) == (
        grpc.StatusCode.UNAVAILABLE
    )
    with grpc.secure_channel(target, channel_credentials(pair(pki, "release-check"))) as ch:
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING


def test_a_client_does_not_talk_to_a_server_of_another_ca(platform, pki, tmp_path):
    other = write_pki(tmp_path / "other")
    mine = pair(pki, "operator")
    trusting_other = TlsPair("operator", mine.cert, mine.key, (other / "ca.crt").read_bytes())
    ch = grpc.secure_channel(TARGET["training"], channel_credentials(trusting_other))
    assert refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_token_counts_only_with_its_own_services_certificate(platform, pki, tokens):
    from ctloop.v1 import training_pb2, training_pb2_grpc

    rpc = method("Training", "ListRounds")
    # ingest's certificate carrying the operator's token and name: refused
    stolen = channel(TARGET["training"], "operator", tokens["operator"], None, pair(pki, "ingest"))
    with stolen, pytest.raises(grpc.RpcError) as err:
        stolen.unary_unary(rpc)(b"", timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    # the operator's own pair and token: answered
    with platform["grpc_channel"](TARGET["training"]) as ch:
        rounds = training_pb2_grpc.TrainingStub(ch).ListRounds(training_pb2.ListRoundsRequest())
    assert list(rounds.rounds) == []


def test_the_services_call_each_other_over_tls(platform):
    """MONAI Label's train status: ingest -> training ListRounds over mutual TLS (no round yet:
    404; a failed call would be a 502)."""
    headers = {"Authorization": f"Bearer {platform['admin_token']}"}
    r = httpx.get(f"{platform['api']}/train/", headers=headers, timeout=60)
    assert r.status_code == 404 and r.json()["code"] == "no_rounds", r.text


def test_the_release_check_passes_over_tls_and_sees_plain_text_refused(platform):
    done = subprocess.run(
        [sys.executable, "-m", "ctloop.release_check", "--attempts", "2", "--wait", "1"],
        cwd=REPO_ROOT,
        env=platform["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    grpc_lines = [line for line in done.stdout.splitlines() if " grpc " in line]
    assert len(grpc_lines) == 4, done.stdout
    assert all("over mutual TLS, plain text and anonymous calls refused" in x for x in grpc_lines)
