"""``python -m ctloop.release_check`` (the chart's ``helm test`` hook) against real services:
every check passes when the platform is up, and a part that does not answer fails the run with
a line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ctloop.settings import REPO_ROOT
from tests.helpers.platform import run_platform

pytestmark = pytest.mark.integration

PORTS = {"INGEST": 28740, "INFERENCE": 28742, "TRAINING": 28744, "METRICS": 28746}


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctloop.release_check", "--attempts", "2", "--wait", "1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_release_check_passes_on_a_running_platform_and_names_what_does_not_answer(
    stack, tmp_path: Path
):
    with run_platform(tmp_path, PORTS) as platform:
        ok = _check(platform["env"])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        lines = ok.stdout.splitlines()
        for part in (
            "ingest http",
            "ingest grpc",
            "inference grpc",
            "training grpc",
            "metrics http",
            "triton",
            "kafka",
            "s3",
        ):
            assert any(line.startswith("ok") and f" {part} " in f"{line} " for line in lines), (
                part,
                ok.stdout,
            )
        assert lines[-1] == "all checks passed"

        # as the chart's helm test runs it: S3 as the metrics identity (the stack's gateway holds
        # each identity to its grants): its grants work and a read outside them is refused
        as_metrics = _check({**platform["env"], "CTLOOP_S3__IDENTITY": "metrics"})
        assert as_metrics.returncode == 0, as_metrics.stdout + as_metrics.stderr
        (s3,) = [line for line in as_metrics.stdout.splitlines() if " s3 " in f"{line} "]
        assert s3.startswith("ok") and "as metrics" in s3, s3
        assert "ctloop-models/models/ctloop-probe is refused" in s3, s3

        nobody = {**platform["env"], "CTLOOP_SERVICES__METRICS__HTTP_PORT": "28799"}
        failed = _check(nobody)
        assert failed.returncode == 1, failed.stdout
        bad = [line for line in failed.stdout.splitlines() if line.startswith("FAIL")]
        assert len(bad) == 1 and "metrics http" in bad[0] and "28799" in bad[0], failed.stdout
        assert failed.stdout.splitlines()[-1] == "1 checks failed"
