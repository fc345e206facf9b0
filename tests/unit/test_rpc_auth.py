"""The gRPC caller table and token checks (ctloop/rpc_auth.py): who may call what, how a server
decides, and the local tokens file."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from unittest import mock

import grpc
import pytest

from ctloop.rpc_auth import (
    CALLER_HEADER,
    CALLS,
    CallerAuthInterceptor,
    accepted_digests,
    callers_of,
    digest,
    ensure_tokens_file,
    method,
    own_token,
    served_by,
)
from ctloop.settings import Settings

TOKENS = {"ingest": "ctg_ingest-secret", "training": "ctg_training-secret"}


def headers(caller: str, token: str) -> dict[str, str]:
    return {CALLER_HEADER: caller, "authorization": f"Bearer {token}"}


@pytest.fixture
def server() -> CallerAuthInterceptor:
    return CallerAuthInterceptor({c: digest(t) for c, t in TOKENS.items()})


def test_each_server_authenticates_exactly_the_callers_the_table_grants_it():
    assert callers_of("ingest") == {"training"}
    assert callers_of("inference") == {"ingest", "operator"}
    assert callers_of("training") == {"ingest", "operator"}
    assert callers_of("metrics") == {"operator"}
    assert served_by(method("Training", "Rollback")) == "training"
    with pytest.raises(KeyError):
        method("Training", "DeleteEverything")


def test_no_service_may_roll_back_models_or_read_workflow_data_beyond_its_need():
    assert method("Training", "Rollback") not in CALLS["ingest"]
    assert method("Workflow", "ListTrainingVolumes") not in CALLS["operator"]
    assert CALLS["training"] == {method("Workflow", "ListTrainingVolumes")}


def test_the_grant_is_checked_after_the_token(server):
    rpc = method("Training", "StartRound")
    assert server.check(rpc, headers("ingest", TOKENS["ingest"])) == (grpc.StatusCode.OK, "ingest")
    code, detail = server.check(rpc, headers("training", TOKENS["training"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "training" in detail


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {CALLER_HEADER: "ingest"},
        headers("ingest", "ctg_wrong"),
        headers("ingest", TOKENS["training"]),  # another service's token under its name
        headers("operator", TOKENS["ingest"]),  # a caller this server holds no digest for
        {CALLER_HEADER: "ingest", "authorization": f"Basic {TOKENS['ingest']}"},
    ],
)
def test_missing_wrong_or_misattributed_tokens_are_unauthenticated(server, metadata):
    code, detail = server.check(method("Training", "ListRounds"), metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert not any(t in detail for t in TOKENS.values())


def test_the_tokens_file_is_made_once_for_the_owner_alone(tmp_path: Path):
    path = tmp_path / "run" / "grpc-tokens.json"
    first = ensure_tokens_file(path)
    assert set(first) == {"ingest", "training", "operator"}
    assert len(set(first.values())) == 3 and all(len(t) > 40 for t in first.values())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_tokens_file(path) == first  # kept: running services keep their tokens
    assert [p.name for p in path.parent.iterdir()] == ["grpc-tokens.json"]


def test_the_chart_gives_a_service_its_token_and_its_callers_digests(tmp_path: Path):
    env = {
        "CTLOOP_RUN_DIR": str(tmp_path),
        "CTLOOP_GRPC__TOKEN": "ctg_from-secret",
        "CTLOOP_GRPC__CALLERS__INGEST": digest("ctg_a").upper(),
        "CTLOOP_GRPC__CALLERS__OPERATOR": digest("ctg_b"),
    }
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert own_token(settings, "training") == "ctg_from-secret"
    assert accepted_digests(settings) == {"ingest": digest("ctg_a"), "operator": digest("ctg_b")}
    assert not settings.grpc_tokens_file.exists()  # nothing local is made when configured


def test_locally_a_service_reads_the_run_folders_tokens(tmp_path: Path):
    with mock.patch.dict(os.environ, {"CTLOOP_RUN_DIR": str(tmp_path)}, clear=True):
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert own_token(settings, "ingest") == ""  # no file yet: calls go out without a token
    accepted = accepted_digests(settings)  # a server makes the file if no launcher did
    tokens = ensure_tokens_file(settings.grpc_tokens_file)
    assert accepted == {c: digest(t) for c, t in tokens.items()}
    assert own_token(settings, "ingest") == tokens["ingest"]
